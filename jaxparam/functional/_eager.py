"""Eager calls of the functional core, compiled once per signature.

The power method and the orthogonal maps loop with ``lax.fori_loop`` over bodies
that close over their arrays. Called outside a trace, JAX compiles such a loop
anew on every call (its cache keys on the body, a new closure each time) and
keeps every compilation: 20-200 ms and 1.4-3.7 MiB per call of `spectral_norm`,
`spectral_norm_init` (registration) or `matrix_exp`. So an eager call (no
argument a tracer) runs the whole function under one ``jax.jit``, cached on the
shapes, dtypes and static arguments; inside a trace (``jit``, ``grad``,
``vmap``) the function runs as written and adds nothing to the computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax

F = TypeVar("F", bound=Callable[..., Any])


def jit_when_eager(
    *static_argnames: str, loops: Callable[[dict[str, Any]], bool] = lambda kwargs: True
) -> Callable[[F], F]:
    """Decorates a functional-core function; ``static_argnames``: its Python
    (hashable) arguments, passed by keyword. ``loops(kwargs)``: whether a call
    with these keyword arguments loops at all (spectral norm in evaluation mode
    does not, and returns its state as the very arrays it was given)."""

    def wrap(fn: F) -> F:
        jitted = jax.jit(fn, static_argnames=static_argnames)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            leaves = jax.tree.leaves(
                (args, {k: v for k, v in kwargs.items() if k not in static_argnames})
            )
            if any(isinstance(x, jax.core.Tracer) for x in leaves) or not loops(kwargs):
                return fn(*args, **kwargs)
            return jitted(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap
