"""NNX built-ins against torch's ``torch.nn.utils.parametrizations``.

Each test builds a torch layer and the Flax layer holding the same numbers (in
Flax's layout), applies torch's built-in and ours, and compares values, state,
and a few optimizer steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from torch.nn.utils import parametrizations as TP

import jaxparam.parametrize as P
from jaxparam.parametrizations import PowerIteration, orthogonal, spectral_norm, weight_norm

# -- layouts: torch weight -> flax kernel --------------------------------------


def linear_pair(din=5, dout=3, seed=0):
    t = torch.nn.Linear(din, dout)
    f = nnx.Linear(din, dout, rngs=nnx.Rngs(seed))
    f.kernel[...] = jnp.asarray(t.weight.detach().numpy().T)
    f.bias[...] = jnp.asarray(t.bias.detach().numpy())
    return t, f, lambda w: w.T


def conv_pair(nd=2, cin=3, cout=4, k=3):
    t = getattr(torch.nn, f"Conv{nd}d")(cin, cout, k)
    f = nnx.Conv(cin, cout, (k,) * nd, padding="VALID", rngs=nnx.Rngs(0))
    perm = tuple(range(2, nd + 2)) + (1, 0)
    f.kernel[...] = jnp.asarray(t.weight.detach().numpy().transpose(perm))
    f.bias[...] = jnp.asarray(t.bias.detach().numpy())
    return t, f, lambda w: np.transpose(w, perm)


def conv_transpose_pair(nd=1, cin=3, cout=4, k=3):
    t = getattr(torch.nn, f"ConvTranspose{nd}d")(cin, cout, k)
    f = nnx.ConvTranspose(cin, cout, (k,) * nd, rngs=nnx.Rngs(0))
    perm = tuple(range(2, nd + 2)) + (0, 1)
    f.kernel[...] = jnp.asarray(t.weight.detach().numpy().transpose(perm))
    return t, f, lambda w: np.transpose(w, perm)


def embed_pair(num=6, features=4):
    t = torch.nn.Embedding(num, features)
    f = nnx.Embed(num, features, rngs=nnx.Rngs(0))
    f.embedding[...] = jnp.asarray(t.weight.detach().numpy())
    return t, f, lambda w: w


PAIRS = {
    "linear": (linear_pair, "kernel"),
    "conv1d": (lambda: conv_pair(1), "kernel"),
    "conv2d": (lambda: conv_pair(2), "kernel"),
    "conv_transpose1d": (lambda: conv_transpose_pair(1), "kernel"),
    "conv_transpose2d": (lambda: conv_transpose_pair(2), "kernel"),
    "embed": (embed_pair, "embedding"),
}


def np_(x):
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    return np.asarray(x)


# -- weight norm -------------------------------------------------------------


@pytest.mark.parametrize("layer", sorted(PAIRS))
def test_weight_norm_default_matches_torch(layer):
    make, name = PAIRS[layer]
    t, f, to_flax = make()
    # torch's weight_norm default is dim=0; for ConvTranspose that is the input
    # channels, so compare ours (per output feature) against torch's output dim.
    torch_dim = 1 if "transpose" in layer else 0
    TP.weight_norm(t, "weight", dim=torch_dim)
    weight_norm(f, name)
    plist = f.parametrizations[name]
    np.testing.assert_allclose(np_(getattr(f, name)[...]), to_flax(np_(t.weight)), atol=1e-6)
    # g has size 1 on every axis but the output axis, in each framework's layout
    g_t = np_(t.parametrizations.weight.original0)
    np.testing.assert_allclose(np_(plist.original0[...]), to_flax(g_t), atol=1e-6)
    np.testing.assert_allclose(
        np_(plist.original1[...]), to_flax(np_(t.parametrizations.weight.original1)), atol=1e-6
    )


@pytest.mark.parametrize("dim", [None, 0, 1])
def test_weight_norm_explicit_dims_match_torch(dim):
    t, f, _ = linear_pair()
    # torch's dim d on (out, in) is flax axis 1 - d on (in, out); None is the whole tensor
    TP.weight_norm(t, "weight", dim=dim)
    weight_norm(f, "kernel", dim=None if dim is None else 1 - dim)
    np.testing.assert_allclose(np_(f.kernel[...]), np_(t.weight).T, atol=1e-6)
    np.testing.assert_allclose(
        np.squeeze(np_(f.parametrizations.kernel.original0[...])),
        np.squeeze(np_(t.parametrizations.weight.original0)),
        atol=1e-6,
    )


def test_weight_norm_keeps_the_initial_function_unlike_flax():
    f = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 4))
    before = f(x)
    weight_norm(f)
    np.testing.assert_allclose(f(x), before, atol=1e-6)
    assert P.is_parametrized(f, "kernel")
    # flax's own WeightNorm rewrites the kernel: its output differs at creation.
    g = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    wrapped = nnx.WeightNorm(g, rngs=nnx.Rngs(0))
    assert not np.allclose(wrapped(x), before, atol=1e-3)


def test_weight_norm_negative_dim_is_an_ordinary_axis():
    f = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    weight_norm(f, dim=-2)
    assert f.parametrizations.kernel.original0.shape == (5, 1)
    with pytest.raises(IndexError, match="Dimension out of range"):
        weight_norm(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), dim=2)


def test_weight_norm_missing_name():
    f = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    t = torch.nn.Linear(5, 3)
    with pytest.raises(ValueError) as torch_err:
        TP.weight_norm(t, "nope")  # register_parametrization's message, not spectral_norm's
    with pytest.raises(ValueError) as ours:
        weight_norm(f, "nope")
    words = str(torch_err.value).split("' ", 1)[1]
    assert str(ours.value).startswith(f"Module 'Linear' {words}")
    assert type(f) is nnx.Linear


# -- spectral norm -------------------------------------------------------------


def copy_torch_vectors(t, f, name, layer):
    """Put torch's _u, _v into ours (v is permuted where the flattening differs)."""
    sn_t = t.parametrizations.weight[0]
    sn_f = f.parametrizations[name][0]
    u, v = np_(sn_t._u), np_(sn_t._v)
    w = np_(t.parametrizations.weight.original)
    if layer.startswith("conv") and "transpose" not in layer:
        # torch flattens (out, in, *k); we flatten (*k, in) after moving out first
        rest = (w.shape[1],) + w.shape[2:]
        v = np.moveaxis(v.reshape(rest), 0, -1).ravel()
    elif "transpose" in layer:
        # torch: dim=1 first, then (in, *k); flax: (*k, in)
        rest = (w.shape[0],) + w.shape[2:]
        v = np.moveaxis(v.reshape(rest), 0, -1).ravel()
    elif layer == "linear":
        pass
    sn_f._u[...] = jnp.asarray(u)
    sn_f._v[...] = jnp.asarray(v)


