"""Serialization of parametrized modules: NNX (orbax, msgpack, deepcopy, pickle) and torch_compat.

The NNX model carries every kind of state a parametrization adds: weight norm's
two originals, spectral norm's power-iteration vectors (``PowerIteration``), and
orthogonal's ``base`` (``OrthogonalBase``) and its ``nnx.Rngs`` (a typed PRNG key).
"""

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import torch.nn.utils.parametrize as TP
from flax import nnx, serialization

import jaxparam.parametrize as P
import torch_compat.parametrize as CP
from jaxparam.parametrizations import orthogonal, spectral_norm, weight_norm

X = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)


def make_model(seed: int) -> nnx.Sequential:
    model = nnx.Sequential(
        nnx.Linear(4, 4, rngs=nnx.Rngs(seed)),
        nnx.Linear(4, 3, rngs=nnx.Rngs(seed + 1)),
        nnx.Linear(3, 5, rngs=nnx.Rngs(seed + 2)),
    )
    weight_norm(model.layers[0])
    spectral_norm(model.layers[1], rngs=seed)
    orthogonal(model.layers[2], rngs=seed)
    return model


def _leaves(tree):
    return {
        path: np.asarray(jax.random.key_data(v.get_value()))
        if jnp.issubdtype(v.get_value().dtype, jax.dtypes.prng_key)
        else np.asarray(v.get_value())
        for path, v in nnx.to_flat_state(tree)
    }


def assert_same_state(a, b):
    la, lb = _leaves(nnx.state(a)), _leaves(nnx.state(b))
    assert la.keys() == lb.keys()
    for path in la:
        np.testing.assert_array_equal(la[path], lb[path], err_msg=str(path))


def assert_same_function(a, b):
    a.eval()
    b.eval()
    np.testing.assert_array_equal(np.asarray(a(X)), np.asarray(b(X)))


# -- NNX ------------------------------------------------------------------------------


def test_state_paths_follow_torch():
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(make_model(0)))}
    assert "layers/0/parametrizations/kernel/original0" in paths
    assert "layers/0/parametrizations/kernel/original1" in paths
    assert "layers/1/parametrizations/kernel/0/_u" in paths
    assert "layers/1/parametrizations/kernel/0/_v" in paths
    assert "layers/2/parametrizations/kernel/0/base" in paths
    assert "layers/2/parametrizations/kernel/original" in paths


def test_orbax_round_trip(tmp_path):
    source = make_model(0)
    source(X)  # a training-mode forward moves _u and _v away from their init
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "ckpt", nnx.state(source))
    checkpointer.wait_until_finished()

    target = make_model(5)
    abstract = nnx.state(nnx.eval_shape(lambda: make_model(5)))
    nnx.update(target, checkpointer.restore(tmp_path / "ckpt", abstract))
    assert_same_state(source, target)  # the PRNG key of orthogonal's rngs included
    assert_same_function(source, target)


def test_msgpack_round_trip():
    # flax.serialization works on pure dicts (``to_state_dict`` returns an
    # nnx.State unchanged, which msgpack cannot pack). msgpack cannot pack a typed
    # PRNG key either, so the RNG state (orthogonal's rngs, as any nnx.Rngs in a
    # model) is left out: it only draws the completion of non-square matrices.
    source = make_model(0)
    source(X)
    state = nnx.state(source, nnx.Not(nnx.RngState))
    data = serialization.msgpack_serialize(serialization.to_state_dict(nnx.to_pure_dict(state)))

    target = make_model(5)
    target_state = nnx.state(target, nnx.Not(nnx.RngState))
    restored = serialization.from_state_dict(
        nnx.to_pure_dict(target_state), serialization.msgpack_restore(data)
    )
    nnx.replace_by_pure_dict(target_state, restored)
    nnx.update(target, target_state)
    assert_same_function(source, target)
    assert_same_state(
        nnx.state(source, nnx.Not(nnx.RngState)), nnx.state(target, nnx.Not(nnx.RngState))
    )


def test_deepcopy_is_independent():
    source = make_model(0)
    clone = copy.deepcopy(source)
    assert type(clone.layers[0]) is type(source.layers[0])
    assert P.type_before_parametrizations(clone.layers[0]) is nnx.Linear
    assert_same_state(source, clone)
    assert_same_function(source, clone)
    clone.layers[0].kernel = jnp.ones((4, 4))
    assert not jnp.array_equal(source.layers[0].kernel[...], clone.layers[0].kernel[...])
    assert (
        clone.layers[2].parametrizations.kernel.original
        is not source.layers[2].parametrizations.kernel.original
    )


