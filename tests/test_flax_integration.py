"""Parametrizations on stock Flax NNX layers, under NNX transforms, and in training.

A parametrized layer must give the output of the same layer with the parametrized
value baked in; training with nnx.Optimizer must match torch's parametrize +
torch.optim.Adam on the same numbers (Flax kernels are torch weights transposed).
"""

import copy
import operator
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.utils.parametrize as TP
from flax import nnx
from torch import nn

import jaxparam.parametrize as P

# Module-level named functions: they pickle (lambdas do not).


def soft(x):
    return jnp.tanh(x) * 1.5 + 0.1


def positive(s):
    return s**2 + 0.5


def symmetric(x):
    return (x + x.T) / 2


symmetric.right_inverse = lambda x: x


def assert_close(a, b, tol=1e-5):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def flat(state):
    return {"/".join(str(k) for k in p): v for p, v in nnx.to_flat_state(state)}


# ---------------------------------------------------------------------------
# Stock layers: output equals the layer with the parametrized value baked in
# ---------------------------------------------------------------------------

rngs = nnx.Rngs


def _mha():
    return nnx.MultiHeadAttention(
        num_heads=2, in_features=4, qkv_features=4, decode=False, rngs=rngs(0)
    )


LAYERS = {
    # name: (make layer, path to the parametrized sub-layer, attribute, link, input)
    "linear": (lambda: nnx.Linear(3, 4, rngs=rngs(0)), (), "kernel", soft, (2, 3)),
    "conv": (lambda: nnx.Conv(2, 3, (3, 3), rngs=rngs(0)), (), "kernel", soft, (1, 5, 5, 2)),
    "conv_transpose": (
        lambda: nnx.ConvTranspose(2, 3, (3, 3), rngs=rngs(0)),
        (),
        "kernel",
        soft,
        (1, 4, 4, 2),
    ),
    "embed": (lambda: nnx.Embed(5, 3, rngs=rngs(0)), (), "embedding", soft, None),
    "linear_general": (
        lambda: nnx.LinearGeneral(3, (2, 2), rngs=rngs(0)),
        (),
        "kernel",
        soft,
        (2, 3),
    ),
    "einsum": (
        lambda: nnx.Einsum("ab,bc->ac", (3, 4), (4,), rngs=rngs(0)),
        (),
        "kernel",
        soft,
        (2, 3),
    ),
    "layer_norm": (lambda: nnx.LayerNorm(4, rngs=rngs(0)), (), "scale", positive, (2, 4)),
    "mha_query": (_mha, ("query",), "kernel", soft, (1, 3, 4)),
    "mha_out": (_mha, ("out",), "kernel", soft, (1, 3, 4)),
}


def _sub(layer, path):
    for p in path:
        layer = getattr(layer, p)
    return layer


def _call(layer, x, name):
    if name == "embed":
        return layer(x), layer.attend(jnp.ones((2, 3)))
    return layer(x)


def _input(name, shape):
    if name == "embed":
        return jnp.array([0, 3, 4, 1])
    return jax.random.normal(jax.random.key(1), shape)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("jit", ["eager", "graph", "tree"])
def test_stock_layer(name, jit):
    make, path, attr, f, shape = LAYERS[name]
    layer, ref = make(), make()
    target = _sub(layer, path)
    P.register_parametrization(target, attr, f)
    assert type(target).__name__ == "Parametrized" + type(_sub(ref, path)).__name__
    ref_target = _sub(ref, path)
    getattr(ref_target, attr)[...] = f(getattr(ref_target, attr)[...])
    x = _input(name, shape)
    # flax's graph mode (its default) or its tree mode, where modules are pytrees
    call = _call if jit == "eager" else nnx.jit(_call, static_argnums=2, graph=jit == "graph")
    jax.tree.map(assert_close, call(layer, x, name), _call(ref, x, name))
    assert f"parametrizations/{attr}/original" in "|".join(flat(nnx.state(target)))


def test_layer_norm_scale_truthiness():
    ln = nnx.LayerNorm(4, rngs=rngs(0))
    P.register_parametrization(ln, "scale", positive)
    assert bool(ln.scale)  # flax does `self.scale[...] if self.scale else None`
    assert_close(ln(jnp.ones((1, 4)) * jnp.arange(4.0)), _baked_layer_norm())