def norm_linear_pair(builtin, t, f):
    """Applies torch's and our ``builtin`` (weight or spectral norm) to a
    ``linear_pair``; spectral norm starts from torch's vectors."""
    if builtin == "weight_norm":
        TP.weight_norm(t, "weight")
        weight_norm(f)
    else:
        TP.spectral_norm(t, "weight")
        spectral_norm(f, rngs=nnx.Rngs(0))
        copy_torch_vectors(t, f, "kernel", "linear")


@pytest.mark.parametrize("layer", sorted(PAIRS))
@pytest.mark.parametrize("jit", ["eager", "graph", "tree"])
def test_spectral_norm_matches_torch_in_training_and_eval(layer, jit):
    make, name = PAIRS[layer]
    t, f, to_flax = make()
    TP.spectral_norm(t, "weight")
    spectral_norm(f, name, rngs=nnx.Rngs(0))
    copy_torch_vectors(t, f, name, layer)
    sn_f = f.parametrizations[name][0]
    assert isinstance(sn_f._u, PowerIteration) and not isinstance(sn_f._u, nnx.Param)

    def read(m):
        return getattr(m, name)[...]

    if jit != "eager":  # flax's graph mode (its default) or tree mode
        read = nnx.jit(read, graph=jit == "graph")
    for _ in range(3):  # each training read runs one power iteration
        np.testing.assert_allclose(np_(read(f)), to_flax(np_(t.weight)), atol=1e-5)
    np.testing.assert_allclose(np_(sn_f._u[...]), np_(t.parametrizations.weight[0]._u), atol=1e-5)
    t.eval()
    f.eval()
    u_before = np_(sn_f._u[...]).copy()
    for _ in range(2):
        np.testing.assert_allclose(np_(read(f)), to_flax(np_(t.weight)), atol=1e-5)
    np.testing.assert_array_equal(np_(sn_f._u[...]), u_before)


