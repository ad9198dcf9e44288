"""PyTorch's ``torch.nn.utils.parametrize`` for Flax linen variable dicts.

A linen model keeps its variables outside the module, so every operation here
takes a variables dict and returns a new one; nothing is ever mutated. The
structure of the chains (the links, which are Python callables) cannot be data in
that dict: it lives in a :class:`ParametrizationSpec`, a small immutable,
hashable object returned beside the variables and static under ``jax.jit``.

In plain words (the invariants this file keeps):

- Registering on ``("params", "Dense_0", "kernel")`` removes that entry and stores
  ``right_inverse(kernel)`` at ``params/Dense_0/parametrizations/kernel/original``
  (``original0``, ``original1``, ... for a sequence), in the collection the
  variable was in: the layout of torch's ``state_dict`` and of the NNX side.
- A link is a plain callable, or an ``nnx.Module`` (for example the NNX built-ins'
  ``WeightNorm``, ``SpectralNorm``): it is split into a static graphdef (kept in the
  spec) and its Variables, stored at ``<collection>/Dense_0/parametrizations/kernel/
  <i>/<path in the link>``. The collection is ``params`` for ``nnx.Param``, the
  linen name flax registers for the Variable type or its nearest registered base
  (``PowerIteration`` is an ``nnx.BatchStat``: ``batch_stats``, where flax's own
  ``nn.SpectralNorm`` keeps its vectors), and ``buffers`` otherwise. Every run
  merges a fresh copy; the link object you registered is never touched.
- :func:`apply` computes every parametrized value, puts it at its plain path,
  calls ``model.apply`` and maps the mutated collections back to the parametrized
  layout. The model's code is unchanged.
- The training mode belongs to the spec (``spec.train()``, ``spec.eval()``), as it
  belongs to the link in NNX and to the module in torch; links that have a
  ``deterministic`` attribute get ``not spec.training``. New specs are in training
  mode, like new torch modules. A link whose state changes in training (spectral
  norm's ``_u``, ``_v``) needs its collection in ``apply``'s ``mutable``.
- Errors use torch's types and message prefixes, followed by a hint.

Example:
  >>> import jax, jax.numpy as jnp
  >>> import flax.linen as nn
  >>> import jaxparam.linen as PL
  >>> model = nn.Dense(3)
  >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  >>> def symmetric(x):
  ...     return jnp.triu(x) + jnp.triu(x, 1).T
  >>> variables, spec = PL.register_parametrization(
  ...     variables, ("params", "kernel"), symmetric)
  >>> sorted(variables["params"]["parametrizations"]["kernel"])
  ['original']
  >>> y = PL.apply(model, variables, jnp.ones((1, 3)), spec=spec)
  >>> w = PL.get_parametrized(variables, ("params", "kernel"), spec=spec)
  >>> bool(jnp.allclose(w, w.T))
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import meta
from flax.core.scope import in_filter, union_filters
from flax.nnx import variablelib

from jaxparam import _checks as C
from jaxparam import functional as F
from jaxparam.parametrizations import (
    DEFAULT,
    Orthogonal,
    SpectralNorm,
    WeightNorm,
    _axis,
    _key,
)

__all__ = [
    "BUFFERS",
    "ChainSpec",
    "ParametrizationSpec",
    "apply",
    "assign",
    "get_parametrized",
    "is_parametrized",
    "materialize",
    "orthogonal",
    "register_parametrization",
    "remove_parametrizations",
    "spectral_norm",
    "weight_norm",
]

Path = tuple[str, ...]
Variables = Mapping[str, Any]

BUFFERS = "buffers"
"""Collection of link Variables whose type has no linen collection registered with flax."""

_PARAMETRIZATIONS = "parametrizations"

# ---------------------------------------------------------------------------
# Private helpers: functional access to nested dicts
# ---------------------------------------------------------------------------


def _copy(tree: Any) -> Any:
    """A copy of the dict structure (arrays shared; they are immutable)."""
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def _has(tree: Any, path: Sequence[str]) -> bool:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return False
        tree = tree[key]
    return True


def _get(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    """Set in place (only ever on a private copy)."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _delete(tree: dict, path: Sequence[str]) -> None:
    """Delete in place and prune the dicts this leaves empty along the path."""
    if not _has(tree, path):
        return
    parents = [tree]
    for key in path[:-1]:
        parents.append(parents[-1][key])
    del parents[-1][path[-1]]
    for depth in range(len(path) - 2, -1, -1):
        if parents[depth + 1]:
            break
        del parents[depth][path[depth]]


def _as_path(path: str | Sequence[str]) -> Path:
    if isinstance(path, str):
        path = tuple(p for p in path.split("/") if p)
    path = tuple(path)
    if len(path) < 2 or not all(isinstance(p, str) for p in path):
        raise ValueError(
            f"A variable path needs a collection and a name, as strings. Got {path!r}.\n"
            "fix: pass e.g. ('params', 'Dense_0', 'kernel') or 'params/Dense_0/kernel'."
        )
    return path


