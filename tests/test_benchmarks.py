"""The benchmark scripts still run: each one, on tiny sizes, end to end.

Performance is measured in `benchmarks/`, never in tests; this only keeps the
scripts from rotting (a renamed helper, a changed API) between the runs that
produce the figures in docs/performance.md. Each script runs in a subprocess, as a
user runs it, with its JSON written to a temporary folder; every number in it
must be finite, and what it reports (ratios, or times) positive. The scripts run
in the background while the rest of the suite runs (``BACKGROUND_JOBS``, see
tests/conftest.py); these tests run last and read what they wrote.
"""

import json
import math
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

TINY = {
    "bench_builtins": [
        "--kinds",
        "weight_norm,spectral_norm,orthogonal,orthogonal_cayley,orthogonal_householder",
        *("--width", "16", "--orth-width", "8", "--batch", "4", "--repeat", "1", "--number", "1"),
    ],
    "bench_mechanism": ["--width", "16", "--batch", "4", "--repeat", "1", "--number", "1"],
    "bench_nnx_overhead": ["--width", "16", "--batch", "4", "--repeat", "1", "--number", "1"],
    "bench_functional": ["--sizes", "8", "--norm-size", "8", "--warmup", "1", "--repeats", "1"],
    "bench_torch_func": [
        *("--width", "8", "--batch", "3", "--members", "2", "--repeat", "1", "--number", "1"),
    ],
    "bench_bridge": [
        *("--size", "4", "--iters", "2", "--warmup", "1", "--repeats", "1", "--width", "16"),
        *("--batch", "4", "--mlp-steps", "1", "--mlp-warmup", "1"),
    ],
}

BACKGROUND_JOBS = (
    {
        script: {"argv": [sys.executable, str(BENCH / f"{script}.py"), *args]}
        for script, args in TINY.items()
    }
    if BENCH.is_dir()
    else {}
)


def _numbers(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, (*path, str(i)))
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield path, node


@pytest.mark.skipif(not BENCH.is_dir(), reason="benchmarks/ is not in this checkout")
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_script_runs(script, background):
    proc, results = background(script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = list(pathlib.Path(results).glob("*.json"))
    assert [p.name for p in written] == [f"{script}.json"]
    numbers = list(_numbers(json.loads(written[0].read_text())))
    for path, value in numbers:
        assert math.isfinite(value), (path, value)
    # What each script reports: ratios, or (bench_nnx_overhead) per-call times.
    key = "median_s" if script == "bench_nnx_overhead" else "ratio"
    reported = [(path, v) for path, v in numbers if any(key in part for part in path[-2:])]
    assert reported, f"no {key} in the results"
    for path, value in reported:
        assert value > 0, (path, value)
