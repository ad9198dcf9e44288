"""Torch's consistency checks, and their messages, shared by the NNX and linen fronts.

Each check raises torch's exception type with torch's message text (so a torch
user's ``assertRaisesRegex`` keeps matching), followed by a ``fix:`` line. The
checks look at arrays only; the fronts decide where the arrays come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

_UNSAFE_FIX = "fix: pass unsafe=True if the parametrization is meant to change it."


def is_tensor(x: Any) -> bool:
    return isinstance(x, jax.Array)


def type_name(x: Any) -> str:
    return type(x).__name__


def link_name(link: Any) -> str:
    """The name torch's messages give a parametrization."""
    if isinstance(link, nnx.Module):
        return type(link).__name__
    return getattr(link, "__name__", type(link).__name__)


def _not_a_tensor(X: Any) -> ValueError:
    return ValueError(
        f"A parametrization must return a tensor. Got {type_name(X)}.\n"
        "fix: return a jax.Array (wrap Python scalars with jnp.asarray)."
    )


# -- first registration (torch's ParametrizationList.__init__) -----------------


def originals_from_right_inverse(new: Any, original_dtype: Any) -> tuple[bool, tuple[Any, ...]]:
    """Check what ``right_inverse`` returned at registration: ``(is_tensor, originals)``."""
    if not is_tensor(new) and not isinstance(new, Sequence):
        raise ValueError(
            "'right_inverse' must return a Tensor or a Sequence of tensors (list, tuple...). "
            f"Got {type_name(new)}\n"
            "fix: return one jax.Array, or a tuple of them (one per original)."
        )
    if is_tensor(new):
        if new.dtype != original_dtype:
            raise ValueError(
                "When `right_inverse` outputs one tensor, it may not change the dtype.\n"
                f"original.dtype: {original_dtype}\n"
                f"right_inverse(original).dtype: {new.dtype}\n"
                "fix: return an array of the original's dtype."
            )
        return True, (new,)
    for i, item in enumerate(new):
        if not is_tensor(item):
            raise ValueError(
                "'right_inverse' must return a Tensor or a Sequence of tensors "
                "(list, tuple...). "
                f"Got element {i} of the sequence with type {type_name(item)}.\n"
                "fix: make every element a jax.Array."
            )
    return False, tuple(new)


def check_registered_value(Z: Any, original_shape: Any, original_dtype: Any) -> None:
    """The chain's value at registration keeps the dtype and shape (unless ``unsafe``)."""
    if not is_tensor(Z):
        raise _not_a_tensor(Z)
    if Z.dtype != original_dtype:
        raise ValueError(
            "Registering a parametrization may not change the dtype of the tensor, "
            "unless `unsafe` flag is enabled.\n"
            f"unparametrized dtype: {original_dtype}\n"
            f"parametrized dtype: {Z.dtype}\n" + _UNSAFE_FIX
        )
    if Z.shape != original_shape:
        raise ValueError(
            "Registering a parametrization may not change the shape of the tensor, "
            "unless `unsafe` flag is enabled.\n"
            f"unparametrized shape: {original_shape}\n"
            f"parametrized shape: {Z.shape}\n" + _UNSAFE_FIX
        )


# -- appending to a chain (torch's register_parametrization) ------------------------


def check_appended_value(Y: Any, X: Any, tensor_name: str) -> None:
    """``X = parametrization(Y)`` maps the current value's space to itself."""
    if not is_tensor(X):
        raise _not_a_tensor(X)
    if X.dtype != Y.dtype:
        raise ValueError(
            "Registering a parametrization may not change the dtype of the tensor, "
            "unless the `unsafe` flag is enabled.\n"
            f"module.{tensor_name}.dtype: {Y.dtype}\n"
            f"parametrization(module.{tensor_name}).dtype: {X.dtype}\n" + _UNSAFE_FIX
        )
    if X.shape != Y.shape:
        raise ValueError(
            "Registering a parametrization may not change the shape of the tensor, "
            "unless the `unsafe` flag is enabled.\n"
            f"module.{tensor_name}.shape: {Y.shape}\n"
            f"parametrization(module.{tensor_name}).shape: {X.shape}\n" + _UNSAFE_FIX
        )


def check_appended_right_inverse(Y: Any, Z: Any, tensor_name: str) -> None:
    """``Z = parametrization.right_inverse(X)`` lands back in the current value's space."""
    if not is_tensor(Z):
        raise ValueError(
            f"parametrization.right_inverse must return a tensor. Got: {type_name(Z)}\n"
            "fix: return one jax.Array (a link appended to a chain has one input)."
        )
    if Z.dtype != Y.dtype:
        raise ValueError(
            "The tensor returned by parametrization.right_inverse must have the same dtype "
            f"as module.{tensor_name}, unless the `unsafe` flag is enabled.\n"
            f"module.{tensor_name}.dtype: {Y.dtype}\n"
            f"returned dtype: {Z.dtype}\n" + _UNSAFE_FIX
        )
    if Z.shape != Y.shape:
        raise ValueError(
            "The tensor returned by parametrization.right_inverse must have the same shape "
            f"as module.{tensor_name}, unless the `unsafe` flag is enabled.\n"
            f"module.{tensor_name}.shape: {Y.shape}\n"
            f"returned shape: {Z.shape}\n" + _UNSAFE_FIX
        )


# -- assignment (torch's ParametrizationList.right_inverse) ---------------------------


def missing_right_inverse(name: str, fix: str) -> RuntimeError:
    """torch's error for a link without ``right_inverse`` (``name``: its `link_name`)."""
    return RuntimeError(
        f"parametrization {name} does not implement right_inverse.\n"
        "fix: give the parametrization a `right_inverse` method (or attribute, for a "
        f"plain function), or {fix}."
    )


def originals_from_assignment(
    value: Any, is_tensor_chain: bool, original_dtypes: Sequence[Any]
) -> tuple[Any, ...]:
    """Check what the chain's ``right_inverse`` returned on assignment: the new originals."""
    dtype_fix = "fix: make `right_inverse` return arrays of the originals' dtypes."
    if is_tensor_chain:
        if not is_tensor(value):
            raise ValueError(
                f"`right_inverse` should return a tensor. Got {type_name(value)}\n"
                "fix: return one jax.Array."
            )
        if value.dtype != original_dtypes[0]:
            raise ValueError(
                f"The tensor returned by `right_inverse` has dtype {value.dtype} "
                f"while `original` has dtype {original_dtypes[0]}\n" + dtype_fix
            )
        return (value,)
    if not isinstance(value, Sequence):
        raise ValueError(
            f"'right_inverse' must return a sequence of tensors. Got {type_name(value)}.\n"
            "fix: return a tuple with one array per original."
        )
    if len(value) != len(original_dtypes):
        raise ValueError(
            "'right_inverse' must return a sequence of tensors of length "
            f"{len(original_dtypes)}. Got a sequence of length {len(value)}.\n"
            "fix: return a tuple with one array per original."
        )
    for i, (tensor, dtype) in enumerate(zip(value, original_dtypes, strict=True)):
        if not is_tensor(tensor):
            raise ValueError(
                "'right_inverse' must return a sequence of tensors "
                f"or reference-type opaques. Got element {i} of type {type_name(tensor)}.\n"
                "fix: make every element a jax.Array."
            )
        if tensor.dtype != dtype:
            raise ValueError(
                f"Tensor {i} returned by `right_inverse` has dtype {tensor.dtype} "
                f"while `original{i}` has dtype {dtype}\n" + dtype_fix
            )
    return tuple(value)


# -- removal (torch's remove_parametrizations) ------------------------------------


def not_parametrized(owner: str, name: str, parametrized: Sequence[str]) -> ValueError:
    names = ", ".join(sorted(parametrized)) or "none"
    return ValueError(
        f"Module {owner} does not have a parametrization on {name}\n"
        f"parametrized names: {names}\n"
        "fix: name one of the parametrized names."
    )


def cannot_leave_unparametrized() -> ValueError:
    return ValueError(
        "Cannot leave unparametrized (`leave_parametrized=False`) a tensor "
        "that is parametrized in terms of a sequence of tensors.\n"
        "fix: use leave_parametrized=True to keep the current value."
    )


def check_baked_dtype(value: Any, original_dtype: Any) -> None:
    """Removal keeping the value of an ``unsafe`` chain that changed the dtype.

    Torch's ``set_`` refuses to store a value of another dtype in the original
    Parameter, and ``remove_parametrizations`` reports it as this RuntimeError.
    """
    if value.dtype != original_dtype:
        raise RuntimeError(
            "Calling remove_parametrizations() with leave_parametrized=True "
            "for a parameter whose parametrized value has another dtype fails, as in torch.\n"
            f"original dtype: {original_dtype}\n"
            f"parametrized dtype: {value.dtype}\n"
            "fix: use leave_parametrized=False, or append a link casting back to "
            "the original's dtype before removing."
        )