def test_spectral_norm_follows_nnx_view():
    # flax's `nnx.view(model, deterministic=True)` is an evaluation view: the
    # vectors stay fixed, as with `module.eval()`, and the model it views keeps
    # training; `deterministic=False` on an evaluation model is a training view.
    t, f, _ = linear_pair()
    norm_linear_pair("spectral_norm", t, f)
    sn = f.parametrizations.kernel[0]
    x = np.random.randn(2, 5).astype(np.float32)
    u_before = np_(sn._u[...]).copy()
    t.eval()
    view = nnx.view(f, deterministic=True)
    np.testing.assert_allclose(np_(view(jnp.asarray(x))), np_(t(torch.from_numpy(x))), atol=1e-5)
    np.testing.assert_array_equal(np_(sn._u[...]), u_before)
    assert not sn.deterministic
    f.eval()
    t.train()
    train_view = nnx.view(f, deterministic=False)
    np.testing.assert_allclose(
        np_(train_view(jnp.asarray(x))), np_(t(torch.from_numpy(x))), atol=1e-5
    )
    np.testing.assert_allclose(np_(sn._u[...]), np_(t.parametrizations.weight[0]._u), atol=1e-5)
    assert not np.array_equal(np_(sn._u[...]), u_before)


def test_spectral_norm_1d_is_normalize_and_has_no_vectors():
    t = torch.nn.LayerNorm(5)
    f = nnx.LayerNorm(5, epsilon=1e-5, rngs=nnx.Rngs(0))
    w = np.random.randn(5).astype(np.float32)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(w))
    f.scale[...] = jnp.asarray(w)
    TP.spectral_norm(t, "weight")
    spectral_norm(f, "scale")
    np.testing.assert_allclose(np_(f.scale[...]), np_(t.weight), atol=1e-6)
    assert not hasattr(f.parametrizations.scale[0], "_u")
    x = np.random.randn(2, 5).astype(np.float32)
    np.testing.assert_allclose(np_(f(jnp.asarray(x))), np_(t(torch.from_numpy(x))), atol=1e-5)


def test_spectral_norm_errors_match_torch():
    for kwargs in ({"n_power_iterations": 0}, {"dim": 3}):
        with pytest.raises(Exception) as torch_err:
            TP.spectral_norm(torch.nn.Linear(3, 3), "weight", **kwargs)
        f = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        with pytest.raises(type(torch_err.value)) as ours:
            spectral_norm(f, "kernel", **kwargs)
        assert str(ours.value).split("(")[0] == str(torch_err.value).split("(")[0]
        assert type(f) is nnx.Linear


@pytest.mark.parametrize("graph", [True, False])
def test_spectral_norm_gan_pattern_two_forwards_one_backward(graph):
    f = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    spectral_norm(f, rngs=nnx.Rngs(1))
    x1, x2 = jnp.ones((2, 4)), -jnp.ones((2, 4))
    # u starts far from the converged vector the 15 warm-up iterations left there
    f.parametrizations.kernel[0]._u[...] = u0 = jnp.full((4,), 0.5)

    @nnx.jit(graph=graph)  # flax's graph mode (its default) and its tree mode
    def step(m):
        def loss(m):
            return m(x1).sum() - m(x2).sum()

        return nnx.grad(loss)(m)

    grads = step(f)
    assert np.all(np.isfinite(np_(grads["parametrizations"]["kernel"]["original"][...])))
    u = np_(f.parametrizations.kernel[0]._u[...])
    assert not np.allclose(u, np_(u0)) and np.isclose(np.linalg.norm(u), 1.0)  # updated
    assert "0" not in grads["parametrizations"]["kernel"] or not any(
        isinstance(v, nnx.Param) for v in jax.tree.leaves(grads["parametrizations"]["kernel"]["0"])
    )


# -- training side by side with torch ------------------------------------------


