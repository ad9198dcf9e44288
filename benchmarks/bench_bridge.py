"""Per-access overhead of a JAX parametrization through torch_compat vs torch-native.

Side by side in one process: ``module.weight`` with ``x.T + x`` (symmetric)
written in torch (``torch.nn.utils.parametrize``) and in JAX
(``torch_compat.parametrize``), forward only (under ``no_grad`` and with grad)
and forward+backward. The first access (compile) is reported apart; warm-up
iterations are excluded from the steady state. Results go to
``benchmarks/results/bench_bridge.json``.

Example:
    python benchmarks/bench_bridge.py --size 8 --iters 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import torch
import torch.nn.utils.parametrize as torch_P

import torch_compat.parametrize as compat_P


class TorchSymmetric(torch.nn.Module):
    def forward(self, x):
        return x.T + x


def jax_symmetric(x):
    return x.T + x


def _module(P, link, size, dtype):
    torch.manual_seed(0)
    m = torch.nn.Linear(size, size).to(dtype)
    P.register_parametrization(m, "weight", link)
    return m


def _time(fn, iters, warmup, repeats):
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - t0) / iters * 1e6)
    return {"median_us": statistics.median(runs), "min_us": min(runs), "runs_us": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8, help="weight is size x size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/bench_bridge.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)

    results: dict = {
        "config": vars(args),
        "env": {
            "torch": torch.__version__,
            "jax": jax.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "jax_device": str(jax.devices()[0]),
        },
        "cases": {},
    }
    modules = {
        "torch": _module(torch_P, TorchSymmetric(), args.size, dtype),
        "jax": _module(compat_P, jax_symmetric, args.size, dtype),
    }

    # Compile: the first access of a fresh function (new jit cache entry).
    def fresh(x):
        return x.T + x

    t0 = time.perf_counter()
    m_first = _module(compat_P, fresh, args.size, dtype)  # registration = 1st access
    results["compile_first_access_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    m_first.weight.sum().backward()  # first access with grad: the vjp variant compiles
    results["compile_first_grad_access_ms"] = (time.perf_counter() - t0) * 1e3

    def fwd_nograd(m):
        def f():
            with torch.no_grad():
                return m.weight

        return f

    def fwd_grad(m):
        return lambda: m.weight

    def fwd_bwd(m):
        def f():
            m.weight.sum().backward()

        return f

    for case, make in (
        ("forward_nograd", fwd_nograd),
        ("forward", fwd_grad),
        ("forward_backward", fwd_bwd),
    ):
        row = {}
        for name, m in modules.items():
            row[name] = _time(make(m), args.iters, args.warmup, args.repeats)
        row["ratio_jax_over_torch"] = row["jax"]["median_us"] / row["torch"]["median_us"]
        results["cases"][case] = row
        print(
            f"{case:18s} torch {row['torch']['median_us']:8.1f} us   "
            f"torch_compat(JAX) {row['jax']['median_us']:8.1f} us   "
            f"ratio {row['ratio_jax_over_torch']:5.2f}x"
        )
    print(
        f"compile: first access {results['compile_first_access_ms']:.1f} ms, "
        f"first grad access {results['compile_first_grad_access_ms']:.1f} ms"
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
