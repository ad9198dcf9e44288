"""Differential tests of `jaxparam.functional.orthogonal` against torch's `_Orthogonal`."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.utils.parametrizations import _is_orthogonal, _OrthMaps, _Orthogonal

from jaxparam.functional import (
    default_orthogonal_map,
    forward_mode_ad,
    is_orthogonal,
    matrix_exp,
    orthogonal,
    orthogonal_right_inverse,
)

from ._helpers import assert_close, to_numpy, to_torch_dtype

SHAPES = [(4, 4), (3, 5), (2, 5, 3), (2, 1, 3, 4)]
MAPS = ["matrix_exp", "cayley", "householder"]


def _randn(rng, shape, dtype):
    x = rng.standard_normal(shape)
    if "complex" in dtype:
        x = x + 1j * rng.standard_normal(shape)
    return jnp.asarray(x, dtype)


@functools.cache
def _value_and_vjp(orthogonal_map, use_trivialization, jit):
    def f(X, base, ct):
        fun = functools.partial(
            orthogonal, orthogonal_map=orthogonal_map, use_trivialization=use_trivialization
        )
        Q, vjp = jax.vjp(fun, X, base)
        return Q, *vjp(ct)

    return jax.jit(f) if jit else f


def _torch_grad(t):
    return to_numpy(t.grad)


def _run(
    shape, orthogonal_map, dtype, use_trivialization, jit=True, diagonal=0.0, unitary_base=False
):
    rng = np.random.default_rng(0)
    X = _randn(rng, shape, dtype) + diagonal * jnp.eye(*shape[-2:], dtype=dtype)
    tX = to_torch_dtype(X, dtype)
    # torch refuses to register a complex Householder weight, but a registered module
    # cast with `.to(torch.complex64)` runs its forward on one: build it from the real part.
    mod = _Orthogonal(
        tX.real, getattr(_OrthMaps, orthogonal_map), use_trivialization=use_trivialization
    )
    base = None
    if use_trivialization:
        n = max(shape[-2:])
        base_np = _randn(rng, (*shape[:-2], n, n), dtype)
        if unitary_base:  # as `right_inverse` makes it
            base_np = jnp.linalg.qr(base_np)[0]
        tb = to_torch_dtype(base_np, dtype, requires_grad=True)
        mod.base = tb
        base = base_np
    tX.requires_grad_(True)
    tQ = mod(tX)
    ct = _randn(rng, shape, dtype)
    # torch's complex gradient is the conjugate of JAX's VJP of the conjugate cotangent.
    tQ.backward(to_torch_dtype(jnp.conj(ct), dtype))
    Q, gX, gb = _value_and_vjp(orthogonal_map, use_trivialization, jit)(X, base, ct)
    assert Q.shape == shape and Q.dtype == X.dtype
    assert_close(Q, to_numpy(tQ), dtype)
    # Rounding grows with the gradient's size: householder's reach 42 here, where
    # an absolute 1e-5 is 4 float32 ulps (an AMD EPYC machine gave 2.1e-5 against
    # torch). The tolerance is relative above 1.
    tgX = _torch_grad(tX)
    assert_close(jnp.conj(gX), tgX, dtype, scale=max(1.0, float(np.abs(tgX).max())))
    if use_trivialization:
        tgb = _torch_grad(tb)
        assert_close(jnp.conj(gb), tgb, dtype, scale=max(1.0, float(np.abs(tgb).max())))


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", SHAPES)
def test_orthogonal_float32(shape, orthogonal_map):
    _run(shape, orthogonal_map, "float32", use_trivialization=False)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_orthogonal_trivialization(orthogonal_map, jit):
    if jit:  # eager dispatch is slow: one small case covers the eager path
        _run((2, 5, 3), orthogonal_map, "float32", use_trivialization=True, jit=jit)
    _run((3, 4), orthogonal_map, "float32", use_trivialization=True, jit=jit)


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (2, 3, 5)])
def test_orthogonal_float64(shape, orthogonal_map, x64):
    _run(shape, orthogonal_map, "float64", use_trivialization=shape[-1] == 3)


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((4, 4), "complex64"),
        ((2, 5, 3), "complex64"),
        ((3, 4), "complex64"),
        ((2, 3, 4), "complex128"),
    ],
)
def test_orthogonal_complex(shape, orthogonal_map, dtype, x64):
    _run(shape, orthogonal_map, dtype, use_trivialization=shape[-2:] == (3, 4))


@pytest.mark.parametrize("use_trivialization", [False, True])
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((5, 3), "complex64"),
        ((3, 5), "complex64"),
        ((4, 4), "complex64"),
        ((2, 5, 3), "complex128"),
        ((2, 3, 5), "complex128"),
        ((4, 4), "complex128"),
    ],
)
def test_orthogonal_householder_complex(shape, dtype, use_trivialization, x64):
    # Torch's forward on a complex X: tau = 2 / (1 + sum(A * A)) (no conjugate), the
    # reflectors I - tau v v^H, the columns times trunc(real(diag(X))). The shifted
    # diagonal makes those factors 1 or 2 mostly (0 zeroes a column's gradient). The
    # product is not unitary: with a random base, gradients of size 20 leave float32
    # rounding above 1e-5 (1e-14 in double); the base is unitary, as right_inverse's.
    _run(shape, "householder", dtype, use_trivialization, diagonal=2.0, unitary_base=True)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((2, 150, 150), "float32"),
        ((141, 67), "float64"),
        ((130, 130), "complex64"),
        ((100, 197), "float32"),
    ],
)
def test_cayley_blocked_inverse(shape, dtype, x64):
    # Sizes where the inverse is blocked (n > 128): odd splits, tall and wide, batched.
    # (With a random non-orthogonal base, float32 gradients at n ~ 100 are too large
    # for an absolute 1e-5: the trivialization is checked in float64.)
    _run(shape, "cayley", dtype, use_trivialization=dtype == "float64")


@pytest.mark.parametrize(("shape", "dtype"), [((2, 7, 7), "float32"), ((3, 48, 48), "complex128")])
def test_gauss_jordan_leaf_inverse(shape, dtype, x64):
    # The blocked Cayley inverse's leaves: I - A/2 with A skew-Hermitian, inverted in
    # XLA without pivoting, equal numpy's pivoted LAPACK inverse.
    from jaxparam.functional._orthogonal import _gauss_jordan_inverse

    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape) * 2.0
    if dtype.startswith("complex"):
        x = x + 1j * rng.standard_normal(shape) * 2.0
    a = x - np.conj(np.swapaxes(x, -1, -2))
    m = np.eye(shape[-1]) - a / 2
    got = np.asarray(_gauss_jordan_inverse(jnp.asarray(m, dtype)))
    tol = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(got, np.linalg.inv(m), atol=tol, rtol=tol)


def test_matrix_exp_large_norm(x64):
    # Several squarings: compare with torch in float64 (tight) and float32 (relative).
    rng = np.random.default_rng(1)
    A = rng.standard_normal((2, 12, 12)) * 3.0
    ct = rng.standard_normal((2, 12, 12))
    tA = torch.from_numpy(A).requires_grad_(True)
    tE = torch.matrix_exp(tA)
    tE.backward(torch.from_numpy(ct))
    E, g = jax.jit(lambda a, c: (matrix_exp(a), jax.vjp(matrix_exp, a)[1](c)[0]))(
        jnp.asarray(A), jnp.asarray(ct)
    )
    scale = np.abs(tE.detach().numpy()).max()
    assert np.abs(E - tE.detach().numpy()).max() <= 1e-10 * scale
    assert np.abs(g - tA.grad.numpy()).max() <= 1e-10 * np.abs(tA.grad.numpy()).max()
    E32 = matrix_exp(jnp.asarray(A, jnp.float32))
    assert np.abs(E32 - tE.detach().numpy()).max() <= 1e-5 * scale


@pytest.mark.parametrize("degree", [8, 18])
def test_matrix_exp_polynomials_are_taylor(degree, x64):
    # The product-saving evaluations are the Taylor polynomial, coefficient for
    # coefficient: on scalars up to |x| = 10 (where a wrong high-order coefficient
    # would weigh, x^18/18! ~ 156) they agree with sum x^k/k! to float64 rounding.
    from jaxparam.functional._orthogonal import _TAYLOR, _taylor

    x = np.concatenate([np.linspace(-10.0, 10.0, 81), [1e-3, -0.58, 1.09]])
    got = np.array(jax.vmap(lambda t: _taylor(t.reshape(1, 1), degree)[0, 0])(jnp.asarray(x)))
    k = np.arange(degree + 1)
    terms = x[:, None] ** k / np.array([math.factorial(int(j)) for j in k])
    assert np.all(np.abs(got - terms.sum(1)) <= 4e-15 * np.abs(terms).sum(1))
    # Its theta: the remainder at theta is below the unit roundoff of the precision.
    for itemsize, eps in ((4, 2.0**-24), (8, 2.0**-53)):
        m, theta = _TAYLOR[itemsize]
        if m == degree:
            assert sum(theta**j / math.factorial(j) for j in range(m + 1, m + 40)) < eps


# --- right inverse ----------------------------------------------------------------------


def _torch_right_inverse(Q, orthogonal_map, use_trivialization):
    tQ = torch.from_numpy(np.array(Q))
    mod = _Orthogonal(tQ, getattr(_OrthMaps, orthogonal_map), use_trivialization=use_trivialization)
    X = mod.right_inverse(tQ)
    return mod, X


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 5), (2, 4, 3)])
def test_right_inverse_householder_no_trivialization(shape, jit):
    rng = np.random.default_rng(0)
    Q = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    mod, tX = _torch_right_inverse(Q, "householder", False)
    f = functools.partial(
        orthogonal_right_inverse, orthogonal_map="householder", use_trivialization=False
    )
    X, base = (jax.jit(f) if jit else f)(Q)
    assert base is None
    assert_close(X, tX.numpy(), "float32")
    # forward(right_inverse(Q)) is the orthogonalized Q, in both libraries.
    Q2 = orthogonal(X, orthogonal_map="householder", use_trivialization=False)
    assert_close(Q2, mod(tX).numpy(), "float32")
    assert bool(is_orthogonal(Q2 if shape[-2] >= shape[-1] else jnp.swapaxes(Q2, -1, -2)))


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(4, 4), (2, 4, 4)])
def test_right_inverse_square(shape, orthogonal_map, dtype):
    if orthogonal_map == "householder" and dtype == "complex64":
        pytest.skip("torch: householder does not support complex")
    rng = np.random.default_rng(0)
    W = _randn(rng, shape, dtype)
    f = jax.jit(functools.partial(orthogonal_right_inverse, orthogonal_map=orthogonal_map))
    for target in (W, np.linalg.qr(np.asarray(W))[0]):  # not orthogonal, then orthogonal
        target = jnp.asarray(target, dtype)
        mod, tX = _torch_right_inverse(target, orthogonal_map, True)
        X, base = f(target)
        # Deterministic here: base is Q (orthogonal) or its QR factor.
        assert_close(X, tX.numpy(), dtype)
        assert_close(base, mod.base.numpy(), dtype)
        Q = orthogonal(X, base, orthogonal_map=orthogonal_map)
        assert_close(Q, mod(tX).numpy(), dtype)
    # Orthogonal targets are reproduced exactly: orthogonal(right_inverse(Q)) == Q.
    assert_close(Q, target, dtype)


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (2, 4, 2)])
def test_right_inverse_non_square(shape, orthogonal_map):
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((*shape[:-2], max(shape[-2:]), min(shape[-2:]))))[0]
    if shape[-2] < shape[-1]:
        Q = np.swapaxes(Q, -1, -2)
    Q = jnp.asarray(Q, jnp.float32)
    mod, tX = _torch_right_inverse(Q, orthogonal_map, True)
    X, base = orthogonal_right_inverse(Q, orthogonal_map=orthogonal_map, key=jax.random.key(0))
    # Random completion: compare the deterministic parts and the properties.
    assert_close(X, tX.numpy(), "float32")
    n = max(shape[-2:])
    assert base.shape == tuple(mod.base.shape) == (*shape[:-2], n, n)
    assert bool(is_orthogonal(base))
    k = min(shape[-2:])
    Qt = Q if shape[-2] >= shape[-1] else jnp.swapaxes(Q, -1, -2)
    assert_close(base[..., :k], Qt, "float32")  # first columns are Q (diag(R) = +1)
    assert_close(orthogonal(X, base, orthogonal_map=orthogonal_map), Q, "float32")


def test_right_inverse_is_deterministic_given_key():
    Q = jnp.eye(5)[:, :2]
    f = functools.partial(orthogonal_right_inverse, orthogonal_map="householder")
    a = f(Q, key=jax.random.key(3))[1]
    b = f(Q, key=jax.random.key(3))[1]
    c = f(Q, key=jax.random.key(4))[1]
    assert bool(jnp.all(a == b)) and not bool(jnp.all(a == c))


@pytest.mark.parametrize("shape", [(4, 4), (5, 3), (3, 7), (2, 6, 4)])
def test_is_orthogonal_and_default_map(shape):
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.complex64):
        W = rng.standard_normal(shape).astype(dtype)
        tall = W if shape[-2] >= shape[-1] else np.swapaxes(W, -1, -2)
        for M in (tall, np.linalg.qr(tall)[0]):
            assert bool(is_orthogonal(jnp.asarray(M))) == _is_orthogonal(torch.from_numpy(M))
        lin = torch.nn.Module()
        lin.weight = torch.nn.Parameter(torch.from_numpy(W))
        torch.nn.utils.parametrizations.orthogonal(lin)
        expected = lin.parametrizations.weight[0].orthogonal_map.name
        assert default_orthogonal_map(jnp.asarray(W)) == expected


# --- errors -----------------------------------------------------------------------------


def _torch_error(exc, fn):
    with pytest.raises(exc) as info:
        fn()
    return "^" + re.escape(str(info.value))


def test_error_1d():
    m = torch.nn.Module()
    m.weight = torch.nn.Parameter(torch.randn(4))
    match = _torch_error(ValueError, lambda: torch.nn.utils.parametrizations.orthogonal(m))
    with pytest.raises(ValueError, match=match):
        orthogonal(jnp.ones(4), orthogonal_map="cayley", use_trivialization=False)
    with pytest.raises(ValueError, match=match):
        orthogonal_right_inverse(jnp.ones(4), orthogonal_map="cayley")
    with pytest.raises(ValueError, match=match):
        default_orthogonal_map(jnp.ones(4))


def test_error_unknown_map():
    m = torch.nn.Linear(3, 3)
    match = _torch_error(
        ValueError, lambda: torch.nn.utils.parametrizations.orthogonal(m, orthogonal_map="qr")
    )
    with pytest.raises(ValueError, match=match):
        orthogonal(jnp.ones((3, 3)), orthogonal_map="qr", use_trivialization=False)


def test_error_householder_complex():
    m = torch.nn.Module()
    m.weight = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    match = _torch_error(
        ValueError,
        lambda: torch.nn.utils.parametrizations.orthogonal(m, orthogonal_map="householder"),
    )
    # Refused where torch refuses (no tau can be recovered from complex reflectors):
    # the inverse. The forward runs, as torch's does (test_orthogonal_householder_complex).
    X = jnp.ones((4, 3), jnp.complex64)
    for use_trivialization in (True, False):
        with pytest.raises(ValueError, match=match):
            orthogonal_right_inverse(
                X, orthogonal_map="householder", use_trivialization=use_trivialization
            )


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley"])
def test_error_right_inverse_without_trivialization(orthogonal_map):
    # register_parametrization swallows this NotImplementedError; call right_inverse.
    match = _torch_error(
        NotImplementedError,
        lambda: _torch_right_inverse(np.eye(3, dtype=np.float32), orthogonal_map, False),
    )
    with pytest.raises(NotImplementedError, match=match):
        orthogonal_right_inverse(
            jnp.eye(3), orthogonal_map=orthogonal_map, use_trivialization=False
        )


def test_error_base_mismatch():
    with pytest.raises(ValueError, match="`base` is required"):
        orthogonal(jnp.eye(3), orthogonal_map="cayley")
    with pytest.raises(ValueError, match="`base` was given"):
        orthogonal(jnp.eye(3), jnp.eye(3), orthogonal_map="cayley", use_trivialization=False)
    with pytest.raises(ValueError, match="`key` is required"):
        orthogonal_right_inverse(jnp.eye(3)[:, :2], orthogonal_map="cayley")


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
@pytest.mark.parametrize("shape", [(0, 0), (0, 3), (3, 0), (2, 0, 0)], ids=str)
def test_orthogonal_empty_is_unchanged_as_torch(shape, orthogonal_map):
    X = jnp.zeros(shape)
    Q = orthogonal(X, orthogonal_map=orthogonal_map, use_trivialization=False)
    assert Q.shape == shape
    n = max(shape[-2:])
    base = jnp.zeros((*shape[:-2], n, n))
    assert orthogonal(X, base, orthogonal_map=orthogonal_map).shape == shape
    assert matrix_exp(jnp.zeros((0, 0))).shape == (0, 0)


@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((4, 4), "float64"), ((2, 5, 3), "float64"), ((3, 4), "complex128"), ((6, 6), "float32")],
)
def test_orthogonal_forward_mode_matches_torch(shape, orthogonal_map, dtype, x64):
    """jax.jvp through each map (with the trivialization's base) against torch's
    forward-mode AD on `_Orthogonal`; `matrix_exp` inside `forward_mode_ad`."""
    rng = np.random.default_rng(0)
    X, dX = _randn(rng, shape, dtype), _randn(rng, shape, dtype)
    n = max(shape[-2:])
    base, dbase = (_randn(rng, (*shape[:-2], n, n), dtype) for _ in range(2))
    # Built from the real part: torch registers no complex Householder weight (see _run).
    mod = _Orthogonal(to_torch_dtype(X, dtype).real, getattr(_OrthMaps, orthogonal_map))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        mod.base = fwAD.make_dual(to_torch_dtype(base, dtype), to_torch_dtype(dbase, dtype))
        out = mod(fwAD.make_dual(to_torch_dtype(X, dtype), to_torch_dtype(dX, dtype)))
        tQ, tdQ = (to_numpy(t) for t in fwAD.unpack_dual(out)[:2])
    fun = functools.partial(orthogonal, orthogonal_map=orthogonal_map)
    with forward_mode_ad():
        Q, dQ = jax.jit(lambda *a: jax.jvp(fun, a[:2], a[2:]))(X, base, dX, dbase)
    assert_close(Q, tQ, dtype)
    assert_close(dQ, tdQ, dtype)
    if orthogonal_map != "matrix_exp":  # no context needed (reverse mode: the tests above)
        assert_close(jax.jvp(fun, (X, base), (dX, dbase))[1], tdQ, dtype)


def test_matrix_exp_reverse_mode_refuses_inside_forward_mode_ad():
    """Inside the context, the squarings are a plain loop of data-dependent
    length, which reverse mode cannot differentiate under jit; JAX says so."""
    a = jnp.array([[0.0, 3.0], [-3.0, 0.0]])

    def grad_fn():
        return jax.jit(jax.grad(lambda a: matrix_exp(a).sum()))

    assert float(jnp.abs(grad_fn()(a)).sum()) > 0
    with forward_mode_ad(), pytest.raises(ValueError, match="Reverse-mode differentiation"):
        grad_fn()(a)
    # outside the context again, the custom VJP is back
    assert float(jnp.abs(grad_fn()(a)).sum()) > 0


# --- edge cases: empty matrices, extreme scales, non-finite values ------------------------

EMPTY_SHAPES = [(3, 0), (0, 3), (0, 0), (2, 3, 0), (2, 0, 3), (2, 0, 0), (0, 3, 2)]


@pytest.mark.parametrize("use_trivialization", [False, True])
@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_right_inverse_and_forward_as_torch(shape, orthogonal_map, use_trivialization):
    """Torch registers a zero-size matrix with every map (householder's geqrf
    included) and returns it; the shapes of X, base and Q are torch's."""
    if not use_trivialization and orthogonal_map != "householder":
        pytest.skip("torch: only householder inverts without trivialization")
    Q = jnp.zeros(shape)
    mod, tX = _torch_right_inverse(Q, orthogonal_map, use_trivialization)
    X, base = orthogonal_right_inverse(
        Q,
        orthogonal_map=orthogonal_map,
        use_trivialization=use_trivialization,
        key=jax.random.key(0),
    )
    assert X.shape == tuple(tX.shape)
    if use_trivialization:
        assert base.shape == tuple(mod.base.shape)
    else:
        assert base is None
    Q2 = orthogonal(X, base, orthogonal_map=orthogonal_map, use_trivialization=use_trivialization)
    assert Q2.shape == tuple(mod(tX).shape) == shape


def test_empty_forward_broadcasts_base_as_torch(x64):
    # torch's `base @ Q` broadcasts a batched base against an unbatched empty X; the
    # dtype is promoted as for a non-empty X (torch refuses mixed dtypes there).
    mod = _Orthogonal(torch.zeros(3, 0), _OrthMaps.cayley)
    mod.base = torch.zeros(2, 3, 3)
    expected = mod(torch.zeros(3, 0))
    Q = orthogonal(jnp.zeros((3, 0)), jnp.zeros((2, 3, 3)), orthogonal_map="cayley")
    assert Q.shape == tuple(expected.shape) == (2, 3, 0)
    X = jnp.zeros((3, 0), jnp.float32)
    assert orthogonal(X, jnp.zeros((2, 3, 3)), orthogonal_map="cayley").dtype == jnp.float64


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [("float32", s) for s in (1e-30, 1e-15, 1.0, 1e20, 1e30)]
    + [("float64", s) for s in (1e-300, 1e-150, 1.0, 1e150, 1e300)],
    ids=str,
)
@pytest.mark.parametrize("shape", [(4, 3), (3, 5), (2, 5, 5)], ids=str)
def test_right_inverse_householder_extreme_scales(shape, dtype, scale, x64):
    """geqrf's column norms are scaled, as LAPACK's dnrm2: x * x neither
    overflows to NaN nor underflows to an identity-like Q."""
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.standard_normal(shape) * scale, dtype)
    mod, tX = _torch_right_inverse(W, "householder", False)
    X, _ = orthogonal_right_inverse(W, orthogonal_map="householder", use_trivialization=False)
    # X holds R above the diagonal (of the input's scale), reflectors and signs below.
    tX = tX.numpy()
    assert_close(X, tX, dtype, scale=max(1.0, float(np.max(np.abs(tX)))))
    Q = orthogonal(X, orthogonal_map="householder", use_trivialization=False)
    assert_close(Q, mod(torch.from_numpy(tX)).numpy(), dtype)


