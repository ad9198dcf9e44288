"""``jaxparam.linen`` against torch's parametrize, the NNX built-ins and flax's tooling.

Differential tests run the same scenario through real torch (a module holding a
parameter with the same numbers, or a ``Linear`` whose weight is the Dense kernel
transposed) and through the linen functions, and compare originals, values,
error messages and training trajectories.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx, serialization
from torch.nn.utils import parametrizations as TP
from torch.nn.utils import parametrize as TPZ

import jaxparam.linen as PL
import jaxparam.parametrizations as NP
from jaxparam.parametrizations import WeightNorm

KERNEL = ("params", "Dense_0", "kernel")


class MLP(nn.Module):
    hidden: int = 5
    out: int = 2

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden)(x))  # Dense_0
        return nn.Dense(self.out)(h)  # Dense_1


def init_mlp(din=4, hidden=5, out=2, seed=0):
    model = MLP(hidden, out)
    return model, model.init(jax.random.key(seed), jnp.ones((1, din)))


def torch_mlp(variables):
    """A torch MLP holding the linen MLP's numbers (weight = kernel.T)."""
    p = variables["params"]
    layers = []
    for name in ("Dense_0", "Dense_1"):
        k, b = np.asarray(p[name]["kernel"]), np.asarray(p[name]["bias"])
        lin = torch.nn.Linear(*k.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(k.T.copy()))
            lin.bias.copy_(torch.from_numpy(b.copy()))
        layers.append(lin)
    return torch.nn.Sequential(layers[0], torch.nn.Tanh(), layers[1])


def torch_holder(array):
    """A torch module with one parameter ``kernel`` holding ``array`` (same layout)."""
    m = torch.nn.Module()
    m.register_parameter("kernel", torch.nn.Parameter(torch.tensor(np.asarray(array))))
    return m


def np_(x):
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return np.asarray(x)