def _fmt(path: Sequence[str]) -> str:
    return "/".join(path)


def _collection_of(variable_type: type) -> str:
    """The linen collection for a link Variable of this type.

    A name flax registered by itself is skipped: ``nnx.bridge.ToLinen`` names a
    collection after each Variable type it does not know (``PowerIteration`` ->
    ``"PowerIteration"``), for the rest of the process, and the collection here
    must not depend on whether a ToLinen ran before.
    """
    for t in variable_type.__mro__:
        if isinstance(t, type) and issubclass(t, nnx.Variable):
            try:
                name = variablelib.variable_name_from_type(t, allow_register=False)
            except ValueError:
                continue
            if name != t.__name__:  # ToLinen's registrations take the class's name
                return name
    return BUFFERS


# ---------------------------------------------------------------------------
# Links and the spec
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Link:
    """One link of a chain: a plain callable, or a split ``nnx.Module``.

    ``layout`` lists the module's Variables: (path inside the module, linen
    collection, PRNG key implementation or None). Typed PRNG keys are stored as raw
    key data, so the variables dict stays serializable.
    """

    name: str
    has_right_inverse: bool
    fn: Callable[..., Any] | None = None
    graphdef: Any = None
    layout: tuple[tuple[tuple[Any, ...], str, str | None], ...] = ()

    def _key(self) -> tuple[Any, ...]:
        return (id(self.fn), self.graphdef, self.layout, self.has_right_inverse)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Link):
            return NotImplemented
        return self.fn is other.fn and self._key()[1:] == other._key()[1:]

    def __hash__(self) -> int:
        return hash(self._key())


def _make_link(parametrization: Any) -> tuple[_Link, dict[tuple[Any, ...], Any] | None]:
    if not callable(parametrization):
        raise TypeError(
            f"A parametrization must be callable. Got {C.type_name(parametrization)}.\n"
            "fix: pass a function of the original(s), or an nnx.Module with __call__."
        )
    name = C.link_name(parametrization)
    has_ri = hasattr(parametrization, "right_inverse")
    if not isinstance(parametrization, nnx.Module):
        return _Link(name, has_ri, fn=parametrization), None
    graphdef, state = nnx.split(parametrization)
    layout, values = [], {}
    for path, var in nnx.to_flat_state(state):
        raw = var.get_raw_value()
        impl = None
        if isinstance(raw, jax.Array) and jnp.issubdtype(raw.dtype, jax.dtypes.prng_key):
            impl = str(jax.random.key_impl(raw))
            raw = jax.random.key_data(raw)
        layout.append((tuple(path), _collection_of(type(var)), impl))
        values[tuple(path)] = raw
    return _Link(name, has_ri, graphdef=graphdef, layout=tuple(layout)), values


def _call(
    link: _Link,
    state: dict[tuple[Any, ...], Any] | None,
    method: str,
    args: Sequence[Any],
    training: bool,
) -> tuple[Any, dict[tuple[Any, ...], Any] | None]:
    """Run ``link.<method>(*args)`` on a fresh copy; return (result, new state)."""
    if link.graphdef is None:
        fn = link.fn if method == "__call__" else link.fn.right_inverse
        return fn(*args), None
    assert state is not None
    # Stored values become the module's jax arrays (numpy ones, e.g. restored from
    # a checkpoint, are read-only; keys are rewrapped). An entry the call leaves
    # alone comes back as the very stored object, so callers detect changes by
    # identity.
    nested: dict[Any, Any] = {}
    for path, _, impl in link.layout:
        raw = jnp.asarray(state[path])
        if impl is not None:
            raw = jax.random.wrap_key_data(raw, impl=impl)
        _set(nested, path, raw)
    module = nnx.merge(link.graphdef, nested)
    module.set_attributes(deterministic=not training, raise_if_not_found=False)
    out = getattr(module, method)(*args)
    flat = {tuple(p): v.get_raw_value() for p, v in nnx.to_flat_state(nnx.state(module))}
    new = {}
    for path, _, impl in link.layout:
        raw = flat[path]
        if raw is _get(nested, path):
            raw = state[path]
        elif impl is not None:
            raw = jax.random.key_data(raw)
        new[path] = raw
    return out, new


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """The static structure of one parametrized variable (torch's ``ParametrizationList``
    without its tensors).

    Attributes:
      path: the parametrized variable, e.g. ``("params", "Dense_0", "kernel")``.
      links: the chain, in registration order (internal link records).
      is_tensor: ``right_inverse`` returned one array (``original``), not a
        sequence (``original0..N``).
      ntensors: the number of originals.
      unsafe: torch's flag; it sticks to the chain once set.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> v = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 2)))
      >>> v, spec = PL.weight_norm(v, "params/kernel")
      >>> chain = spec["params/kernel"]
      >>> [p[-1] for p in chain.original_paths()]
      ['original0', 'original1']
    """

    path: Path
    links: tuple[_Link, ...]
    is_tensor: bool
    ntensors: int
    unsafe: bool = False

    def _prefix(self, collection: str) -> Path:
        return (collection, *self.path[1:-1], _PARAMETRIZATIONS, self.path[-1])

    def original_paths(self) -> tuple[Path, ...]:
        """Where the originals live in the variables dict."""
        prefix = self._prefix(self.path[0])
        if self.is_tensor:
            return (prefix + ("original",),)
        return tuple(prefix + (f"original{i}",) for i in range(self.ntensors))

    def state_paths(self) -> tuple[Path, ...]:
        """Where the links' Variables live in the variables dict."""
        return tuple(
            self._link_state_path(i, p, col)
            for i, link in enumerate(self.links)
            for p, col, _ in link.layout
        )

    def _link_state_path(self, i: int, path: tuple[Any, ...], collection: str) -> Path:
        return self._prefix(collection) + (str(i), *map(str, path))

    def _collections(self) -> set[str]:
        return {self.path[0]} | {col for link in self.links for _, col, _ in link.layout}