def _baked_layer_norm():
    ln = nnx.LayerNorm(4, rngs=rngs(0))
    ln.scale[...] = positive(ln.scale[...])
    return ln(jnp.ones((1, 4)) * jnp.arange(4.0))


# ---------------------------------------------------------------------------
# grad / value_and_grad
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("jit", ["eager", "graph", "tree"])
def test_grad_wrt_original(jit):
    layer = nnx.Linear(3, 3, rngs=rngs(0))
    kernel0 = layer.kernel[...]
    bias0 = layer.bias[...]
    P.register_parametrization(layer, "kernel", soft)
    x = jax.random.normal(jax.random.key(2), (4, 3))

    def loss(m):
        return jnp.sum(jnp.sin(m(x)))

    vg = nnx.value_and_grad(loss)
    if jit != "eager":
        vg = nnx.jit(vg, graph=jit == "graph")
    value, grads = vg(layer)
    g = flat(grads)
    assert set(g) == {"parametrizations/kernel/original", "bias"}

    def pure(k, b):
        return jnp.sum(jnp.sin(x @ soft(k) + b))

    ref_value, (gk, gb) = jax.value_and_grad(pure, argnums=(0, 1))(kernel0, bias0)
    assert_close(value, ref_value)
    assert_close(g["parametrizations/kernel/original"][...], gk)
    assert_close(g["bias"][...], gb)
    assert_close(nnx.grad(loss)(layer)["bias"][...], gb)


# ---------------------------------------------------------------------------
# Training vs torch: 2-layer MLP, symmetric + weight-norm-style, Adam
# ---------------------------------------------------------------------------


def jwn(g, v):  # Flax layout (in, out): one norm per output column
    return g * v / jnp.linalg.norm(v, axis=0, keepdims=True)


jwn.right_inverse = lambda w: (jnp.linalg.norm(w, axis=0, keepdims=True), w)


class TSymmetric(nn.Module):
    def forward(self, x):
        return (x + x.T) / 2

    def right_inverse(self, x):
        return x


class TWeightNorm(nn.Module):  # torch layout (out, in): one norm per output row
    def forward(self, g, v):
        return g * v / v.norm(dim=1, keepdim=True)

    def right_inverse(self, w):
        return w.norm(dim=1, keepdim=True), w


class JMLP(nnx.Module):
    def __init__(self):
        self.l1 = nnx.Linear(4, 4, rngs=rngs(0))
        self.l2 = nnx.Linear(4, 2, rngs=rngs(1))

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def _torch_mlp(jm):
    tm = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        for t, j in ((tm[0], jm.l1), (tm[2], jm.l2)):
            t.weight.copy_(torch.tensor(np.asarray(j.kernel[...]).T))
            t.bias.copy_(torch.tensor(np.asarray(j.bias[...])))
    return tm


def test_training_matches_torch(mse_steps):
    jm = JMLP()
    tm = _torch_mlp(jm)
    P.register_parametrization(jm.l1, "kernel", symmetric)
    P.register_parametrization(jm.l2, "kernel", jwn)
    TP.register_parametrization(tm[0], "weight", TSymmetric())
    TP.register_parametrization(tm[2], "weight", TWeightNorm())
    x = jax.random.normal(jax.random.key(3), (8, 4))
    y = jax.random.normal(jax.random.key(4), (8, 2))

    step = mse_steps(jm, optax.adam(0.05), tm, torch.optim.Adam(tm.parameters(), lr=0.05))
    for _ in range(4):
        loss, tloss = step(x, y)
        assert_close(loss, tloss)
    assert_close(jm.l1.kernel[...], tm[0].weight.T)
    assert_close(jm.l2.kernel[...], tm[2].weight.T)
    p2, tp2 = jm.l2.parametrizations.kernel, tm[2].parametrizations.weight
    assert_close(p2.original0[...], tp2.original0.T)
    assert_close(p2.original1[...], tp2.original1.T)
    assert_close(
        jm.l1.parametrizations.kernel.original[...], tm[0].parametrizations.weight.original.T
    )


# ---------------------------------------------------------------------------
# split / merge / state / update, pickle, deepcopy
# ---------------------------------------------------------------------------


def _model():
    m = JMLP()
    P.register_parametrization(m.l1, "kernel", symmetric)
    P.register_parametrization(m.l1, "kernel", soft)
    P.register_parametrization(m.l2, "kernel", jwn)
    return m


