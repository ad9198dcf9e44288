"""Torch's built-in parametrizations (``torch.nn.utils.parametrizations``) for Flax NNX.

``weight_norm``, ``spectral_norm`` and ``orthogonal`` register a parametrization
module through :func:`jaxparam.parametrize.register_parametrization`, with torch's
choice of ``unsafe``, and compute with the shared functional core
(:mod:`jaxparam.functional`), so their numbers are torch's.

Layouts: a Flax kernel is ``(..., in, out)`` where torch's weight is
``(out, in, ...)``. The built-ins take ``dim`` as an axis of the **Flax** array,
and their default means what torch's default means, "per output feature": the
last axis, except ``0`` for ``nnx.Embed``'s embedding. A negative ``dim`` is an
ordinary axis (unlike torch's ``weight_norm``, where ``-1`` means the whole
tensor); ``dim=None`` is the whole tensor. The full table, torch to Flax, is in
``docs/builtins.md``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxparam import functional as F
from jaxparam.parametrize import (
    _missing_tensor_error,
    _transaction,
    is_parametrized,
    register_parametrization,
)

__all__ = [
    "Orthogonal",
    "OrthogonalBase",
    "PowerIteration",
    "SpectralNorm",
    "WeightNorm",
    "orthogonal",
    "spectral_norm",
    "weight_norm",
]


class _Default:
    def __repr__(self) -> str:
        return "<per output feature>"


DEFAULT: Any = _Default()


def _weight(module: nnx.Module, name: str) -> jax.Array:
    """The current value of ``module.<name>``, as torch's ``getattr(module, name)``.

    A name that is already parametrized gives its parametrized value, so a
    built-in can be appended to a chain, as in torch. Reading it runs the chain:
    in training mode a spectral norm in it takes a power iteration, as in torch,
    so the built-ins that read call this inside a `_transaction`.
    """
    if is_parametrized(module, name):
        return getattr(module, name)[...]
    var = vars(module).get(name)
    if not isinstance(var, nnx.Variable):
        raise ValueError(
            f"Module '{type(module).__name__}' has no parameter or buffer with name '{name}'\n"
            "fix: name an nnx.Variable held directly by the module (for example 'kernel')."
        )
    return var.get_value()


def _weight_shape(module: nnx.Module, name: str) -> jax.Array | jax.ShapeDtypeStruct:
    """The shape and dtype of ``module.<name>``, without running a chain (torch's
    ``weight_norm`` never reads the weight: no power iteration of a spectral norm
    already in the chain), and ``register_parametrization``'s error for a bad name."""
    if is_parametrized(module, name):
        return module.parametrizations[name].eval_shape()
    var = vars(module).get(name)
    if not isinstance(var, nnx.Variable):
        raise _missing_tensor_error(module, name)
    return var.get_value()


def _check_inexact(module: nnx.Module, name: str, weight: jax.Array, builtin: str) -> None:
    """Refuse integer and boolean weights at registration, before anything changes.

    Torch fails on them too, but deep inside each built-in (``norm()``, a random
    draw, ``torch.finfo``) and only for buffers (a ``Parameter`` cannot be an
    integer tensor at all); we say so up front, with the same words for all three.
    """
    if not jnp.issubdtype(weight.dtype, jnp.inexact):
        raise ValueError(
            f"{builtin} needs a floating point or complex tensor. "
            f"Got module.{name} of dtype {weight.dtype}.\n"
            f"module: {type(module).__name__}\n"
            f"fix: cast the Variable first (`module.{name}[...] = "
            f"module.{name}[...].astype(jnp.float32)`), or register a custom "
            "parametrization with jaxparam.parametrize.register_parametrization, which "
            "accepts any dtype."
        )


def _output_dim(module: nnx.Module) -> int:
    return 0 if isinstance(module, nnx.Embed) else -1


