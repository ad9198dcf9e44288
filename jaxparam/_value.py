"""`ParametrizedValue`: what reading a parametrized attribute returns.

Reading ``module.kernel`` on a parametrized NNX module returns a read-only,
Variable-like view of the computed ``jax.Array``, not the bare array. Why a view:
flax layers read their weights the way they read a ``Variable`` -- ``self.kernel[...]``,
``self.scale.shape`` -- and some test truthiness (``nnx.LayerNorm`` does
``scale = self.scale[...] if self.scale else None``), which a bare multi-element
``jax.Array`` refuses. The view behaves like a Variable on those points and like
an array everywhere else, so every flax layer runs unchanged:

- ``view[...]`` (and any index) gives the ``jax.Array``; ``view.value`` and
  ``view.get_value()`` too;
- ``bool(view)`` is ``len(view) > 0`` as for a ``Variable`` (a 0-d view gives the
  truth value of its element);
- arithmetic, ``@``, comparisons, ``.shape``, ``.dtype``, ``.T`` and every other
  array attribute are forwarded to the array;
- ``jnp`` functions accept it: it is a pytree with the array as its one leaf, and
  ``np.asarray(view)`` works through ``__array__``;
- it is read-only: ``view[...] = x`` (the NNX spelling of assignment) assigns
  through the chain's ``right_inverse``, exactly like ``module.kernel = x``;
  ``view[idx] = x`` assigns the whole tensor with that part replaced.

The view is computed when read; it does not follow later changes of the originals.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ParametrizedValue"]


class ParametrizedValue:
    """Read-only view of a parametrized tensor (see the module docstring).

    Attributes:
      value: the parametrized ``jax.Array``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import jaxparam.parametrize as P
      >>> layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
      >>> _ = P.register_parametrization(layer, "kernel", lambda x: x + x.T)
      >>> w = layer.kernel
      >>> bool(jnp.allclose(w[...], w.T))
      True
    """

    __slots__ = ("_value", "_assign")

    def __init__(self, value: jax.Array, assign: Callable[[Any], None] | None = None):
        self._value = value
        self._assign = assign

    # -- Variable-like access -------------------------------------------------
    @property
    def value(self) -> jax.Array:
        return self._value

    def get_value(self) -> jax.Array:
        return self._value

    def __getitem__(self, key: Any) -> jax.Array:
        if key is Ellipsis:
            return self._value
        return self._value[key]

    def __setitem__(self, key: Any, new: Any) -> None:
        if self._assign is None:
            raise TypeError(
                "This ParametrizedValue is detached from its module (it went through a "
                "pytree transformation), so it cannot be assigned to.\n"
                "fix: assign on the module instead: `module.<name> = value`."
            )
        new = _unwrap(new)
        if key is not Ellipsis:
            new = self._value.at[key].set(new)
        self._assign(new)

    def __len__(self) -> int:
        return len(self._value)

    def __bool__(self) -> bool:
        if self._value.ndim == 0:
            return bool(self._value)
        return len(self._value) > 0

    def __iter__(self):
        return iter(self._value)

    # -- array protocol ---------------------------------------------------------
    def __jax_array__(self) -> jax.Array:
        return self._value

    def __array__(self, dtype=None, copy=None):
        out = np.asarray(self._value, dtype=dtype)
        return out.copy() if copy else out

    @property
    def shape(self) -> tuple[int, ...]:
        return self._value.shape

    @property
    def dtype(self) -> Any:
        return self._value.dtype

    @property
    def ndim(self) -> int:
        return self._value.ndim

    @property
    def size(self) -> int:
        return self._value.size

    def __getattr__(self, name: str) -> Any:
        # Everything else an array has (.T, .sum(), .reshape(), .astype(), ...).
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._value, name)

    def __repr__(self) -> str:
        return f"ParametrizedValue({self._value!r})"

    def __hash__(self) -> int:  # arrays are unhashable; so is the view
        raise TypeError("unhashable type: 'ParametrizedValue'")

    # Prevent `x += y` from silently rebinding to a plain array on the module.
    def __iadd__(self, other):
        raise TypeError(
            "In-place operators are not supported on a parametrized value.\n"
            "fix: assign a new value instead: `module.<name> = module.<name> + x`."
        )

    __isub__ = __imul__ = __itruediv__ = __imatmul__ = __iadd__


def _unwrap(x: Any) -> Any:
    """The array behind a view, a Variable, or the value itself."""
    if isinstance(x, ParametrizedValue):
        return x._value
    from flax import nnx

    if isinstance(x, nnx.Variable):
        return x.get_value()
    if isinstance(x, np.ndarray | np.generic):
        return jnp.asarray(x)
    return x


def _binary(name: str) -> Callable[..., Any]:
    op = getattr(operator, name) if hasattr(operator, name) else None

    def method(self, other):
        other = _unwrap(other)
        if op is not None:
            return op(self._value, other)
        return getattr(self._value, f"__{name}__")(other)

    method.__name__ = f"__{name}__"
    return method


def _reflected(name: str) -> Callable[..., Any]:
    def method(self, other):
        return getattr(self._value, f"__r{name}__")(_unwrap(other))

    method.__name__ = f"__r{name}__"
    return method


def _unary(name: str) -> Callable[..., Any]:
    def method(self):
        return getattr(self._value, f"__{name}__")()

    method.__name__ = f"__{name}__"
    return method


_BINARY = (
    "add sub mul matmul truediv floordiv mod pow lshift rshift and xor or lt le gt ge eq ne"
).split()
_REFLECTED = "add sub mul matmul truediv floordiv mod pow lshift rshift and xor or".split()
_UNARY = "neg pos abs invert complex int float index".split()

for _name in _BINARY:
    setattr(ParametrizedValue, f"__{_name}__", _binary(_name))
for _name in _REFLECTED:
    setattr(ParametrizedValue, f"__r{_name}__", _reflected(_name))
for _name in _UNARY:
    setattr(ParametrizedValue, f"__{_name}__", _unary(_name))
del _name

jax.tree_util.register_pytree_node(
    ParametrizedValue,
    lambda v: ((v._value,), None),
    lambda _, children: ParametrizedValue(children[0]),
)