def test_split_merge_state_update_round_trip():
    m = _model()
    x = jnp.ones((2, 4))
    graphdef, state = nnx.split(m)
    m2 = nnx.merge(graphdef, state)
    assert type(m2.l1) is type(m.l1)
    assert P.is_parametrized(m2.l1, "kernel")
    assert_close(m2(x), m(x))
    keys = set(flat(nnx.state(m)))
    assert "l1/parametrizations/kernel/original" in keys
    assert "l2/parametrizations/kernel/original0" in keys
    # update: new originals flow into the parametrized value (flax 0.12's merge
    # reuses the state's Variables, so m and m2 share them: read before updating)
    original = np.asarray(m.l1.parametrizations.kernel.original[...])
    nnx.update(m2, jax.tree.map(lambda a: a * 0.5, nnx.state(m)))
    assert_close(m2.l1.parametrizations.kernel.original[...], original * 0.5)
    assert_close(m2.l1.kernel[...], soft(symmetric(original * 0.5)))
    # removal on the merged module restores the plain class there only
    P.remove_parametrizations(m2.l1, "kernel", leave_parametrized=False)
    assert type(m2.l1) is nnx.Linear and type(m.l1) is not nnx.Linear
    assert_close(m.l1.kernel[...], soft(symmetric(original * 0.5)))


def test_pickle_split_output():
    m = _model()
    x = jnp.ones((2, 4))
    graphdef, state = pickle.loads(pickle.dumps(nnx.split(m)))
    m2 = nnx.merge(graphdef, state)
    assert type(m2.l1).__name__ == "ParametrizedLinear"
    assert_close(m2(x), m(x))


def test_pickle_in_a_fresh_process(tmp_path):
    # The injected class is found by name in a process where it was never created
    # (and jaxparam is imported by unpickling alone). `operator.neg` pickles by
    # reference without importing this test module (and torch) over there.
    m = nnx.Linear(3, 3, rngs=rngs(0))
    P.register_parametrization(m, "kernel", operator.neg)
    path = tmp_path / "split.pkl"
    path.write_bytes(pickle.dumps(nnx.split(m)))
    expected = np.asarray(m(jnp.ones((1, 3))))
    code = (
        "import pickle, sys, numpy as np, jax.numpy as jnp\n"
        "from flax import nnx\n"
        f"g, s = pickle.loads(open({str(path)!r}, 'rb').read())\n"
        "m = nnx.merge(g, s)\n"
        "assert type(m).__name__ == 'ParametrizedLinear', type(m)\n"
        "np.save(sys.argv[1], np.asarray(m(jnp.ones((1, 3)))))\n"
    )
    out = tmp_path / "out.npy"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, timeout=120)
    assert_close(np.load(out), expected)


def test_deepcopy_is_independent():
    m = _model()
    x = jnp.ones((2, 4))
    c = copy.deepcopy(m)
    assert type(c.l1) is type(m.l1)
    assert c.l1.parametrizations.kernel.original is not m.l1.parametrizations.kernel.original
    assert_close(c(x), m(x))
    before = np.asarray(m.l1.kernel[...])
    c.l1.parametrizations.kernel.original[...] = jnp.eye(4)
    assert_close(c.l1.kernel[...], soft(symmetric(jnp.eye(4))))
    assert_close(m.l1.kernel[...], before)


def test_clone_preserves_parametrization():
    m = _model()
    c = nnx.clone(m)
    assert_close(c(jnp.ones((2, 4))), m(jnp.ones((2, 4))))
    assert P.type_before_parametrizations(c.l2) is nnx.Linear


# ---------------------------------------------------------------------------
# vmap over a stack of parametrized modules
# ---------------------------------------------------------------------------


def test_vmap_stack_of_parametrized_modules():
    keys = jax.random.split(jax.random.key(0), 3)

    def make(key):
        m = nnx.Linear(3, 3, rngs=nnx.Rngs(params=key))
        P.register_parametrization(m, "kernel", symmetric)
        P.register_parametrization(m, "kernel", soft)
        return m

    stack = nnx.vmap(make)(keys)
    assert P.is_parametrized(stack, "kernel")
    assert stack.parametrizations.kernel.original.shape == (3, 3, 3)
    x = jax.random.normal(jax.random.key(5), (3, 2, 3))
    out = nnx.vmap(lambda m, x: m(x))(stack, x)
    for i in range(3):
        single = make(keys[i])
        assert_close(out[i], single(x[i]))
    # grads through the vmapped forward reach the stacked originals
    grads = nnx.grad(lambda m: jnp.sum(nnx.vmap(lambda m, x: m(x))(m, x)))(stack)
    assert flat(grads)["parametrizations/kernel/original"].shape == (3, 3, 3)