@pytest.mark.parametrize("use_trivialization", [False, True])
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("orthogonal_map", MAPS)
@pytest.mark.parametrize("shape", [(2, 4, 3), (2, 3, 5), (2, 4, 4)], ids=str)
def test_non_finite_in_non_finite_out(shape, orthogonal_map, value, use_trivialization):
    """A NaN or an inf in the used part of X makes its matrix non-finite, as in
    torch (the pattern may differ: torch's follows LAPACK's); the other matrices of
    the batch keep their values. Cayley's inverse alone would hide an inf."""
    rng = np.random.default_rng(0)
    X = _randn(rng, shape, "float32")
    base = None
    if use_trivialization:
        n = max(shape[-2:])
        base = jnp.asarray(np.linalg.qr(rng.standard_normal((shape[0], n, n)))[0], jnp.float32)
    # below the diagonal in the tall frame: every map reads it
    bad = X.at[0, 2, 0].set(value) if shape[-2] >= shape[-1] else X.at[0, 0, 2].set(value)
    f = functools.partial(
        orthogonal, orthogonal_map=orthogonal_map, use_trivialization=use_trivialization
    )
    Q, Q_clean = f(bad, base), f(X, base)
    assert not bool(jnp.all(jnp.isfinite(Q[0])))
    assert_close(Q[1], Q_clean[1], "float32")
    # torch makes it non-finite too
    mod = _Orthogonal(
        torch.zeros(shape),
        getattr(_OrthMaps, orthogonal_map),
        use_trivialization=use_trivialization,
    )
    if use_trivialization:
        mod.base = torch.from_numpy(np.array(base))
    assert not bool(torch.isfinite(mod(torch.from_numpy(np.array(bad)))[0]).all())


def test_cayley_non_finite_gradients():
    """The NaN selects Q, not A: finite matrices keep their gradient, a non-finite
    one gets a finite (zero) gradient instead of NaN flowing into the others."""
    rng = np.random.default_rng(0)
    X = _randn(rng, (2, 4, 4), "float32")
    bad = X.at[0, 2, 0].set(jnp.inf)

    def loss(X):
        Q = orthogonal(X, orthogonal_map="cayley", use_trivialization=False)
        return jnp.sum(jnp.where(jnp.isfinite(Q), Q, 0) * jnp.arange(16.0).reshape(4, 4))

    g, g_clean = jax.grad(loss)(bad), jax.grad(loss)(X)
    assert bool(jnp.all(jnp.isfinite(g)))
    assert_close(g[1], g_clean[1], "float32")
