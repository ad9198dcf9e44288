"""PyTorch's ``torch.nn.utils.parametrize`` for Flax NNX modules.

In plain words (the invariants this file keeps):

- Registering a parametrization on ``module.kernel`` moves the ``Variable`` that
  was there into ``module.parametrizations.kernel.original`` (same Variable type,
  same metadata; ``original0``, ``original1``, ... when ``right_inverse`` returns a
  sequence) and swaps the module's class for ``Parametrized<Class>``, a subclass
  whose ``kernel`` property computes ``chain(original)``.
- ``module.parametrizations.kernel`` is a :class:`ParametrizationList`: an
  ``nnx.Module`` holding the originals and the chain's links under ``"0"``, ``"1"``,
  ... so the state tree reads ``parametrizations/kernel/original`` and
  ``parametrizations/kernel/0/<link state>``, as torch's ``state_dict`` does.
- Reading gives a :class:`~jaxparam.ParametrizedValue` (a read-only, Variable-like
  view; see ``jaxparam/_value.py`` for why). Under a JAX trace the chain runs
  inline; outside one it runs as one compiled call per chain structure.
- Assigning (``module.kernel = x`` or ``module.kernel[...] = x``) runs the links'
  ``right_inverse`` in reverse order and stores the result in the originals.
- Removing bakes the current value (``leave_parametrized=True``) or puts the
  original back, and restores the plain class after the last removal.
- Every public operation is a transaction: if it raises, the module is left
  exactly as it was (class, attributes, Variable values). Torch does not promise
  this; we do.

Errors reuse torch's types and message prefixes, followed by a hint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from jaxparam import _checks as C
from jaxparam._value import ParametrizedValue, _unwrap

__all__ = [
    "cached",
    "ParametrizationList",
    "register_parametrization",
    "is_parametrized",
    "remove_parametrizations",
    "type_before_parametrizations",
    "transfer_parametrizations_and_params",
]

# ---------------------------------------------------------------------------
# Private helpers
# ---------------------------------------------------------------------------


class _CacheEntry(NamedTuple):
    """A value cached by :func:`cached`, and what it was computed from: the chain
    (the list and its links, by identity), every Variable it reads (the originals
    and the links' own, such as spectral norm's ``_u``) and the array each held
    right after the computation (so a training read's own update of ``_u`` does
    not make the next read recompute)."""

    plist: Any
    links: tuple[Any, ...]
    variables: tuple[nnx.Variable, ...]
    raws: tuple[Any, ...]
    value: jax.Array

    def is_current(self, plist: Any) -> bool:
        return (
            plist is self.plist
            and len(plist) == len(self.links)
            and all(a is b for a, b in zip(plist, self.links, strict=True))
            and all(v.get_raw_value() is r for v, r in zip(self.variables, self.raws, strict=True))
        )


class _CacheState(threading.local):
    """`cached`'s state, per thread (torch's is process-wide: a thread inside
    ``cached()`` made every other thread's reads cached too, and a training
    spectral norm there skipped power iterations)."""

    def __init__(self) -> None:
        self.enabled = 0
        # (id(module), tensor_name) -> _CacheEntry
        self.cache: dict[tuple[int, str], _CacheEntry] = {}


_cached = _CacheState()


@contextlib.contextmanager
def cached() -> Iterator[None]:
    """Compute each parametrized value once inside this context.

    The first read of ``module.<name>`` inside the context computes the value and
    stores it; later reads return it. The cache is emptied when the outermost
    context exits. It belongs to the thread that opened it (torch's is
    process-wide): other threads' reads are not cached by it. Use it when a
    parametrized tensor is read several times in one forward pass (an RNN's
    recurrent kernel, tied weights). Under ``jit`` XLA already removes the
    duplicate work; eagerly, the cache is what saves it.

    Unlike torch, a cached value is only reused while its chain is the same (the
    same links, in the same order) and every Variable the chain reads (the
    originals, and the links' own such as spectral norm's ``_u``) holds the very
    array it held after the computation: an assignment (``module.kernel = x``),
    an optimizer update, ``nnx.update``, registering or removing a link, or
    changing a link's Variable inside the context recomputes instead of
    returning a stale value, and values cached inside one ``jit`` trace are
    never seen by another. (A plain Python attribute of a link changed in place,
    such as ``n_power_iterations``, is not tracked.)

    Example:
      >>> from flax import nnx
      >>> import jaxparam.parametrize as P
      >>> layer = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
      >>> _ = P.register_parametrization(layer, "kernel", lambda x: x + x.T)
      >>> with P.cached():
      ...     a = layer.kernel
      ...     b = layer.kernel
      >>> a[...] is b[...]
      True
    """
    state = _cached
    state.enabled += 1
    try:
        yield
    finally:
        state.enabled -= 1
        if not state.enabled:
            state.cache = {}


def _has_right_inverse(link: Any) -> bool:
    return hasattr(link, "right_inverse")


def _variables_of(module: nnx.Module) -> dict[str, nnx.Variable]:
    return {k: v for k, v in vars(module).items() if isinstance(v, nnx.Variable)}


_SHARDING_KEYS = ("out_sharding", "sharding", "sharding_names")


def _fit_sharding(metadata: dict[str, Any], old_shape: Any, new_shape: Any) -> dict[str, Any]:
    """``metadata`` with its sharding annotations fitted to an array of ``new_shape``.

    Sharding annotations name one mesh axis per array axis: they are dropped when
    the rank changes, and an axis whose size changed (weight norm's ``g`` keeps
    size 1 where the weight had ``in`` features) is no longer sharded. Axes of
    unchanged size keep their mesh axis.
    """
    metadata = dict(metadata)
    old_shape, new_shape = tuple(old_shape), tuple(new_shape)
    if old_shape == new_shape:
        return metadata
    for key in _SHARDING_KEYS:
        spec = metadata.get(key)
        if spec is None:
            continue
        if len(old_shape) != len(new_shape) or len(spec) != len(new_shape):
            del metadata[key]
            continue
        fitted = [
            name if old == new else None
            for name, old, new in zip(spec, old_shape, new_shape, strict=True)
        ]
        metadata[key] = type(spec)(*fitted) if isinstance(spec, PartitionSpec) else tuple(fitted)
    return metadata


def _new_variable_like(template: nnx.Variable, value: Any) -> nnx.Variable:
    """A Variable of ``template``'s type and metadata holding ``value``.

    Sharding annotations are fitted to ``value``'s shape (:func:`_fit_sharding`).
    """
    old_shape = np.shape(template.get_raw_value())
    metadata = _fit_sharding(template.get_metadata(), old_shape, np.shape(value))
    return type(template)._new(value, metadata)


def _template(plist: ParametrizationList, value: Any) -> nnx.Variable:
    """The original whose type and metadata a Variable holding ``value`` takes.

    The first original of ``value``'s shape if there is one (weight norm's ``v``,
    which kept the weight's sharding annotations), else the first original.
    """
    originals = plist.originals()
    for original in originals:
        if np.shape(original.get_raw_value()) == np.shape(value):
            return original
    return originals[0]


def _set_value(var: nnx.Variable, value: Any) -> None:
    """``var.set_value(value)``, refitting its sharding annotations when the shape changes.

    Only an ``unsafe`` chain can change an original's shape (at registration, on
    assignment, or on removal with ``leave_parametrized=True``); the annotations
    of the old shape would otherwise mislead ``nnx.get_partition_spec``.
    """
    old_shape = np.shape(var.get_raw_value())
    if old_shape != np.shape(value):
        var._var_metadata = _fit_sharding(var.get_metadata(), old_shape, np.shape(value))
    var.set_value(value)


def _contains_tracer(leaves: Sequence[Any]) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in leaves)


# -- transactions ---------------------------------------------------------------


@dataclasses.dataclass
class _Snapshot:
    """Shallow copy of everything an operation may change on one module."""

    objects: list[tuple[Any, type, dict[str, Any]]]
    values: list[tuple[nnx.Variable, Any, dict[str, Any]]]

    @classmethod
    def take(cls, *modules: nnx.Module) -> _Snapshot:
        # Every graph node reachable from the modules, not only the parametrized
        # module and its ParametrizationLists: a link that is an nnx.Module (or any
        # submodule) can have its Variables written by an evaluation that runs
        # before a check fails (appending to a chain runs the chain).
        objects, values, seen = [], [], set()
        for module in modules:
            for _, node in nnx.iter_graph(module):
                if id(node) in seen:
                    continue
                if isinstance(node, nnx.Variable):
                    seen.add(id(node))
                    values.append((node, node.get_raw_value(), dict(node.get_metadata())))
                elif isinstance(node, nnx.Pytree):
                    seen.add(id(node))
                    objects.append((node, type(node), dict(vars(node))))
        return cls(objects, values)

    def restore(self) -> None:
        for obj, obj_type, attrs in self.objects:
            object.__setattr__(obj, "__class__", obj_type)
            vars(obj).clear()
            vars(obj).update(attrs)
        for var, raw, metadata in self.values:
            var.set_raw_value(raw, _unsafe_bypass_check=True)
            var._var_metadata = metadata


@contextlib.contextmanager
def _transaction(*modules: nnx.Module) -> Iterator[None]:
    """Undo every change to ``modules`` if the body raises."""
    snapshot = _Snapshot.take(*modules)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise


# -- compiled evaluation -----------------------------------------------------


def _run_chain(graphdef: nnx.GraphDef, state: nnx.State) -> tuple[jax.Array, Any]:
    """Run a ParametrizationList as one XLA computation (jitted by `_compiled_chain`).

    Returns the value and only the state entries the chain changed (for example a
    power iteration's vectors), found at trace time by identity, so unchanged
    originals are not copied out.
    """
    # `nnx.merge` may reuse the very Variable objects of `state`, so the values
    # before the call are recorded first; comparing Variables afterwards would see
    # the chain's own writes on both sides and report nothing as changed.
    before = [v.get_raw_value() for _, v in nnx.to_flat_state(state)]
    plist = nnx.merge(graphdef, state)
    value = plist()
    changed = {}
    new_flat = nnx.to_flat_state(nnx.state(plist))
    for old, (path, new) in zip(before, new_flat, strict=True):
        if new.get_raw_value() is not old:
            changed[path] = new
    return value, (nnx.from_flat_state(changed) if changed else None)


#: The jitted chains of eager reads, one per graphdef (chain structure, links,
#: shapes and dtypes), shared by every module with that chain. At most
#: `_MAX_COMPILED` are kept, the oldest dropped first, with their executables:
#: a graphdef holds its links, so a lambda made for each new model (a
#: hyper-parameter search in one process) would otherwise keep every one, and
#: what it captured, for good (about 1.4 MiB each).
_MAX_COMPILED = 256
_compiled: dict[nnx.GraphDef, Callable[[nnx.State], tuple[jax.Array, Any]]] = {}


def _compiled_chain(graphdef: nnx.GraphDef) -> Callable[[nnx.State], tuple[jax.Array, Any]]:
    fn = _compiled.get(graphdef)
    if fn is None:
        while len(_compiled) >= _MAX_COMPILED:
            del _compiled[next(iter(_compiled))]
        fn = _compiled[graphdef] = jax.jit(functools.partial(_run_chain, graphdef))
    return fn


# ---------------------------------------------------------------------------
# The parametrizations container
# ---------------------------------------------------------------------------


class _Parametrizations(nnx.Dict):
    """``module.parametrizations``: an ``nnx.Dict`` that iterates in registration
    order, as torch's ``ModuleDict`` does.

    Flax's graph operations (``copy.deepcopy``, ``nnx.split``/``nnx.merge``,
    ``nnx.jit``) rebuild a module's attributes in sorted order; the order is kept
    in a static attribute so that, as in torch, ``transfer_parametrizations_and_params``
    registers the names in the order they were registered (which one fails first,
    and with which message, depends on it).
    """

    def __init__(self) -> None:
        self._jaxparam_order: tuple[str, ...] = ()

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key not in self._jaxparam_order:
            self._jaxparam_order = (*self._jaxparam_order, key)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._jaxparam_order = tuple(k for k in self._jaxparam_order if k != key)

    def __iter__(self) -> Iterator[str]:
        present = vars(self)
        return (k for k in self._jaxparam_order if k in present)


# ---------------------------------------------------------------------------
# ParametrizationList
# ---------------------------------------------------------------------------


class ParametrizationList(nnx.Module):
    """The originals and the chain of parametrizations of one parametrized tensor.

    It is the type of ``module.parametrizations[tensor_name]`` once
    ``module.<tensor_name>`` is parametrized with :func:`register_parametrization`.
    If the first parametrization's ``right_inverse`` returns one array (or there
    is none, meaning the identity), the original is stored as ``original``; if it
    returns a sequence, as ``original0``, ``original1``, ... Each original is a
    Variable of the type the parametrized Variable had (``nnx.Param`` stays
    ``nnx.Param``, an ``nnx.BatchStat`` stays an ``nnx.BatchStat``); a single
    original is the very Variable object that was on the module.

    The links are stored under ``"0"``, ``"1"``, ... : plain callables as static
    attributes, ``nnx.Module`` links as submodules (their Variables are part of the
    state tree).

    It is built by :func:`register_parametrization`; users do not instantiate it.

    Args:
      modules: the parametrizations (one or more callables).
      original: the Variable being parametrized.
      unsafe: skip the dtype and shape consistency checks.

    Raises:
      ValueError: as torch's ``ParametrizationList``: empty ``modules``, a
        ``right_inverse`` returning something other than an array or a sequence
        of arrays, a changed dtype or shape (unless ``unsafe``).
    """

    def __init__(
        self,
        modules: Sequence[Callable[..., Any]],
        original: nnx.Variable,
        unsafe: bool = False,
    ) -> None:
        if len(modules) == 0:
            raise ValueError(
                "ParametrizationList requires one or more modules.\n"
                "fix: pass at least one parametrization."
            )
        self._length = 0
        for link in modules:
            self.append(link)
        self.unsafe = unsafe

        original_value = original.get_value()
        original_shape, original_dtype = original_value.shape, original_value.dtype

        new = original_value
        for link in reversed(list(self)):
            if _has_right_inverse(link):
                try:
                    new = link.right_inverse(new)
                except NotImplementedError:
                    pass

        self.is_tensor, originals = C.originals_from_right_inverse(new, original_dtype)
        self.ntensors = len(originals)
        if not self.unsafe:
            C.check_registered_value(self._apply(originals), original_shape, original_dtype)

        # All checks passed: only now is the original Variable touched.
        if self.is_tensor:
            _set_value(original, new)
            self.original = original
        else:
            for i, item in enumerate(originals):
                setattr(self, f"original{i}", _new_variable_like(original, item))

    # -- the sequence of links (torch's ModuleList) ------------------------------
    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        return (getattr(self, str(i)) for i in range(self._length))

    def __getitem__(self, index: int) -> Callable[..., Any]:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} is out of range")
        return getattr(self, str(index))

    def append(self, link: Callable[..., Any]) -> None:
        """Append a link to the chain (used by :func:`register_parametrization`)."""
        if not callable(link):
            raise TypeError(
                f"A parametrization must be callable. Got {C.type_name(link)}.\n"
                "fix: pass a function of the original(s), or an nnx.Module with __call__."
            )
        setattr(self, str(self._length), link)
        self._length += 1

    # -- originals ---------------------------------------------------------------
    def originals(self) -> tuple[nnx.Variable, ...]:
        """The original Variables, in order (``original`` or ``original0..N``)."""
        if self.is_tensor:
            return (self.original,)
        return tuple(getattr(self, f"original{i}") for i in range(self.ntensors))

    def _apply(self, originals: Sequence[jax.Array]) -> Any:
        links = list(self)
        x = links[0](*originals)
        for link in links[1:]:
            x = link(x)
        return x

    def __call__(self) -> jax.Array:
        """Evaluate the chain on the originals (inline; traceable)."""
        return self._apply([v.get_value() for v in self.originals()])

    def evaluate(self) -> jax.Array:
        """The parametrized value: inline under a JAX trace, compiled otherwise.

        Outside a trace the whole chain runs as one jitted call, compiled once per
        chain structure, shapes and dtypes; the Variables the chain changes (for
        example spectral norm's ``u`` and ``v`` in training mode) are written back.
        """
        graphdef, state = nnx.split(self)
        if _contains_tracer(jax.tree.leaves(state)):
            return self()
        try:
            hash(graphdef)
        except TypeError:
            # A link that is an unhashable callable (a class defining __eq__ and
            # no __hash__) is a static attribute jit cannot key on: run inline.
            return self()
        value, changed = _compiled_chain(graphdef)(state)
        if changed is not None:
            nnx.update(self, changed)
        return value

    def eval_shape(self) -> jax.ShapeDtypeStruct:
        """The parametrized value's shape and dtype, found without running the
        chain: no Variable changes (a power iteration's vectors stay as they are)."""
        graphdef, state = nnx.split(self)
        return jax.eval_shape(functools.partial(_run_chain, graphdef), state)[0]

    def right_inverse(self, value: Any) -> None:
        """Run the links' ``right_inverse`` in reverse order and store the result.

        The result goes into ``original`` (one array) or ``original0``,
        ``original1``, ... (a sequence). Nothing is stored unless every check passes.

        Raises:
          RuntimeError: a link has no ``right_inverse``.
          ValueError: the result has the wrong type, length or dtype.
        """
        value = _unwrap(value)
        for link in reversed(list(self)):
            if not _has_right_inverse(link):
                raise C.missing_right_inverse(
                    C.link_name(link),
                    "assign the original directly: "
                    "`module.parametrizations.<name>.original[...] = value`",
                )
            value = link.right_inverse(value)
        originals = self.originals()
        new = C.originals_from_assignment(value, self.is_tensor, [v.dtype for v in originals])
        for tensor, original in zip(new, originals, strict=True):
            _set_value(original, tensor)


# ---------------------------------------------------------------------------
# The injected class
# ---------------------------------------------------------------------------

# One class per (plain class, parametrized names), so identically parametrized
# modules share a graphdef (one jit compilation, stackable under nnx.vmap).
_CLASSES: dict[tuple[type, frozenset[str]], type] = {}
_CLASS_PREFIX = "Parametrized:"


def _get_parametrized(module: nnx.Module, name: str) -> jax.Array:
    plist = module.parametrizations[name]
    state = _cached
    if not state.enabled:
        return plist.evaluate()
    key = (id(module), name)
    hit = state.cache.get(key)
    if hit is not None and hit.is_current(plist):
        return hit.value
    value = plist.evaluate()
    variables = tuple(v for _, v in nnx.iter_graph(plist) if isinstance(v, nnx.Variable))
    raws = tuple(v.get_raw_value() for v in variables)
    state.cache[key] = _CacheEntry(plist, tuple(plist), variables, raws, value)
    return value


def _make_property(name: str) -> property:
    def fget(self):
        return ParametrizedValue(_get_parametrized(self, name), lambda v: _assign(self, name, v))

    def fset(self, value):
        _assign(self, name, value)

    return property(fget, fset, doc=f"The parametrized value of `{name}`.")


def _assign(module: nnx.Module, name: str, value: Any) -> None:
    with _transaction(module):
        module.parametrizations[name].right_inverse(value)


def _class_key_name(base: type, names: frozenset[str]) -> str:
    return (
        _CLASS_PREFIX
        + base.__module__.replace(".", "/")
        + ":"
        + base.__qualname__.replace(".", "/")
        + ":"
        + ",".join(sorted(names))
    )


def _parametrized_class(base: type, names: frozenset[str]) -> type:
    """The ``Parametrized<Base>`` class with a property for each name."""
    key = (base, names)
    cls = _CLASSES.get(key)
    if cls is not None:
        return cls

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr in names:
            _assign(self, attr, value)
        else:
            base.__setattr__(self, attr, value)

    namespace: dict[str, Any] = {name: _make_property(name) for name in names}
    namespace["__setattr__"] = __setattr__
    namespace["_parametrized_names"] = names
    namespace["__module__"] = __name__
    namespace["__qualname__"] = _class_key_name(base, names)
    cls = type(base)(
        f"Parametrized{base.__name__}",
        (base,),
        namespace,
        pytree=base._pytree__is_pytree,
    )
    _CLASSES[key] = cls
    return cls


def __getattr__(attr: str) -> Any:
    # Lets pickle find an injected class by its qualified name, even in a new
    # process where it was never created (the name encodes its base and names).
    if attr.startswith(_CLASS_PREFIX):
        _, module_name, qualname, names = attr.split(":")
        import importlib

        obj: Any = importlib.import_module(module_name.replace("/", "."))
        for part in qualname.split("/"):
            obj = getattr(obj, part)
        return _parametrized_class(obj, frozenset(names.split(",")))
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _set_class(module: nnx.Module, base: type, names: frozenset[str]) -> None:
    new_cls = _parametrized_class(base, names) if names else base
    object.__setattr__(module, "__class__", new_cls)


def _parametrized_names(module: nnx.Module) -> frozenset[str]:
    return getattr(type(module), "_parametrized_names", frozenset())


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def _check_link_preserves(module: nnx.Module, tensor_name: str, parametrization: Any) -> None:
    """Torch's checks when appending to an existing chain (parametrization maps A to A)."""
    Y = _get_parametrized(module, tensor_name)
    X = parametrization(Y)
    C.check_appended_value(Y, X, tensor_name)
    if _has_right_inverse(parametrization):
        try:
            Z = parametrization.right_inverse(X)
        except NotImplementedError:
            return
        C.check_appended_right_inverse(Y, Z, tensor_name)


def _sync_training_mode(module: nnx.Module, parametrization: Any) -> None:
    # torch: parametrization.train(module.training). NNX keeps the mode on each
    # module as `deterministic`; follow the module's when it has one.
    mode = getattr(module, "deterministic", None)
    if isinstance(parametrization, nnx.Module) and isinstance(mode, bool):
        parametrization.set_attributes(deterministic=mode, raise_if_not_found=False)


def register_parametrization(
    module: nnx.Module,
    tensor_name: str,
    parametrization: Callable[..., Any],
    *,
    unsafe: bool = False,
) -> nnx.Module:
    """Register a parametrization on the Variable ``module.<tensor_name>``.

    After registration, reading ``module.<tensor_name>`` returns
    ``parametrization(original)`` and gradients flow to the original, stored at
    ``module.parametrizations.<tensor_name>.original``. Registering again on the
    same name appends to the chain. A parametrization is any callable of the
    original(s): a function, or an ``nnx.Module`` (which may hold Variables of its
    own). It may have a ``right_inverse``: run at registration to initialise the
    original(s) (a sequence means several originals, ``original0..N``), and on
    every assignment ``module.<tensor_name> = value``.

    Args:
      module: the NNX module holding the Variable.
      tensor_name: the attribute name of the Variable (``"kernel"``, ``"scale"``, ...).
      parametrization: the callable to register.
      unsafe: skip the dtype/shape consistency checks (torch's flag; it sticks to
        the chain once set).

    Returns:
      The module (now of class ``Parametrized<Class>``).

    Raises:
      ValueError: the name is not a Variable of the module; the parametrization
        changes the dtype or shape, or returns a non-array (unless ``unsafe``);
        ``right_inverse`` returns something invalid (torch's messages).

    If it raises, the module is left exactly as it was.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxparam.parametrize as P
      >>> layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
      >>> _ = P.register_parametrization(layer, "kernel", lambda x: jnp.triu(x) + jnp.triu(x, 1).T)
      >>> type(layer).__name__
      'ParametrizedLinear'
      >>> bool(jnp.allclose(layer.kernel[...], layer.kernel[...].T))
      True
      >>> layer.parametrizations.kernel.original.shape
      (3, 3)
    """
    if isinstance(module, nnx.bridge.ToNNX):
        # ToNNX hands its attributes to linen as variables on every call; a
        # ParametrizationList cannot be one (flax then fails on every call).
        raise ValueError(
            f"Module 'ToNNX' wraps a linen module; its '{tensor_name}' cannot be "
            "parametrized in NNX (ToNNX passes its attributes to linen as plain "
            "variables on every call).\n"
            "fix: parametrize the linen variables with jaxparam.linen (for example "
            "jaxparam.linen.weight_norm(variables, 'params/kernel')), or build the "
            "layer from NNX modules (nnx.Linear, nnx.Conv, ...)."
        )
    with _transaction(module):
        _sync_training_mode(module, parametrization)
        if is_parametrized(module, tensor_name):
            if not unsafe:
                _check_link_preserves(module, tensor_name, parametrization)
            plist = module.parametrizations[tensor_name]
            plist.append(parametrization)
            plist.unsafe |= unsafe
        elif isinstance(vars(module).get(tensor_name), nnx.Variable):
            original = vars(module)[tensor_name]
            if not C.is_tensor(original.get_raw_value()):
                raise ValueError(
                    f"Module '{C.type_name(module)}' has a Variable '{tensor_name}' that holds "
                    f"a {C.type_name(original.get_raw_value())}, not an array.\n"
                    "fix: parametrize a Variable that holds a jax.Array."
                )
            plist = ParametrizationList([parametrization], original, unsafe=unsafe)
            delattr(module, tensor_name)
            names = _parametrized_names(module)
            if not names:
                base = type(module)
                module.parametrizations = _Parametrizations()
            else:
                base = type_before_parametrizations(module)
            _set_class(module, base, names | {tensor_name})
            module.parametrizations[tensor_name] = plist
        else:
            raise _missing_tensor_error(module, tensor_name)
    return module


def _missing_tensor_error(module: nnx.Module, tensor_name: str) -> ValueError:
    """torch's error for a name that is neither a Variable of ``module`` nor parametrized
    (``register_parametrization``'s, which torch's ``weight_norm`` raises too)."""
    variables = ", ".join(sorted(_variables_of(module))) or "none"
    attr = vars(module).get(tensor_name, None)
    if tensor_name in vars(module):
        detail = f"\nfound: an attribute of type {C.type_name(attr)}, not an nnx.Variable"
    elif hasattr(type(module), tensor_name):
        detail = "\nfound: a class attribute (a method or property), not an nnx.Variable"
    else:
        detail = ""
    return ValueError(
        f"Module '{C.type_name(module)}' does not have a parameter, a buffer, or a "
        f"parametrized element with name '{tensor_name}'{detail}\n"
        f"Variables of the module: {variables}\n"
        "fix: name an nnx.Variable (nnx.Param, nnx.BatchStat, ...) held directly "
        "by this module."
    )


def is_parametrized(module: nnx.Module, tensor_name: str | None = None) -> bool:
    """Whether ``module`` has a parametrization (on ``tensor_name``, if given).

    Example:
      >>> from flax import nnx
      >>> import jaxparam.parametrize as P
      >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> P.is_parametrized(layer)
      False
    """
    parametrizations = vars(module).get("parametrizations")
    if not isinstance(parametrizations, nnx.Dict) or not _parametrized_names(module):
        return False
    if tensor_name is None:
        return len(parametrizations) > 0
    return tensor_name in _parametrized_names(module)


def remove_parametrizations(
    module: nnx.Module,
    tensor_name: str,
    leave_parametrized: bool = True,
) -> nnx.Module:
    """Remove the parametrizations on ``module.<tensor_name>``.

    With ``leave_parametrized=True`` the Variable keeps the current parametrized
    value (for a single original, it is the very original Variable object); with
    ``False`` it gets the original back. After the last removal the module is of
    its plain class again. The Variable moves from
    ``parametrizations.<name>.original`` back to ``<name>``: an ``nnx.Optimizer``
    made before (its state follows the model's paths) must be made again.

    Args:
      module: the parametrized module.
      tensor_name: the parametrized name.
      leave_parametrized: keep the parametrized value (default) or the original.

    Returns:
      The module.

    Raises:
      ValueError: the name is not parametrized; ``leave_parametrized=False`` with
        several originals (torch's messages). The module is then unchanged.

    Example:
      >>> from flax import nnx
      >>> import jaxparam.parametrize as P
      >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> _ = P.register_parametrization(layer, "kernel", lambda x: 2 * x)
      >>> _ = P.remove_parametrizations(layer, "kernel")
      >>> type(layer).__name__
      'Linear'
    """
    if not is_parametrized(module, tensor_name):
        raise C.not_parametrized(
            C.type_name(module), tensor_name, list(_parametrized_names(module))
        )
    with _transaction(module):
        plist = module.parametrizations[tensor_name]
        if plist.is_tensor:
            original = plist.original
            if leave_parametrized:
                t = _get_parametrized(module, tensor_name)
                C.check_baked_dtype(t, original.dtype)
                _set_value(original, t)
        else:
            if not leave_parametrized:
                raise C.cannot_leave_unparametrized()
            t = _get_parametrized(module, tensor_name)
            original = _new_variable_like(_template(plist, t), t)

        names = _parametrized_names(module) - {tensor_name}
        base = type_before_parametrizations(module)
        _set_class(module, base, names)
        del module.parametrizations[tensor_name]
        setattr(module, tensor_name, original)
        if not names:
            delattr(module, "parametrizations")
    return module


def type_before_parametrizations(module: nnx.Module) -> type:
    """The class of ``module`` before any parametrization was registered.

    Example:
      >>> from flax import nnx
      >>> import jaxparam.parametrize as P
      >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> _ = P.register_parametrization(layer, "kernel", lambda x: 2 * x)
      >>> P.type_before_parametrizations(layer) is nnx.Linear
      True
    """
    if _parametrized_names(module):
        return type(module).__bases__[0]
    return type(module)


def transfer_parametrizations_and_params(
    from_module: nnx.Module,
    to_module: nnx.Module,
    tensor_name: str | None = None,
) -> nnx.Module:
    """Transfer parametrizations and their originals from one module to another.

    As in torch, the links (the same objects) are registered on ``to_module``,
    creating the Variable there when missing (as a Variable of the original's type
    holding the parametrized value), and then ``to_module``'s originals become the
    very Variables of ``from_module``: the two modules share them.

    Args:
      from_module: the parametrized source.
      to_module: the destination.
      tensor_name: one name to transfer; all by default.

    Returns:
      ``to_module``.

    Raises:
      ValueError: as :func:`register_parametrization` on ``to_module``; then
        ``to_module`` is unchanged.

    Example:
      >>> from flax import nnx
      >>> import jaxparam.parametrize as P
      >>> a = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      >>> b = nnx.Linear(2, 2, rngs=nnx.Rngs(1))
      >>> _ = P.register_parametrization(a, "kernel", lambda x: 2 * x)
      >>> _ = P.transfer_parametrizations_and_params(a, b)
      >>> b.parametrizations.kernel.original is a.parametrizations.kernel.original
      True
    """
    if not is_parametrized(from_module):
        return to_module
    names = list(from_module.parametrizations) if tensor_name is None else [tensor_name]
    with _transaction(to_module):
        for name in names:
            source = from_module.parametrizations[name]
            if name not in vars(to_module) and name not in _parametrized_names(to_module):
                value = _get_parametrized(from_module, name)
                setattr(to_module, name, _new_variable_like(_template(source, value), value))
            for link in source:
                register_parametrization(to_module, name, link)
            target = to_module.parametrizations[name]
            if source.is_tensor and target.is_tensor:
                target.original = source.original
            else:
                i = 0
                while hasattr(source, f"original{i}"):
                    setattr(target, f"original{i}", getattr(source, f"original{i}"))
                    i += 1
    return to_module
