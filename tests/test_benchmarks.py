"""The benchmark scripts still run: each one, on tiny sizes, end to end.

Performance is measured in `benchmarks/`, never in tests; this only keeps the
scripts from rotting (a renamed helper, a changed API) between the runs that
produce the figures in docs/performance.md. Each script runs in a subprocess, as a
user runs it, with its JSON written to a temporary folder; every number in it
must be finite, and what it reports (ratios, or times) positive.
"""

import json
import math
import os
import pathlib
import subprocess
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
def test_benchmark_script_runs(script, tmp_path):
    env = {**os.environ, "JAXPARAM_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), *TINY[script]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = list(tmp_path.glob("*.json"))
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
