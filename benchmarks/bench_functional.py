"""Benchmark of `jaxparam.functional` against torch eager, side by side in one process.

For each orthogonal map (``matrix_exp``, ``cayley``, ``householder``) and each size
``n``: forward and forward+backward on one square float32 ``(n, n)`` weight, jitted
JAX vs torch eager running torch's `_Orthogonal` (the math of
``torch.nn.utils.parametrizations.orthogonal``, ``use_trivialization=False``).
Weight norm and spectral norm: forward+backward on one ``(m, m)`` weight.

Compile time (first call, jitted) and steady state (median over ``--repeats``
after ``--warmup`` calls; ``block_until_ready`` before stopping the clock) are
reported apart. The printed times are the best of ``--repeats`` (the JSON also
has medians). Ratios are JAX time / torch
time (below 1 means JAX is faster).

Example:
    python benchmarks/bench_functional.py --sizes 64 128 256 512 1024
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _timing import results_dir
from torch.nn.utils.parametrizations import _OrthMaps, _Orthogonal, _SpectralNorm, _WeightNorm

from jaxparam.functional import orthogonal, spectral_norm, spectral_norm_init, weight_norm

MAPS = ("matrix_exp", "cayley", "householder")


def _time_pair(jax_fn, torch_fn, warmup: int, repeats: int) -> dict[str, float]:
    """Steady-state times in ms, the two frameworks alternating call by call.

    Each timed call is preceded by an untimed call of the same framework: torch's
    OpenMP threads and XLA's thread pool spin-wait after a call and would slow the
    other's first call down. Alternating keeps a change in the machine's load (it is
    shared) from favouring one side. ``*_ms`` is the best of ``repeats`` (robust to
    other processes on the machine), ``*_median_ms`` the median.
    """
    times = {"jax": [], "torch": []}
    for fn in (jax_fn, torch_fn):
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for name, fn in (("jax", jax_fn), ("torch", torch_fn)):
            fn()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        "jax_ms": float(np.min(times["jax"])),
        "jax_median_ms": float(np.median(times["jax"])),
        "torch_ms": float(np.min(times["torch"])),
        "torch_median_ms": float(np.median(times["torch"])),
    }


def _compare(jax_f, jax_args, torch_fn, warmup, repeats, prefix):
    """Compiles ``jax_f`` (timed apart), then times it against ``torch_fn``."""
    f = jax.jit(jax_f)
    t0 = time.perf_counter()
    jax.block_until_ready(f(*jax_args))
    compile_ms = (time.perf_counter() - t0) * 1e3
    r = _time_pair(lambda: jax.block_until_ready(f(*jax_args)), torch_fn, warmup, repeats)
    out = {f"jax_{prefix}_compile_ms": compile_ms}
    out.update({k.replace("_", f"_{prefix}_", 1): v for k, v in r.items()})
    out[f"ratio_{prefix}"] = r["jax_ms"] / r["torch_ms"]
    out[f"ratio_{prefix}_median"] = r["jax_median_ms"] / r["torch_median_ms"]
    return out


def _loss_grad(f):
    """Forward+backward as a training step does: grad of sum(f(x) * ct)."""

    def loss(x, ct):
        return jnp.sum(f(x) * ct)

    return jax.grad(loss)


def bench_orthogonal(n, orthogonal_map, warmup, repeats, rng):
    x_np = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    ct_np = rng.standard_normal((n, n)).astype(np.float32)
    x, ct = jnp.asarray(x_np), jnp.asarray(ct_np)
    f = functools.partial(orthogonal, orthogonal_map=orthogonal_map, use_trivialization=False)
    tx = torch.from_numpy(x_np)
    tct = torch.from_numpy(ct_np)
    mod = _Orthogonal(tx, getattr(_OrthMaps, orthogonal_map), use_trivialization=False)

    def torch_fwd():
        with torch.no_grad():
            mod(tx)

    txg = tx.clone().requires_grad_(True)

    def torch_step():
        txg.grad = None
        (mod(txg) * tct).sum().backward()

    out = _compare(f, (x,), torch_fwd, warmup, repeats, "fwd")
    out.update(_compare(_loss_grad(f), (x, ct), torch_step, warmup, repeats, "fwdbwd"))
    return out


def bench_weight_norm(m, warmup, repeats, rng):
    v_np = rng.standard_normal((m, m)).astype(np.float32)
    g_np = np.linalg.norm(v_np, axis=1, keepdims=True).astype(np.float32)
    ct_np = rng.standard_normal((m, m)).astype(np.float32)

    def loss(g, v, ct):
        return jnp.sum(weight_norm(g, v, 0) * ct)

    args = (jnp.asarray(g_np), jnp.asarray(v_np), jnp.asarray(ct_np))
    mod = _WeightNorm(0)
    tg = torch.from_numpy(g_np).requires_grad_(True)
    tv = torch.from_numpy(v_np).requires_grad_(True)
    tct = torch.from_numpy(ct_np)

    def torch_step():
        tg.grad = tv.grad = None
        (mod(tg, tv) * tct).sum().backward()

    return _compare(jax.grad(loss, argnums=(0, 1)), args, torch_step, warmup, repeats, "fwdbwd")


def bench_spectral_norm(m, warmup, repeats, rng):
    w_np = rng.standard_normal((m, m)).astype(np.float32)
    ct_np = rng.standard_normal((m, m)).astype(np.float32)
    w, ct = jnp.asarray(w_np), jnp.asarray(ct_np)
    state = spectral_norm_init(w, jax.random.key(0))

    def step(w, state, ct):
        def loss(w):
            out, new_state = spectral_norm(w, state, training=True)
            return jnp.sum(out * ct), new_state

        return jax.grad(loss, has_aux=True)(w)

    mod = _SpectralNorm(torch.from_numpy(w_np))
    tw = torch.from_numpy(w_np).requires_grad_(True)
    tct = torch.from_numpy(ct_np)

    def torch_step():
        tw.grad = None
        (mod(tw) * tct).sum().backward()

    return _compare(step, (w, state, ct), torch_step, warmup, repeats, "fwdbwd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--maps", nargs="+", default=list(MAPS), choices=MAPS)
    parser.add_argument("--norm-size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(results_dir()) / "bench_functional.json")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    results = {
        "meta": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "jax_backend": jax.default_backend(),
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": platform.processor(),
            "args": {k: str(v) for k, v in vars(args).items()},
        },
        "orthogonal": [],
    }
    header = f"{'map':<12}{'n':>6}  {'fwd jax/torch ms':>20}{'ratio':>7}  "
    header += f"{'fwd+bwd jax/torch ms':>22}{'ratio':>7}  {'compile ms':>12}"
    print(header)
    for orthogonal_map in args.maps:
        for n in args.sizes:
            r = bench_orthogonal(n, orthogonal_map, args.warmup, args.repeats, rng)
            results["orthogonal"].append({"map": orthogonal_map, "n": n, **r})
            print(
                f"{orthogonal_map:<12}{n:>6}  "
                f"{r['jax_fwd_ms']:>9.3f}/{r['torch_fwd_ms']:<10.3f}{r['ratio_fwd']:>7.2f}  "
                f"{r['jax_fwdbwd_ms']:>10.3f}/{r['torch_fwdbwd_ms']:<11.3f}"
                f"{r['ratio_fwdbwd']:>7.2f}  {r['jax_fwdbwd_compile_ms']:>12.1f}",
                flush=True,
            )
    m = args.norm_size
    for name, fn in (("weight_norm", bench_weight_norm), ("spectral_norm", bench_spectral_norm)):
        r = fn(m, args.warmup, args.repeats, rng)
        results[name] = {"m": m, **r}
        print(
            f"{name:<14}{m:>4}  fwd+bwd {r['jax_fwdbwd_ms']:.3f}/{r['torch_fwdbwd_ms']:.3f} ms"
            f"  ratio {r['ratio_fwdbwd']:.2f}  compile {r['jax_fwdbwd_compile_ms']:.1f} ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