@dataclasses.dataclass(frozen=True)
class ParametrizationSpec:
    """The parametrizations registered on a variables dict: static, immutable, hashable.

    Returned by :func:`register_parametrization` (and the built-ins) beside the new
    variables; pass it to every other function. It holds no arrays, so it is static
    under ``jax.jit`` (close over it, or mark it static). Indexing by a path gives
    the :class:`ChainSpec`.

    Attributes:
      chains: one :class:`ChainSpec` per parametrized variable, in registration order.
      training: the mode of the links (torch's ``module.training``); ``True`` for a
        new spec, as for a new torch module.

    Example:
      >>> import jaxparam.linen as PL
      >>> spec = PL.ParametrizationSpec()
      >>> spec.training, spec.eval().training, len(spec)
      (True, False, 0)
    """

    chains: tuple[ChainSpec, ...] = ()
    training: bool = True

    def __contains__(self, path: object) -> bool:
        try:
            p = _as_path(path)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return False
        return any(c.path == p for c in self.chains)

    def __getitem__(self, path: str | Sequence[str]) -> ChainSpec:
        p = _as_path(path)
        for chain in self.chains:
            if chain.path == p:
                return chain
        raise KeyError(p)

    def __iter__(self) -> Iterator[Path]:
        return (c.path for c in self.chains)

    def __len__(self) -> int:
        return len(self.chains)

    def train(self, mode: bool = True) -> ParametrizationSpec:
        """The same spec in training mode (or evaluation mode if ``mode`` is False)."""
        return dataclasses.replace(self, training=mode)

    def eval(self) -> ParametrizationSpec:
        """The same spec in evaluation mode: stateful links stop updating."""
        return self.train(False)

    def _replace_chain(self, chain: ChainSpec | None, path: Path) -> ParametrizationSpec:
        chains = []
        replaced = False
        for c in self.chains:
            if c.path == path:
                replaced = True
                if chain is not None:
                    chains.append(chain)
            else:
                chains.append(c)
        if not replaced and chain is not None:
            chains.append(chain)
        return dataclasses.replace(self, chains=tuple(chains))


# ---------------------------------------------------------------------------
# Reading, running and writing one chain
# ---------------------------------------------------------------------------

_States = list[dict[tuple[Any, ...], Any] | None]


def _read(variables: Variables, chain: ChainSpec) -> tuple[tuple[Any, ...], _States]:
    def get(path: Path) -> Any:
        if not _has(variables, path):
            raise ValueError(
                f"The variables do not hold '{_fmt(path)}', needed by the parametrization "
                f"on '{_fmt(chain.path)}'.\n"
                "fix: pass the variables returned together with this spec (and every "
                "collection the chain uses)."
            )
        return _get(variables, path)

    originals = tuple(get(p) for p in chain.original_paths())
    states: _States = []
    for i, link in enumerate(chain.links):
        if link.graphdef is None:
            states.append(None)
        else:
            states.append({p: get(chain._link_state_path(i, p, col)) for p, col, _ in link.layout})
    return originals, states


def _write(
    tree: dict,
    chain: ChainSpec,
    originals: Sequence[Any] | None,
    states: _States | None,
) -> None:
    if originals is not None:
        for path, value in zip(chain.original_paths(), originals, strict=True):
            _set(tree, path, value)
    if states is not None:
        for i, (link, state) in enumerate(zip(chain.links, states, strict=True)):
            for p, col, _ in link.layout:
                _set(tree, chain._link_state_path(i, p, col), state[p])


