"""A drop-in ``torch.nn.utils.parametrize`` whose parametrizations may be JAX.

Replace ``import torch.nn.utils.parametrize as P`` by
``import torch_compat.parametrize as P``: torch parametrizations (``nn.Module``s)
run natively, exactly as in torch (same module structure, state-dict keys,
errors). Any other callable is JAX: a function ``f(x) -> y`` (or
``f(x0, x1, ...)``), optionally with a ``right_inverse`` attribute, or a
``flax.nnx.Module``. It is wrapped in a torch adapter
(:class:`~torch_compat.JaxParametrization` /
:class:`~torch_compat.NNXParametrization`) that sits in the
``ParametrizationList`` like any torch module. Consecutive JAX links of a chain
run as one compiled computation, with torch autograd (see ``_bridge``).

In plain words (the invariants, as in torch):

* ``module.weight`` is a property of the injected ``Parametrized<Class>``;
  it evaluates ``module.parametrizations.weight()`` (or the cached value).
* ``module.parametrizations.weight.original`` (or ``original0..N`` when the
  first ``right_inverse`` returns a sequence) holds the unconstrained tensor(s).
* ``module.weight = X`` runs the ``right_inverse``s in reverse order and
  ``set_``s the originals in place (optimizers keep tracking them).
* Beyond torch: every mutating operation (registration, assignment,
  ``ParametrizationList.right_inverse``, removal, transfer) is a transaction.
  If it raises, the module is left exactly as it was: class (and the injected
  class's properties), ``_parameters`` / ``_buffers`` / ``_modules`` and
  attributes of every submodule, the same tensor objects with the same
  storage, shape, ``requires_grad`` and values (power-iteration buffers that a
  check forward updated included). Torch's exception propagates unchanged.
  Reading ``module.weight`` is not wrapped (it is the hot path).

Example:
    >>> import torch, jax.numpy as jnp
    >>> import torch_compat.parametrize as P
    >>> m = P.register_parametrization(torch.nn.Linear(3, 3), "weight", lambda x: x + x.T)
    >>> torch.equal(m.weight, m.weight.T)
    True
"""

from __future__ import annotations

import collections
import copyreg
import weakref
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import torch
import torch.nn.utils.parametrize as _torch_parametrize
from flax import nnx
from torch import Tensor
from torch.__future__ import get_swap_module_params_on_conversion
from torch._library.opaque_object import is_opaque_reference_type
from torch._opaque_base import OpaqueBase
from torch.nn.modules.container import Module, ModuleDict, ModuleList
from torch.nn.parameter import Parameter
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from torch_compat import _bridge

__all__ = [
    "cached",
    "ParametrizationList",
    "register_parametrization",
    "is_parametrized",
    "remove_parametrizations",
    "type_before_parametrizations",
    "transfer_parametrizations_and_params",
]

# The cache is torch's own (`torch.nn.utils.parametrize._cache`, read through the
# module: torch rebinds it): one `cached()` context, whichever library opened it,
# caches the modules of both (third-party code wraps calls in torch's).


@contextmanager
def cached():
    r"""Context manager that enables the caching system within parametrizations.

    The value of each parametrized tensor is computed the first time it is
    accessed inside the context and reused afterwards; the values are discarded
    on exit (nested contexts: on the outermost exit). The cache holds torch
    tensors only, never JAX arrays that could alias torch memory.

    It is torch's context itself: ``torch.nn.utils.parametrize.cached()``
    caches ``torch_compat`` modules too, and this caches modules parametrized
    with torch's ``register_parametrization``.

    Raises:
        Nothing by itself.

    Example:
        >>> import torch
        >>> import torch_compat.parametrize as P
        >>> m = P.register_parametrization(torch.nn.Linear(2, 2), "weight", lambda x: x.T)
        >>> with P.cached():
        ...     m.weight is m.weight
        True
    """
    with _torch_parametrize.cached():
        yield


def _register_parameter_or_buffer(module, name, X) -> None:
    if isinstance(X, Parameter):
        module.register_parameter(name, X)
    else:
        module.register_buffer(name, X)