def _resolve_dim(module: nnx.Module, dim: Any, ndim: int) -> int | None:
    """A non-negative Flax axis, or ``None`` for the whole tensor."""
    return _axis(_output_dim(module) if dim is DEFAULT else dim, ndim)


def _axis(dim: int | None, ndim: int) -> int | None:
    """``dim`` checked against ``ndim`` and made non-negative (``None`` stays)."""
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
      ValueError: ``name`` is not a Variable of the module, or it is not floating
        point or complex.
      IndexError: ``dim`` is out of range, or the weight is 0-d (torch's message).

    Example:
      >>> from flax import nnx
      >>> from jaxparam.parametrizations import weight_norm
      >>> layer = weight_norm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
      >>> layer.parametrizations.kernel.original0.shape
      (1, 4)
    """
    weight = _weight_shape(module, name)
    _check_inexact(module, name, weight, "weight_norm")
    if weight.ndim == 0:
        # torch: norm_except_dim on a 0-d tensor, whatever `dim`.
        shown = -1 if dim is None else (_output_dim(module) if dim is DEFAULT else dim)
        raise IndexError(
            f"Dimension specified as {shown} but tensor has no dimensions\n"
            "fix: weight norm needs a tensor with at least one dimension."
        )
    link = WeightNorm(_resolve_dim(module, dim, weight.ndim))
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
    evaluation mode (``module.eval()``, or the view ``nnx.view(model,
    deterministic=True)``) they stay fixed. A 1-d weight is simply normalized
    and holds no vectors, as in torch.
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

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``: ``deterministic=True`` freezes ``_u`` and ``_v``."""
        if deterministic is not None:
            self.deterministic = deterministic

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
      ValueError: ``name`` is not a Variable of the module, it is not floating
        point or complex, or ``n_power_iterations`` is not positive.
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
    with _transaction(module):  # reading the weight may take a power iteration
        weight = _weight(module, name)
        _check_inexact(module, name, weight, "spectral_norm")
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


# ---------------------------------------------------------------------------
# orthogonal
# ---------------------------------------------------------------------------


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


class OrthogonalBase(nnx.Variable):
    """The dynamic-trivialization base of :class:`Orthogonal` (torch's ``base`` buffer).

    Stored in torch's frame, exactly as torch stores it, so checkpoints map one to one.
    """


class Orthogonal(nnx.Module):
    """An orthogonal (unitary) matrix, or batch of them, as torch's ``_Orthogonal``.

    Acts on the last two axes of the Flax array, through torch's orientation: a
    Flax kernel ``(..., in, out)`` is seen as torch's ``(..., out, in)``, so the
    numbers (and ``base``) are exactly torch's. With ``use_trivialization=True``
    the result is ``base @ map(X)`` and ``base`` (an ``OrthogonalBase`` Variable,
    not a ``Param``) is reset by every ``right_inverse``. ``right_inverse`` needs
    randomness to complete a non-square matrix (torch draws ``torch.randn``); it
    comes from the link's own ``rngs``.
    """

    def __init__(
        self,
        weight: jax.Array,
        orthogonal_map: str,
        *,
        use_trivialization: bool = True,
        rngs: nnx.Rngs,
    ):
        if jnp.iscomplexobj(weight) and orthogonal_map == "householder":
            raise ValueError("The householder parametrization does not support complex tensors.")
        self.shape = tuple(weight.shape)
        self.orthogonal_map = orthogonal_map
        self.use_trivialization = use_trivialization
        # Only a non-square weight is ever completed with random columns; a square
        # one keeps no random state (fewer Variables for nnx.jit to carry).
        square = weight.shape[-2] == weight.shape[-1]
        self.rngs = rngs if use_trivialization and not square else None
        if use_trivialization:
            n = max(weight.shape[-2:])
            self.base = OrthogonalBase(jnp.zeros((*weight.shape[:-2], n, n), weight.dtype))

    def __call__(self, X: jax.Array) -> jax.Array:
        if X.size == 0:
            # An empty matrix is orthogonal (torch returns it unchanged); the maps'
            # reductions (the matrix exponential's norm) have no empty case.
            return X
        base = self.base[...] if self.use_trivialization else None
        Q = F.orthogonal(
            _mT(X),
            base,
            orthogonal_map=self.orthogonal_map,
            use_trivialization=self.use_trivialization,
        )
        return _mT(Q)

    def right_inverse(self, Q: jax.Array) -> jax.Array:
        if tuple(Q.shape) != self.shape:
            raise ValueError(
                f"Expected a matrix or batch of matrices of shape {self.shape}. "
                f"Got a tensor of shape {tuple(Q.shape)}."
            )
        X, base = F.orthogonal_right_inverse(
            jax.lax.stop_gradient(_mT(Q)),
            orthogonal_map=self.orthogonal_map,
            use_trivialization=self.use_trivialization,
            key=self.rngs.params() if self.rngs is not None else None,
        )
        if self.use_trivialization:
            self.base[...] = base
        return _mT(X)


def orthogonal(
    module: nnx.Module,
    name: str = "kernel",
    orthogonal_map: str | None = None,
    *,
    use_trivialization: bool = True,
    rngs: nnx.Rngs | jax.Array | int = 0,
) -> nnx.Module:
    """Make ``module.<name>`` an orthogonal (unitary) matrix, as torch's ``orthogonal``.

    The weight ``(..., n, k)`` gets orthonormal columns if tall, orthonormal rows if
    wide (a batch of matrices over the leading axes). Maps: ``"matrix_exp"``
    (default for square or complex weights), ``"cayley"``, ``"householder"``
    (default otherwise; real only). With ``use_trivialization=True`` (default) the
    value is ``base @ map(X)``: ``original`` starts at ``-I`` and ``base`` (at
    ``parametrizations.<name>.0.base``) holds the weight made orthogonal, so the
    initial value is the weight's orthogonal projection, as in torch. Assigning
    ``module.<name> = Q`` works as in torch.

    Args:
      module: the NNX module.
      name: the Variable to parametrize.
      orthogonal_map: ``"matrix_exp"``, ``"cayley"``, ``"householder"`` or ``None``
        (torch's default choice).
      use_trivialization: use the dynamic trivialization (torch's default).
      rngs: randomness for completing non-square matrices in ``right_inverse``
        (torch uses its global generator): an ``nnx.Rngs``, a key, or an int seed.
        Kept by the link (as ``rngs``) only for a non-square weight with the
        trivialization, the one case that draws.

    Returns:
      The module.

    Raises:
      ValueError: ``name`` is not a Variable of the module, it is not floating
        point or complex, the weight has fewer than 2 dimensions, the map is
        unknown, or ``householder`` on a complex weight (torch's messages).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxparam.parametrizations import orthogonal
      >>> layer = orthogonal(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
      >>> k = layer.kernel[...]
      >>> bool(jnp.allclose(k @ k.T, jnp.eye(3), atol=1e-5))
      True
    """
    with _transaction(module):  # reading the weight may take a power iteration
        weight = _weight(module, name)
        if weight.ndim < 2:
            raise ValueError(
                f"Expected a matrix or batch of matrices. Got a tensor of {weight.ndim} dimensions."
            )
        _check_inexact(module, name, weight, "orthogonal")
        if orthogonal_map is None:
            orthogonal_map = F.default_orthogonal_map(_mT(weight))
        if orthogonal_map not in ("matrix_exp", "cayley", "householder"):
            raise ValueError(
                'orthogonal_map has to be one of "matrix_exp", "cayley", "householder". '
                f"Got: {orthogonal_map}"
            )
        key = _key(rngs)
        link = Orthogonal(
            weight,
            orthogonal_map,
            use_trivialization=use_trivialization,
            rngs=nnx.Rngs(params=key),
        )
        return register_parametrization(module, name, link, unsafe=True)