def snapshot(tree):
    """Structure, leaf identities and values, to prove a tree was not mutated."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [id(x) for x in leaves], [np.array(x) for x in leaves]


def assert_same(tree, snap):
    treedef, ids, values = snap
    leaves, new_def = jax.tree.flatten(tree)
    assert new_def == treedef
    assert [id(x) for x in leaves] == ids
    for a, b in zip(leaves, values, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


# -- parametrizations written for both frameworks --------------------------------


class TSymmetric(torch.nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).transpose(-1, -2)

    def right_inverse(self, A):
        return A.triu()


def j_symmetric(X):
    return jnp.triu(X) + jnp.swapaxes(jnp.triu(X, 1), -1, -2)


j_symmetric.right_inverse = jnp.triu


class TSplit(torch.nn.Module):
    """Two originals: right_inverse(W) = (W / 4, 3 W / 4), forward sums them."""

    def forward(self, a, b):
        return a + b

    def right_inverse(self, W):
        return W / 4, 3 * W / 4


class JSplit(nnx.Module):
    def __call__(self, a, b):
        return a + b

    def right_inverse(self, W):
        return W / 4, 3 * W / 4


class Scale(nnx.Module):
    """A link with a trainable nnx.Param of its own."""

    def __init__(self, n):
        self.scale = nnx.Param(jnp.full((n,), 2.0))

    def __call__(self, X):
        return X * self.scale[...]


# -- registration, layout, right_inverse -------------------------------------------


def test_right_inverse_and_layout_match_torch():
    model, v = init_mlp(4, 4)
    k = v["params"]["Dense_0"]["kernel"]
    t = torch_holder(k)
    TPZ.register_parametrization(t, "kernel", TSymmetric())
    TPZ.register_parametrization(t, "kernel", TSymmetric())
    v1, spec = PL.register_parametrization(v, KERNEL, j_symmetric)
    v1, spec = PL.register_parametrization(v1, KERNEL, j_symmetric, spec=spec)
    entry = v1["params"]["Dense_0"]["parametrizations"]["kernel"]
    assert sorted(entry) == ["original"]
    assert "kernel" not in v1["params"]["Dense_0"]
    np.testing.assert_allclose(
        np_(entry["original"]), np_(t.parametrizations.kernel.original), atol=1e-6
    )
    np.testing.assert_allclose(
        np_(PL.get_parametrized(v1, KERNEL, spec=spec)), np_(t.kernel), atol=1e-6
    )
    # the layout mirrors torch's state_dict keys
    ours = ["/".join(k.key for k in p) for p, _ in jax.tree.leaves_with_path(v1["params"])]
    assert "Dense_0/parametrizations/kernel/original" in ours
    assert "parametrizations.kernel.original" in t.state_dict()


def test_several_originals_match_torch_and_model_output_is_unchanged():
    model, v = init_mlp()
    x = jax.random.normal(jax.random.key(1), (3, 4))
    before = model.apply(v, x)
    t = torch_holder(v["params"]["Dense_0"]["kernel"])
    TPZ.register_parametrization(t, "kernel", TSplit())
    v1, spec = PL.register_parametrization(v, "params/Dense_0/kernel", JSplit())
    entry = v1["params"]["Dense_0"]["parametrizations"]["kernel"]
    for i in range(2):
        np.testing.assert_allclose(
            np_(entry[f"original{i}"]),
            np_(getattr(t.parametrizations.kernel, f"original{i}")),
            atol=1e-6,
        )
    np.testing.assert_allclose(PL.apply(model, v1, x, spec=spec), before, atol=1e-6)


def test_link_params_go_to_params_and_get_gradients():
    model, v = init_mlp()
    v1, spec = PL.register_parametrization(v, KERNEL, Scale(5))
    assert v1["params"]["Dense_0"]["parametrizations"]["kernel"]["0"]["scale"].shape == (5,)
    x = jnp.ones((2, 4))
    grads = jax.grad(lambda p: PL.apply(model, {"params": p}, x, spec=spec).sum())(v1["params"])
    assert jax.tree.structure(grads) == jax.tree.structure(v1["params"])
    assert np.any(np_(grads["Dense_0"]["parametrizations"]["kernel"]["0"]["scale"]) != 0)


# -- torch's error messages, and atomicity -------------------------------------------


def _returns_none(X):
    return None


def _to_f16(X):
    return X.astype(jnp.float16) if isinstance(X, jax.Array) else X.to(torch.float16)


def _first_row(X):
    return X[:1]


class _BadInverse:
    """right_inverse returns a transposed shape (only wrong when not square)."""

    def __init__(self, transpose):
        self.transpose = transpose

    def __call__(self, X):
        return X

    def right_inverse(self, X):
        return self.transpose(X)


class _InverseNotArray:
    def __call__(self, X):
        return X

    def right_inverse(self, X):
        return 3


# (name, torch link, jax link, registered on a fresh variable or appended)
ERROR_CASES = [
    ("returns_none", _returns_none, _returns_none, False),
    ("dtype", _to_f16, _to_f16, False),
    ("shape", _first_row, _first_row, False),
    ("returns_none_append", _returns_none, _returns_none, True),
    ("dtype_append", _to_f16, _to_f16, True),
    ("shape_append", _first_row, _first_row, True),
    ("inverse_not_array", _InverseNotArray(), _InverseNotArray(), False),
    ("inverse_not_array_append", _InverseNotArray(), _InverseNotArray(), True),
    ("inverse_shape_append", _BadInverse(lambda X: X.T), _BadInverse(lambda X: X.T), True),
]


def _torch_link(fn):
    if isinstance(fn, torch.nn.Module):
        return fn

    class Wrap(torch.nn.Module):
        def forward(self, X):
            return fn(X)

    if hasattr(fn, "right_inverse"):
        Wrap.right_inverse = lambda self, X: fn.right_inverse(X)
    return Wrap()


@pytest.mark.parametrize(("name", "tlink", "jlink", "append"), ERROR_CASES)
def test_errors_match_torch_and_change_nothing(name, tlink, jlink, append):
    _, v = init_mlp()
    k = v["params"]["Dense_0"]["kernel"]
    t = torch_holder(k)
    spec = None
    if append:
        TPZ.register_parametrization(t, "kernel", _torch_link(lambda X: 2 * X))
        v, spec = PL.register_parametrization(v, KERNEL, lambda X: 2 * X)
    with pytest.raises(Exception) as torch_err:
        TPZ.register_parametrization(t, "kernel", _torch_link(tlink))
    snap, spec_before = snapshot(v), spec
    with pytest.raises(type(torch_err.value)) as ours:
        PL.register_parametrization(v, KERNEL, jlink, spec=spec)
    # torch's first line, up to the diagnostics that name torch types
    torch_head = str(torch_err.value).splitlines()[0].split("Got")[0]
    assert len(torch_head) > 30
    assert str(ours.value).startswith(torch_head), (str(ours.value), str(torch_err.value))
    assert_same(v, snap)
    assert spec is spec_before


def test_missing_variable_matches_torch_prefix():
    _, v = init_mlp()
    with pytest.raises(ValueError) as torch_err:
        TPZ.register_parametrization(torch.nn.Linear(2, 2), "nope", _torch_link(lambda X: X))
    with pytest.raises(ValueError) as ours:
        PL.register_parametrization(v, "params/Dense_0/nope", lambda X: X)
    assert str(ours.value).startswith(str(torch_err.value).split("'")[0])
    with pytest.raises(ValueError, match="does not have a parameter, a buffer"):
        PL.register_parametrization(v, "params/Dense_0", lambda X: X)  # a subtree


def test_assignment_errors_and_removal_errors_match_torch():
    _, v = init_mlp()
    k = v["params"]["Dense_0"]["kernel"]
    t = torch_holder(k)
    TPZ.register_parametrization(t, "kernel", _torch_link(lambda X: 2 * X))
    v1, spec = PL.register_parametrization(v, KERNEL, lambda X: 2 * X)
    with pytest.raises(RuntimeError) as torch_err:
        t.kernel = torch.zeros(k.shape)
    snap = snapshot(v1)
    with pytest.raises(RuntimeError) as ours:
        PL.assign(v1, KERNEL, jnp.zeros(k.shape), spec=spec)
    assert str(ours.value).startswith(str(torch_err.value).split(" ")[0])
    assert "does not implement right_inverse" in str(ours.value)
    assert_same(v1, snap)

    t2 = torch_holder(k)
    TPZ.register_parametrization(t2, "kernel", TSplit())
    v2, spec2 = PL.register_parametrization(v, KERNEL, JSplit())
    with pytest.raises(ValueError) as torch_err:
        TPZ.remove_parametrizations(t2, "kernel", leave_parametrized=False)
    snap = snapshot(v2)
    with pytest.raises(ValueError) as ours:
        PL.remove_parametrizations(v2, KERNEL, leave_parametrized=False, spec=spec2)
    assert str(ours.value).startswith(str(torch_err.value))
    assert_same(v2, snap)
    with pytest.raises(ValueError) as torch_err:
        TPZ.remove_parametrizations(t2, "bias")
    with pytest.raises(ValueError) as ours:
        PL.remove_parametrizations(v2, "params/Dense_0/bias", spec=spec2)
    assert str(ours.value).startswith(str(torch_err.value).split(" ")[0] + " ")
    assert "does not have a parametrization on bias" in str(ours.value)


def test_successful_operations_never_mutate_their_inputs():
    model, v = init_mlp()
    snap = snapshot(v)
    v1, spec = PL.spectral_norm(v, KERNEL, rngs=0)
    assert_same(v, snap)
    snap1 = snapshot(v1)
    v2, spec2 = PL.register_parametrization(v1, KERNEL, lambda X: -X, spec=spec)
    PL.apply(model, v2, jnp.ones((1, 4)), spec=spec2, mutable=["batch_stats"])
    PL.materialize(v2, spec=spec2)
    PL.assign(v1, KERNEL, jnp.ones((4, 5)), spec=spec)
    PL.remove_parametrizations(v1, KERNEL, spec=spec)
    assert_same(v1, snap1)
    assert len(spec) == 1 and len(spec2.chains[0].links) == 2


# -- assignment and removal ---------------------------------------------------------


def test_assignment_matches_torch():
    _, v = init_mlp(4, 4)
    k = v["params"]["Dense_0"]["kernel"]
    t = torch_holder(k)
    TPZ.register_parametrization(t, "kernel", TSplit())
    TPZ.register_parametrization(t, "kernel", TSymmetric())
    v1, spec = PL.register_parametrization(v, KERNEL, JSplit())
    v1, spec = PL.register_parametrization(v1, KERNEL, j_symmetric, spec=spec)
    a = np.random.randn(4, 4).astype(np.float32)
    a = a + a.T
    t.kernel = torch.from_numpy(a)
    v2 = PL.assign(v1, KERNEL, jnp.asarray(a), spec=spec)
    entry = v2["params"]["Dense_0"]["parametrizations"]["kernel"]
    for i in range(2):
        np.testing.assert_allclose(
            np_(entry[f"original{i}"]),
            np_(getattr(t.parametrizations.kernel, f"original{i}")),
            atol=1e-6,
        )
    np.testing.assert_allclose(np_(PL.get_parametrized(v2, KERNEL, spec=spec)), a, atol=1e-6)


@pytest.mark.parametrize("leave_parametrized", [True, False])
def test_removal_matches_torch_and_round_trips(leave_parametrized):
    model, v = init_mlp()
    k = v["params"]["Dense_0"]["kernel"]
    t = torch_holder(k)
    TPZ.register_parametrization(t, "kernel", _torch_link(lambda X: 2 * X))
    v1, spec = PL.register_parametrization(v, KERNEL, lambda X: 2 * X)
    v1, spec = PL.spectral_norm(v1, "params/Dense_1/kernel", spec=spec)
    TPZ.remove_parametrizations(t, "kernel", leave_parametrized=leave_parametrized)
    v2, spec2 = PL.remove_parametrizations(
        v1, KERNEL, leave_parametrized=leave_parametrized, spec=spec
    )
    np.testing.assert_allclose(np_(v2["params"]["Dense_0"]["kernel"]), np_(t.kernel), atol=1e-6)
    assert "parametrizations" not in v2["params"]["Dense_0"]
    assert PL.is_parametrized(spec2) and not PL.is_parametrized(spec2, KERNEL)
    v3, spec3 = PL.remove_parametrizations(
        v2, "params/Dense_1/kernel", leave_parametrized=leave_parametrized, spec=spec2
    )
    assert not PL.is_parametrized(spec3)
    assert jax.tree.structure(v3) == jax.tree.structure(v)  # batch_stats pruned too
    if not leave_parametrized:
        jax.tree.map(np.testing.assert_array_equal, v3["params"]["Dense_1"], v["params"]["Dense_1"])


# -- built-ins against torch and the NNX built-ins -----------------------------------


@pytest.mark.parametrize("dim", ["default", None, 0])
def test_weight_norm_matches_torch_and_nnx(dim):
    _, v = init_mlp()
    k = v["params"]["Dense_0"]["kernel"]
    t = torch.nn.Linear(4, 5)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(np.asarray(k).T.copy()))
    # flax axis d of (in, out) is torch's 1 - d on (out, in)
    TP.weight_norm(t, "weight", dim={"default": 0, None: None, 0: 1}[dim])
    kwargs = {} if dim == "default" else {"dim": dim}
    v1, spec = PL.weight_norm(v, KERNEL, **kwargs)
    entry = v1["params"]["Dense_0"]["parametrizations"]["kernel"]
    g_t = np_(t.parametrizations.weight.original0)
    np.testing.assert_allclose(np.squeeze(np_(entry["original0"])), np.squeeze(g_t), atol=1e-6)
    np.testing.assert_allclose(
        np_(entry["original1"]), np_(t.parametrizations.weight.original1).T, atol=1e-6
    )
    np.testing.assert_allclose(
        np_(PL.get_parametrized(v1, KERNEL, spec=spec)), np_(t.weight).T, atol=1e-6
    )
    layer = nnx.Linear(4, 5, rngs=nnx.Rngs(0))
    layer.kernel[...] = k
    NP.weight_norm(layer, **kwargs)
    np.testing.assert_array_equal(
        np_(layer.parametrizations.kernel.original0[...]), np_(entry["original0"])
    )


def test_weight_norm_missing_variable_has_torchs_message():
    # torch's weight_norm goes straight to register_parametrization: its message
    _, v = init_mlp()
    with pytest.raises(ValueError) as torch_err:
        TP.weight_norm(torch.nn.Linear(2, 2), "nope")
    words = str(torch_err.value).split("' ", 1)[1]
    with pytest.raises(ValueError) as ours:
        PL.weight_norm(v, "params/Dense_0/nope")
    assert str(ours.value).startswith(f"Module 'params/Dense_0' {words}")
    v1, spec = PL.weight_norm(v, KERNEL)
    with pytest.raises(ValueError, match="to append to a chain, pass its spec"):
        PL.weight_norm(v1, KERNEL)  # parametrized, without the spec


def test_weight_norm_default_dim_for_embedding_is_zero():
    model = nn.Embed(6, 4)
    v = model.init(jax.random.key(0), jnp.arange(3))
    v1, _ = PL.weight_norm(v, "params/embedding")
    assert v1["params"]["parametrizations"]["embedding"]["original0"].shape == (6, 1)
    with pytest.raises(IndexError, match="Dimension out of range"):
        PL.weight_norm(v, "params/embedding", dim=2)


def copy_vectors_from_torch(v, t_linear, path=KERNEL):
    sn = t_linear.parametrizations.weight[0]
    p = ("batch_stats", *path[1:-1], "parametrizations", path[-1], "0")
    new = jax.tree.map(lambda x: x, v)
    node = functools.reduce(lambda d, k: d[k], p, new)
    node["_u"] = jnp.asarray(np_(sn._u))
    node["_v"] = jnp.asarray(np_(sn._v))
    return new


@pytest.mark.parametrize("jit", [True, False])
def test_spectral_norm_matches_torch_in_training_and_eval(jit):
    model = nn.Dense(3)
    v = model.init(jax.random.key(0), jnp.ones((1, 5)))
    t = torch.nn.Linear(5, 3)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(np.asarray(v["params"]["kernel"]).T.copy()))
        t.bias.copy_(torch.from_numpy(np.asarray(v["params"]["bias"]).copy()))
    TP.spectral_norm(t, "weight")
    path = ("params", "kernel")
    v, spec = PL.spectral_norm(v, path, rngs=0)
    v = copy_vectors_from_torch(v, t, path)
    x = np.random.randn(4, 5).astype(np.float32)

    def run(v, x, spec):
        return PL.apply(model, v, x, spec=spec, mutable=["batch_stats"])

    run = jax.jit(run, static_argnums=2) if jit else run
    for _ in range(3):
        y, updates = run(v, jnp.asarray(x), spec)
        v = {**v, **updates}
        np.testing.assert_allclose(np_(y), np_(t(torch.from_numpy(x))), atol=1e-5)
    u = v["batch_stats"]["parametrizations"]["kernel"]["0"]["_u"]
    np.testing.assert_allclose(np_(u), np_(t.parametrizations.weight[0]._u), atol=1e-5)
    t.eval()
    for _ in range(2):
        y, updates = run(v, jnp.asarray(x), spec.eval())
        np.testing.assert_allclose(np_(y), np_(t(torch.from_numpy(x))), atol=1e-5)
        np.testing.assert_array_equal(
            np_(updates["batch_stats"]["parametrizations"]["kernel"]["0"]["_u"]), np_(u)
        )
    # evaluation needs no mutable collection; training without one is refused
    PL.apply(model, v, jnp.asarray(x), spec=spec.eval())
    with pytest.raises(RuntimeError, match="immutable"):
        PL.apply(model, v, jnp.asarray(x), spec=spec)


def test_spectral_norm_equals_nnx_builtin_over_steps():
    model = nn.Dense(3)
    v = model.init(jax.random.key(0), jnp.ones((1, 5)))
    layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    layer.kernel[...] = v["params"]["kernel"]
    layer.bias[...] = v["params"]["bias"]
    NP.spectral_norm(layer, rngs=7)
    v, spec = PL.spectral_norm(v, "params/kernel", rngs=7)
    sn = layer.parametrizations.kernel[0]
    stored = v["batch_stats"]["parametrizations"]["kernel"]["0"]
    np.testing.assert_array_equal(np_(stored["_u"]), np_(sn._u[...]))
    x = jnp.ones((2, 5))
    for _ in range(3):
        y, updates = PL.apply(model, v, x, spec=spec, mutable=["batch_stats"])
        v = {**v, **updates}
        np.testing.assert_allclose(np_(y), np_(layer(x)), atol=1e-6)
    stored = v["batch_stats"]["parametrizations"]["kernel"]["0"]
    np.testing.assert_allclose(np_(stored["_v"]), np_(sn._v[...]), atol=1e-6)


def test_spectral_norm_beside_batchnorm_shares_batch_stats():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(4)(x)
            return nn.BatchNorm(use_running_average=not train)(x)

    model = Net()
    v = model.init(jax.random.key(0), jnp.ones((2, 3)), False)
    v1, spec = PL.spectral_norm(v, KERNEL)
    x = jax.random.normal(jax.random.key(1), (8, 3))
    _, updates = PL.apply(model, v1, x, True, spec=spec, mutable=["batch_stats"])
    new = {**v1, **updates}
    assert jax.tree.structure(new) == jax.tree.structure(v1)
    bs = new["batch_stats"]
    assert not np.allclose(bs["BatchNorm_0"]["mean"], v1["batch_stats"]["BatchNorm_0"]["mean"])
    old_u = v1["batch_stats"]["Dense_0"]["parametrizations"]["kernel"]["0"]["_u"]
    assert not np.array_equal(bs["Dense_0"]["parametrizations"]["kernel"]["0"]["_u"], old_u)


def test_spectral_norm_vectors_stay_in_batch_stats_after_a_tolinen():
    # nnx.bridge.ToLinen registers a collection named after each Variable type it
    # does not know, for the whole process ("PowerIteration"); the vectors here
    # went there after one, and `mutable=["batch_stats"]` failed.
    from jaxparam.parametrizations import spectral_norm

    class Net(nnx.Module):
        def __init__(self, *, rngs):
            self.a = spectral_norm(nnx.Linear(3, 3, rngs=rngs), rngs=rngs)

        def __call__(self, x):
            return self.a(x)

    nnx.bridge.ToLinen(Net).init(jax.random.key(0), jnp.ones((1, 3)))
    _, v = init_mlp()
    v1, spec = PL.spectral_norm(v, KERNEL)
    assert "_u" in v1["batch_stats"]["Dense_0"]["parametrizations"]["kernel"]["0"]
    assert "PowerIteration" not in v1


def test_ours_keep_the_initial_function_unlike_flax():
    x = jax.random.normal(jax.random.key(1), (2, 4))
    dense = nn.Dense(5)
    v = dense.init(jax.random.key(0), x)
    before = dense.apply(v, x)
    v1, spec = PL.weight_norm(v, "params/kernel")
    np.testing.assert_allclose(PL.apply(dense, v1, x, spec=spec), before, atol=1e-6)
    # spectral norm divides by sigma (as torch does) but keeps w itself as the original
    v2, spec2 = PL.spectral_norm(v, "params/kernel")
    original = v2["params"]["parametrizations"]["kernel"]["original"]
    np.testing.assert_array_equal(original, v["params"]["kernel"])

    # flax's own nn.WeightNorm starts from scale = 1, i.e. computes w / ||w||: given
    # the same kernel and bias, the wrapped layer's output is not the plain layer's
    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.WeightNorm(nn.Dense(5))(x)

    model = Flax()
    fv = model.init(jax.random.key(0), x)
    fv = {"params": {**fv["params"], "Dense_0": v["params"]}}
    assert not np.allclose(model.apply(fv, x), before, atol=1e-3)


# -- transforms, training, serialization ---------------------------------------------


@pytest.mark.parametrize("jit", [True, False])
def test_grad_and_vmap(jit):
    model, v = init_mlp()
    v1, spec = PL.weight_norm(v, KERNEL)
    x = jax.random.normal(jax.random.key(1), (3, 4))

    def loss(params, x):
        return jnp.sum(PL.apply(model, {"params": params}, x, spec=spec) ** 2)

    grad = jax.jit(jax.grad(loss)) if jit else jax.grad(loss)
    g = grad(v1["params"], x)
    assert jax.tree.structure(g) == jax.tree.structure(v1["params"])
    # gradient w.r.t. the originals = chain rule through w = g v / |v|
    g_plain = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2))(v["params"])
    _, vjp = jax.vjp(
        lambda g0, v0: WeightNorm(1)(g0, v0),
        *(
            v1["params"]["Dense_0"]["parametrizations"]["kernel"][k]
            for k in ("original0", "original1")
        ),
    )
    expected = vjp(g_plain["Dense_0"]["kernel"])
    got = g["Dense_0"]["parametrizations"]["kernel"]
    np.testing.assert_allclose(got["original0"], expected[0], atol=1e-5)
    np.testing.assert_allclose(got["original1"], expected[1], atol=1e-5)

    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), v1)
    f = jax.vmap(lambda v: PL.apply(model, v, x, spec=spec))
    ys = (jax.jit(f) if jit else f)(stacked)
    np.testing.assert_allclose(ys[0], PL.apply(model, v1, x, spec=spec), atol=1e-6)
    v2 = jax.tree.map(lambda a: 2 * a, v1)
    np.testing.assert_allclose(ys[1], PL.apply(model, v2, x, spec=spec), atol=1e-5)


@pytest.mark.parametrize("builtin", ["weight_norm", "spectral_norm"])
def test_optax_training_matches_torch(builtin):
    model, v = init_mlp(6, 5, 2)
    tnet = torch_mlp(v)
    spec = None
    for i, name in enumerate(("Dense_0", "Dense_1")):
        path = ("params", name, "kernel")
        if builtin == "weight_norm":
            TP.weight_norm(tnet[2 * i], "weight")
            v, spec = PL.weight_norm(v, path, spec=spec)
        else:
            TP.spectral_norm(tnet[2 * i], "weight")
            v, spec = PL.spectral_norm(v, path, spec=spec)
            v = copy_vectors_from_torch(v, tnet[2 * i], path)
    x = np.random.randn(8, 6).astype(np.float32)
    y = np.random.randn(8, 2).astype(np.float32)
    tx = optax.sgd(0.1)
    opt_state = tx.init(v["params"])
    topt = torch.optim.SGD(tnet.parameters(), lr=0.1)

    @jax.jit
    def step(v, opt_state, x, y):
        def loss(params):
            out, updates = PL.apply(
                model, {**v, "params": params}, x, spec=spec, mutable=["batch_stats"]
            )
            return jnp.mean((out - y) ** 2), updates

        (loss, updates), grads = jax.value_and_grad(loss, has_aux=True)(v["params"])
        upd, opt_state = tx.update(grads, opt_state)
        return loss, {**v, **updates, "params": optax.apply_updates(v["params"], upd)}, opt_state

    if builtin == "weight_norm":
        v = {**v, "batch_stats": {}}
    for _ in range(4):
        loss, v, opt_state = step(v, opt_state, jnp.asarray(x), jnp.asarray(y))
        topt.zero_grad()
        tloss = ((tnet(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
        tloss.backward()
        topt.step()
        np.testing.assert_allclose(float(loss), tloss.item(), rtol=1e-5, atol=1e-6)
    tnet.eval()  # reading torch's weight in training mode would iterate again
    for i, name in enumerate(("Dense_0", "Dense_1")):
        w = PL.get_parametrized(v, ("params", name, "kernel"), spec=spec.eval())
        np.testing.assert_allclose(np_(w), np_(tnet[2 * i].weight).T, atol=1e-5)


def test_serialization_round_trips(tmp_path):
    model, v = init_mlp()
    v1, spec = PL.spectral_norm(v, KERNEL, rngs=3)
    v1, spec = PL.weight_norm(v1, "params/Dense_1/kernel", spec=spec)
    x = jnp.ones((2, 4))
    expected = PL.apply(model, v1, x, spec=spec.eval())
    target = jax.tree.map(jnp.zeros_like, v1)

    state = serialization.to_state_dict(v1)
    assert "original" in state["params"]["Dense_0"]["parametrizations"]["kernel"]
    restored = [
        serialization.from_state_dict(target, state),
        serialization.from_bytes(target, serialization.to_bytes(v1)),
    ]
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", v1)
    ckpt.wait_until_finished()
    restored.append(ckpt.restore(tmp_path / "ckpt", target))
    for r in restored:
        assert jax.tree.structure(r) == jax.tree.structure(v1)
        np.testing.assert_allclose(PL.apply(model, r, x, spec=spec.eval()), expected, atol=1e-6)


def test_spec_is_static_hashable_and_jit_caches_on_it():
    model, v = init_mlp()
    v1, spec = PL.weight_norm(v, KERNEL)
    _, spec_again = PL.weight_norm(v, KERNEL)
    assert hash(spec) == hash(spec) and spec.eval() != spec and spec.eval().train() == spec
    traces = []

    @functools.partial(jax.jit, static_argnums=1)
    def f(v, spec):
        traces.append(1)
        return PL.apply(model, v, jnp.ones((1, 4)), spec=spec)

    f(v1, spec)
    f(jax.tree.map(lambda a: a + 1, v1), spec)
    assert len(traces) == 1
    assert spec_again == spec  # the same structure: identical graphdefs


@pytest.mark.parametrize("m", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_matches_torch_and_nnx_and_trains_alike(m):
    model = nn.Dense(3)
    v = model.init(jax.random.key(0), jnp.ones((1, 5)))
    t = torch.nn.Linear(5, 3)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(np.asarray(v["params"]["kernel"]).T.copy()))
        t.bias.copy_(torch.from_numpy(np.asarray(v["params"]["bias"]).copy()))
    layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    layer.kernel[...] = v["params"]["kernel"]
    NP.orthogonal(layer, orthogonal_map=m)
    v, spec = PL.orthogonal(v, "params/kernel", orthogonal_map=m)
    link_state = v["buffers"]["parametrizations"]["kernel"]["0"]
    np.testing.assert_array_equal(link_state["base"], layer.parametrizations.kernel[0].base[...])
    np.testing.assert_array_equal(PL.get_parametrized(v, "params/kernel", spec=spec), layer.kernel)
    torch.manual_seed(0)
    TP.orthogonal(t, "weight", m)
    # torch completes the non-square matrix with its own torch.randn: take its base
    link_state["base"] = jnp.asarray(np_(t.parametrizations.weight[0].base))
    np.testing.assert_allclose(
        np_(PL.get_parametrized(v, "params/kernel", spec=spec)), np_(t.weight).T, atol=1e-6
    )
    x = np.random.randn(4, 5).astype(np.float32)
    tx = optax.sgd(0.1)
    opt_state = tx.init(v["params"])
    topt = torch.optim.SGD(t.parameters(), lr=0.1)

    @jax.jit
    def step(params, opt_state, x):
        loss = lambda p: jnp.sum(PL.apply(model, {**v, "params": p}, x, spec=spec) ** 3)
        grads = jax.grad(loss)(params)
        upd, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, upd), opt_state

    for _ in range(3):
        params, opt_state = step(v["params"], opt_state, jnp.asarray(x))
        v = {**v, "params": params}
        topt.zero_grad()
        (t(torch.from_numpy(x)) ** 3).sum().backward()
        topt.step()
    w = PL.get_parametrized(v, "params/kernel", spec=spec)
    # float32 matrix_exp differs between torch and XLA by ~1e-6; three large cubic
    # steps amplify that to ~1e-4 (the linen and NNX trajectories are bit-identical)
    np.testing.assert_allclose(np_(w), np_(t.weight).T, atol=5e-4)
    # assignment runs right_inverse, which resets base (a buffers entry), as in torch
    q = np.linalg.qr(np.random.randn(5, 3))[0].astype(np.float32)
    with torch.no_grad():
        t.weight = torch.from_numpy(q.T.copy())
    v2 = PL.assign(v, "params/kernel", jnp.asarray(q), spec=spec)
    np.testing.assert_allclose(
        np_(PL.get_parametrized(v2, "params/kernel", spec=spec)), q, atol=1e-5
    )
    np.testing.assert_allclose(np_(t.weight).T, q, atol=1e-5)
    with pytest.raises(ValueError, match="Expected a matrix or batch of matrices of shape"):
        PL.assign(v, "params/kernel", jnp.zeros((3, 5)), spec=spec)
    # the link's PRNG key is stored as raw uint32 data: the dict serializes, and
    # assignment after a restore draws what it would have drawn
    restored = serialization.from_bytes(v, serialization.to_bytes(v))
    assert (
        restored["buffers"]["parametrizations"]["kernel"]["0"]["rngs"]["params"]["key"].dtype
        == np.uint32
    )
    v3 = PL.assign(restored, "params/kernel", jnp.asarray(q), spec=spec)
    jax.tree.map(np.testing.assert_array_equal, v3, v2)
