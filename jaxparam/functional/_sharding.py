"""Meshes with explicit axes (``jax.sharding.AxisType.Explicit``).

On such a mesh an array's type names the axes it is sharded over, and JAX asks the
caller to spell out the sharding of every product whose contracted axes are
sharded and of every concatenation of differently sharded operands. The power
method and the orthogonal maps are written for any layout, so where an input is
sharded over an explicit axis they run with the mesh's explicit axes made
automatic (``jax.sharding.auto_axes``): XLA places the intermediates, as it does on
an ``Auto`` mesh, and the results get the shardings the caller's types expect.
Elsewhere (one device, ``Auto`` axes, replicated inputs) the function is called
as is: nothing is added to the computation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec


def _explicit_mesh(args: Any) -> Any:
    """The mesh of the first array in ``args`` typed as sharded, or None."""
    for x in jax.tree.leaves(args):
        sharding = jax.typeof(x).sharding
        if isinstance(sharding, NamedSharding) and any(p is not None for p in sharding.spec):
            if sharding.mesh.explicit_axes:
                return sharding.mesh
    return None


def like(x: jax.Array, mesh: Any) -> NamedSharding:
    """``x``'s partition spec on ``mesh`` (replicated when ``x`` is not sharded)."""
    return NamedSharding(mesh, jax.typeof(x).sharding.spec)


def replicated(ndim: int, mesh: Any, batch: tuple = ()) -> NamedSharding:
    """Replicated on ``mesh``, except over the leading axes, which follow ``batch``."""
    return NamedSharding(mesh, PartitionSpec(*batch, *[None] * (ndim - len(batch))))


def call_auto(fn: Callable[..., Any], args: tuple, out_sharding: Callable[[Any], Any]) -> Any:
    """``fn(*args)``, on automatic axes where an argument is sharded over explicit ones.

    ``out_sharding(mesh)`` gives the results' shardings (a tree like the result's);
    it is called only on an explicit mesh. Not compiled here: ``fn`` is a new
    closure on every call, and a ``jit`` of it would compile and keep a new
    executable each time. The public functions that loop already run whole under
    one ``jit`` when called eagerly (`jaxparam.functional._eager`).
    """
    mesh = _explicit_mesh(args)
    if mesh is None:
        return fn(*args)
    auto = jax.sharding.auto_axes(fn, axes=mesh.explicit_axes, out_sharding=out_sharding(mesh))
    return auto(*args)
