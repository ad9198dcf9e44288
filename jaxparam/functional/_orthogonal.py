"""Orthogonal and unitary maps, mirroring torch's `_Orthogonal` parametrization.

In plain words, for ``X`` of shape ``(..., n, k)``::

    if n < k: work on X^T (wide matrices are handled as tall ones), transpose back at the end
    matrix_exp / cayley:
        A = skew(pad(tril(X)))          # A = Y - Y^H, Y = [tril(X), 0] of shape (..., n, n)
        Q = exp(A)[..., :k]             # or cayley(A) = (I - A/2)^{-1} (I + A/2)
    householder:
        Q = H_1 ... H_k [..., :k] * trunc(diag(X))   # reflectors from tril(X, -1)
        (H_i = I - tau_i v_i v_i^H, tau = 2 / (1 + sum(v * v)): for a complex X, torch's
        numbers, which need not be unitary; the right inverse refuses complex, as torch)
    if use_trivialization: Q = base @ Q

The right inverse, with ``use_trivialization=True``, stores an orthogonal ``base``
(``Q`` itself, orthogonalized by QR when it is not orthogonal, completed to a
square matrix with random columns when it is not square) and returns ``-I`` (so
that ``orthogonal(-I, base) == Q``). With ``use_trivialization=False`` only
``householder`` can be inverted, through ``geqrf``.

All checks use static shapes and dtypes only, so every function is jit-safe; the
maps are differentiable (``householder`` through the compact WY form, since
``jax.lax.linalg.householder_product`` has no derivative rule; ``cayley`` through
a custom JVP of two matrix products, which reverse mode transposes; ``matrix_exp``
through a custom VJP of about three products per squaring, which forward mode cannot
use: inside `forward_mode_ad` it traces as plain JAX operations instead).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from jaxparam.functional import _sharding
from jaxparam.functional._eager import jit_when_eager

__all__ = [
    "default_orthogonal_map",
    "forward_mode_ad",
    "is_orthogonal",
    "matrix_exp",
    "orthogonal",
    "orthogonal_right_inverse",
]

OrthogonalMap = Literal["matrix_exp", "cayley", "householder"]
_MAPS = ("matrix_exp", "cayley", "householder")
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _mH(x: jax.Array) -> jax.Array:
    return jnp.conj(_mT(x))


def _eye_like(x: jax.Array) -> jax.Array:
    return jnp.eye(x.shape[-2], x.shape[-1], dtype=x.dtype)


def _is_complex(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.complexfloating)


# ---------------------------------------------------------------------------------------
# Checks (static: shapes, dtypes and Python arguments only).


def _check_matrix(x: jax.Array) -> None:
    if x.ndim < 2:
        raise ValueError(
            "Expected a matrix or batch of matrices. "
            f"Got a tensor of {x.ndim} dimensions.\n"
            f"shape: {x.shape}"
        )


def _check_map(orthogonal_map: str) -> None:
    if orthogonal_map not in _MAPS:
        raise ValueError(
            'orthogonal_map has to be one of "matrix_exp", "cayley", "householder". '
            f"Got: {orthogonal_map}"
        )


def _check_real_householder(orthogonal_map: str, x: jax.Array) -> None:
    # Torch refuses complex Householder weights at registration (no tau can be
    # recovered from complex reflectors) and so never inverts one; its forward does
    # run on a complex weight (a registered module cast with `.to(torch.complex64)`).
    if orthogonal_map == "householder" and _is_complex(x):
        raise ValueError(
            "The householder parametrization does not support complex tensors.\n"
            'fix: use orthogonal_map="matrix_exp" or "cayley" for complex weights'
        )


# ---------------------------------------------------------------------------------------
# Matrix exponential: scaling and squaring of a Taylor polynomial, with a custom VJP.
#
# Forward: s = ceil(log2(|A|_1 / theta)), R = T_m(A / 2^s), then s squarings. One s for
# the whole batch (no data-dependent branching per matrix).
# Backward: the squarings' adjoints G <- G R_j^T + R_j^T G commute with each other (all
# R_j are polynomials in A), so they run in the forward order, recomputing R_j, in O(n^2)
# memory; then the VJP of the polynomial.
#
# T_m is the Taylor polynomial of degree m, evaluated with the fewest matrix products
# known (Bader, Blanes and Casas, "Computing the matrix exponential with an optimized
# Taylor polynomial approximation", Mathematics 7 (2019), the evaluation torch's
# `torch.matrix_exp` uses): degree 8 in 3 products, degree 18 in 5 (Paterson-Stockmeyer
# needs 4 and 7). theta (torch's values) is a norm at which the remainder
# sum_{k>m} theta^k/k! is below the unit roundoff: 2.2e-8 < 6e-8 in single precision,
# 4.5e-17 < 1.1e-16 in double. torch also picks lower degrees for
# smaller norms; here one degree per precision keeps the computation free of branches
# (a branch on the norm would run every degree under `vmap`).

_SQRT177 = 0.1330413469565007072504e2
_X3 = 2.0 / 3.0
# T8(A) = I + A + Y2 A2 + (X3 A2 + A4)(X4 I + X5 A + X6 A2 + X7 A4), A4 = A2 (X1 A + X2 A2)
_T8 = {
    "x1": _X3 * (1.0 + _SQRT177) / 88.0,
    "x2": _X3 * (1.0 + _SQRT177) / 352.0,
    "x4": (-271.0 + 29.0 * _SQRT177) / (315.0 * _X3),
    "x5": (-11.0 + 11.0 * _SQRT177) / (1260.0 * _X3),
    "x6": (-99.0 + 11.0 * _SQRT177) / (5040.0 * _X3),
    "x7": (89.0 - _SQRT177) / (5040.0 * _X3 * _X3),
    "y2": (857.0 - 58.0 * _SQRT177) / 630.0,
}
# T18: B_i = sum_j _T18_B[i][j] P_j over the powers P = (I, A, A2, A3, A6), then
# A9 = B0 B4 + B3 and T18(A) = B1 + (B2 + A9) A9. The coefficients solve the 19
# equations "the coefficient of A^k is 1/k!" to 40 digits (checked in the tests);
# they agree with the published ones to 3e-7.
_T18_B = (
    (
        0.0,
        -0.1003655810290183160959,
        -0.008029246482321465287674,
        -0.0008921384980357183652971,
        0.0,
    ),
    (
        0.0,
        0.3978497494996450761452,
        1.367837784604117199225,
        0.4982896225253826775569,
        -0.0006378981945947233092416,
    ),
    (
        -10.96763960529620625935,
        1.680158138789061971828,
        0.05717798464788655127029,
        -0.006982101224880520842905,
        0.00003349750170860705383134,
    ),
    (
        -0.09043168323908105619715,
        -0.06764045190713819075601,
        0.06759613017704596460828,
        0.02955525704293155274261,
        -0.00001391802575160607011247,
    ),
    (
        0.0,
        0.0,
        -0.09233646193774806031123,
        -0.0169364939003982332846,
        -0.00001400867981836082157535,
    ),
)
# (degree, theta) by the real itemsize; theta from torch's `mexp` tables.
_TAYLOR = {4: (8, 5.800524627688768e-01), 8: (18, 1.090863719290036e00)}


def _taylor_params(dtype: jnp.dtype) -> tuple[int, float]:
    itemsize = jnp.finfo(dtype).dtype.itemsize
    return _TAYLOR[8] if itemsize >= 8 else _TAYLOR[4]


def _combine(coeffs: Sequence[float], powers: Sequence[jax.Array]) -> jax.Array:
    return functools.reduce(jnp.add, [c * p for c, p in zip(coeffs, powers, strict=True) if c])


def _taylor(b: jax.Array, degree: int) -> jax.Array:
    """The Taylor polynomial of ``exp`` of the given degree (8 or 18) at ``b``."""
    eye, b2 = _eye_like(b), _mm(b, b)
    if degree == 8:
        c = _T8
        b4 = _mm(b2, c["x1"] * b + c["x2"] * b2)
        b8 = _mm(_X3 * b2 + b4, c["x4"] * eye + c["x5"] * b + c["x6"] * b2 + c["x7"] * b4)
        return eye + b + c["y2"] * b2 + b8
    b3 = _mm(b2, b)
    powers = (eye, b, b2, b3, _mm(b3, b3))
    bs = [_combine(row, powers) for row in _T18_B]
    b9 = _mm(bs[0], bs[4]) + bs[3]
    return bs[1] + _mm(bs[2] + b9, b9)


def _scaling(a: jax.Array, theta: float) -> tuple[jax.Array, jax.Array]:
    col_norms = jnp.sum(jnp.abs(jax.lax.stop_gradient(a)), axis=-2)
    # A non-finite column (whose matrix's exp is NaN anyway) must not set the scaling
    # of the rest of the batch (a NaN norm gave s = 0 for every matrix: inaccurate).
    norm = jnp.max(jnp.where(jnp.isfinite(col_norms), col_norms, 0), initial=0.0)
    s = jnp.ceil(jnp.log2(norm / theta))
    s = jnp.where(jnp.isfinite(s), jnp.clip(s, 0, 64), 0).astype(jnp.int32)
    scale = jnp.exp2(-s.astype(jnp.finfo(a.dtype).dtype)).astype(a.dtype)
    return s, a * scale


_tracing = threading.local()


@contextlib.contextmanager
def forward_mode_ad() -> Iterator[None]:
    """Traces `matrix_exp` for forward-mode AD (``jax.jvp``, ``jax.linearize``, ``jax.jacfwd``).

    `matrix_exp`'s derivative is a custom VJP (reverse mode in about three
    matrix products per squaring), and JAX cannot push a tangent through a custom
    VJP. Inside this context (on this thread, while tracing), `matrix_exp`, and so
    `orthogonal`'s default map, traces as plain JAX operations, which forward mode
    differentiates; reverse mode through what is traced here then fails under
    ``jax.jit`` (the squarings are a loop of data-dependent length). The setting is
    read at trace time: a function jitted outside the context keeps its trace. The
    other maps, and weight and spectral norm, need no context.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> a = jnp.array([[0.0, 1.0], [-1.0, 0.0]])
        >>> with forward_mode_ad():
        ...     _, t = jax.jvp(matrix_exp, (a,), (a,))
        >>> bool(jnp.allclose(t, a @ matrix_exp(a), atol=1e-6))
        True
    """
    previous = getattr(_tracing, "forward", False)
    _tracing.forward = True
    try:
        yield
    finally:
        _tracing.forward = previous


@jit_when_eager()
def matrix_exp(a: jax.Array) -> jax.Array:
    """Matrix exponential of a (batch of) square matrices, cheap to differentiate.

    Scaling and squaring of a Taylor polynomial (degree 8 in single precision in 3
    matrix products, degree 18 in double in 5), evaluated as torch's
    ``torch.matrix_exp`` does (which also picks lower degrees per matrix for small
    norms; here one degree and one scaling serve the whole batch). The VJP costs
    about three matrix products per squaring and uses O(n^2) memory. For forward
    mode (``jax.jvp``), trace inside `forward_mode_ad`.

    Args:
        a: array of shape ``(..., n, n)``, real or complex.

    Returns:
        ``exp(a)``, same shape and dtype.

    Raises:
        ValueError: if ``a`` is not a (batch of) square matrices.

    Example:
        >>> import jax.numpy as jnp
        >>> matrix_exp(jnp.zeros((2, 2)))
        Array([[1., 0.],
               [0., 1.]], dtype=float32)
    """
    if getattr(_tracing, "forward", False):
        fn = lambda a: _matrix_exp_fwd(a)[0]  # plain operations: forward mode differentiates them
    else:
        fn = _matrix_exp_vjp
    return _sharding.call_auto(fn, (a,), functools.partial(_sharding.like, a))


@jax.custom_vjp
def _matrix_exp_vjp(a: jax.Array) -> jax.Array:
    return _matrix_exp_fwd(a)[0]


def _check_square(a: jax.Array) -> None:
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(
            f"matrix_exp: expected a square matrix or a batch of square matrices.\nshape: {a.shape}"
        )


def _matrix_exp_fwd(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    _check_square(a)
    degree, theta = _taylor_params(a.dtype)
    s, b = _scaling(a, theta)
    r = _taylor(b, degree)
    r = jax.lax.fori_loop(0, s, lambda _, r: _mm(r, r), r)
    return r, a


def _matrix_exp_bwd(a: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    degree, theta = _taylor_params(a.dtype)
    s, b = _scaling(a, theta)
    r, poly_vjp = jax.vjp(functools.partial(_taylor, degree=degree), b)

    def body(_, carry):
        r, g = carry
        rt = _mT(r)
        return _mm(r, r), _mm(g, rt) + _mm(rt, g)

    _, g = jax.lax.fori_loop(0, s, body, (r, g))
    (gb,) = poly_vjp(g)
    scale = jnp.exp2(-s.astype(jnp.finfo(a.dtype).dtype)).astype(a.dtype)
    return (gb * scale,)


_matrix_exp_vjp.defvjp(_matrix_exp_fwd, _matrix_exp_bwd)


# ---------------------------------------------------------------------------------------
# Cayley map: (I - A/2)^{-1} (I + A/2) = 2 (I - A/2)^{-1} - I, with a JVP in two products,
# dQ = M^{-1} dA M^{-1} where M^{-1} = (Q + I) / 2, which reverse mode transposes into
# A_bar = M^{-T} G M^{-T}.
#
# The inverse is blocked and needs no pivoting: M = I - A/2 with A skew-Hermitian has
# Hermitian part I, and so have (at least) its leading blocks and their Schur
# complements, so every block inverted below has all singular values >= 1 (its inverse
# has norm <= 1). The work is then matrix products, which XLA's CPU code runs much
# faster than its LAPACK LU + triangular solves (1.7-1.9x at n = 256-1024). Up to
# n = 128 one LAPACK inverse is as fast (`benchmarks/bench_functional.py`).
#
# The blocks at the bottom of the recursion are inverted by Gauss-Jordan elimination
# in XLA (no pivoting, for the same reason), not by LAPACK: jaxlib's triangular solve
# runs on OpenBLAS, whose worker threads keep spinning after the call and slow down
# the XLA work that follows (a 512x512 product after a 32x32 solve: 1.26-1.34 ms
# instead of 0.85-0.91). Without any LAPACK call the n = 512 Cayley forward went from
# 4.8 to 3.5 ms and forward+backward from 9.7 to 6.0 ms (n = 1024: 64 to 37 ms).

_BLOCK_INV_FROM = 128  # blocked above this size ...
_BLOCK_INV_LEAF = 48  # ... down to blocks of at most this size


def _gauss_jordan_inverse(m: jax.Array) -> jax.Array:
    """Inverse of ``m`` (``(..., b, b)``) by in-place Gauss-Jordan, without pivoting.

    Only for matrices whose pivots are safe without pivoting, as the blocks of
    `_inv_identity_plus_skew` are (every leading block has Hermitian part I).
    """
    b = m.shape[-1]
    rows = jnp.arange(b)

    def step(k, a):
        col = jax.lax.dynamic_index_in_dim(a, k, axis=-1, keepdims=False)
        row = jax.lax.dynamic_index_in_dim(a, k, axis=-2, keepdims=False)
        p = 1 / jax.lax.dynamic_index_in_dim(col, k, axis=-1, keepdims=True)
        row_p = row * p
        a = a - col[..., :, None] * row_p[..., None, :]
        a = jax.lax.dynamic_update_index_in_dim(a, row_p, k, axis=-2)
        return jax.lax.dynamic_update_index_in_dim(a, jnp.where(rows == k, p, -col * p), k, axis=-1)

    return jax.lax.fori_loop(0, b, step, m)


def _inv_identity_plus_skew(m: jax.Array, top: bool = True) -> jax.Array:
    """Inverse of ``m`` (``(..., n, n)``) whose Hermitian part is the identity."""
    n = m.shape[-1]
    if top and n <= _BLOCK_INV_FROM:
        return jnp.linalg.inv(m)
    if not top and n <= _BLOCK_INV_LEAF:
        return _gauss_jordan_inverse(m)
    h = n // 2
    p, q = m[..., :h, :h], m[..., :h, h:]
    r, s = m[..., h:, :h], m[..., h:, h:]
    p_inv = _inv_identity_plus_skew(p, top=False)
    p_inv_q, r_p_inv = _mm(p_inv, q), _mm(r, p_inv)
    s_inv = _inv_identity_plus_skew(
        s - _mm(r, p_inv_q), top=False
    )  # the Schur complement's inverse
    top_right = -_mm(p_inv_q, s_inv)
    bottom_left = -_mm(s_inv, r_p_inv)
    top_left = p_inv - _mm(top_right, r_p_inv)
    return jnp.concatenate(
        [
            jnp.concatenate([top_left, top_right], axis=-1),
            jnp.concatenate([bottom_left, s_inv], axis=-1),
        ],
        axis=-2,
    )


@jax.custom_jvp
def _cayley(a: jax.Array) -> jax.Array:
    return _cayley_fwd(a)[0]


def _cayley_fwd(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    eye = _eye_like(a)
    m_inv = _inv_identity_plus_skew(eye - 0.5 * a)
    q = 2.0 * m_inv - eye
    return q, m_inv


@_cayley.defjvp
def _cayley_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    q, m_inv = _cayley_fwd(a)
    return q, _mm(_mm(m_inv, da), m_inv)


# ---------------------------------------------------------------------------------------
# Householder product in compact WY form: H_1 ... H_k = I - V T V^H with
# T^{-1} = striu(V^H V) + diag(1 / tau) (for complex inputs too: LAPACK's ungqr).


def _householder_product(a: jax.Array, tau: jax.Array) -> jax.Array:
    """First k columns of H_1 ... H_k, H_i = I - tau_i v_i v_i^H (LAPACK's orgqr, ungqr)."""
    n, k = a.shape[-2], a.shape[-1]
    v = jnp.tril(a, -1) + jnp.eye(n, k, dtype=a.dtype)
    vtv = _mm(_mH(v), v)
    t_inv = jnp.triu(vtv, 1) + jnp.eye(k, dtype=a.dtype) / tau[..., None, :]
    rhs = _mH(v[..., :k, :])
    t_vt = jax.lax.linalg.triangular_solve(t_inv, rhs, left_side=True, lower=False)
    return jnp.eye(n, k, dtype=a.dtype) - _mm(v, t_vt)


# ---------------------------------------------------------------------------------------
# Public API.


def default_orthogonal_map(X: jax.Array) -> OrthogonalMap:
    """Torch's default map: ``"matrix_exp"`` if square or complex, else ``"householder"``.

    Args:
        X: the weight, shape ``(..., n, k)``.

    Returns:
        The name of the map `torch.nn.utils.parametrizations.orthogonal` would pick.

    Raises:
        ValueError: if ``X`` has fewer than 2 dimensions (torch's message).

    Example:
        >>> import jax.numpy as jnp
        >>> default_orthogonal_map(jnp.zeros((4, 3)))
        'householder'
    """
    _check_matrix(X)
    if X.shape[-2] == X.shape[-1] or _is_complex(X):
        return "matrix_exp"
    return "householder"


def is_orthogonal(Q: jax.Array, eps: float | None = None) -> jax.Array:
    """Whether ``Q^H Q`` is close to the identity, as torch's ``_is_orthogonal``.

    ``torch.allclose(Q.mH @ Q, I, atol=eps)`` (``rtol=1e-5``) with torch's
    ``eps = 10 * n * finfo(Q.dtype).eps``; one boolean for the whole batch.
    Torch ignores its ``eps`` argument; here an explicit ``eps`` replaces the default.

    Args:
        Q: shape ``(..., n, k)`` with ``n >= k``.
        eps: absolute tolerance; ``None`` for torch's.

    Returns:
        A scalar boolean array (jit-safe; no Python bool).

    Raises:
        ValueError: if ``Q`` has fewer than 2 dimensions.

    Example:
        >>> import jax.numpy as jnp
        >>> bool(is_orthogonal(jnp.eye(3)))
        True
    """
    _check_matrix(Q)
    n, k = Q.shape[-2], Q.shape[-1]
    if eps is None:
        eps = 10.0 * n * float(jnp.finfo(Q.dtype).eps)

    def close(Q):
        eye = jnp.eye(k, dtype=Q.dtype)  # made here: on the mesh's automatic axes
        return jnp.all(jnp.abs(_mm(_mH(Q), Q) - eye) <= eps + 1e-5 * jnp.abs(eye))

    return _sharding.call_auto(close, (Q,), functools.partial(_sharding.replicated, 0))


def _make_orthogonal(a: jax.Array) -> jax.Array:
    """Q of the QR decomposition of a tall ``a`` with real non-negative diag(R)."""
    # jnp.linalg.qr is geqrf + orgqr, as torch's `_make_orthogonal`; diag(R) is diag(X).
    q, r = jnp.linalg.qr(a, mode="reduced")
    return q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def _geqrf(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """LAPACK's ``geqrf`` for a real tall ``a`` (unblocked, ``dlarfg`` conventions).

    Returns R on and above the diagonal, the reflectors (unit first entry implied)
    below it, and ``tau``; ``tau = 0`` (``H = I``) where the column below the
    diagonal is already zero. JAX has no public ``geqrf``.
    """
    n, k = a.shape[-2], a.shape[-1]
    tau = jnp.zeros((*a.shape[:-2], k), a.dtype)
    if k == 0:
        # No column, no reflector (and the loop body, traced even for no step, would
        # index an empty axis). ``n >= k``, so ``n == 0`` lands here too.
        return a, tau
    rows = jnp.arange(n)
    cols = jnp.arange(k)
    finfo = jnp.finfo(a.dtype)
    # Below this max |x|, x * x underflows (losing the column, or all of it: tau = 0);
    # above it (a non-finite sum), it overflows. Scaled there as LAPACK's dnrm2,
    # unscaled elsewhere (the same numbers as before for ordinary columns).
    small = float(finfo.tiny) ** 0.5 / float(finfo.eps)

    def body(j, carry):
        a, tau = carry
        col = jnp.take(a, j, axis=-1)
        alpha = jnp.take(col, j, axis=-1)
        x = jnp.where(rows > j, col, 0)
        sumsq = jnp.sum(x * x, axis=-1)
        xmax = jnp.max(jnp.abs(x), axis=-1)
        xs = x / jnp.where(xmax == 0, 1, xmax)[..., None]
        scaled = xmax * jnp.sqrt(jnp.sum(xs * xs, axis=-1))
        xnorm = jnp.where((xmax < small) | ~jnp.isfinite(sumsq), scaled, jnp.sqrt(sumsq))
        zero = xnorm == 0
        beta = -jnp.copysign(jnp.hypot(alpha, xnorm), alpha)
        safe_beta = jnp.where(zero, 1, beta)
        t = jnp.where(zero, 0, (beta - alpha) / safe_beta)
        scale = jnp.where(zero, 0, 1 / jnp.where(zero, 1, alpha - beta))
        v = jnp.where(rows == j, 1, x * scale[..., None])
        w = jnp.einsum("...n,...nk->...k", v, a, precision=_HIGHEST)
        w = jnp.where(cols > j, w, 0)
        a = a - t[..., None, None] * v[..., :, None] * w[..., None, :]
        new_col = jnp.where(
            rows < j, col, jnp.where(rows == j, jnp.where(zero, alpha, beta)[..., None], v)
        )
        a = jnp.where(cols == j, new_col[..., :, None], a)
        tau = jnp.where(cols == j, t[..., None], tau)
        return a, tau

    return jax.lax.fori_loop(0, k, body, (a, tau))


@jit_when_eager("orthogonal_map", "use_trivialization")
def orthogonal(
    X: jax.Array,
    base: jax.Array | None = None,
    *,
    orthogonal_map: OrthogonalMap,
    use_trivialization: bool = True,
) -> jax.Array:
    """Maps ``X`` to an orthogonal (unitary) matrix, as torch's ``_Orthogonal.forward``.

    For ``X`` of shape ``(..., n, k)`` the result has orthonormal columns when
    ``n >= k`` and orthonormal rows otherwise (wide matrices are handled through
    their transpose, as in torch). ``matrix_exp`` and ``cayley`` use
    ``A = Y - Y^H`` with ``Y = [tril(X), 0]`` padded to square; ``householder``
    multiplies the reflectors stored below the diagonal of ``X`` and the columns by
    ``trunc(diag(X))`` (torch's ``.int()``, no gradient). A complex ``X`` gets
    torch's numbers there: ``tau = 2 / (1 + sum(v * v))`` is complex, the product
    need not be unitary, and only the real part of the diagonal is truncated
    (torch refuses to register it, and `orthogonal_right_inverse` refuses it). With
    ``use_trivialization=True`` the result is ``base @ Q`` (``base`` is square of
    size ``max(n, k)``, from `orthogonal_right_inverse`).

    Args:
        X: the unconstrained weight, shape ``(..., n, k)``, in torch's layout.
        base: the trivialization base, shape ``(..., max(n, k), max(n, k))``; required
            iff ``use_trivialization``.
        orthogonal_map: ``"matrix_exp"``, ``"cayley"`` or ``"householder"``
            (see `default_orthogonal_map`).
        use_trivialization: whether to multiply by ``base`` (dynamic trivialization).

    Returns:
        The orthogonal matrix, same shape and dtype as ``X``.

    Raises:
        ValueError: if ``X`` has fewer than 2 dimensions, ``orthogonal_map`` is
            unknown (torch's messages), or ``base`` is missing (or given) against
            ``use_trivialization``.

    Example:
        >>> import jax.numpy as jnp
        >>> orthogonal(jnp.zeros((3, 3)), orthogonal_map="cayley", use_trivialization=False)
        Array([[1., 0., 0.],
               [0., 1., 0.],
               [0., 0., 1.]], dtype=float32)
    """
    _check_matrix(X)
    _check_map(orthogonal_map)
    if use_trivialization and base is None:
        raise ValueError(
            "orthogonal: `base` is required when use_trivialization=True.\n"
            "fix: take it from `orthogonal_right_inverse`, or pass use_trivialization=False"
        )
    if not use_trivialization and base is not None:
        raise ValueError(
            "orthogonal: `base` was given but use_trivialization=False.\n"
            "fix: pass use_trivialization=True, or drop `base`"
        )
    if X.size == 0:
        # An empty matrix is orthogonal: torch returns it unchanged (and the maps'
        # reductions, such as the matrix exponential's norm, have no empty case), or
        # `base @ Q`'s: the batch broadcast with base's (as torch), the dtype promoted
        # (as below).
        if base is not None:
            batch = jnp.broadcast_shapes(X.shape[:-2], base.shape[:-2])
            X = jnp.broadcast_to(X.astype(jnp.result_type(X, base)), (*batch, *X.shape[-2:]))
        return X
    # On an explicit mesh the result keeps X's sharding.
    args = (X,) if base is None else (X, base)
    compute = functools.partial(_orthogonal, orthogonal_map=orthogonal_map)
    return _sharding.call_auto(compute, args, functools.partial(_sharding.like, X))


def _orthogonal(
    X: jax.Array, base: jax.Array | None = None, *, orthogonal_map: OrthogonalMap
) -> jax.Array:
    n, k = X.shape[-2], X.shape[-1]
    transposed = n < k
    if transposed:
        X = _mT(X)
        n, k = k, n
    if orthogonal_map in ("matrix_exp", "cayley"):
        Y = jnp.tril(X)
        if n != k:
            Y = jnp.concatenate([Y, jnp.zeros((*Y.shape[:-1], n - k), Y.dtype)], axis=-1)
        A = Y - _mH(Y)
        if orthogonal_map == "matrix_exp":
            Q = matrix_exp(A)
        else:
            # The inverse of I - A/2 turns a non-finite A into a finite, orthogonal-looking
            # Q (torch's solve gives NaN): make those matrices NaN. Selecting Q, not A,
            # keeps finite inputs' gradients as they were (the NaN ones get zero).
            finite = jnp.all(jnp.isfinite(A), axis=(-2, -1), keepdims=True)
            Q = jnp.where(finite, _cayley(A), jnp.nan)
        if n != k:
            Q = Q[..., :k]
    else:
        A = jnp.tril(X, -1)
        tau = 2.0 / (1.0 + jnp.sum(A * A, axis=-2))
        Q = _householder_product(A, tau)
        # torch's `.int()`: truncation, of the real part for a complex X.
        signs = jnp.trunc(jnp.real(jax.lax.stop_gradient(jnp.diagonal(X, axis1=-2, axis2=-1))))
        Q = Q * signs[..., None, :]
    if base is not None:
        Q = _mm(base, Q)
    if transposed:
        Q = _mT(Q)
    return Q


@jit_when_eager("orthogonal_map", "use_trivialization")
def orthogonal_right_inverse(
    Q: jax.Array,
    *,
    orthogonal_map: OrthogonalMap,
    use_trivialization: bool = True,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Finds ``(X, base)`` with ``orthogonal(X, base) == Q``, as torch's ``right_inverse``.

    With ``use_trivialization=True``: ``base`` is ``Q`` (in the tall frame) when it
    is square and orthogonal (`is_orthogonal`), its QR ``Q`` factor (with a
    non-negative ``diag(R)``) when it is square but not orthogonal, and the QR
    factor of ``Q`` completed by ``max(n, k) - min(n, k)`` standard normal columns
    drawn from ``key`` when it is not square; ``X`` is ``-I`` (zeros with ``-1`` on
    the diagonal), so ``orthogonal(X, base) == Q`` whenever ``Q`` is orthogonal.
    The square-case choice is a ``jnp.where`` on both branches (jit-safe).

    With ``use_trivialization=False`` (``householder`` only): ``X`` is the
    ``geqrf`` of ``Q`` with the diagonal replaced by the signs (torch's encoding) and
    ``base`` is ``None``.

    Args:
        Q: the target, shape ``(..., n, k)``.
        orthogonal_map: the map used by `orthogonal`.
        use_trivialization: whether `orthogonal` uses a ``base``.
        key: a ``jax.random`` key; needed only to complete non-square ``Q`` with
            ``use_trivialization=True`` (torch draws ``torch.randn`` there).

    Returns:
        ``(X, base)``; ``base`` is ``None`` when not trivializing.

    Raises:
        ValueError: if ``Q`` has fewer than 2 dimensions, the map is unknown or
            ``householder`` with a complex ``Q`` (torch's messages), or ``key`` is
            missing where one is needed.
        NotImplementedError: for ``matrix_exp``/``cayley`` with
            ``use_trivialization=False`` (torch's message).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> Q = jnp.eye(3)[:, :2]
        >>> X, base = orthogonal_right_inverse(
        ...     Q, orthogonal_map="householder", key=jax.random.key(0))
        >>> bool(jnp.allclose(orthogonal(X, base, orthogonal_map="householder"), Q, atol=1e-6))
        True
    """
    _check_matrix(Q)
    _check_map(orthogonal_map)
    _check_real_householder(orthogonal_map, Q)
    if not use_trivialization:
        if orthogonal_map in ("cayley", "matrix_exp"):
            raise NotImplementedError(
                "It is not possible to assign to the matrix exponential "
                "or the Cayley parametrizations when use_trivialization=False.\n"
                'fix: use use_trivialization=True or orthogonal_map="householder"'
            )
        # On an explicit mesh X keeps Q's sharding.
        return _sharding.call_auto(
            _householder_inverse, (Q,), functools.partial(_sharding.like, Q)
        ), None
    if Q.shape[-2] != Q.shape[-1] and key is None:
        raise ValueError(
            "orthogonal_right_inverse: a `key` is required to complete a non-square "
            "matrix into an orthogonal one.\n"
            f"shape: {Q.shape}\n"
            "fix: pass key=jax.random.key(...)"
        )

    def out_sharding(mesh):
        # X keeps Q's sharding, base is replicated (but over Q's batch axes).
        batch = jax.typeof(Q).sharding.spec[:-2]
        return _sharding.like(Q, mesh), _sharding.replicated(Q.ndim, mesh, batch)

    args = (Q,) if key is None else (Q, key)
    return _sharding.call_auto(_trivialization_inverse, args, out_sharding)


def _householder_inverse(Q: jax.Array) -> jax.Array:
    Q = jax.lax.stop_gradient(Q)
    n, k = Q.shape[-2], Q.shape[-1]
    transpose = n < k
    if transpose:
        Q = _mT(Q)
        n, k = k, n
    A, tau = _geqrf(Q)
    d = jnp.sign(jnp.diagonal(A, axis1=-2, axis2=-1))
    d = jnp.where(tau == 0.0, -d, d)
    idx = jnp.arange(k)
    A = A.at[..., idx, idx].set(d)
    return _mT(A) if transpose else A


def _trivialization_inverse(
    Q: jax.Array, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    Q = jax.lax.stop_gradient(Q)
    Q_init = Q
    n, k = Q.shape[-2], Q.shape[-1]
    if n < k:
        Q = _mT(Q)
        n, k = k, n
    if n == k:
        base = jnp.where(is_orthogonal(Q), Q, _make_orthogonal(Q))
    else:
        N = jax.random.normal(key, (*Q.shape[:-2], n, n - k), Q.dtype)
        base = _make_orthogonal(jnp.concatenate([Q, N], axis=-1))
    neg_id = -jnp.eye(Q_init.shape[-2], Q_init.shape[-1], dtype=Q_init.dtype)
    X = jnp.broadcast_to(neg_id, Q_init.shape)
    return X, base