@pytest.mark.parametrize("builtin", ["weight_norm", "spectral_norm"])
def test_training_matches_torch(builtin, mse_steps):
    torch.manual_seed(0)
    t1, f1, _ = linear_pair(6, 5)
    t2, f2, _ = linear_pair(5, 2)
    for t, f in ((t1, f1), (t2, f2)):
        norm_linear_pair(builtin, t, f)

    class Net(nnx.Module):
        def __init__(self):
            self.a, self.b = f1, f2

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    net = Net()
    tnet = torch.nn.Sequential(t1, torch.nn.Tanh(), t2)
    x = np.random.randn(8, 6).astype(np.float32)
    y = np.random.randn(8, 2).astype(np.float32)
    step = mse_steps(net, optax.sgd(0.1), tnet, torch.optim.SGD(tnet.parameters(), lr=0.1))
    for _ in range(4):
        loss, tloss = step(x, y)
        np.testing.assert_allclose(float(loss), tloss.detach().item(), rtol=1e-5, atol=1e-6)
    for t, f in ((t1, f1), (t2, f2)):
        np.testing.assert_allclose(np_(f.kernel[...]), np_(t.weight).T, atol=1e-5)


# -- orthogonal -------------------------------------------------------------------

ORTH_CASES = [
    (din, dout, m, triv)
    for din, dout in [(3, 5), (5, 3), (4, 4)]
    for m in ("matrix_exp", "cayley", "householder")
    for triv in (True, False)
    if triv or m == "householder"
]


def orthogonal_pair(din, dout, m, triv):
    t, f, _ = linear_pair(din, dout)
    torch.manual_seed(0)
    TP.orthogonal(t, "weight", m, use_trivialization=triv)
    orthogonal(f, orthogonal_map=m, use_trivialization=triv, rngs=nnx.Rngs(0))
    if triv:
        # torch completes non-square matrices with torch.randn: take its draw
        base = np_(t.parametrizations.weight[0].base)
        f.parametrizations.kernel[0].base[...] = jnp.asarray(base)
    return t, f


@pytest.mark.parametrize(("din", "dout", "m", "triv"), ORTH_CASES)
def test_orthogonal_matches_torch_and_trains_alike(din, dout, m, triv, mse_steps):
    t, f = orthogonal_pair(din, dout, m, triv)
    np.testing.assert_allclose(np_(f.kernel[...]), np_(t.weight).T, atol=1e-6)
    np.testing.assert_allclose(
        np_(f.parametrizations.kernel.original[...]),
        np_(t.parametrizations.weight.original).T,
        atol=1e-6,
    )
    x = np.random.randn(4, din).astype(np.float32)
    y = np.random.randn(4, dout).astype(np.float32)
    step = mse_steps(f, optax.sgd(0.1), t, torch.optim.SGD(t.parameters(), lr=0.1))
    for _ in range(3):
        step(x, y)
    np.testing.assert_allclose(np_(f.kernel[...]), np_(t.weight).T, atol=1e-5)


@pytest.mark.parametrize("m", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_assignment_matches_torch(m):
    t, f = orthogonal_pair(5, 3, m, True)
    q = np.linalg.qr(np.random.randn(5, 3))[0].astype(np.float32)  # flax (in, out)
    with torch.no_grad():
        t.weight = torch.from_numpy(q.T.copy())
    f.kernel = jnp.asarray(q)
    np.testing.assert_allclose(np_(f.kernel[...]), q, atol=1e-5)
    np.testing.assert_allclose(np_(f.kernel[...]), np_(t.weight).T, atol=1e-5)
    with pytest.raises(ValueError, match="Expected a matrix or batch of matrices of shape"):
        f.kernel = jnp.zeros((3, 5))


def test_orthogonal_householder_without_trivialization_assignment():
    t, f = orthogonal_pair(5, 3, "householder", False)
    q = np.linalg.qr(np.random.randn(5, 3))[0].astype(np.float32)
    with torch.no_grad():
        t.weight = torch.from_numpy(q.T.copy())
    f.kernel = jnp.asarray(q)
    np.testing.assert_allclose(np_(f.kernel[...]), np_(t.weight).T, atol=1e-5)


def test_orthogonal_errors_match_torch():
    cases = [
        (lambda: torch.nn.LayerNorm(3), lambda: nnx.LayerNorm(3, rngs=nnx.Rngs(0)), {}),
        (
            lambda: torch.nn.Linear(3, 3),
            lambda: nnx.Linear(3, 3, rngs=nnx.Rngs(0)),
            {"orthogonal_map": "qr"},
        ),
    ]
    for make_t, make_f, kwargs in cases:
        t, f = make_t(), make_f()
        name = "scale" if isinstance(f, nnx.LayerNorm) else "kernel"
        with pytest.raises(ValueError) as torch_err:
            TP.orthogonal(t, "weight", **kwargs)
        with pytest.raises(ValueError) as ours:
            orthogonal(f, name, **kwargs)
        assert str(ours.value) == str(torch_err.value)
        assert not P.is_parametrized(f)
    f = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="It is not possible to assign"):
        orthogonal(f, orthogonal_map="cayley", use_trivialization=False)
        f.kernel = jnp.eye(3)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
