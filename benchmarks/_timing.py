"""Shared timing helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax


def block(x: Any) -> Any:
    """Wait for every JAX array (and torch is synchronous on CPU) in ``x``."""
    return jax.block_until_ready(x)


def time_call(fn: Callable[[], Any], *, repeat: int, number: int) -> dict[str, float]:
    """Compile/first-call time and steady-state per-call time of ``fn`` (seconds).

    The first call (tracing and compilation for jitted code) is timed apart and
    excluded from the steady state; each of ``repeat`` rounds times ``number``
    calls, blocking on the result at the end of the round. The median round is
    reported, the minimum too.
    """
    start = time.perf_counter()
    block(fn())
    first = time.perf_counter() - start
    block(fn())  # one more warm-up call
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            out = fn()
        block(out)
        rounds.append((time.perf_counter() - start) / number)
    return {"first_call_s": first, "median_s": statistics.median(rounds), "min_s": min(rounds)}


def time_interleaved(
    fns: dict[str, Callable[[], Any]], *, repeat: int, number: int
) -> dict[str, dict[str, float]]:
    """`time_call` for several variants, their rounds interleaved.

    Round ``r`` of every variant runs before round ``r + 1`` of any, so a change in
    the machine's load (this machine is shared) hits all variants alike. The order
    rotates from round to round, so that no variant always runs right after the
    same other one and pays for what it left behind (spinning worker threads of
    torch or OpenBLAS, evicted caches). Each entry also has ``rounds_s``, so
    callers can take ratios round by round.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        block(fn())
        out[name] = {"first_call_s": time.perf_counter() - start, "rounds_s": []}
        block(fn())
    names = list(fns)
    for r in range(repeat):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(number):
                res = fn()
            block(res)
            out[name]["rounds_s"].append((time.perf_counter() - start) / number)
    for entry in out.values():
        entry["median_s"] = statistics.median(entry["rounds_s"])
        entry["min_s"] = min(entry["rounds_s"])
    return out


def round_ratio(timings: dict[str, dict[str, Any]], num: str, den: str) -> float:
    """Median over rounds of ``num``'s time / ``den``'s time in the same round."""
    pairs = zip(timings[num]["rounds_s"], timings[den]["rounds_s"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def results_dir() -> str:
    """Where results go: ``$JAXPARAM_BENCH_RESULTS``, else ``benchmarks/results``."""
    return os.environ.get("JAXPARAM_BENCH_RESULTS") or os.path.join(
        os.path.dirname(__file__), "results"
    )


def write_json(name: str, payload: dict[str, Any], out_dir: str | None = None) -> str:
    """Write ``payload`` with machine information to ``<results_dir()>/<name>.json``."""
    out_dir = out_dir or results_dir()
    os.makedirs(out_dir, exist_ok=True)
    payload = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
        },
        **payload,
    }
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


# -- training steps shared by the benchmarks (mean squared error, one optimizer step) --


class NNXSteps(NamedTuple):
    """One training step through three flax transforms, each on its own copy of the model."""

    jit: Callable  #: ``nnx.jit`` (graph mode, flax's default): per-call graph traversal
    cached: Callable  #: the same step under ``nnx.cached_partial``: traverses once
    tree: Callable  #: ``nnx.jit(graph=False)``: flax's tree mode, modules as pytrees
    optimizer: Any  #: the optimizer of ``jit``'s model (the ``model`` passed in)


def nnx_mse_steps(model: Any, tx: Any) -> NNXSteps:
    """Training steps of ``model`` (MSE loss) taking ``(x, y)``; see `NNXSteps`.

    ``jit`` trains ``model`` itself; ``cached`` and ``tree`` train ``nnx.clone``
    copies of it, made before any step. Interleaved, every variant has then done
    as many steps from the same start as any other: a parametrization whose cost
    depends on the weights (``matrix_exp`` squares as many times as the weight's
    norm asks) is timed at the same point of training in each. With one shared
    model, the three would train it three times faster than a variant with its
    own weights, and pay for larger norms.
    """
    import jax.numpy as jnp
    from flax import nnx

    def train(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    copies = [model, nnx.clone(model), nnx.clone(model)]
    jit_opt, cached_opt, tree_opt = (nnx.Optimizer(m, tx, wrt=nnx.Param) for m in copies)
    step = nnx.jit(train)
    tree = nnx.jit(train, graph=False)
    cached = nnx.cached_partial(step, copies[1], cached_opt)
    return NNXSteps(
        jit=lambda x, y: step(copies[0], jit_opt, x, y),
        cached=cached,
        tree=lambda x, y: tree(copies[2], tree_opt, x, y),
        optimizer=jit_opt,
    )


def nnx_functional_mse_step(model: Any, tx: Any) -> Callable:
    """The same step in flax's functional style: ``nnx.split`` once, one ``jax.jit``.

    The model is merged inside the jitted step and its non-``Param`` state (such
    as spectral norm's power-iteration vectors) is carried from call to call;
    optax updates the ``Param`` state directly. No per-call graph traversal, so
    this isolates what the model itself costs inside XLA. Returns a callable of
    ``(x, y)`` returning the loss; ``model`` is left untouched.
    """
    import jax.numpy as jnp
    import optax
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def step(params, opt_state, rest, x, y):
        m = nnx.merge(graphdef, params, rest)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(m)
        rest = nnx.split(m, nnx.Param, ...)[2]
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, rest, loss

    return carry_step(step, params, tx.init(params), rest)


def pytree_mse_step(forward: Callable, params: Any, state: Any, tx: Any) -> Callable:
    """The hand-written floor: one ``jax.jit`` step over a params pytree.

    ``forward(params, state, x) -> (out, new_state)``; the returned callable takes
    ``(x, y)``, carries params, optimizer state and ``state`` from call to call,
    and returns the loss.
    """
    import jax.numpy as jnp
    import optax

    @jax.jit
    def step(params, opt_state, state, x, y):
        def loss_fn(params):
            out, new_state = forward(params, state, x)
            return jnp.mean((out - y) ** 2), new_state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, state, loss

    return carry_step(step, params, tx.init(params), state)


def carry_step(step: Callable, params: Any, opt_state: Any, state: Any) -> Callable:
    """``(x, y) -> loss`` that carries ``step``'s params, optimizer state and state."""
    box = [params, opt_state, state]

    def call(x, y):
        *box[:], loss = step(*box, x, y)  # the new (params, opt_state, state), then the loss
        return loss

    return call
