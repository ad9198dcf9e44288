"""Per-access overhead of a JAX parametrization through torch_compat vs torch-native.

Side by side in one process: ``module.weight`` with ``x.T + x`` (symmetric)
written in torch (``torch.nn.utils.parametrize``) and in JAX
(``torch_compat.parametrize``), forward only (under ``no_grad`` and with grad)
and forward+backward. The first access (compile) is reported apart; warm-up
iterations are excluded from the steady state. Results go to
``benchmarks/results/bench_bridge.json``.

A second part times training steps (forward, backward, SGD step) of a 3-layer
MLP (``--width`` 512, batch ``--batch`` 64, float32) with each built-in of
``torch_compat.parametrizations`` on every weight against
``torch.nn.utils.parametrizations``, interleaved run by run in one process
(the machine is shared: only ratios measured side by side mean something).

Example:
    python benchmarks/bench_bridge.py --size 8 --iters 2000 --repeats 5
    python benchmarks/bench_bridge.py --only-mlp --mlp-steps 50 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import torch
import torch.nn.utils.parametrizations as torch_builtins
import torch.nn.utils.parametrize as torch_P
from _timing import results_dir

import torch_compat.parametrize as compat_P
from torch_compat import parametrizations as compat_builtins

MLP_BUILTINS = {
    "weight_norm": ("weight_norm", {}),
    "spectral_norm": ("spectral_norm", {}),
    "orthogonal_matrix_exp": ("orthogonal", {"orthogonal_map": "matrix_exp"}),
    "orthogonal_cayley": ("orthogonal", {"orthogonal_map": "cayley"}),
    "orthogonal_householder": ("orthogonal", {"orthogonal_map": "householder"}),
}


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


def _mlp(P, builtin: str, width: int, depth: int):
    fn, kw = MLP_BUILTINS[builtin]
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        lin = torch.nn.Linear(width, width)
        getattr(P, fn)(lin, **kw)
        layers += [lin, torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1])


def bench_mlp(args) -> dict:
    """Training steps per built-in, torch vs torch_compat, interleaved repeats."""
    out: dict = {}
    torch.manual_seed(1)
    x = torch.randn(args.batch, args.width)
    target = torch.randn(args.batch, args.width)
    for builtin in args.builtins:
        models = {
            "torch": _mlp(torch_builtins, builtin, args.width, args.depth),
            "jax": _mlp(compat_builtins, builtin, args.width, args.depth),
        }
        steps = {}
        for name, model in models.items():
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.mse_loss(model(x), target)
                loss.backward()
                opt.step()

            t0 = time.perf_counter()
            step()  # first step: compiles the JAX chain (forward and VJP)
            first_ms = (time.perf_counter() - t0) * 1e3
            for _ in range(args.mlp_warmup):
                step()
            steps[name] = (step, first_ms)
        runs: dict = {"torch": [], "jax": []}
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            for name, (step, _) in steps.items():
                t0 = time.perf_counter()
                for _ in range(args.mlp_steps):
                    step()
                runs[name].append((time.perf_counter() - t0) / args.mlp_steps * 1e3)
        ratios = [j / t for j, t in zip(runs["jax"], runs["torch"], strict=True)]
        row = {
            name: {
                "median_ms": statistics.median(r),
                "min_ms": min(r),
                "runs_ms": r,
                "first_step_ms": steps[name][1],
            }
            for name, r in runs.items()
        }
        row["ratio_jax_over_torch_median"] = statistics.median(ratios)
        row["ratio_runs"] = ratios
        out[builtin] = row
        print(
            f"mlp {builtin:24s} torch {row['torch']['median_ms']:7.2f} ms   "
            f"torch_compat {row['jax']['median_ms']:7.2f} ms   "
            f"ratio {row['ratio_jax_over_torch_median']:5.2f}x "
            f"(runs {', '.join(f'{r:.2f}' for r in ratios)})"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8, help="weight is size x size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(results_dir(), "bench_bridge.json"))
    parser.add_argument("--width", type=int, default=512, help="MLP width")
    parser.add_argument("--depth", type=int, default=3, help="MLP layers")
    parser.add_argument("--batch", type=int, default=64, help="MLP batch size")
    parser.add_argument("--mlp-steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--mlp-warmup", type=int, default=5)
    parser.add_argument(
        "--builtins", nargs="+", default=list(MLP_BUILTINS), choices=list(MLP_BUILTINS)
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--only-mlp", action="store_true", help="skip the per-access part")
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP part")
    parser.add_argument(
        "--jax-sync-cpu",
        action="store_true",
        help="set jax_cpu_enable_async_dispatch=False (each bridge call blocks on its "
        "result anyway: the async hand-off to XLA's worker thread is pure overhead)",
    )
    parser.add_argument(
        "--malloc-top-pad",
        type=int,
        default=0,
        metavar="BYTES",
        help="glibc mallopt(M_TOP_PAD, BYTES) at start (what MALLOC_TOP_PAD_ does): XLA "
        "allocates its outputs in its worker threads' malloc arenas, which glibc trims "
        "back to the OS on every free, so each step page-faults its buffers again",
    )
    args = parser.parse_args()
    if args.malloc_top_pad:
        import ctypes

        m_top_pad = -2  # <malloc.h>
        if not ctypes.CDLL("libc.so.6").mallopt(m_top_pad, args.malloc_top_pad):
            raise SystemExit("mallopt(M_TOP_PAD) failed")
    if args.jax_sync_cpu:  # must precede the CPU client's creation
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    torch.set_num_threads(args.threads)
    print(f"torch.get_num_threads() = {torch.get_num_threads()}, cpu count = {os.cpu_count()}")
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
    if not args.only_mlp:
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
    if not args.no_mlp:
        results["mlp"] = bench_mlp(args)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
