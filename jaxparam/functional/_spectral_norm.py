"""Spectral normalization, mirroring torch's `_SpectralNorm` parametrization.

In plain words, for a weight of 2 or more dimensions::

    W = weight moved so that `dim` is first, flattened to (h, w)
    if training:                     # no gradient flows through this block
        repeat n_power_iterations times:
            u = normalize(W v);  v = normalize(W^H u)
    sigma = vdot(u, W v)             # gradient flows through W only
    return weight / sigma, (u, v)

For a 1-d weight torch registers no ``_u``/``_v`` buffers and returns
``normalize(weight)``; here the state is ``SpectralNormState(None, None)`` and is
returned unchanged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxparam.functional import _sharding
from jaxparam.functional._eager import jit_when_eager

__all__ = ["SpectralNormState", "spectral_norm", "spectral_norm_init"]

_HIGHEST = jax.lax.Precision.HIGHEST


class SpectralNormState(NamedTuple):
    """Power-iteration vectors ``u`` (size h) and ``v`` (size w); both None for 1-d weights."""

    u: jax.Array | None
    v: jax.Array | None


def _check_dim(dim: int, ndim: int) -> int:
    if dim >= ndim or dim < -ndim:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] "
            f"but got {dim})\ndim: {dim}\nndim: {ndim}"
        )
    return dim if dim >= 0 else dim + ndim


def _check_iterations(n_power_iterations: int) -> None:
    if n_power_iterations <= 0:
        raise ValueError(
            "Expected n_power_iterations to be positive, but "
            f"got n_power_iterations={n_power_iterations}"
        )


def _normalize(x: jax.Array, eps: float) -> jax.Array:
    # torch.nn.functional.normalize(x, dim=0, eps=eps) for a vector.
    norm = jnp.sqrt(jnp.sum(jnp.real(x * jnp.conj(x))))
    return x / jnp.maximum(norm, eps).astype(x.dtype)


def _to_matrix(weight: jax.Array, dim: int) -> jax.Array:
    # torch's flatten(1): the width is the explicit product of the other axes, so a
    # weight with 0 output features still has an answer (reshape(0, -1) has none).
    if dim != 0:
        weight = jnp.moveaxis(weight, dim, 0)
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))


def _mv(m: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.matmul(m, x, precision=_HIGHEST)


def _mhv(m: jax.Array, x: jax.Array) -> jax.Array:
    """``m^H @ x`` as a row vector times ``m``.

    Written as ``m.T @ x``, XLA's CPU backend turns the product into a strided
    loop fusion: 3-4x slower on a 512x512 matrix than this form (``m`` read row by row).
    """
    return jnp.conj(jnp.matmul(jnp.conj(x), m, precision=_HIGHEST))


def _power_method(
    weight_mat: jax.Array, u: jax.Array, v: jax.Array, n: int, eps: float
) -> tuple[jax.Array, jax.Array]:
    def body(_, uv):
        u, v = uv
        u = _normalize(_mv(weight_mat, v), eps)
        v = _normalize(_mhv(weight_mat, u), eps)
        return u, v

    return jax.lax.fori_loop(0, n, body, (u, v))


@jit_when_eager("dim", "eps")
def spectral_norm_init(
    weight: jax.Array, key: jax.Array, *, dim: int = 0, eps: float = 1e-12
) -> SpectralNormState:
    """Initializes the power-iteration state as torch's ``_SpectralNorm.__init__``.

    Draws ``u`` (size ``h``) and ``v`` (size ``w``) from a standard normal with
    ``key``, normalizes them, then runs the 15 warm-up power iterations on the
    weight reshaped to ``(h, w)`` (``dim`` moved first). The procedure is torch's;
    the values differ from torch's because the random stream differs.

    Args:
        weight: the weight, in torch's layout.
        key: a ``jax.random`` key.
        dim: the output axis (torch's meaning); negative values wrap around.
        eps: epsilon of the normalizations.

    Returns:
        A `SpectralNormState`; ``SpectralNormState(None, None)`` for a 1-d weight
        (torch registers no buffers then).

    Raises:
        IndexError: if ``dim`` is out of range (torch's message).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> state = spectral_norm_init(jnp.ones((3, 4)), jax.random.key(0))
        >>> state.u.shape, state.v.shape
        ((3,), (4,))
    """
    dim = _check_dim(dim, weight.ndim)
    if weight.ndim <= 1:
        return SpectralNormState(None, None)

    def init(weight, key):
        weight_mat = jax.lax.stop_gradient(_to_matrix(weight, dim))
        h, w = weight_mat.shape
        ku, kv = jax.random.split(key)
        u = _normalize(jax.random.normal(ku, (h,), weight.dtype), eps)
        v = _normalize(jax.random.normal(kv, (w,), weight.dtype), eps)
        return SpectralNormState(*_power_method(weight_mat, u, v, 15, eps))

    def out_sharding(mesh):  # on an explicit mesh the vectors come back replicated
        return SpectralNormState(_sharding.replicated(1, mesh), _sharding.replicated(1, mesh))

    return _sharding.call_auto(init, (weight, key), out_sharding)


@jit_when_eager(
    "n_power_iterations", "eps", "dim", "training", loops=lambda kw: kw.get("training", True)
)
def spectral_norm(
    weight: jax.Array,
    state: SpectralNormState,
    *,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int = 0,
    training: bool = True,
) -> tuple[jax.Array, SpectralNormState]:
    """Divides ``weight`` by its spectral norm, as torch's ``_SpectralNorm.forward``.

    When ``training`` is true, first runs ``n_power_iterations`` of the power
    method (starting from ``state``) on the weight reshaped to a matrix; the
    vectors are constants for the gradient, exactly as torch updates its buffers
    under ``no_grad`` and then uses clones. Then ``sigma = vdot(u, W @ v)`` and the
    result is ``weight / sigma``. A 1-d weight is simply normalized
    (``normalize(weight, eps)``) and ``state`` is returned unchanged.

    ``training``, ``n_power_iterations``, ``eps`` and ``dim`` are static Python
    values (the caller knows the mode); under ``jit`` mark them static or close
    over them.

    Args:
        weight: the weight, in torch's layout.
        state: the current `SpectralNormState` (from `spectral_norm_init`).
        n_power_iterations: power iterations per call in training mode (positive).
        eps: epsilon of the normalizations.
        dim: the output axis (torch's meaning); negative values wrap around.
        training: whether to run the power iteration (torch's ``module.training``).

    Returns:
        ``(weight / sigma, new_state)``; ``new_state`` equals ``state`` when not
        training.

    Raises:
        IndexError: if ``dim`` is out of range (torch's message).
        ValueError: if ``n_power_iterations`` is not positive (torch's message).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> w = jnp.diag(jnp.array([4.0, 2.0]))
        >>> state = spectral_norm_init(w, jax.random.key(0))
        >>> w_sn, state = spectral_norm(w, state)
        >>> float(w_sn[0, 0])
        1.0
    """
    dim = _check_dim(dim, weight.ndim)
    _check_iterations(n_power_iterations)
    if weight.ndim == 1:
        return _normalize(weight, eps), state

    def normalized(weight, u, v):
        weight_mat = _to_matrix(weight, dim)
        if training:
            u, v = _power_method(jax.lax.stop_gradient(weight_mat), u, v, n_power_iterations, eps)
            u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
        sigma = jnp.vdot(u, _mv(weight_mat, v), precision=_HIGHEST)
        return weight / sigma, SpectralNormState(u, v)

    def out_sharding(mesh):  # on an explicit mesh every result keeps its input's sharding
        u, v = (_sharding.like(x, mesh) for x in state)
        return _sharding.like(weight, mesh), SpectralNormState(u, v)

    return _sharding.call_auto(normalized, (weight, *state), out_sharding)