def test_orthogonal_complex_householder_refused():
    t = torch.nn.Linear(3, 3).to(torch.complex64)
    with pytest.raises(ValueError) as torch_err:
        TP.orthogonal(t, "weight", "householder")
    f = nnx.Linear(3, 3, param_dtype=jnp.complex64, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError) as ours:
        orthogonal(f, orthogonal_map="householder")
    assert str(ours.value) == str(torch_err.value)


MAPS = ["matrix_exp", "cayley", "householder"]


@pytest.mark.parametrize("m", MAPS)
def test_orthogonal_stays_orthogonal_after_many_large_steps(m):
    n = 16
    f = nnx.Linear(n, n, rngs=nnx.Rngs(0))
    orthogonal(f, orthogonal_map=m)
    opt = nnx.Optimizer(f, optax.sgd(1.0), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (32, n))
    y = jax.random.normal(jax.random.key(1), (32, n))

    @nnx.jit
    def step(f, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(f)
        opt.update(f, grads)

    fast_step = nnx.cached_partial(step, f, opt)
    for _ in range(1000):
        fast_step()
    k = f.kernel[...]
    err = float(jnp.max(jnp.abs(k.T @ k - jnp.eye(n))))
    assert err <= 10 * n * float(jnp.finfo(jnp.float32).eps), err


@pytest.mark.parametrize("builtin", ["weight_norm", "spectral_norm"])
def test_norms_forward_mode_matches_torch(builtin):
    """jax.jvp of the weight an NNX norm computes, along tangents on its
    originals, against torch's J t for the same weight (torch's weight_norm has
    no forward mode, so J comes from torch.func.jacrev), layouts transposed."""
    t, f, _ = linear_pair(5, 4)
    norm_linear_pair(builtin, t, f)
    t.eval()
    f.eval()
    names = [n for n, _ in t.parametrizations.weight.named_parameters()]
    t_orig = {n: p.detach() for n, p in t.parametrizations.weight.named_parameters()}
    rng = np.random.default_rng(3)
    t_tan = {
        n: torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32))
        for n, p in t_orig.items()
    }
    graphdef, params, rest = nnx.split(f, nnx.Param, ...)
    originals = params["parametrizations"]["kernel"]
    for n in names:  # the same numbers, in flax's layout (transposed)
        np.testing.assert_allclose(np_(originals[n][...]), np_(t_orig[n]).T, rtol=1e-6)
    tangents = jax.tree.map(jnp.zeros_like, params)
    for n in names:
        tangents["parametrizations"]["kernel"][n][...] = jnp.asarray(np_(t_tan[n]).T)

    def kernel(p):
        return nnx.merge(graphdef, p, rest).kernel[...]

    _, k_dot = jax.jvp(kernel, (params,), (tangents,))

    link = t.parametrizations.weight[0]  # torch's _WeightNorm / _SpectralNorm
    jac = torch.func.jacrev(lambda o: link(*[o[n] for n in names]))(t_orig)
    w_dot = sum(
        (jac[n].reshape(t.weight.numel(), -1) @ t_tan[n].reshape(-1)).reshape(t.weight.shape)
        for n in names
    )
    np.testing.assert_allclose(np_(k_dot), np_(w_dot).T, rtol=1e-5, atol=1e-5)
    assert float(np.abs(np_(w_dot)).max()) > 1e-3


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", *MAPS])
def test_builtins_forward_mode_matches_reverse_mode(kind):
    """jax.jvp through an NNX built-in (matrix_exp inside forward_mode_ad) gives
    J t, with J from reverse mode (traced outside the context)."""
    from jaxparam.functional import forward_mode_ad

    f = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    if kind in MAPS:
        orthogonal(f, orthogonal_map=kind, rngs=nnx.Rngs(1))
    else:
        {"weight_norm": weight_norm, "spectral_norm": spectral_norm}[kind](f)
    f.eval()
    graphdef, params, rest = nnx.split(f, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(0), (3, 5))

    def apply(p):
        return nnx.merge(graphdef, p, rest)(x)

    tangents = jax.tree.map(lambda p: jax.random.normal(jax.random.key(2), p.shape), params)
    with forward_mode_ad():
        y, y_dot = jax.jit(lambda p, t: jax.jvp(apply, (p,), (t,)))(params, tangents)
    jac = jax.jit(jax.jacrev(apply))(params)
    want = sum(
        jnp.tensordot(j, t, axes=t.ndim)
        for j, t in zip(jax.tree.leaves(jac), jax.tree.leaves(tangents), strict=True)
    )
    np.testing.assert_allclose(y, apply(params), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_dot, want, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(y_dot).max()) > 1e-3