def _run(
    chain: ChainSpec, originals: Sequence[Any], states: _States, training: bool
) -> tuple[Any, _States]:
    """The chain's forward: ``links[-1](...links[0](*originals))``."""
    new_states = list(states)
    x, new_states[0] = _call(chain.links[0], states[0], "__call__", originals, training)
    for i in range(1, len(chain.links)):
        x, new_states[i] = _call(chain.links[i], states[i], "__call__", (x,), training)
    return x, new_states


def _remove_layout(tree: dict, chain: ChainSpec) -> None:
    for col in chain._collections():
        _delete(tree, chain._prefix(col))


def _check_not_parametrized_layout(path: Path) -> None:
    if _PARAMETRIZATIONS in path[1:-1]:
        raise ValueError(
            f"Cannot parametrize '{_fmt(path)}': it lies inside a parametrization's layout.\n"
            "fix: parametrize the plain variable path (e.g. 'params/Dense_0/kernel'), which "
            "appends to its chain."
        )


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------


def register_parametrization(
    variables: Variables,
    path: str | Sequence[str],
    parametrization: Callable[..., Any],
    *,
    unsafe: bool = False,
    spec: ParametrizationSpec | None = None,
) -> tuple[dict[str, Any], ParametrizationSpec]:
    """Register a parametrization on the variable at ``path``; torch's semantics.

    The variable at ``path`` is replaced by its original(s) under
    ``.../parametrizations/<name>/original`` (``original0..N`` when the first
    parametrization's ``right_inverse`` returns a sequence). Registering again on
    the same path (with the spec returned the first time) appends to the chain,
    after torch's consistency checks. A parametrization is any callable of the
    original(s), or an ``nnx.Module``, whose Variables are stored in the variables
    dict (see the module docstring). ``right_inverse``, if any, runs now to
    initialise the original(s), and on every :func:`assign`.

    Args:
      variables: the linen variables (as returned by ``model.init``); not modified.
      path: the variable, e.g. ``("params", "Dense_0", "kernel")`` or
        ``"params/Dense_0/kernel"``.
      parametrization: the callable to register.
      unsafe: skip the dtype/shape consistency checks (torch's flag).
      spec: the spec of the parametrizations already registered on ``variables``.

    Returns:
      The new variables and the new spec.

    Raises:
      ValueError: no array at ``path`` (torch's "does not have a parameter, a
        buffer, or a parametrized element" message); the parametrization changes
        the dtype or shape or returns a non-array (unless ``unsafe``);
        ``right_inverse`` returns something invalid (torch's messages).
      TypeError: the parametrization is not callable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> v = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 3)))
      >>> v, spec = PL.register_parametrization(v, "params/kernel", jnp.tril)
      >>> v, spec = PL.register_parametrization(v, "params/kernel", jnp.triu, spec=spec)
      >>> w = PL.get_parametrized(v, "params/kernel", spec=spec)
      >>> bool(jnp.all(w == jnp.diag(jnp.diag(w))))
      True
    """
    path = _as_path(path)
    spec = ParametrizationSpec() if spec is None else spec
    link, link_state = _make_link(parametrization)
    training = spec.training
    tree = _copy(variables)

    if path in spec:
        chain = spec[path]
        originals, states = _read(variables, chain)
        tensor_name = path[-1]
        if not unsafe:
            Y, states = _run(chain, originals, states, training)
            X, link_state = _call(link, link_state, "__call__", (Y,), training)
            C.check_appended_value(Y, X, tensor_name)
            if link.has_right_inverse:
                try:
                    Z, link_state = _call(link, link_state, "right_inverse", (X,), training)
                except NotImplementedError:
                    pass
                else:
                    C.check_appended_right_inverse(Y, Z, tensor_name)
        new_chain = dataclasses.replace(
            chain, links=chain.links + (link,), unsafe=chain.unsafe or unsafe
        )
        _write(tree, new_chain, None, [*states, link_state])
        return tree, spec._replace_chain(new_chain, path)

    _check_not_parametrized_layout(path)
    leaf = _get(variables, path) if _has(variables, path) else None
    if leaf is None or isinstance(leaf, Mapping):
        found = "" if leaf is None else "\nfound: a subtree (a module's variables), not an array"
        raise ValueError(
            f"Module '{_fmt(path[:-1])}' does not have a parameter, a buffer, or a "
            f"parametrized element with name '{path[-1]}'{found}\n"
            "fix: name an array of an initialised linen variables dict, e.g. "
            "('params', 'Dense_0', 'kernel'); to append to a chain, pass its spec."
        )
    if isinstance(leaf, meta.AxisMetadata):
        raise ValueError(
            f"The variable '{_fmt(path)}' is boxed in {C.type_name(leaf)} metadata.\n"
            "fix: unbox the variables first (flax.linen.meta.unbox(variables))."
        )
    if isinstance(leaf, np.ndarray | np.generic):
        leaf = jnp.asarray(leaf)
    if not C.is_tensor(leaf):
        raise ValueError(
            f"Variable '{_fmt(path)}' holds a {C.type_name(leaf)}, not an array.\n"
            "fix: parametrize a variable that holds a jax.Array."
        )

    # torch's ParametrizationList.__init__
    original_shape, original_dtype = leaf.shape, leaf.dtype
    new = leaf
    if link.has_right_inverse:
        try:
            new, link_state = _call(link, link_state, "right_inverse", (new,), training)
        except NotImplementedError:
            pass
    is_tensor, originals = C.originals_from_right_inverse(new, original_dtype)
    chain = ChainSpec(path, (link,), is_tensor, len(originals), unsafe)
    if not unsafe:
        Z, (link_state,) = _run(chain, originals, [link_state], training)
        C.check_registered_value(Z, original_shape, original_dtype)
    prefix = chain._prefix(path[0])
    if _has(tree, prefix):
        raise ValueError(
            f"The variables already hold '{_fmt(prefix)}', but the spec has no "
            f"parametrization on '{_fmt(path)}'.\n"
            "fix: pass the spec returned with these variables."
        )
    _delete(tree, path)
    _write(tree, chain, originals, [link_state])
    return tree, spec._replace_chain(chain, path)