def _maybe_set(dest: Tensor, src: Tensor) -> None:
    should_swap = get_swap_module_params_on_conversion() or is_traceable_wrapper_subclass(dest)
    if should_swap:
        if isinstance(dest, Parameter) and not isinstance(src, Parameter):
            src = Parameter(src, requires_grad=dest.requires_grad)
        torch.utils.swap_tensors(dest, src)
    else:
        dest.set_(src)  # type: ignore[call-overload]


class _Snapshot:
    """Everything an operation may change, to be put back if it raises.

    Covers every module reachable from the roots: its class (and, for an
    injected ``Parametrized<Class>``, the class's attributes), its
    ``__dict__`` and the ``_parameters`` / ``_buffers`` / ``_modules`` dicts,
    and each tensor's object identity, storage view, ``requires_grad`` and
    bytes. The parametrize value cache is restored too.
    """

    def __init__(self, roots: Sequence[Any]) -> None:
        mods: dict[int, Module] = {}
        for root in roots:
            if isinstance(root, Module):
                for m in root.modules():
                    mods.setdefault(id(m), m)
        self.modules = [
            (
                m,
                m.__class__,
                dict(m.__dict__),
                dict(m._parameters),
                dict(m._buffers),
                dict(m._modules),
            )
            for m in mods.values()
        ]
        self.classes = {
            type(m): dict(type(m).__dict__) for m in mods.values() if _is_injected(type(m))
        }
        tensors: dict[int, Tensor] = {}
        for m in mods.values():
            for t in (*m._parameters.values(), *m._buffers.values()):
                # an uninitialized (lazy) tensor has no data to restore, and refuses
                # every operation: the dicts above put it back
                if isinstance(t, Tensor) and not torch.nn.parameter.is_lazy(t):
                    tensors.setdefault(id(t), t)
        with torch.no_grad():
            self.tensors = [
                (t, t.detach(), t.detach().clone(), t.requires_grad) for t in tensors.values()
            ]
        self.cache = dict(_torch_parametrize._cache)

    def restore(self) -> None:
        for cls, saved in self.classes.items():
            for k in [k for k in cls.__dict__ if k not in saved]:
                delattr(cls, k)
            for k, v in saved.items():
                if cls.__dict__.get(k, _MISSING) is not v and k not in ("__dict__", "__weakref__"):
                    setattr(cls, k, v)
        for m, cls, d, params, bufs, mods in self.modules:
            object.__setattr__(m, "__class__", cls)
            m.__dict__.clear()
            m.__dict__.update(d)
            for current, saved in ((m._parameters, params), (m._buffers, bufs), (m._modules, mods)):
                current.clear()
                current.update(saved)
        with torch.no_grad():
            for t, alias, value, requires_grad in self.tensors:
                _restore_tensor(t, alias, value)
                if t.requires_grad != requires_grad and t.is_leaf:
                    t.requires_grad_(requires_grad)
        _torch_parametrize._cache.clear()
        _torch_parametrize._cache.update(self.cache)


_MISSING = object()


def _same_view(t: Tensor, alias: Tensor) -> bool:
    return (
        t.dtype == alias.dtype
        and t.device == alias.device
        and t.shape == alias.shape
        and t.stride() == alias.stride()
        and t.storage_offset() == alias.storage_offset()
        and t.untyped_storage().data_ptr() == alias.untyped_storage().data_ptr()
    )