def test_pickle_split_in_process():
    source = make_model(0)
    graphdef, state = pickle.loads(pickle.dumps(nnx.split(source)))
    restored = nnx.merge(graphdef, state)
    assert type(restored.layers[1]).__name__ == "ParametrizedLinear"
    assert_same_state(source, restored)
    assert_same_function(source, restored)
    restored.layers[0].kernel = jnp.eye(4)  # right_inverse still works
    np.testing.assert_allclose(restored.layers[0].kernel[...], np.eye(4), atol=1e-6)


def test_pickle_split_in_fresh_process(tmp_path):
    # The injected classes are found by name in a process that never built them.
    source = make_model(0)
    source.eval()
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(nnx.split(source)))
    np.save(tmp_path / "out.npy", np.asarray(source(X)))
    script = textwrap.dedent(
        f"""
        import pickle, numpy as np, jax.numpy as jnp
        from flax import nnx
        graphdef, state = pickle.loads(open({str(tmp_path / "model.pkl")!r}, "rb").read())
        model = nnx.merge(graphdef, state)
        model.eval()
        x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
        np.testing.assert_array_equal(np.asarray(model(x)), np.load({str(tmp_path / "out.npy")!r}))
        print(type(model.layers[2]).__name__)
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ParametrizedLinear"


def test_pickle_refuses_lambda_links_clearly():
    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    P.register_parametrization(layer, "kernel", lambda x: 2 * x)
    with pytest.raises((pickle.PicklingError, AttributeError), match="lambda"):
        pickle.dumps(nnx.split(layer))


# -- torch_compat -------------------------------------------------------------------------


def _symmetric_jax(x):
    return jnp.triu(x) + jnp.triu(x, 1).T


class SymmetricTorch(torch.nn.Module):
    def forward(self, x):
        return x.triu() + x.triu(1).T


class Scale(nnx.Module):
    def __init__(self):
        self.scale = nnx.Param(jnp.asarray(2.0))

    def __call__(self, x):
        return self.scale[...] * x


_PICKLE_MESSAGE = (
    "Serialization of parametrized modules is only supported through state_dict(). See:\n"
    "https://pytorch.org/tutorials/beginner/saving_loading_models.html"
    "#saving-loading-a-general-checkpoint-for-inference-and-or-resuming-training"
)


def _compat_model(seed: int):
    torch.manual_seed(seed)
    m = torch.nn.Linear(3, 3)
    CP.register_parametrization(m, "weight", _symmetric_jax)
    CP.register_parametrization(m, "weight", Scale())
    return m


def test_torch_compat_state_dict_round_trip():
    source = _compat_model(0)
    target = _compat_model(1)
    assert list(source.state_dict()) == list(target.state_dict())
    assert "parametrizations.weight.original" in source.state_dict()
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight, source.weight)


def test_torch_compat_loads_torch_state_dict():
    torch.manual_seed(0)
    reference = TP.register_parametrization(torch.nn.Linear(3, 3), "weight", SymmetricTorch())
    compat = CP.register_parametrization(torch.nn.Linear(3, 3), "weight", _symmetric_jax)
    assert list(compat.state_dict()) == list(reference.state_dict())
    compat.load_state_dict(reference.state_dict())
    torch.testing.assert_close(compat.weight, reference.weight, rtol=0, atol=0)


def test_torch_compat_deepcopy():
    source = _compat_model(0)
    clone = copy.deepcopy(source)
    assert type(clone).__name__ == "ParametrizedLinear"
    assert torch.equal(clone.weight, source.weight)
    assert clone.parametrizations.weight.original is not source.parametrizations.weight.original
    with torch.no_grad():
        clone.parametrizations.weight.original.add_(1.0)
    assert not torch.equal(clone.weight, source.weight)


@pytest.mark.parametrize("kind", ["torch", "torch_compat"])
def test_pickle_refused_with_torchs_message(kind):
    if kind == "torch":
        m = TP.register_parametrization(torch.nn.Linear(3, 3), "weight", SymmetricTorch())
    else:
        m = _compat_model(0)
    with pytest.raises(RuntimeError) as info:
        pickle.dumps(m)
    assert str(info.value) == _PICKLE_MESSAGE