def is_parametrized(spec: ParametrizationSpec, path: str | Sequence[str] | None = None) -> bool:
    """Whether ``spec`` has a parametrization (on ``path``, if given).

    Example:
      >>> import jaxparam.linen as PL
      >>> PL.is_parametrized(PL.ParametrizationSpec())
      False
    """
    if path is None:
        return len(spec) > 0
    return path in spec


def _chain_or_raise(spec: ParametrizationSpec, path: Path) -> ChainSpec:
    if path not in spec:
        raise C.not_parametrized(_fmt(path[:-1]), path[-1], [_fmt(p) for p in spec])
    return spec[path]


def _materialize(
    variables: Variables, spec: ParametrizationSpec
) -> tuple[dict[str, Any], dict[Path, Any], dict[Path, Any]]:
    """(plain variables, values by path, changed link state by full path)."""
    plain = _copy(variables)
    values: dict[Path, Any] = {}
    changed: dict[Path, Any] = {}
    for chain in spec.chains:
        originals, states = _read(variables, chain)
        value, new_states = _run(chain, originals, states, spec.training)
        values[chain.path] = value
        for i, (link, old, new) in enumerate(zip(chain.links, states, new_states, strict=True)):
            for p, col, _ in link.layout:
                if new[p] is not old[p]:
                    changed[chain._link_state_path(i, p, col)] = new[p]
    for chain in spec.chains:
        _remove_layout(plain, chain)
    for chain in spec.chains:
        _set(plain, chain.path, values[chain.path])
    return plain, values, changed


def get_parametrized(
    variables: Variables, path: str | Sequence[str], *, spec: ParametrizationSpec
) -> jax.Array:
    """The parametrized value at ``path`` (torch's ``module.weight``).

    In training mode a stateful link (spectral norm) runs its update to compute the
    value, but the new state is not kept: use :func:`materialize` or :func:`apply`
    with ``mutable`` to keep it.

    Raises:
      ValueError: ``path`` is not parametrized, or the variables lack an original.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> v = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 2)))
      >>> w0 = v["params"]["kernel"]
      >>> v, spec = PL.register_parametrization(v, "params/kernel", lambda x: 2 * x)
      >>> bool(jnp.allclose(PL.get_parametrized(v, "params/kernel", spec=spec), 2 * w0))
      True
    """
    chain = _chain_or_raise(spec, _as_path(path))
    originals, states = _read(variables, chain)
    return _run(chain, originals, states, spec.training)[0]


