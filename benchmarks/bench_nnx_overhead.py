"""What ``nnx.jit`` adds per call on parametrized models, against ``nnx.cached_partial``.

``nnx.jit`` traverses the model and optimizer graphs on every call;
``nnx.cached_partial`` does it once. On the training step of the 3-layer MLP of
``bench_builtins.py``, plain and with each built-in, this times both steps, and,
apart, the traversal itself (``nnx.split`` of model and optimizer: pure Python,
free of XLA's timing noise), which shows what the parametrization's extra graph
nodes (the ``parametrizations`` dict, the list, the link) add to it.

Usage: ``python benchmarks/bench_nnx_overhead.py [--width 512] [--repeat 7]``
"""

from __future__ import annotations

import argparse

import jax
from _timing import nnx_mse_steps, time_call, write_json
from bench_builtins import mlp, parametrize_nnx, tx
from flax import nnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=20)
    parser.add_argument("--kinds", default="plain,weight_norm,spectral_norm")
    args = parser.parse_args()

    x = jax.random.normal(jax.random.key(0), (args.batch, args.width))
    results = {"args": vars(args)}
    for kind in args.kinds.split(","):
        model = mlp(args.width, 0)
        if kind != "plain":
            parametrize_nnx(model, kind)
        steps = nnx_mse_steps(model, tx())
        jit_step, cached_step, optimizer = steps.jit, steps.cached, steps.optimizer
        split = time_call(
            lambda m=model, o=optimizer: nnx.split((m, o)), repeat=args.repeat, number=args.number
        )
        jitted = time_call(lambda f=jit_step: f(x, x), repeat=args.repeat, number=args.number)
        cached = time_call(lambda f=cached_step: f(x, x), repeat=args.repeat, number=args.number)
        overhead = jitted["median_s"] - cached["median_s"]
        results[kind] = {
            "nnx_jit": jitted,
            "cached_partial": cached,
            "difference_s": overhead,
            "split_model_and_optimizer": split,
        }
        print(
            f"{kind:<14} nnx.jit {jitted['median_s'] * 1e6:8.0f} us   cached_partial "
            f"{cached['median_s'] * 1e6:8.0f} us   difference {overhead * 1e6:6.0f} us   "
            f"nnx.split(model, optimizer) {split['median_s'] * 1e6:6.0f} us"
        )
    print(f"wrote {write_json('bench_nnx_overhead', results)}")


if __name__ == "__main__":
    main()
