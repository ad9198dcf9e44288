"""Shared timing helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

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


def write_json(name: str, payload: dict[str, Any], out_dir: str | None = None) -> str:
    """Write ``payload`` with machine information to ``benchmarks/results/<name>.json``."""
    out_dir = out_dir or os.path.join(os.path.dirname(__file__), "results")
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