def test_builtins_append_to_an_existing_chain_like_torch():
    t, f, _ = linear_pair(4, 4)

    class DoubleT(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    P.register_parametrization(f, "kernel", lambda x: 2 * x)
    torch.nn.utils.parametrize.register_parametrization(t, "weight", DoubleT())
    TP.spectral_norm(t, "weight")
    spectral_norm(f, rngs=nnx.Rngs(0))
    assert len(f.parametrizations.kernel) == len(t.parametrizations.weight) == 2
    f.parametrizations.kernel[1]._u[...] = jnp.asarray(np_(t.parametrizations.weight[1]._u))
    f.parametrizations.kernel[1]._v[...] = jnp.asarray(np_(t.parametrizations.weight[1]._v))
    for _ in range(2):
        np.testing.assert_allclose(np_(f.kernel[...]), np_(t.weight).T, atol=1e-5)


def test_weight_norm_appended_to_spectral_norm_reads_nothing_like_torch():
    # torch's weight_norm registers with unsafe=True and never reads the weight:
    # the spectral norm in the chain takes no power iteration (ours took one).
    t, f, _ = linear_pair(4, 4)
    TP.spectral_norm(t, "weight")
    spectral_norm(f, rngs=nnx.Rngs(0))
    t_sn, f_sn = t.parametrizations.weight[0], f.parametrizations.kernel[0]
    with torch.no_grad():  # far from converged, so one iteration moves them a lot
        t_sn._u.copy_(torch.tensor([1.0, 0, 0, 0]))
        t_sn._v.copy_(torch.tensor([0, 1.0, 0, 0]))
    f_sn._u[...], f_sn._v[...] = jnp.asarray(np_(t_sn._u)), jnp.asarray(np_(t_sn._v))
    TP.weight_norm(t, "weight")
    weight_norm(f)
    np.testing.assert_array_equal(np_(f_sn._u[...]), np_(t_sn._u))
    np.testing.assert_array_equal(np_(f_sn._v[...]), np_(t_sn._v))
    # weight norm takes (g, v): after another link the chain cannot run, in both
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        _ = t.weight
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        _ = f.kernel


@pytest.mark.parametrize(
    "bad",
    [
        lambda m: weight_norm(m, dim=7),
        lambda m: spectral_norm(m, dim=7),
        lambda m: spectral_norm(m, n_power_iterations=0),
        lambda m: orthogonal(m, orthogonal_map="bogus"),
    ],
    ids=["weight_norm_dim", "spectral_norm_dim", "spectral_norm_iterations", "orthogonal_map"],
)
def test_builtin_that_raises_leaves_a_spectral_norm_in_the_chain_as_it_was(bad):
    # spectral_norm and orthogonal read the weight first, as torch's do (a power
    # iteration in training mode); when their checks then fail, the module
    # (its power-iteration vectors included) is as it was, unlike torch's.
    f = spectral_norm(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
    sn = f.parametrizations.kernel[0]
    sn._u[...] = jnp.asarray([1.0, 0, 0, 0])
    before = jax.tree.map(np.asarray, nnx.state(f))
    with pytest.raises((ValueError, IndexError)):
        bad(f)
    after = jax.tree.map(np.asarray, nnx.state(f))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert len(f.parametrizations.kernel) == 1
