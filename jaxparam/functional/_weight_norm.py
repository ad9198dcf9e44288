"""Weight normalization, mirroring torch's `_WeightNorm` parametrization.

In plain words, with ``dim`` the kept axis (torch's meaning: the output axis)::

    g = norm_except_dim(w, dim)      # size 1 on every axis but `dim`
    w = v * (g / norm_except_dim(v, dim))

``dim=None`` (and ``dim=-1``, exactly as in torch's ``torch._weight_norm`` and
``torch.norm_except_dim``, where ``-1`` means "the whole tensor", not "the last
axis") normalizes over the whole tensor and ``g`` is a 0-d array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["weight_norm", "weight_norm_inverse"]


def _canonical_dim(dim: int | None, ndim: int) -> int | None:
    """Returns the kept axis in ``[0, ndim)``, or ``None`` for the whole tensor.

    Mirrors ``torch.norm_except_dim``: ``-1`` is "the whole tensor"; any other
    negative ``dim`` wraps around. Out-of-range values raise torch's `IndexError`.
    """
    if dim is None or dim == -1:
        return None
    lo, hi = -max(ndim, 1), max(ndim, 1) - 1
    if not lo <= dim <= hi:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{lo}, {hi}], but got {dim})\n"
            f"dim: {dim}\nndim: {ndim}"
        )
    return dim % max(ndim, 1)


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    # torch's CPU/CUDA kernels keep the norm in float32 for half-precision inputs.
    if dtype in (jnp.bfloat16, jnp.float16):
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def _sum_except_dim(x: jax.Array, dim: int | None) -> jax.Array:
    if dim is None:
        return jnp.sum(x)
    axes = tuple(i for i in range(x.ndim) if i != dim)
    return jnp.sum(x, axis=axes, keepdims=True)


def _norm_except_dim(x: jax.Array, dim: int | None) -> jax.Array:
    return jnp.sqrt(_sum_except_dim(jnp.real(x * jnp.conj(x)), dim))


def weight_norm(g: jax.Array, v: jax.Array, dim: int | None = 0) -> jax.Array:
    """Recomposes a weight from its magnitude ``g`` and direction ``v``.

    Computes ``v * (g / norm_except_dim(v, dim))`` as ``torch._weight_norm``
    (what ``torch.nn.utils.parametrizations.weight_norm`` calls in ``forward``).
    Arrays are in torch's layout and ``dim`` has torch's meaning. Half-precision
    inputs are computed in float32 and rounded once at the end, as torch does.

    Args:
        g: magnitude, shape ``(1, ..., v.shape[dim], ..., 1)`` (or ``()`` when
            ``dim`` is ``None``/``-1``); any shape broadcasting against the norm works.
        v: direction, the unnormalized weight.
        dim: the axis kept by the norm. ``None`` or ``-1`` means the whole tensor
            (torch's convention); other negative values wrap around.

    Returns:
        The weight ``w`` with the shape and dtype of ``v``.

    Raises:
        IndexError: if ``dim`` is out of range for ``v.ndim`` (torch's message).

    Example:
        >>> import jax.numpy as jnp
        >>> v = jnp.array([[3.0, 4.0], [0.0, 2.0]])
        >>> weight_norm(jnp.array([[10.0], [1.0]]), v, dim=0)
        Array([[6., 8.],
               [0., 1.]], dtype=float32)
    """
    d = _canonical_dim(dim, v.ndim)
    out_dtype = jnp.result_type(v, g)
    ct = _compute_dtype(out_dtype)
    return _weight_norm(g.astype(ct), v.astype(ct), d).astype(out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _weight_norm(g: jax.Array, v: jax.Array, d: int | None) -> jax.Array:
    return v * (g / _norm_except_dim(v, d))


@_weight_norm.defjvp
def _weight_norm_jvp(d, primals, tangents):
    # JAX's own derivative of `g / n` forms n**-2, which float32 flushes to zero
    # once a row's norm passes ~9e18 (the projection term vanished: the gradient
    # of v was the raw cotangent). Dividing by n twice stays in range, as
    # torch's fused backward does; the VJP is this map transposed.
    g, v = primals
    dg, dv = tangents
    n = _norm_except_dim(v, d)
    scale = g / n
    dn = _sum_except_dim(jnp.real(jnp.conj(v) * dv), d) / n
    return v * scale, dv * scale + v * ((dg - scale * dn) / n)


def weight_norm_inverse(w: jax.Array, dim: int | None = 0) -> tuple[jax.Array, jax.Array]:
    """Splits a weight into ``(g, v)``, as torch's ``_WeightNorm.right_inverse``.

    ``g = torch.norm_except_dim(w, 2, dim)`` and ``v = w``; ``g`` keeps size 1 on
    every axis but ``dim`` (0-d when ``dim`` is ``None`` or ``-1``).

    Args:
        w: the weight, in torch's layout.
        dim: the axis kept by the norm; ``None`` or ``-1`` means the whole tensor.

    Returns:
        ``(g, v)`` such that ``weight_norm(g, v, dim)`` equals ``w`` (up to rounding).

    Raises:
        IndexError: if ``dim`` is out of range for ``w.ndim`` (torch's message).

    Example:
        >>> import jax.numpy as jnp
        >>> g, v = weight_norm_inverse(jnp.array([[3.0, 4.0], [0.0, 2.0]]), dim=0)
        >>> g
        Array([[5.],
               [2.]], dtype=float32)
    """
    d = _canonical_dim(dim, w.ndim)
    ct = _compute_dtype(w.dtype)
    g = _norm_except_dim(w.astype(ct), d)
    real = jnp.finfo(w.dtype).dtype if jnp.issubdtype(w.dtype, jnp.complexfloating) else w.dtype
    return g.astype(real), w
