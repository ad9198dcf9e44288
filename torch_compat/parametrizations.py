"""A drop-in ``torch.nn.utils.parametrizations`` computed by the JAX functional core.

Replace ``from torch.nn.utils import parametrizations`` by
``from torch_compat import parametrizations``: ``orthogonal``, ``spectral_norm``
and ``weight_norm`` have torch's signatures, defaults, ``unsafe`` choices,
module structure, state-dict keys (``parametrizations.weight.original0/1``,
``.0._u``, ``.0._v``, ``.0.base``) and errors. The link modules
(``_Orthogonal``, ``_SpectralNorm``, ``_WeightNorm``) hold their state as torch
buffers; their math is :mod:`jaxparam.functional`, run through the bridge (one
compiled call per access, fused with neighbouring JAX links, torch autograd).

In plain words, what stays torch's:

* Randomness. ``_SpectralNorm`` draws ``u``, ``v`` with ``normal_`` and
  ``_Orthogonal.right_inverse`` draws ``torch.randn``, from torch's global
  generator, in torch's order, so ``torch.manual_seed`` reproduces torch's
  numbers. The drawn tensors are then passed to the JAX math.
* The power-iteration buffers ``_u``, ``_v`` are updated in place (same tensor
  objects) on every access in training mode; ``module.eval()`` stops it.
* ``_Orthogonal.right_inverse`` replaces the ``base`` buffer (a new tensor), as
  torch's does.

Example:
    >>> import torch
    >>> from torch_compat import parametrizations
    >>> m = parametrizations.weight_norm(torch.nn.Linear(4, 3))
    >>> sorted(m.state_dict())
    ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import torch
from torch import Tensor
from torch.nn.modules import Module
from torch.nn.utils.parametrizations import _OrthMaps

from jaxparam import functional as F
from jaxparam.functional._spectral_norm import _normalize
from torch_compat import _bridge, parametrize

__all__ = ["orthogonal", "spectral_norm", "weight_norm"]


# --------------------------------------------------------------------------- #
# Orthogonal
# --------------------------------------------------------------------------- #


def _scalar_type(t: Tensor) -> str:
    # torch names a dtype in its kernel errors as in `Tensor.type()`: Long, Half, BFloat16, ...
    return t.new_empty(0).type().rsplit(".", 1)[-1].removesuffix("Tensor")


def _not_implemented(kernel: str, t: Tensor) -> NotImplementedError:
    # torch's message for a LAPACK kernel without this dtype (its CPU kernels' names).
    return NotImplementedError(f"\"{kernel}_cpu\" not implemented for '{_scalar_type(t)}'")


#: The half-precision dtypes: LAPACK (torch's geqrf/lu, JAX's qr/solve) has no kernel for them.
_HALF = (torch.float16, torch.bfloat16)


def _none_at_matmul() -> TypeError:
    # torch's `self.base @ Q` with an unset base (orthogonal appended to a chain
    # with unsafe=True never runs right_inverse).
    return TypeError("unsupported operand type(s) for @: 'NoneType' and 'Tensor'")


#: torch's names of the integer dtypes (``Tensor.type()``), by JAX dtype name.
_INTEGER_NAMES = {
    "bool": "Bool",
    "uint8": "Byte",
    "int8": "Char",
    "int16": "Short",
    "int32": "Int",
    "int64": "Long",
}


def _integer_map_error(orthogonal_map: str, dtype: Any) -> RuntimeError:
    """What torch's ``_Orthogonal.forward`` raises on an integer or bool weight
    (registration accepts them), from the first op of each map that refuses it."""
    kind = _INTEGER_NAMES.get(jnp.dtype(dtype).name, str(dtype))
    if orthogonal_map == "householder":
        tau = _scalar_type(torch.empty(0))  # `2.0 / (1.0 + ...)`: the default dtype
        return RuntimeError(
            f"torch.linalg.householder_product: tau dtype {tau} does not match input dtype {kind}"
        )
    if kind == "Bool":  # `A = X - X.mH`
        return RuntimeError(
            "Subtraction, the `-` operator, with two bool tensors is not supported. "
            "Use the `^` or `logical_xor()` operator instead."
        )
    if orthogonal_map == "cayley":  # `torch.add(Id, A, alpha=-0.5)`
        return RuntimeError(
            "For integral input tensors, argument alpha must not be a floating point number."
        )
    return RuntimeError(
        f"linalg.matrix_exp: Expected a floating point or complex tensor as input. Got {kind}"
    )


class _Orthogonal(_bridge._JaxLink):
    """torch's ``_Orthogonal`` link; the maps are `jaxparam.functional.orthogonal`."""

    parametrization_name = "_Orthogonal"  # torch's class name, for messages
    # torch's saves only values computed from the original (its tril, the
    # exponent, base): the original may change between forward and backward
    # (`functional_call` with a weight, an optimizer step before the backward).
    saves_inputs = False

    base: Tensor

    def __init__(
        self, weight: Tensor, orthogonal_map: _OrthMaps, *, use_trivialization: bool = True
    ) -> None:
        super().__init__()
        # Note [Householder complex] in torch: no tau can be recovered for complex inputs.
        if weight.is_complex() and orthogonal_map == _OrthMaps.householder:
            raise ValueError("The householder parametrization does not support complex tensors.")
        self.shape = weight.shape
        self.orthogonal_map = orthogonal_map
        if use_trivialization:
            self.register_buffer("base", None)

    def _autocast(self) -> Any:
        """The dtype torch's autocast gives ``base @ Q`` now, or ``None``.

        torch's ``forward`` multiplies by ``base`` with ``@``, which autocast runs
        in its lower precision (bfloat16 by default on CPU, float16 on CUDA) on
        real inputs below float64; the maps themselves (``matrix_exp``, the solve,
        ``householder_product``) are not autocast.
        """
        base = getattr(self, "base", None)
        if base is None or not base.is_floating_point() or base.dtype == torch.float64:
            return None
        device = base.device.type
        if not torch.is_autocast_enabled(device):
            return None
        return _bridge._jax_dtype(torch.get_autocast_dtype(device))

    def _jax_key(self) -> Any:
        return (
            "torch_compat._Orthogonal",
            self.orthogonal_map.name,
            hasattr(self, "base"),
            getattr(self, "base", None) is None,
            self._autocast(),
        )

    def _jax_state(self) -> tuple[list[Tensor], list[Tensor]]:
        if getattr(self, "base", None) is None:
            return [], []  # (an unset base raises in `apply`, after the map's own errors)
        return [], [self.base]

    def _jax_apply(self):
        name = self.orthogonal_map.name
        autocast = self._autocast()  # as in `_jax_key`, which keys the compiled chain
        unset_base = hasattr(self, "base") and self.base is None

        def apply(params, buffers, X):
            # Trace time, in torch's order: the map refuses an integer weight, then
            # `base @ Q` an unset base.
            if not jnp.issubdtype(X.dtype, jnp.inexact):
                raise _integer_map_error(name, X.dtype)
            if unset_base:
                raise _none_at_matmul()
            if name == "cayley" and X.dtype in (jnp.float16, jnp.bfloat16):
                # torch's `linalg.solve` (LU) has no half kernel, nor has JAX's solve:
                # raise torch's error, not JAX's (trace time, before anything runs).
                kind = "Half" if X.dtype == jnp.float16 else "BFloat16"
                raise NotImplementedError(f"\"lu_cpu\" not implemented for '{kind}'")
            base = buffers[0] if buffers else None
            if autocast is None or not jnp.issubdtype(X.dtype, jnp.floating):
                Q = F.orthogonal(X, base, orthogonal_map=name, use_trivialization=base is not None)
                return Q, buffers
            # torch's `self.base @ Q` under autocast: both cast to the autocast
            # dtype, accumulated in float32, rounded once (the weight comes out in
            # that dtype; its gradient is cast back to X's by the transpose).
            Q = F.orthogonal(X, orthogonal_map=name, use_trivialization=False)
            wide = X.shape[-2] < X.shape[-1]
            Q = jnp.swapaxes(Q, -1, -2) if wide else Q
            Q = jnp.matmul(
                base.astype(autocast), Q.astype(autocast), preferred_element_type=jnp.float32
            ).astype(autocast)
            return (jnp.swapaxes(Q, -1, -2) if wide else Q), buffers

        return apply

    @torch.autograd.no_grad()
    def right_inverse(self, Q: Tensor) -> Tensor:
        if Q.shape != self.shape:
            raise ValueError(
                f"Expected a matrix or batch of matrices of shape {self.shape}. "
                f"Got a tensor of shape {Q.shape}."
            )
        name = self.orthogonal_map.name
        Q_init = Q
        n, k = Q.size(-2), Q.size(-1)
        transpose = n < k
        if transpose:
            Q = Q.mT
            n, k = k, n
        if not hasattr(self, "base"):
            # Note [right_inverse expm cayley] in torch.
            if name in ("cayley", "matrix_exp"):
                raise NotImplementedError(
                    "It is not possible to assign to the matrix exponential "
                    "or the Cayley parametrizations when use_trivialization=False."
                )
            if not (Q.is_floating_point() or Q.is_complex()):
                # torch's `geqrf` of an integer tensor (registration ignores it, as torch's).
                raise _not_implemented("geqrf", Q)
            A = _bridge.call_jax(
                lambda q: F.orthogonal_right_inverse(
                    q, orthogonal_map="householder", use_trivialization=False
                )[0],
                Q,
                what="`right_inverse`",
                key=("torch_compat._Orthogonal.right_inverse", "householder", False),
            )
            return A.mT if transpose else A
        if n == k and not (Q.is_floating_point() or Q.is_complex()):
            # torch's `_is_orthogonal` asks `torch.finfo` for the tolerance (JAX would
            # raise a ValueError of its own).
            raise TypeError(
                "torch.finfo() requires a floating point input type. "
                "Use torch.iinfo to handle 'torch.finfo'\n"
                "fix: make the tensor floating point before registering orthogonal"
            )
        if Q.dtype in _HALF and n != k:
            # torch completes Q, then its QR (`geqrf`) fails in half precision; so
            # would JAX's. Raised before drawing the completion (nothing changes).
            raise _not_implemented("geqrf", Q)
        if n != k:
            # torch's completion: n - k standard normal columns from torch's generator.
            N = torch.randn(*(Q.size()[:-2] + (n, n - k)), dtype=Q.dtype, device=Q.device)
            Q = torch.cat([Q, N], dim=-1)
        if Q.dtype in _HALF:
            # torch keeps an orthogonal half Q (its check is a matmul) and fails in the
            # QR of any other; JAX's QR has no half kernel at all, so only the check runs.
            is_orth = _bridge.call_jax(
                lambda q: F.is_orthogonal(q),
                Q,
                what="`right_inverse`",
                key=("torch_compat._Orthogonal.is_orthogonal",),
            )
            if not is_orth:
                raise _not_implemented("geqrf", Q)
            self.base = Q.clone()
        else:
            # Q is square here: the functional core keeps it if orthogonal, else takes
            # its QR factor with a non-negative diag(R) (torch's `_make_orthogonal`).
            self.base = _bridge.call_jax(
                lambda q: F.orthogonal_right_inverse(q, orthogonal_map=name)[1],
                Q,
                what="`right_inverse`",
                key=("torch_compat._Orthogonal.right_inverse", name, True),
            )
        # -Id, so that householder(zeros) == eye (torch's "poor man's eye_like").
        neg_Id = torch.zeros_like(Q_init)
        neg_Id.diagonal(dim1=-2, dim2=-1).fill_(-1.0)
        return neg_Id