# ---------------------------------------------------------------------------
# Eager access: compiled once per structure
# ---------------------------------------------------------------------------


def _compiles():
    return sum(fn._cache_size() for fn in P._compiled.values())


def test_eager_access_compiles_once_per_structure():
    def make(seed, n=5):
        m = nnx.Linear(n, n, rngs=rngs(seed))
        P.register_parametrization(m, "kernel", symmetric)
        return m

    a, b = make(0), make(1)
    _ = a.kernel  # may compile
    size = _compiles()
    for _ in range(3):
        _ = a.kernel[...], b.kernel[...]
    assert _compiles() == size  # same structure: no new compile
    b.kernel = jnp.eye(5)
    _ = b.kernel
    assert _compiles() == size
    _ = make(2, n=6).kernel  # new shape: one more
    assert _compiles() == size + 1
    assert_close(a.kernel[...], symmetric(a.parametrizations.kernel.original[...]))


def test_eager_compiled_chains_are_bounded_and_release_what_links_captured(monkeypatch):
    # A lambda made for each new model (a hyper-parameter search in one process)
    # is a new chain; at most _MAX_COMPILED are kept, the oldest dropped first,
    # and with them the lambdas and what they captured (here an array).
    import gc
    import weakref

    monkeypatch.setattr(P, "_compiled", {})
    monkeypatch.setattr(P, "_MAX_COMPILED", 4)

    class Mask:  # a weakly referenceable stand-in for a captured array
        def __init__(self, n):
            self.value = jnp.full((n, n), 0.5)

    refs = []
    for i in range(10):
        m = nnx.Linear(3, 3, rngs=rngs(i))
        mask = Mask(3)
        P.register_parametrization(m, "kernel", lambda x, mask=mask: x * mask.value)
        assert_close(m.kernel[...], 0.5 * m.parametrizations.kernel.original[...])
        refs.append(weakref.ref(mask))
        del m, mask
    gc.collect()
    assert len(P._compiled) == 4
    assert refs[0]() is None and refs[-1]() is not None


@pytest.mark.parametrize("builtin", ["register", "weight_norm", "spectral_norm"])
def test_a_tonnx_wrapper_refuses_and_keeps_working(builtin):
    # ToNNX passes its attributes to linen as variables on every call: a
    # parametrized one broke every later call with flax's own error.
    from flax import linen

    from jaxparam import parametrizations as PZ

    x = jnp.ones((2, 4))
    m = nnx.bridge.ToNNX(linen.Dense(3), rngs=nnx.Rngs(0))
    nnx.bridge.lazy_init(m, x)
    before = nnx.state(m, nnx.Param)
    before = jax.tree.map(np.asarray, before)
    register = {
        "register": lambda: P.register_parametrization(m, "kernel", jnp.tril),
        "weight_norm": lambda: PZ.weight_norm(m, "kernel"),
        "spectral_norm": lambda: PZ.spectral_norm(m, "kernel"),
    }[builtin]
    with pytest.raises(
        ValueError, match="fix: parametrize the linen variables with jaxparam.linen"
    ):
        register()
    after = jax.tree.map(np.asarray, nnx.state(m, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert type(m) is nnx.bridge.ToNNX
    assert m(x).shape == (2, 3)


def test_spectral_norm_under_tolinen_updates_its_own_collection():
    # flax's ToLinen names a collection after each Variable type it does not
    # know: PowerIteration (a BatchStat subclass) gets its own (docs/builtins.md).
    from jaxparam import parametrizations as PZ

    class Net(nnx.Module):
        def __init__(self, *, rngs):
            self.a = PZ.spectral_norm(nnx.Linear(4, 4, rngs=rngs), rngs=rngs)

        def __call__(self, x):
            return self.a(x)

    x = jnp.ones((2, 4))
    model = nnx.bridge.ToLinen(Net)
    v = model.init(jax.random.key(0), x)
    assert "PowerIteration" in v
    _, upd = model.apply(v, x, mutable=["PowerIteration"])
    changed = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), upd["PowerIteration"], v["PowerIteration"]
    )
    assert any(jax.tree.leaves(changed))