def materialize(
    variables: Variables, *, spec: ParametrizationSpec
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The plain variables the model expects, and the variables with updated link state.

    The first result has every parametrized value at its plain path (originals and
    link Variables removed): pass it to ``model.apply`` or to any flax tool that
    wants the model's own layout. The second is ``variables`` with the link state
    a training-mode run changed (spectral norm's vectors); equal to ``variables``
    in evaluation mode.

    Raises:
      ValueError: the variables lack an original or a link Variable of the spec.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> model = nn.Dense(2)
      >>> v = model.init(jax.random.key(0), jnp.ones((1, 2)))
      >>> v, spec = PL.weight_norm(v, "params/kernel")
      >>> plain, v = PL.materialize(v, spec=spec)
      >>> sorted(plain["params"])
      ['bias', 'kernel']
    """
    plain, _, changed = _materialize(variables, spec)
    new = _copy(variables)
    for path, value in changed.items():
        _set(new, path, value)
    return plain, new


def assign(
    variables: Variables,
    path: str | Sequence[str],
    value: Any,
    *,
    spec: ParametrizationSpec,
) -> dict[str, Any]:
    """Torch's ``module.weight = value``: run ``right_inverse`` through the chain in reverse.

    Returns new variables whose originals (and link state a ``right_inverse`` sets,
    such as orthogonal's ``base``) make the parametrized value ``value``.

    Raises:
      ValueError: ``path`` is not parametrized; the result has the wrong type,
        length or dtype (torch's messages).
      RuntimeError: a link has no ``right_inverse``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> v = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 2)))
      >>> v, spec = PL.weight_norm(v, "params/kernel")
      >>> v = PL.assign(v, "params/kernel", jnp.eye(2), spec=spec)
      >>> bool(jnp.allclose(PL.get_parametrized(v, "params/kernel", spec=spec), jnp.eye(2)))
      True
    """
    path = _as_path(path)
    chain = _chain_or_raise(spec, path)
    originals, states = _read(variables, chain)
    states = list(states)
    if isinstance(value, np.ndarray | np.generic):
        value = jnp.asarray(value)
    for i in reversed(range(len(chain.links))):
        link = chain.links[i]
        if not link.has_right_inverse:
            raise C.missing_right_inverse(
                link.name, "write the original directly in the variables dict"
            )
        value, states[i] = _call(link, states[i], "right_inverse", (value,), spec.training)
    new_originals = C.originals_from_assignment(
        value, chain.is_tensor, [o.dtype for o in originals]
    )
    tree = _copy(variables)
    _write(tree, chain, new_originals, states)
    return tree


def remove_parametrizations(
    variables: Variables,
    path: str | Sequence[str],
    leave_parametrized: bool = True,
    *,
    spec: ParametrizationSpec,
) -> tuple[dict[str, Any], ParametrizationSpec]:
    """Remove the parametrizations on ``path``: back to a plain variable.

    With ``leave_parametrized=True`` the variable gets the current parametrized
    value; with ``False`` the original back. The chain's originals and link
    Variables leave the dict (and the dicts that leaves empty).

    Args:
      variables: the parametrized variables; not modified.
      path: the parametrized variable.
      leave_parametrized: keep the parametrized value (default) or the original.
      spec: the spec.

    Returns:
      The new variables and the new spec.

    Raises:
      ValueError: ``path`` is not parametrized; ``leave_parametrized=False`` with
        several originals (torch's messages).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> v0 = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 2)))
      >>> v, spec = PL.register_parametrization(v0, "params/kernel", lambda x: 2 * x)
      >>> v, spec = PL.remove_parametrizations(v, "params/kernel", False, spec=spec)
      >>> bool(jnp.all(v["params"]["kernel"] == v0["params"]["kernel"])), len(spec)
      (True, 0)
    """
    path = _as_path(path)
    chain = _chain_or_raise(spec, path)
    originals, states = _read(variables, chain)
    if chain.is_tensor and not leave_parametrized:
        value = originals[0]
    elif leave_parametrized:
        value = _run(chain, originals, states, spec.training)[0]
    else:
        raise C.cannot_leave_unparametrized()
    tree = _copy(variables)
    _remove_layout(tree, chain)
    _set(tree, path, value)
    return tree, spec._replace_chain(None, path)


def apply(
    model: Any,
    variables: Variables,
    *args: Any,
    spec: ParametrizationSpec,
    rngs: Any = None,
    method: Any = None,
    mutable: Any = False,
    capture_intermediates: Any = False,
    **kwargs: Any,
) -> Any:
    """``model.apply`` on parametrized variables.

    Computes every parametrized value, puts it at its plain path and calls
    ``model.apply(plain_variables, *args, ...)``. Returns what ``model.apply``
    returns; with ``mutable``, the mutated collections come back in the
    parametrized layout (originals and link Variables included), and the link state
    a training-mode spec changes (spectral norm's vectors) is among them, so
    ``{**variables, **mutated}`` is the next step's variables. A value the model
    itself writes at a parametrized path is dropped, as torch drops an in-place
    write to a computed parametrized tensor.

    Args:
      model: the linen module (unchanged, unaware of the parametrizations).
      variables: the parametrized variables.
      *args: positional arguments of the model's method.
      spec: the spec of ``variables``; its mode (``spec.train()``/``spec.eval()``)
        sets the links' ``deterministic``.
      rngs, method, mutable, capture_intermediates, **kwargs: as ``model.apply``.

    Returns:
      As ``model.apply``.

    Raises:
      RuntimeError: in training mode a link changes state in a collection that
        ``mutable`` does not include (pass it, or use ``spec.eval()``).
      ValueError: the variables lack an original or link Variable of the spec.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> model = nn.Dense(3)
      >>> v = model.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> v, spec = PL.spectral_norm(v, "params/kernel", rngs=1)
      >>> y, updates = PL.apply(model, v, jnp.ones((1, 4)), spec=spec, mutable=["batch_stats"])
      >>> v = {**v, **updates}
      >>> y = PL.apply(model, v, jnp.ones((1, 4)), spec=spec.eval())
    """
    effective = mutable
    if capture_intermediates:
        effective = union_filters(mutable, "intermediates")
    plain, _, changed = _materialize(variables, spec)
    frozen = sorted({p[0] for p in changed if not in_filter(effective, p[0])})
    if frozen:
        raise RuntimeError(
            "Parametrizations in training mode update state in the immutable "
            f"collection(s) {frozen}.\n"
            f"state: {', '.join(_fmt(p) for p in changed if p[0] in frozen)}\n"
            f"fix: pass mutable={frozen} (and merge the returned collections into the "
            "variables), or use spec.eval() for evaluation."
        )
    result = model.apply(
        plain,
        *args,
        rngs=rngs,
        method=method,
        mutable=mutable,
        capture_intermediates=capture_intermediates,
        **kwargs,
    )
    if effective is False:
        return result
    out, mutated = result
    mutated = _copy(mutated)
    for chain in spec.chains:
        if chain.path[0] in mutated:
            _delete(mutated, chain.path)
    for chain in spec.chains:
        for p in chain.original_paths() + chain.state_paths():
            if in_filter(effective, p[0]):
                _set(mutated, p, changed.get(p, _get(variables, p)))
    return out, mutated


# ---------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------


def _leaf(variables: Variables, path: Path) -> jax.Array:
    if not _has(variables, path) or isinstance(_get(variables, path), Mapping):
        raise ValueError(
            f"Module '{_fmt(path[:-1])}' has no parameter or buffer with name '{path[-1]}'\n"
            "fix: name an array of the variables dict, e.g. ('params', 'Dense_0', 'kernel')."
        )
    return jnp.asarray(_get(variables, path))


def _current(variables: Variables, path: Path, spec: ParametrizationSpec | None) -> jax.Array:
    """The value at ``path``: parametrized (appending to a chain) or plain."""
    if spec is not None and path in spec:
        return get_parametrized(variables, path, spec=spec)
    return _leaf(variables, path)


def _resolve_dim(path: Path, dim: Any, ndim: int) -> int | None:
    """A non-negative axis, or None. Default: 0 for ``embedding``, else the last axis."""
    if dim is DEFAULT:
        dim = 0 if path[-1] == "embedding" else -1
    return _axis(dim, ndim)


def weight_norm(
    variables: Variables,
    path: str | Sequence[str],
    dim: Any = DEFAULT,
    *,
    spec: ParametrizationSpec | None = None,
) -> tuple[dict[str, Any], ParametrizationSpec]:
    """Weight normalization on the variable at ``path``, as torch's ``weight_norm``.

    ``w = g * v / ||v||`` with ``g`` at ``original0`` and ``v`` at ``original1``;
    the link is :class:`jaxparam.parametrizations.WeightNorm`, so the numbers are
    the NNX built-in's. Unlike flax's ``nn.WeightNorm``, the stored kernel is not
    rewritten: the model computes exactly what it did before registration.

    Args:
      variables: the linen variables; not modified.
      path: the variable, e.g. ``"params/Dense_0/kernel"``.
      dim: the axis of the Flax array kept by the norm. Default "per output
        feature": ``0`` if the variable is named ``embedding`` (``nn.Embed``),
        else the last axis (``Dense``, ``Conv``, ``ConvTranspose`` kernels).
        ``None``: the whole tensor. A negative ``dim`` is an ordinary axis.
      spec: the spec of the parametrizations already on ``variables``.

    Returns:
      The new variables and spec.

    Raises:
      ValueError: no array at ``path``.
      IndexError: ``dim`` out of range.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> v = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
      >>> v, spec = PL.weight_norm(v, ("params", "kernel"))
      >>> v["params"]["parametrizations"]["kernel"]["original0"].shape
      (1, 4)
    """
    path = _as_path(path)
    if path in (spec or ()):
        ndim = jax.eval_shape(lambda v: get_parametrized(v, path, spec=spec), variables).ndim
    elif _has(variables, path) and not isinstance(_get(variables, path), Mapping):
        ndim = jnp.ndim(_get(variables, path))
    else:  # torch's weight_norm goes straight to register_parametrization: its error
        return register_parametrization(variables, path, WeightNorm(None), unsafe=True, spec=spec)
    link = WeightNorm(_resolve_dim(path, dim, ndim))
    return register_parametrization(variables, path, link, unsafe=True, spec=spec)


def spectral_norm(
    variables: Variables,
    path: str | Sequence[str],
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    dim: Any = DEFAULT,
    *,
    rngs: nnx.Rngs | jax.Array | int = 0,
    spec: ParametrizationSpec | None = None,
) -> tuple[dict[str, Any], ParametrizationSpec]:
    """Spectral normalization on the variable at ``path``, as torch's ``spectral_norm``.

    The value is ``w / sigma(w)``, sigma estimated by power iteration. The link is
    :class:`jaxparam.parametrizations.SpectralNorm` (numbers identical to the NNX
    built-in); its vectors are ``PowerIteration`` Variables stored at
    ``batch_stats/.../parametrizations/<name>/0/_u`` and ``_v``, initialised with
    torch's 15 warm-up iterations from ``rngs``. They update on every
    :func:`apply` of a training-mode spec (pass ``mutable=["batch_stats"]``) and
    stay fixed with ``spec.eval()``. Flax's own ``nn.SpectralNorm`` also keeps its
    vectors in ``batch_stats``, but rescales the stored kernel at init; this keeps
    ``w`` as the original.

    Args:
      variables: the linen variables; not modified.
      path: the variable.
      n_power_iterations: power iterations per training-mode run.
      eps: epsilon of the normalizations.
      dim: the axis of the output features; default as in :func:`weight_norm`.
      rngs: randomness for the initial vectors: an ``nnx.Rngs``, a key, or an int.
      spec: the spec of the parametrizations already on ``variables``.

    Returns:
      The new variables and spec.

    Raises:
      ValueError: no array at ``path``; ``n_power_iterations`` not positive;
        ``dim=None``.
      IndexError: ``dim`` out of range.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> v = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 4)))
      >>> v, spec = PL.spectral_norm(v, "params/kernel", rngs=1)
      >>> sorted(v["batch_stats"]["parametrizations"]["kernel"]["0"])
      ['_u', '_v']
      >>> w = PL.get_parametrized(v, "params/kernel", spec=spec)
      >>> bool(abs(jnp.linalg.norm(w, ord=2) - 1) < 1e-3)
      True
    """
    path = _as_path(path)
    weight = _current(variables, path, spec)
    flax_dim = _resolve_dim(path, dim, weight.ndim)
    if flax_dim is None:
        raise ValueError("spectral_norm needs an output dimension; got dim=None.")
    link = SpectralNorm(
        jax.lax.stop_gradient(weight), n_power_iterations, flax_dim, eps, key=_key(rngs)
    )
    return register_parametrization(variables, path, link, spec=spec)


def orthogonal(
    variables: Variables,
    path: str | Sequence[str],
    orthogonal_map: str | None = None,
    *,
    use_trivialization: bool = True,
    rngs: nnx.Rngs | jax.Array | int = 0,
    spec: ParametrizationSpec | None = None,
) -> tuple[dict[str, Any], ParametrizationSpec]:
    """An orthogonal (unitary) matrix at ``path``, as torch's ``orthogonal``.

    The link is :class:`jaxparam.parametrizations.Orthogonal` (the NNX built-in's
    numbers); its ``base`` lives in the ``buffers`` collection and its random
    stream (for completing non-square matrices in ``right_inverse``) too, as raw
    key data. :func:`assign` resets ``base``, as torch's assignment does.

    Args:
      variables: the linen variables; not modified.
      path: the variable (at least 2-d; acts on the last two axes).
      orthogonal_map: ``"matrix_exp"``, ``"cayley"``, ``"householder"`` or ``None``
        (torch's default choice).
      use_trivialization: torch's dynamic trivialization (default).
      rngs: randomness for ``right_inverse``: an ``nnx.Rngs``, a key, or an int.
      spec: the spec of the parametrizations already on ``variables``.

    Returns:
      The new variables and spec.

    Raises:
      ValueError: no array at ``path``; fewer than 2 dimensions; unknown map;
        householder on a complex weight (torch's messages).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> import jaxparam.linen as PL
      >>> v = nn.Dense(3).init(jax.random.key(0), jnp.ones((1, 5)))
      >>> v, spec = PL.orthogonal(v, "params/kernel")
      >>> sorted(v["buffers"]["parametrizations"]["kernel"]["0"])
      ['base', 'rngs']
      >>> w = PL.get_parametrized(v, "params/kernel", spec=spec)
      >>> bool(jnp.allclose(w.T @ w, jnp.eye(3), atol=1e-5))
      True
    """

    path = _as_path(path)
    weight = _current(variables, path, spec)
    if weight.ndim < 2:
        raise ValueError(
            f"Expected a matrix or batch of matrices. Got a tensor of {weight.ndim} dimensions."
        )
    if orthogonal_map is None:
        orthogonal_map = F.default_orthogonal_map(jnp.swapaxes(weight, -1, -2))
    if orthogonal_map not in ("matrix_exp", "cayley", "householder"):
        raise ValueError(
            'orthogonal_map has to be one of "matrix_exp", "cayley", "householder". '
            f"Got: {orthogonal_map}"
        )
    link = Orthogonal(
        weight,
        orthogonal_map,
        use_trivialization=use_trivialization,
        rngs=nnx.Rngs(params=_key(rngs)),
    )
    return register_parametrization(variables, path, link, unsafe=True, spec=spec)
