"""torch.func through JAX parametrizations: per-sample gradients and ensembling.

Side by side in one process, torch's built-ins (``torch.nn.utils.parametrizations``)
against ``torch_compat.parametrizations`` on the same 3-layer MLP (``--width``,
float32, torch with ``--threads`` intra-op threads):

- ``per_sample``: torch's per-sample-gradients recipe,
  ``vmap(grad(loss), in_dims=(None, None, 0, 0))`` over a batch of ``--batch``
  examples (the JAX links see one batched cotangent: one compiled ``jax.vmap``
  of their VJP per layer);
- ``ensemble``: ``--members`` models stacked, ``vmap`` over their weights and
  buffers, forward without grad (each JAX chain runs as one ``jax.vmap``);
- ``ensemble_grad``: every member's gradient, ``grad`` of the summed loss of
  the vmapped ensemble;
- ``ensemble_vmap_grad``: the same gradients as ``vmap(grad(member_loss))``
  (the bridge runs each chain's forward twice there: once in torch's vmap
  rule, once with residuals for the grad level above it);
- ``jvp``: forward mode, ``torch.func.jvp`` of the batch's outputs along a
  direction in all the parameters (the bridge keeps each chain's
  linearization in its forward and runs one compiled linear map per layer).
  Torch's ``weight_norm`` has no forward-mode formula: that row times ours
  alone.

Spectral norm runs in eval mode (torch cannot vmap its training update).
Variants are interleaved round by round (``_timing.time_interleaved``); ratios
are medians of per-round ratios. Results go to ``bench_torch_func.json``.

Example:
    python benchmarks/bench_torch_func.py --width 256 --batch 32 --members 8
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrizations as torch_builtins
from _timing import round_ratio, time_interleaved, write_json
from torch.func import functional_call, grad, jvp, vmap

from torch_compat import parametrizations as compat_builtins

KINDS = ("weight_norm", "spectral_norm", "orthogonal")


def _mlp(P, kind: str, width: int, depth: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        lin = torch.nn.Linear(width, width)
        getattr(P, kind)(lin)
        layers += [lin, torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).eval()


def _state(model: torch.nn.Module):
    return (
        {k: v.detach() for k, v in model.named_parameters()},
        dict(model.named_buffers()),
    )


def _stacked(models: list[torch.nn.Module]):
    states = [_state(m) for m in models]
    params = {k: torch.stack([s[0][k] for s in states]) for k in states[0][0]}
    buffers = {k: torch.stack([s[1][k] for s in states]) for k in states[0][1]}
    return params, buffers


def _variants(P, kind: str, args, x, y) -> dict:
    model = _mlp(P, kind, args.width, args.depth, seed=0)
    params, buffers = _state(model)

    def loss(p, b, xx, yy):
        return F.mse_loss(functional_call(model, (p, b), (xx[None],)), yy[None])

    per_sample = vmap(grad(loss), in_dims=(None, None, 0, 0))
    members = [_mlp(P, kind, args.width, args.depth, seed=i) for i in range(args.members)]
    e_params, e_buffers = _stacked(members)

    def member_out(p, b):
        return functional_call(model, (p, b), (x,))

    ensemble = vmap(member_out)

    def ensemble_loss(p):
        return (ensemble(p, e_buffers) - y).pow(2).mean(dim=(1, 2)).sum()

    def member_loss(p, b):
        return (member_out(p, b) - y).pow(2).mean()

    member_grads = vmap(grad(member_loss))

    def ensemble_nograd():
        with torch.no_grad():
            return ensemble(e_params, e_buffers)

    gen = torch.Generator().manual_seed(2)
    tangents = {k: torch.randn(v.shape, generator=gen) for k, v in params.items()}

    def directional():
        return jvp(lambda p: functional_call(model, (p, buffers), (x,)), (params,), (tangents,))

    variants = {
        "per_sample": lambda: per_sample(params, buffers, x, y),
        "ensemble": ensemble_nograd,
        "ensemble_grad": lambda: grad(ensemble_loss)(e_params),
        "ensemble_vmap_grad": lambda: member_grads(e_params, e_buffers),
        "jvp": directional,
    }
    if P is torch_builtins and kind == "weight_norm":
        del variants["jvp"]  # NotImplementedError: torch has no forward-mode formula
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    x = torch.randn(args.batch, args.width)
    y = torch.randn(args.batch, args.width)
    results: dict = {"args": vars(args)}
    for kind in args.kinds.split(","):
        sides = {
            "torch": _variants(torch_builtins, kind, args, x, y),
            "compat": _variants(compat_builtins, kind, args, x, y),
        }
        fns = {f"{side}/{name}": fn for side, vs in sides.items() for name, fn in vs.items()}
        timings = time_interleaved(fns, repeat=args.repeat, number=args.number)
        row: dict = {"timings": timings}
        for name in sides["compat"]:
            if name not in sides["torch"]:
                print(
                    f"{kind:14s} {name:18s} torch      n/a      torch_compat "
                    f"{timings[f'compat/{name}']['median_s'] * 1e3:8.2f} ms"
                )
                continue
            ratio = round_ratio(timings, f"compat/{name}", f"torch/{name}")
            row[f"{name}_ratio"] = ratio
            print(
                f"{kind:14s} {name:18s} torch {timings[f'torch/{name}']['median_s'] * 1e3:8.2f} ms"
                f"   torch_compat {timings[f'compat/{name}']['median_s'] * 1e3:8.2f} ms"
                f"   ratio {ratio:5.2f}x"
            )
        results[kind] = row
    print("wrote", write_json("bench_torch_func", results))


if __name__ == "__main__":
    main()