def orthogonal(
    module: Module,
    name: str = "weight",
    orthogonal_map: str | None = None,
    *,
    use_trivialization: bool = True,
) -> Module:
    r"""Applies an orthogonal or unitary parametrization to a matrix or a batch of matrices.

    Torch's ``torch.nn.utils.parametrizations.orthogonal``: same arguments,
    defaults (``"matrix_exp"`` if square or complex, ``"householder"``
    otherwise), structure (``parametrizations.<name>.original`` and, with
    ``use_trivialization``, the buffer ``parametrizations.<name>.0.base``) and
    initial value (the tensor itself if orthogonal, its QR ``Q`` factor
    otherwise; a non-square tensor is completed with ``torch.randn`` columns
    from torch's global generator). The maps run in JAX
    (`jaxparam.functional.orthogonal`). Registered with ``unsafe=True``, as torch.

    Args:
        module: module on which to register the parametrization.
        name: name of the tensor to make orthogonal. Default: ``"weight"``.
        orthogonal_map: ``"matrix_exp"``, ``"cayley"`` or ``"householder"``.
        use_trivialization: whether to use the dynamic trivialization
            framework (a ``base`` buffer). Default: ``True``.

    Returns:
        The module, with an orthogonal parametrization on ``name``.

    Raises:
        ValueError: if ``module`` has no tensor ``name``, the tensor has fewer
            than 2 dimensions, ``orthogonal_map`` is unknown, or
            ``"householder"`` is asked for a complex tensor (torch's messages).
        TypeError: if the tensor is a square integer or bool matrix (torch's
            ``torch.finfo`` message, with the trivialization).

    Example:
        >>> import torch
        >>> from torch_compat.parametrizations import orthogonal
        >>> m = orthogonal(torch.nn.Linear(3, 5))
        >>> torch.allclose(m.weight.T @ m.weight, torch.eye(3), atol=1e-5)
        True
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if weight.ndim < 2:
        raise ValueError(
            f"Expected a matrix or batch of matrices. Got a tensor of {weight.ndim} dimensions."
        )
    if orthogonal_map is None:
        orthogonal_map = (
            "matrix_exp"
            if weight.size(-2) == weight.size(-1) or weight.is_complex()
            else "householder"
        )
    orth_enum = getattr(_OrthMaps, orthogonal_map, None)
    if orth_enum is None:
        raise ValueError(
            'orthogonal_map has to be one of "matrix_exp", "cayley", "householder". '
            f"Got: {orthogonal_map}"
        )
    orth = _Orthogonal(weight, orth_enum, use_trivialization=use_trivialization)
    parametrize.register_parametrization(module, name, orth, unsafe=True)
    return module


# --------------------------------------------------------------------------- #
# Weight norm
# --------------------------------------------------------------------------- #


_NO_DIMENSIONS = "Dimension specified as {dim} but tensor has no dimensions"


def _check_norm_input(weight: Tensor, dim: int) -> None:
    """Raises what ``torch.norm_except_dim(weight, 2, dim)`` raises, in torch's order.

    The JAX math would return a 0-d weight unchanged and integers as integers.
    """
    ndim = max(weight.ndim, 1)
    if not -ndim <= dim < ndim:
        raise IndexError(
            "Dimension out of range (expected to be in range of "
            f"[{-ndim}, {ndim - 1}], but got {dim})"
        )
    if weight.ndim == 0 and dim == 0:
        # (dim=-1 is the whole tensor here; torch raises for it in `forward`.)
        raise IndexError(_NO_DIMENSIONS.format(dim=dim))
    if not (weight.is_floating_point() or weight.is_complex()):
        # torch names the scalar type as in `Tensor.type()`: Int, Long, Bool, Byte, ...
        raise RuntimeError(
            "norm(): input dtype should be either floating point or complex. "
            f"Got {_scalar_type(weight)} instead."
        )


class _WeightNorm(_bridge._JaxLink):
    """torch's ``_WeightNorm`` link; the math is `jaxparam.functional.weight_norm`."""

    parametrization_name = "_WeightNorm"  # torch's class name, for messages

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        if dim is None:
            dim = -1
        self.dim = dim

    def _jax_key(self) -> Any:
        return ("torch_compat._WeightNorm", self.dim)

    def _jax_apply(self):
        dim = self.dim

        def apply(params, buffers, weight_g, weight_v):
            if weight_v.ndim == 0:  # torch._weight_norm's check (trace time)
                raise IndexError(_NO_DIMENSIONS.format(dim=dim))
            return F.weight_norm(weight_g, weight_v, dim), []

        return apply

    def right_inverse(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        dim = self.dim
        _check_norm_input(weight, dim)
        weight_g = _bridge.call_jax(
            lambda w: F.weight_norm_inverse(w, dim)[0],
            weight,
            what="`right_inverse`",
            key=("torch_compat._WeightNorm.right_inverse", dim),
        )
        weight_v = weight  # torch returns the tensor itself
        return weight_g, weight_v


def weight_norm(module: Module, name: str = "weight", dim: int = 0) -> Module:
    r"""Applies weight normalization to a parameter in the given module.

    Torch's ``torch.nn.utils.parametrizations.weight_norm``:
    ``w = g * v / ||v||`` with the norm over every axis but ``dim``;
    ``dim=None`` (or ``-1``, torch's convention) means the whole tensor. The
    magnitude is ``parametrizations.<name>.original0`` and the direction
    ``original1``. Old checkpoints with ``<name>_g`` / ``<name>_v`` keys load
    through the same ``load_state_dict`` pre-hook as torch's. Registered with
    ``unsafe=True``, as torch.

    Args:
        module: containing module.
        name: name of the weight parameter. Default: ``"weight"``.
        dim: dimension kept by the norm; ``None`` for the whole tensor. Default: ``0``.

    Returns:
        The module, with the weight-norm parametrization on ``name``.

    Raises:
        ValueError: if ``module`` has no parameter, buffer or parametrized
            tensor ``name`` (torch's message).
        IndexError: if ``dim`` is out of range (torch's message).

    Example:
        >>> import torch
        >>> from torch_compat.parametrizations import weight_norm
        >>> m = weight_norm(torch.nn.Linear(20, 40))
        >>> m.parametrizations.weight.original0.size()
        torch.Size([40, 1])
    """
    _weight_norm = _WeightNorm(dim)
    parametrize.register_parametrization(module, name, _weight_norm, unsafe=True)

    def _weight_norm_compat_hook(
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        g_key = f"{prefix}{name}_g"
        v_key = f"{prefix}{name}_v"
        if g_key in state_dict and v_key in state_dict:
            original0 = state_dict.pop(g_key)
            original1 = state_dict.pop(v_key)
            state_dict[f"{prefix}parametrizations.{name}.original0"] = original0
            state_dict[f"{prefix}parametrizations.{name}.original1"] = original1

    module._register_load_state_dict_pre_hook(_weight_norm_compat_hook)
    return module


# --------------------------------------------------------------------------- #
# Spectral norm
# --------------------------------------------------------------------------- #


def _sn_warmup(weight_mat, u, v, *, eps: float):
    # torch: register F.normalize(u), F.normalize(v), then 15 power iterations.
    state = F.SpectralNormState(_normalize(u, eps), _normalize(v, eps))
    _, state = F.spectral_norm(weight_mat, state, n_power_iterations=15, eps=eps, training=True)
    return list(state)


def _check_uv(shape: tuple[int, ...], dim: int, u: Any, v: Any, *, training: bool) -> None:
    """Raises what torch's power method or sigma raises when ``_u``, ``_v`` do not fit
    the weight matrix (a replaced original, a transfer to another shape); JAX would
    raise a TypeError of its own. Trace time: nothing has run, nothing changed."""
    h = shape[dim]
    w = math.prod(s for i, s in enumerate(shape) if i != dim)
    # torch's first product, in both modes: `torch.mv(weight_mat, _v)`.
    if v.shape[0] != w:
        raise RuntimeError(f"size mismatch, got input ({h}), mat ({h}x{w}), vec ({v.shape[0]})")
    if u.shape[0] != h:
        # torch's `torch.vdot(u, torch.mv(weight_mat, v))`.
        msg = (
            f"inconsistent tensor size, expected tensor [{u.shape[0]}] and src [{h}] to "
            f"have the same number of elements, but got {u.shape[0]} and {h} elements "
            "respectively"
        )
        if training:
            # torch's power method resizes `_u` in place here (a deprecated resize of an
            # `out=` tensor, with a warning); the JAX link updates its buffers in place
            # with their shapes, so it raises the error torch raises in eval mode.
            msg += (
                f"\nfix: the weight has {h} rows but `_u` has {u.shape[0]} elements; "
                "register spectral_norm again on the new weight (or replace `_u` by a "
                f"tensor of {h} elements)"
            )
        raise RuntimeError(msg)


class _SpectralNorm(_bridge._JaxLink):
    """torch's ``_SpectralNorm`` link; the math is `jaxparam.functional.spectral_norm`."""

    parametrization_name = "_SpectralNorm"  # torch's class name, for messages

    def __init__(
        self,
        weight: Tensor,
        n_power_iterations: int = 1,
        dim: int = 0,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise IndexError(
                "Dimension out of range (expected to be in range of "
                f"[-{ndim}, {ndim - 1}] but got {dim})"
            )
        if n_power_iterations <= 0:
            raise ValueError(
                "Expected n_power_iterations to be positive, but "
                f"got n_power_iterations={n_power_iterations}"
            )
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            weight_mat = self._reshape_weight_to_matrix(weight.detach())
            h, w = weight_mat.size()
            # torch's draws, in torch's order, from torch's global generator.
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            eps_ = float(eps)
            u, v = _bridge.call_jax(
                lambda W, u, v: _sn_warmup(W, u, v, eps=eps_),
                weight_mat,
                u,
                v,
                what="spectral_norm",
                key=("torch_compat._SpectralNorm.init", eps_),
            )
            self.register_buffer("_u", u.clone())
            self.register_buffer("_v", v.clone())

    def _reshape_weight_to_matrix(self, weight: Tensor) -> Tensor:
        if weight.ndim <= 1:
            raise AssertionError(
                f"Expected weight to have more than 1 dimension, got {weight.ndim}"
            )
        if self.dim != 0:
            weight = weight.permute(self.dim, *(d for d in range(weight.dim()) if d != self.dim))
        return weight.flatten(1)

    def _jax_key(self) -> Any:
        return (
            "torch_compat._SpectralNorm",
            self.dim,
            float(self.eps),
            getattr(self, "n_power_iterations", 1),
            self.training,
        )

    def _jax_state(self) -> tuple[list[Tensor], list[Tensor]]:
        if "_u" in self._buffers:
            return [], [self._u, self._v]
        return [], []

    def _jax_apply(self):
        dim, eps, training = self.dim, float(self.eps), self.training
        n = getattr(self, "n_power_iterations", 1)

        def apply(params, buffers, weight):
            if buffers and weight.ndim > 1:
                _check_uv(weight.shape, dim, *buffers, training=training)
            state = F.SpectralNormState(*buffers) if buffers else F.SpectralNormState(None, None)
            y, new = F.spectral_norm(
                weight, state, n_power_iterations=n, eps=eps, dim=dim, training=training
            )
            return y, ([new.u, new.v] if buffers else [])

        return apply

    def right_inverse(self, value: Tensor) -> Tensor:
        return value


def spectral_norm(
    module: Module,
    name: str = "weight",
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: int | None = None,
) -> Module:
    r"""Applies spectral normalization to a parameter in the given module.

    Torch's ``torch.nn.utils.parametrizations.spectral_norm``:
    ``W / sigma(W)``, ``sigma`` estimated by the power method on the weight
    reshaped to a matrix (``dim`` first). The vectors are the buffers
    ``parametrizations.<name>.0._u`` and ``._v``, drawn with torch's generator
    (``normal_``, as torch) and warmed up by 15 iterations; each access in
    training mode runs ``n_power_iterations`` more and updates them in place.
    A 1-d tensor is simply normalized (no buffers). Registered with
    ``unsafe=False``, as torch (so registration runs one forward).

    Args:
        module: containing module.
        name: name of the weight parameter. Default: ``"weight"``.
        n_power_iterations: power iterations per access in training mode. Default: ``1``.
        eps: epsilon of the normalizations. Default: ``1e-12``.
        dim: dimension of the outputs. Default: ``0``, except ``1`` for
            ``ConvTranspose1d/2d/3d``.

    Returns:
        The module, with the spectral-norm parametrization on ``name``.

    Raises:
        ValueError: if ``module`` has no tensor ``name`` or
            ``n_power_iterations`` is not positive (torch's messages).
        IndexError: if ``dim`` is out of range (torch's message).

    Example:
        >>> import torch
        >>> from torch_compat.parametrizations import spectral_norm
        >>> m = spectral_norm(torch.nn.Linear(20, 40))
        >>> sorted(m.parametrizations.weight[0].state_dict())
        ['_u', '_v']
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        if isinstance(
            module,
            (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d),
        ):
            dim = 1
        else:
            dim = 0
    parametrize.register_parametrization(
        module, name, _SpectralNorm(weight, n_power_iterations, dim, eps)
    )
    return module
