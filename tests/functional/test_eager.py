"""Eager calls of the functional core compile once per signature.

Their loops (the power method, matrix_exp's squarings, the orthogonal maps'
eliminations) are ``lax.fori_loop``s over closures; outside a trace JAX compiled
such a loop anew on every call and kept every compilation (spectral norm's
registration: ~380 ms and ~3.7 MiB each time).
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxparam import functional as F
from jaxparam.parametrizations import orthogonal, spectral_norm


@contextlib.contextmanager
def count_compiles():
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


W = jax.random.normal(jax.random.key(0), (6, 5))
STATE = F.spectral_norm_init(W, jax.random.key(1))
SKEW = jnp.triu(jax.random.normal(jax.random.key(2), (5, 5)), 1)
CALLS = {
    "spectral_norm_init": lambda: F.spectral_norm_init(W, jax.random.key(1)),
    "spectral_norm": lambda: F.spectral_norm(W, STATE, n_power_iterations=2),
    "matrix_exp": lambda: F.matrix_exp(SKEW - SKEW.T),
    "orthogonal": lambda: F.orthogonal(W, orthogonal_map="householder", use_trivialization=False),
    "right_inverse": lambda: F.orthogonal_right_inverse(
        W, orthogonal_map="matrix_exp", key=jax.random.key(3)
    ),
    "register_spectral_norm": lambda: spectral_norm(nnx.Linear(5, 6, rngs=nnx.Rngs(0))),
    "register_orthogonal": lambda: orthogonal(nnx.Linear(5, 6, rngs=nnx.Rngs(0))),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_eager_calls_compile_once(call):
    first = CALLS[call]()
    with count_compiles() as compiles:
        again = CALLS[call]()
    assert compiles == []
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
        if isinstance(a, jax.Array):
            assert jnp.array_equal(a, b)


def test_inside_a_trace_the_function_runs_as_written():
    # Under jit the decorated function is traced inline: one computation, and
    # evaluation-mode spectral norm hands its state back as the same arrays.
    jaxpr = jax.make_jaxpr(lambda w: F.spectral_norm(w, STATE, training=True)[0])(W)
    assert not any(e.primitive.name == "pjit" for e in jaxpr.eqns)
    _, state = F.spectral_norm(W, STATE, training=False)
    assert state.u is STATE.u and state.v is STATE.v