def _same_bytes(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or a.is_meta:  # a meta tensor has no bytes to restore
        return True
    return torch.equal(
        a.detach().contiguous().reshape(-1).view(torch.uint8),
        b.detach().contiguous().reshape(-1).view(torch.uint8),
    )


def _restore_tensor(t: Tensor, alias: Tensor, value: Tensor) -> None:
    if not _same_view(t, alias):
        if is_traceable_wrapper_subclass(t) or get_swap_module_params_on_conversion():
            src = alias.clone()
            if isinstance(t, Parameter):
                src = Parameter(src, requires_grad=t.requires_grad)
            torch.utils.swap_tensors(t, src)
        else:
            t.set_(alias)  # type: ignore[call-overload]
    if not _same_bytes(t, value):  # only then: no needless version-counter bump
        t.copy_(value)


@contextmanager
def _transaction(*roots: Any):
    """Runs the body; if it raises, puts every module reachable from ``roots`` back."""
    snapshot = _Snapshot(roots)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise


_INJECTED: weakref.WeakSet[type] = weakref.WeakSet()  # the Parametrized<Class> types


def _is_injected(cls: type) -> bool:
    return cls in _INJECTED


def _link_name(module: Module) -> str:
    """The name torch's messages give a link: the user's JAX callable's, not the adapter's."""
    return getattr(module, "parametrization_name", type(module).__name__)


def _as_module(parametrization: Any) -> Module:
    """Torch modules stay as they are; JAX callables get a torch adapter."""
    if isinstance(parametrization, Module):
        return parametrization
    if isinstance(parametrization, nnx.Module):
        return _bridge.NNXParametrization(parametrization)
    if callable(parametrization):
        return _bridge.JaxParametrization(parametrization)
    raise TypeError(
        "A parametrization must be a torch.nn.Module, a flax.nnx.Module or a JAX "
        f"function. Got {type(parametrization).__name__}."
    )


def _segments(modules: Sequence[Module]) -> list[tuple[bool, list[Module]]]:
    """Splits a chain into maximal runs of JAX links (fused) and torch links."""
    out: list[tuple[bool, list[Module]]] = []
    for m in modules:
        jax_link = _bridge.is_jax_link(m)
        if jax_link and out and out[-1][0]:
            out[-1][1].append(m)
        else:
            out.append((jax_link, [m]))
    return out


class ParametrizationList(_torch_parametrize.ParametrizationList):
    r"""A sequential container holding the original tensor(s) and the parametrizations.

    It is the type of ``module.parametrizations[tensor_name]``. It subclasses
    torch's ``ParametrizationList`` (so ``isinstance`` checks in torch code keep
    working) and behaves the same, except that consecutive JAX links are run as
    one compiled computation. The original is ``original`` if the first
    ``right_inverse`` returns one tensor (or there is none), else
    ``original0``, ``original1``, ...

    It shall not be instantiated by the user.

    Args:
        modules: the parametrizations (torch modules or JAX callables).
        original: the parameter or buffer that is parametrized.
        unsafe: skip the dtype/shape consistency checks. Default: ``False``.

    Raises:
        ValueError: if ``modules`` is empty, or ``right_inverse`` returns
            something other than a tensor or a sequence of tensors, changes the
            dtype or the device, or (unless ``unsafe``) the parametrization
            changes the dtype or the shape.

    Example:
        >>> import torch
        >>> import torch_compat.parametrize as P
        >>> m = P.register_parametrization(torch.nn.Linear(2, 2), "weight", lambda x: -x)
        >>> type(m.parametrizations.weight).__name__
        'ParametrizationList'
    """

    original: Tensor
    unsafe: bool

    def __init__(
        self,
        modules: Sequence[Module],
        original: Tensor | Parameter,
        unsafe: bool = False,
    ) -> None:
        # This should never throw, unless this class is used from the outside
        if len(modules) == 0:
            raise ValueError("ParametrizationList requires one or more modules.")

        # torch's __init__ is replaced, not extended: we call ModuleList's.
        ModuleList.__init__(self, [_as_module(m) for m in modules])
        self.unsafe = unsafe

        # In plain words:
        # module.weight must keep its dtype and shape.
        #    X = module.weight
        #    Y = param.right_inverse(X)          # a Tensor or a Sequence of Tensors
        #    Z = param(Y) if isinstance(Y, Tensor) else param(*Y)
        #    assert X.dtype == Z.dtype and X.shape == Z.shape   (unless unsafe)
        #    if isinstance(Y, Tensor): assert X.dtype == Y.dtype  (so that set_ works)
        # Below we use original = X, new = Y
        original_shape = original.shape
        original_dtype = original.dtype

        with torch.no_grad():
            new = original
            for module in reversed(self):  # type: ignore[call-overload]
                if hasattr(module, "right_inverse"):
                    try:
                        new = module.right_inverse(new)  # type: ignore[operator]
                    except NotImplementedError:
                        pass
                # else, or if it throws, we assume that right_inverse is the identity

        if not isinstance(new, Tensor) and not isinstance(new, Sequence):
            raise ValueError(
                "'right_inverse' must return a Tensor or a Sequence of tensors (list, tuple...). "
                f"Got {type(new).__name__}"
            )

        self.is_tensor = isinstance(new, Tensor)
        self.ntensors = 1 if self.is_tensor else len(new)

        if self.is_tensor:
            if original.dtype != new.dtype:
                raise ValueError(
                    "When `right_inverse` outputs one tensor, it may not change the dtype.\n"
                    f"original.dtype: {original.dtype}\n"
                    f"right_inverse(original).dtype: {new.dtype}"
                )
            if original.device != new.device:
                raise ValueError(
                    "When `right_inverse` outputs one tensor, it may not change the device.\n"
                    f"original.device: {original.device}\n"
                    f"right_inverse(original).device: {new.device}"
                )
            # set_ keeps the id of the original: no need to re-register it in the optimizer
            with torch.no_grad():
                _maybe_set(original, new)
            _register_parameter_or_buffer(self, "original", original)
        else:
            for i, originali in enumerate(new):
                match originali:
                    case OpaqueBase():
                        if not is_opaque_reference_type(type(originali)):
                            raise ValueError(
                                f"'right_inverse' must return a Tensor or a reference-type "
                                f"opaque. Got element {i} of the sequence with type "
                                f"{type(originali).__name__}."
                            )
                        setattr(self, f"original{i}", originali)
                    case Tensor():
                        # The user adds the new parameters to the optimizer (documented)
                        if isinstance(original, Parameter):
                            originali = Parameter(originali, original.requires_grad)
                        originali.requires_grad_(original.requires_grad)
                        _register_parameter_or_buffer(self, f"original{i}", originali)
                    case _:
                        raise ValueError(
                            "'right_inverse' must return a Tensor or a Sequence of tensors "
                            "(list, tuple...). "
                            f"Got element {i} of the sequence with type {type(originali).__name__}."
                        )

        if not self.unsafe:
            # Z = forward(right_inverse(original)) must live where original lives
            Z = self()
            if not isinstance(Z, Tensor):
                raise ValueError(f"A parametrization must return a tensor. Got {type(Z).__name__}.")
            if Z.dtype != original_dtype:
                raise ValueError(
                    "Registering a parametrization may not change the dtype of the tensor, "
                    "unless `unsafe` flag is enabled.\n"
                    f"unparametrized dtype: {original_dtype}\n"
                    f"parametrized dtype: {Z.dtype}"
                )
            if Z.shape != original_shape:
                raise ValueError(
                    "Registering a parametrization may not change the shape of the tensor, "
                    "unless `unsafe` flag is enabled.\n"
                    f"unparametrized shape: {original_shape}\n"
                    f"parametrized shape: {Z.shape}"
                )

    def right_inverse(self, value: Tensor) -> None:
        r"""Calls the ``right_inverse``s in reverse registration order and stores the result.

        The result goes (in place, with ``set_``) into ``self.original``, or into
        ``self.original0``, ``self.original1``, ... if it is a sequence.

        Args:
            value: the value to which to initialize the parametrized tensor.

        Raises:
            RuntimeError: if a parametrization has no ``right_inverse``.
            ValueError: if a ``right_inverse`` returns the wrong type, length or dtype.
            Whatever it raises, the originals and the links are left as they were.

        Example:
            >>> # module.weight = X  calls  module.parametrizations.weight.right_inverse(X)
        """
        with _transaction(self):
            self._right_inverse(value)

    def _right_inverse(self, value: Tensor) -> None:
        with torch.no_grad():
            for module in reversed(self):  # type: ignore[call-overload]
                if hasattr(module, "right_inverse"):
                    value = module.right_inverse(value)  # type: ignore[operator]
                else:
                    raise RuntimeError(
                        f"parametrization {_link_name(module)} does not implement right_inverse."
                    )
            if self.is_tensor:
                if not isinstance(value, Tensor):
                    raise ValueError(
                        f"`right_inverse` should return a tensor. Got {type(value).__name__}"
                    )
                if value.dtype != self.original.dtype:
                    raise ValueError(
                        f"The tensor returned by `right_inverse` has dtype {value.dtype} "
                        f"while `original` has dtype {self.original.dtype}"
                    )
                _maybe_set(self.original, value)
            else:
                if not isinstance(value, collections.abc.Sequence):
                    raise ValueError(
                        "'right_inverse' must return a sequence of tensors. "
                        f"Got {type(value).__name__}."
                    )
                if len(value) != self.ntensors:
                    raise ValueError(
                        "'right_inverse' must return a sequence of tensors of length "
                        f"{self.ntensors}. Got a sequence of length {len(value)}."
                    )
                for i, tensor in enumerate(value):
                    original_i = getattr(self, f"original{i}")
                    match tensor:
                        case OpaqueBase():
                            if is_opaque_reference_type(type(tensor)):
                                setattr(self, f"original{i}", tensor)
                                continue
                        case Tensor():
                            if original_i.dtype != tensor.dtype:
                                raise ValueError(
                                    f"Tensor {i} returned by `right_inverse` has dtype "
                                    f"{tensor.dtype} while `original{i}` has dtype "
                                    f"{original_i.dtype}"
                                )
                            _maybe_set(original_i, tensor)
                            continue
                    raise ValueError(
                        f"'right_inverse' must return a sequence of tensors "
                        f"or reference-type opaques. Got element {i} of type "
                        f"{type(tensor).__name__}."
                    )

    def forward(self) -> Tensor:
        if torch.jit.is_scripting():
            raise RuntimeError("Parametrization is not working with scripting.")
        if self.is_tensor:
            x: Any = (self.original,)
        else:
            x = tuple(getattr(self, f"original{i}") for i in range(self.ntensors))
        # Only integer keys are links (appended modules are registered as "0", "1", ...);
        # read from `_modules` directly (a failing `hasattr` raises inside
        # `Module.__getattr__`, a microsecond per access)
        modules = self._modules
        links = []
        while (link := modules.get(str(len(links)))) is not None:
            links.append(link)
        for is_jax, run in _segments(links):
            if is_jax:
                x = (_bridge.run_chain(run, x),)
            else:
                for module in run:
                    x = (module(*x),)
        return x[0]

    def append(self, module: Any) -> ParametrizationList:  # type: ignore[override]
        """Appends a parametrization (JAX callables are wrapped first).

        Raises:
            TypeError: if ``module`` is neither a torch module nor callable.
        """
        return super().append(_as_module(module))


def _inject_new_class(module: Module) -> None:
    r"""Sets up a module to be parametrized by swapping its class for a subclass.

    The subclass ``Parametrized<Class>`` refuses pickling (``__getstate__``)
    but supports ``deepcopy``.
    """
    cls = module.__class__

    def default_deepcopy(self, memo):
        # A standard deepcopy, since __getstate__ refuses.
        obj = memo.get(id(self), None)
        if obj is not None:
            return obj
        replica = self.__new__(self.__class__)
        memo[id(self)] = replica
        replica.__dict__ = deepcopy(self.__dict__, memo)
        for slot in copyreg._slotnames(self.__class__):  # type: ignore[attr-defined]
            if hasattr(self, slot):
                setattr(replica, slot, deepcopy(getattr(self, slot), memo))
        return replica

    def getstate(self):
        raise RuntimeError(
            "Serialization of parametrized modules is only "
            "supported through state_dict(). See:\n"
            "https://pytorch.org/tutorials/beginner/saving_loading_models.html"
            "#saving-loading-a-general-checkpoint-for-inference-and-or-resuming-training"
        )

    dct: dict[str, Callable[..., Any]] = {"__getstate__": getstate}
    if not hasattr(cls, "__deepcopy__"):
        dct["__deepcopy__"] = default_deepcopy

    module.__class__ = type(f"Parametrized{cls.__name__}", (cls,), dct)
    _INJECTED.add(module.__class__)


def _inject_property(module: Module, tensor_name: str) -> None:
    r"""Injects the property ``module.<tensor_name>`` into the (already swapped) class."""
    if hasattr(module, tensor_name):
        raise AssertionError(f"Module already has an attribute named '{tensor_name}'")

    @torch.jit.unused
    def get_cached_parametrization(parametrization) -> Tensor:
        key = (id(module), tensor_name)
        cache = _torch_parametrize._cache
        tensor = cache.get(key)
        if tensor is None:
            tensor = parametrization()
            cache[key] = tensor
        return tensor

    def get_parametrized(self) -> Tensor:
        if torch.jit.is_scripting():
            raise RuntimeError("Parametrization is not working with scripting.")
        parametrization = self.parametrizations[tensor_name]
        if _torch_parametrize._cache_enabled:
            if torch.jit.is_scripting():
                raise RuntimeError(
                    "Caching is not implemented for scripting. "
                    "Either disable caching or avoid scripting."
                )
            elif torch._C._get_tracing_state() is not None:
                raise RuntimeError("Cannot trace a model while caching parametrizations.")
            else:
                return get_cached_parametrization(parametrization)
        return parametrization()

    def set_original(self, value: Tensor) -> None:
        if torch.jit.is_scripting():
            raise RuntimeError("Parametrization is not working with scripting.")
        self.parametrizations[tensor_name].right_inverse(value)

    setattr(module.__class__, tensor_name, property(get_parametrized, set_original))


def register_parametrization(
    module: Module,
    tensor_name: str,
    parametrization: Module | Callable[..., Any] | nnx.Module,
    *,
    unsafe: bool = False,
) -> Module:
    r"""Registers a parametrization on a tensor of a module (torch's semantics).

    Accessing ``module.<tensor_name>`` then returns ``parametrization(original)``.
    ``parametrization`` is a torch ``nn.Module`` (run natively), a
    ``flax.nnx.Module``, or a JAX function ``f(x) -> y`` (run through the
    bridge, with torch autograd). A JAX function may carry a ``right_inverse``
    attribute; an nnx module may define a ``right_inverse`` method. If the first
    ``right_inverse`` returns a sequence, the originals are ``original0..N`` and
    the parametrization is called with all of them.

    Registering on an already parametrized tensor appends to the chain. The
    parametrization's training mode is set to the module's.

    Args:
        module: module on which to register the parametrization.
        tensor_name: name of the parameter or buffer to parametrize.
        parametrization: the parametrization.
        unsafe: skip the dtype/shape consistency checks. Default: ``False``.

    Returns:
        The module (its class is now ``Parametrized<Class>``).

    Raises:
        ValueError: if the module has no parameter, buffer or parametrized
            tensor named ``tensor_name``, or a consistency check fails.
        TypeError: if ``parametrization`` is neither a module nor callable.
        Whatever it raises (a parametrization's own errors too), ``module``
        and ``parametrization`` are left exactly as they were.

    Example:
        >>> import torch, jax.numpy as jnp
        >>> import torch_compat.parametrize as P
        >>> def skew(x):
        ...     return jnp.triu(x, 1) - jnp.triu(x, 1).T
        >>> m = P.register_parametrization(torch.nn.Linear(3, 3), "weight", skew)
        >>> torch.allclose(m.weight, -m.weight.T)
        True
    """
    with _transaction(module, parametrization):
        return _register_parametrization(module, tensor_name, parametrization, unsafe=unsafe)


def _register_parametrization(
    module: Module, tensor_name: str, parametrization: Any, *, unsafe: bool
) -> Module:
    parametrization = _as_module(parametrization)
    parametrization.train(module.training)
    if is_parametrized(module, tensor_name):
        # forward and right_inverse must map A to A, where A is the space of
        # tensors with module.weight's shape and dtype
        if not unsafe:
            Y = getattr(module, tensor_name)
            X = parametrization(Y)
            if not isinstance(X, Tensor):
                raise ValueError(f"A parametrization must return a tensor. Got {type(X).__name__}.")
            if X.dtype != Y.dtype:
                raise ValueError(
                    "Registering a parametrization may not change the dtype of the tensor, "
                    "unless the `unsafe` flag is enabled.\n"
                    f"module.{tensor_name}.dtype: {Y.dtype}\n"
                    f"parametrization(module.{tensor_name}).dtype: {X.dtype}"
                )
            if X.shape != Y.shape:
                raise ValueError(
                    "Registering a parametrization may not change the shape of the tensor, "
                    "unless the `unsafe` flag is enabled.\n"
                    f"module.{tensor_name}.shape: {Y.shape}\n"
                    f"parametrization(module.{tensor_name}).shape: {X.shape}"
                )
            if hasattr(parametrization, "right_inverse"):
                try:
                    Z = parametrization.right_inverse(X)  # type: ignore[operator]
                except NotImplementedError:
                    pass
                else:
                    if not isinstance(Z, Tensor):
                        raise ValueError(
                            "parametrization.right_inverse must return a tensor. "
                            f"Got: {type(Z).__name__}"
                        )
                    if Z.dtype != Y.dtype:
                        raise ValueError(
                            "The tensor returned by parametrization.right_inverse must have "
                            f"the same dtype as module.{tensor_name}, unless the `unsafe` flag "
                            "is enabled.\n"
                            f"module.{tensor_name}.dtype: {Y.dtype}\n"
                            f"returned dtype: {Z.dtype}"
                        )
                    if Z.shape != Y.shape:
                        raise ValueError(
                            "The tensor returned by parametrization.right_inverse must have "
                            f"the same shape as module.{tensor_name}, unless the `unsafe` flag "
                            "is enabled.\n"
                            f"module.{tensor_name}.shape: {Y.shape}\n"
                            f"returned shape: {Z.shape}"
                        )
            # else right_inverse is assumed to be the identity
        module.parametrizations[tensor_name].append(parametrization)  # type: ignore[index,operator]
        # If unsafe was True in a previous parametrization, keep it enabled
        module.parametrizations[tensor_name].unsafe |= unsafe  # type: ignore[index,union-attr,operator]
    elif tensor_name in module._buffers or tensor_name in module._parameters:
        original = getattr(module, tensor_name)
        # Created early to check for errors before the module changes
        parametrizations = ParametrizationList([parametrization], original, unsafe=unsafe)
        delattr(module, tensor_name)
        if not is_parametrized(module):
            _inject_new_class(module)
            module.parametrizations = ModuleDict()
        _inject_property(module, tensor_name)
        module.parametrizations[tensor_name] = parametrizations  # type: ignore[index,operator]
    else:
        raise ValueError(
            f"Module '{module}' does not have a parameter, a buffer, or a "
            f"parametrized element with name '{tensor_name}'"
        )
    return module


def is_parametrized(module: Module, tensor_name: str | None = None) -> bool:
    r"""Determines whether a module (or one of its tensors) has a parametrization.

    Args:
        module: module to query.
        tensor_name: name of the tensor; ``None`` asks about any tensor.

    Returns:
        ``True`` if ``module`` has a parametrization on ``tensor_name`` (or on
        any tensor when ``tensor_name`` is ``None``).

    Raises:
        Nothing.

    Example:
        >>> import torch
        >>> is_parametrized(torch.nn.Linear(2, 2))
        False
    """
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or not isinstance(parametrizations, ModuleDict):
        return False
    if tensor_name is None:
        return len(parametrizations) > 0
    return tensor_name in parametrizations


def remove_parametrizations(
    module: Module,
    tensor_name: str,
    leave_parametrized: bool = True,
) -> Module:
    r"""Removes the parametrizations on a tensor of a module.

    With ``leave_parametrized=True``, ``module.<tensor_name>`` becomes its
    current value (in place into the original when there is one original, so
    its id, and the optimizer's reference, are kept); the memory is torch's.
    With ``False``, it becomes the unparametrized ``original``.

    Args:
        module: module from which to remove the parametrization.
        tensor_name: name of the parametrized tensor.
        leave_parametrized: keep the current parametrized value. Default: ``True``.

    Returns:
        The module (its plain class is restored when nothing is parametrized).

    Raises:
        ValueError: if ``module.<tensor_name>`` is not parametrized, or if
            ``leave_parametrized=False`` and it depends on several tensors.
            Whatever it raises, ``module`` is left exactly as it was.

    Example:
        >>> import torch
        >>> import torch_compat.parametrize as P
        >>> m = P.register_parametrization(torch.nn.Linear(2, 2), "weight", lambda x: -x)
        >>> type(P.remove_parametrizations(m, "weight")).__name__
        'Linear'
    """
    with _transaction(module):
        return _remove_parametrizations(module, tensor_name, leave_parametrized)


def _remove_parametrizations(module: Module, tensor_name: str, leave_parametrized: bool) -> Module:
    if not is_parametrized(module, tensor_name):
        raise ValueError(f"Module {module} does not have a parametrization on {tensor_name}")

    parametrizations = module.parametrizations[tensor_name]  # type: ignore[index]

    if parametrizations.is_tensor:
        original = parametrizations.original
        if leave_parametrized:
            with torch.no_grad():
                t = getattr(module, tensor_name)
            # Same dtype (checked at registration): set_ keeps the id of the parameter
            with torch.no_grad():
                if type(original) is torch.Tensor:
                    _maybe_set(original, t)
                else:
                    try:
                        _maybe_set(original, t)
                    except RuntimeError as e:
                        raise RuntimeError(
                            "Calling remove_parametrizations() with leave_parametrized=True "
                            "for a parameter that is an instance of a tensor subclass requires "
                            "set_() to be implemented correctly for the tensor subclass."
                            "Alternatively, one can opt into the swap_tensors path"
                            "Either set leave_parametrized=False or provide a working "
                            "implementation"
                            "for set_() in the tensor subclass or set "
                            "torch.__future__.set_swap_module_params_on_conversion(True)."
                        ) from e
    else:
        if leave_parametrized:
            # No no_grad: we need to know whether the originals required grad
            t = getattr(module, tensor_name)
            original = Parameter(t) if t.requires_grad else t
        else:
            raise ValueError(
                "Cannot leave unparametrized (`leave_parametrized=False`) a tensor "
                "that is parametrized in terms of a sequence of tensors."
            )

    delattr(module.__class__, tensor_name)
    del module.parametrizations[tensor_name]  # type: ignore[union-attr]
    _register_parameter_or_buffer(module, tensor_name, original)

    if not is_parametrized(module):
        delattr(module, "parametrizations")
        module.__class__ = module.__class__.__bases__[0]
    return module


def type_before_parametrizations(module: Module) -> type:
    r"""Returns the module's type before parametrizations were applied.

    Args:
        module: the module.

    Returns:
        ``Class`` for a ``Parametrized<Class>``, else ``type(module)``.

    Raises:
        Nothing.

    Example:
        >>> import torch
        >>> type_before_parametrizations(torch.nn.Linear(2, 2)).__name__
        'Linear'
    """
    if is_parametrized(module):
        return module.__class__.__bases__[0]
    return type(module)


def transfer_parametrizations_and_params(
    from_module: Module,
    to_module: Module,
    tensor_name: str | None = None,
) -> Module:
    r"""Transfers parametrizations, and the originals they act on, between modules.

    Only ``tensor_name`` if given, else every parametrized tensor. A missing
    tensor is created in ``to_module``. Nothing happens if ``from_module`` is
    not parametrized. The parametrization objects (and the originals) are
    shared, as in torch.

    Args:
        from_module: module to transfer from.
        to_module: module to transfer to.
        tensor_name: the tensor to transfer; ``None`` for all.

    Returns:
        ``to_module``.

    Raises:
        ValueError: as :func:`register_parametrization` (e.g. a shape mismatch).
            Whatever it raises, both modules are left exactly as they were.

    Example:
        >>> import torch
        >>> import torch_compat.parametrize as P
        >>> a = P.register_parametrization(torch.nn.Linear(2, 2), "weight", lambda x: -x)
        >>> b = P.transfer_parametrizations_and_params(a, torch.nn.Linear(2, 2))
        >>> torch.equal(a.weight, b.weight)
        True
    """
    with _transaction(from_module, to_module):
        return _transfer(from_module, to_module, tensor_name)


def _transfer(from_module: Module, to_module: Module, tensor_name: str | None) -> Module:
    if is_parametrized(from_module):
        parameters_to_transfer = (
            from_module.parametrizations if tensor_name is None else [tensor_name]
        )
        for parameter_name in parameters_to_transfer:
            if not hasattr(to_module, parameter_name):
                setattr(to_module, parameter_name, Parameter(getattr(from_module, parameter_name)))

            for param_func in from_module.parametrizations[parameter_name]:  # type: ignore[index]
                register_parametrization(to_module, parameter_name, param_func)

            # The originals are under `original` or `original0..N`
            from_list = from_module.parametrizations[parameter_name]  # type: ignore[index]
            to_list = to_module.parametrizations[parameter_name]  # type: ignore[index]
            if hasattr(from_list, "original"):
                to_list.original = from_list.original
            else:
                num = 0
                while hasattr(from_list, f"original{num}"):
                    setattr(to_list, f"original{num}", getattr(from_list, f"original{num}"))
                    num += 1
    return to_module
