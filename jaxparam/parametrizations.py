"""Torch's built-in parametrizations (``torch.nn.utils.parametrizations``) for Flax NNX.

``weight_norm``, ``spectral_norm`` and ``orthogonal`` register a parametrization
module through :func:`jaxparam.parametrize.register_parametrization`, with torch's
choice of ``unsafe``, and compute with the shared functional core
(:mod:`jaxparam.functional`), so their numbers are torch's.

Layouts (the one place this is stated; see also ``docs/builtins.md``): a Flax
kernel is ``(..., in, out)`` where torch's weight is ``(out, in, ...)``. The
built-ins take ``dim`` as an axis of the **Flax** array, and their default means
what torch's default means, "per output feature":

============================  ===================  ===========================
layer (Flax / torch)          Flax array           default ``dim`` (torch's)
============================  ===================  ===========================
``Linear`` / ``Linear``       ``(in, out)``        ``-1``  (torch ``0``)
``Conv`` / ``ConvNd``         ``(*k, in, out)``    ``-1``  (torch ``0``)
``ConvTranspose`` / ``..Nd``  ``(*k, in, out)``    ``-1``  (torch ``1`` for
                                                   spectral norm)
``Embed`` / ``Embedding``     ``(num, features)``  ``0``   (torch ``0``)
anything else                 any                  ``-1``
============================  ===================  ===========================

Unlike torch's ``weight_norm``, where ``dim=-1`` means "the whole tensor", a
negative ``dim`` here is an ordinary axis; pass ``dim=None`` for the whole tensor.
``orthogonal`` acts on the last two axes and computes torch's map on the torch
orientation ``(out, in)`` of each matrix, so a Flax ``Linear`` gets exactly the
numbers torch's ``Linear`` gets (transposed).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxparam import functional as F
from jaxparam.parametrize import register_parametrization

__all__ = [
    "PowerIteration",
    "SpectralNorm",
    "WeightNorm",
    "spectral_norm",
    "weight_norm",
]


class _Default:
    def __repr__(self) -> str:
        return "<per output feature>"


DEFAULT: Any = _Default()


def _variable(module: nnx.Module, name: str) -> nnx.Variable:
    var = vars(module).get(name)
    if not isinstance(var, nnx.Variable):
        raise ValueError(
            f"Module '{type(module).__name__}' has no parameter or buffer with name '{name}'\n"
            "fix: name an nnx.Variable held directly by the module (for example 'kernel')."
        )
    return var


def _output_dim(module: nnx.Module) -> int:
    return 0 if isinstance(module, nnx.Embed) else -1


def _resolve_dim(module: nnx.Module, dim: Any, ndim: int) -> int | None:
    """A non-negative Flax axis, or ``None`` for the whole tensor."""
    if dim is DEFAULT:
        dim = _output_dim(module)
    if dim is None:
        return None
    if not -ndim <= dim < max(ndim, 1):
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-ndim}, {ndim - 1}] "
            f"but got {dim})"
        )
    return dim % max(ndim, 1)


# ---------------------------------------------------------------------------
# weight norm
# ---------------------------------------------------------------------------


class WeightNorm(nnx.Module):
    """``w = g * v / ||v||``, the norm taken over every axis but ``dim``.

    ``right_inverse`` splits a weight into ``(g, v)``, stored as ``original0``
    and ``original1``. ``dim`` is a non-negative Flax axis or ``None`` (whole
    tensor).
    """

    def __init__(self, dim: int | None):
        self.dim = dim

    def __call__(self, g: jax.Array, v: jax.Array) -> jax.Array:
        return F.weight_norm(g, v, self.dim)

    def right_inverse(self, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
        return F.weight_norm_inverse(weight, self.dim)


def weight_norm(module: nnx.Module, name: str = "kernel", dim: Any = DEFAULT) -> nnx.Module:
    """Apply weight normalization to ``module.<name>``, as torch's ``weight_norm``.

    Decouples the magnitude ``g`` (``parametrizations.<name>.original0``) from the
    direction ``v`` (``original1``): ``w = g * v / ||v||``. Unlike flax's
    ``nnx.WeightNorm``, the stored kernel is not rewritten: at registration
    ``g = ||w||`` and ``v = w``, so the layer computes exactly what it did.

    Args:
      module: the NNX module.
      name: the Variable to parametrize.
      dim: the Flax axis kept by the norm; by default the output features (see the
        module docstring); ``None`` for the whole tensor.

    Returns:
      The module.

    Raises:
      ValueError: ``name`` is not a Variable of the module.
      IndexError: ``dim`` is out of range.

    Example:
      >>> from flax import nnx
      >>> from jaxparam.parametrizations import weight_norm
      >>> layer = weight_norm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
      >>> layer.parametrizations.kernel.original0.shape
      (1, 4)
    """
    weight = _variable(module, name)
    link = WeightNorm(_resolve_dim(module, dim, weight.get_raw_value().ndim))
    return register_parametrization(module, name, link, unsafe=True)


# ---------------------------------------------------------------------------
# spectral norm
# ---------------------------------------------------------------------------


class PowerIteration(nnx.BatchStat):
    """Spectral norm's power-iteration vectors ``_u`` and ``_v``.

    Not a ``Param``: optimizers (``wrt=nnx.Param``) leave them alone. A subclass of
    ``nnx.BatchStat``: like batch statistics, they update in training mode.
    """


class SpectralNorm(nnx.Module):
    """``w / sigma(w)`` with sigma estimated by power iteration, as torch's.

    In training mode (``deterministic=False``, what ``module.train()`` sets) each
    call runs ``n_power_iterations`` and stores the new ``_u`` and ``_v``; in
    evaluation mode (``module.eval()``) they stay fixed. A 1-d weight is simply
    normalized and holds no vectors, as in torch.
    """

    def __init__(
        self,
        weight: jax.Array,
        n_power_iterations: int = 1,
        dim: int = 0,
        eps: float = 1e-12,
        *,
        key: jax.Array,
    ):
        if n_power_iterations <= 0:
            raise ValueError(
                "Expected n_power_iterations to be positive, but "
                f"got n_power_iterations={n_power_iterations}"
            )
        self.dim = dim
        self.eps = eps
        self.n_power_iterations = n_power_iterations
        self.deterministic = False
        state = F.spectral_norm_init(weight, key, dim=dim, eps=eps)
        if weight.ndim > 1:
            self._u = PowerIteration(state.u)
            self._v = PowerIteration(state.v)

    def __call__(self, weight: jax.Array) -> jax.Array:
        if weight.ndim <= 1:
            state = F.SpectralNormState(None, None)
        else:
            state = F.SpectralNormState(self._u[...], self._v[...])
        out, new = F.spectral_norm(
            weight,
            state,
            n_power_iterations=self.n_power_iterations,
            eps=self.eps,
            dim=self.dim,
            training=not self.deterministic,
        )
        if weight.ndim > 1 and not self.deterministic:
            self._u[...] = new.u
            self._v[...] = new.v
        return out

    def right_inverse(self, value: jax.Array) -> jax.Array:
        return value


def spectral_norm(
    module: nnx.Module,
    name: str = "kernel",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: Any = DEFAULT,
    *,
    rngs: nnx.Rngs | jax.Array | int = 0,
) -> nnx.Module:
    """Apply spectral normalization to ``module.<name>``, as torch's ``spectral_norm``.

    ``module.<name>`` becomes ``w / sigma(w)``, sigma the largest singular value of
    ``w`` reshaped to a matrix with ``dim`` first, estimated by the power method.
    The vectors live at ``parametrizations.<name>.0._u`` and ``._v`` as
    :class:`PowerIteration` Variables; they start with torch's 15 warm-up
    iterations from a random draw (``rngs``) and update on every read in training
    mode, inside ``nnx.jit`` too; ``module.eval()`` freezes them.

    Args:
      module: the NNX module.
      name: the Variable to parametrize.
      n_power_iterations: power iterations per read in training mode.
      eps: epsilon of the normalizations.
      dim: the Flax axis of the output features; by default as in the module
        docstring's table.
      rngs: randomness for the initial vectors: an ``nnx.Rngs`` (its ``params``
        stream), a ``jax.random`` key, or an int seed.

    Returns:
      The module.

    Raises:
      ValueError: ``name`` is not a Variable of the module, or
        ``n_power_iterations`` is not positive.
      IndexError: ``dim`` is out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxparam.parametrizations import spectral_norm
      >>> layer = spectral_norm(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
      >>> sigma = jnp.linalg.norm(layer.kernel[...], ord=2)
      >>> bool(jnp.abs(sigma - 1.0) < 1e-3)
      True
    """
    weight = _variable(module, name).get_value()
    flax_dim = _resolve_dim(module, dim, weight.ndim)
    if flax_dim is None:
        raise ValueError("spectral_norm needs an output dimension; got dim=None.")
    link = SpectralNorm(
        jax.lax.stop_gradient(weight), n_power_iterations, flax_dim, eps, key=_key(rngs)
    )
    return register_parametrization(module, name, link)


def _key(rngs: nnx.Rngs | jax.Array | int) -> jax.Array:
    if isinstance(rngs, nnx.Rngs):
        return rngs.params()
    if isinstance(rngs, int):
        return jax.random.key(rngs)
    return jnp.asarray(rngs) if not isinstance(rngs, jax.Array) else rngs
