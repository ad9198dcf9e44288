"""Cost of the parametrize mechanism, side by side in one run.

On a 3-layer MLP (``--width`` 512, ``--batch`` 64, float32) whose three kernels
carry a custom weight-norm-style or spectral-norm-style parametrization:

- a full training step (forward, backward, optax Adam update) of the jaxparam
  NNX model under ``nnx.jit`` (and under ``nnx.cached_partial``, which skips
  flax's per-call graph traversal), against
- the same math hand-written as one ``jax.jit`` function over a params pytree
  (the "no abstraction" floor), and
- the same step in torch eager with ``torch.nn.utils.parametrize``;
- eager access of ``module.kernel`` outside jit, against calling the same chain
  as a plain jitted function.

Ratios are printed and written, with the raw timings, to
``benchmarks/results/bench_mechanism.json``.

Usage: ``python benchmarks/bench_mechanism.py [--width 512] [--batch 64] [--repeat 7]``
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _timing import nnx_mse_steps, pytree_mse_step, round_ratio, time_interleaved, write_json
from flax import nnx
from torch.nn.utils import parametrize as torch_parametrize

import jaxparam.parametrize as P

# ---------------------------------------------------------------------------
# The math, once in JAX (flax layout: kernels are (in, out), norms over axis 0)
# ---------------------------------------------------------------------------


def wn(g, v):
    return g * v / jnp.linalg.norm(v, axis=0, keepdims=True)


def sn(w, u, training: bool):
    # one power iteration on w^T (out, in) as torch's spectral norm does
    wt = w.T
    if training:
        v = wt.T @ u
        v = v / jnp.maximum(jnp.linalg.norm(v), 1e-12)
        u = wt @ v
        u = u / jnp.maximum(jnp.linalg.norm(u), 1e-12)
    u = jax.lax.stop_gradient(u)
    v = jax.lax.stop_gradient(wt.T @ u)
    v = v / jnp.maximum(jnp.linalg.norm(v), 1e-12)
    sigma = u @ wt @ v
    return w / sigma, u


class WeightNormJ(nnx.Module):
    def __call__(self, g, v):
        return wn(g, v)

    def right_inverse(self, w):
        return jnp.linalg.norm(w, axis=0, keepdims=True), w


class PowerIterate(nnx.Variable):
    """Power-iteration state: not a Param, so optimizers leave it alone."""


class SpectralNormJ(nnx.Module):
    def __init__(self, out_features: int, key):
        u = jax.random.normal(key, (out_features,))
        self.u = PowerIterate(u / jnp.linalg.norm(u))
        self.deterministic = False

    def __call__(self, w):
        out, u = sn(w, self.u[...], training=not self.deterministic)
        self.u[...] = u
        return out


def build_nnx(kind: str, width: int, seed: int):
    rngs = nnx.Rngs(seed)
    model = nnx.Sequential(
        nnx.Linear(width, width, rngs=rngs),
        jax.nn.relu,
        nnx.Linear(width, width, rngs=rngs),
        jax.nn.relu,
        nnx.Linear(width, width, rngs=rngs),
    )
    keys = jax.random.split(jax.random.key(seed + 1), 3)
    for layer, key in zip(model.layers[::2], keys, strict=True):
        link = WeightNormJ() if kind == "weight_norm" else SpectralNormJ(width, key)
        P.register_parametrization(layer, "kernel", link)
    return model


def floor_params(model, kind: str):
    """The same numbers as a plain pytree, for the hand-written floor."""
    params, state = [], []
    for layer in model.layers[::2]:
        plist = layer.parametrizations.kernel
        if kind == "weight_norm":
            params.append(
                {"g": plist.original0[...], "v": plist.original1[...], "b": layer.bias[...]}
            )
        else:
            params.append({"w": plist.original[...], "b": layer.bias[...]})
            state.append(plist[0].u[...])
    return params, state


def floor_forward(kind: str):
    def forward(params, state, x):
        new_state = []
        for i, p in enumerate(params):
            if kind == "weight_norm":
                k = wn(p["g"], p["v"])
            else:
                k, u = sn(p["w"], state[i], training=True)
                new_state.append(u)
            x = x @ k + p["b"]
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x, new_state

    return forward


# ---------------------------------------------------------------------------
# torch eager with torch.nn.utils.parametrize (torch layout: (out, in))
# ---------------------------------------------------------------------------


class WeightNormT(torch.nn.Module):
    def forward(self, g, v):
        return g * v / v.norm(dim=1, keepdim=True)

    def right_inverse(self, w):
        return w.norm(dim=1, keepdim=True), w


class SpectralNormT(torch.nn.Module):
    def __init__(self, u):
        super().__init__()
        self.register_buffer("_u", u)

    def forward(self, w):
        if self.training:
            with torch.no_grad():
                v = torch.nn.functional.normalize(w.T @ self._u, dim=0, eps=1e-12)
                self._u.copy_(torch.nn.functional.normalize(w @ v, dim=0, eps=1e-12))
        u = self._u.clone()
        v = torch.nn.functional.normalize(w.T @ u, dim=0, eps=1e-12).detach()
        return w / (u @ w @ v)


def build_torch(model_nnx, kind: str):
    layers = []
    for layer in model_nnx.layers[::2]:
        plist = layer.parametrizations.kernel
        lin = torch.nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            lin.bias.copy_(torch.from_numpy(np.array(layer.bias[...])))
            lin.weight.copy_(torch.from_numpy(np.asarray(layer.kernel[...]).T.copy()))
        if kind == "weight_norm":
            torch_parametrize.register_parametrization(lin, "weight", WeightNormT())
        else:
            u = torch.from_numpy(np.asarray(plist[0].u[...]).copy())
            torch_parametrize.register_parametrization(lin, "weight", SpectralNormT(u))
        layers.append(lin)
    return torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])


# ---------------------------------------------------------------------------


def run(kind: str, args) -> dict:
    key = jax.random.key(args.seed)
    x = jax.random.normal(key, (args.batch, args.width))
    y = jax.random.normal(jax.random.fold_in(key, 1), (args.batch, args.width))

    model = build_nnx(kind, args.width, args.seed)
    model_t = build_torch(model, kind)
    params, state = floor_params(model, kind)
    tx = optax.adam(1e-4)

    nnx_steps = nnx_mse_steps(model, tx)
    nnx_step, cached_step = nnx_steps.jit, nnx_steps.cached
    floor_call = pytree_mse_step(floor_forward(kind), params, state, tx)

    opt_t = torch.optim.Adam(model_t.parameters(), lr=1e-4)
    xt = torch.from_numpy(np.array(x))
    yt = torch.from_numpy(np.array(y))

    def torch_call():
        opt_t.zero_grad(set_to_none=True)
        loss = ((model_t(xt) - yt) ** 2).mean()
        loss.backward()
        opt_t.step()
        return loss.detach()

    r, n = args.repeat, args.number
    steps = {
        "nnx_jit_step": lambda: nnx_step(x, y),
        "nnx_cached_partial_step": lambda: cached_step(x, y),
        "floor_jax_jit_step": lambda: floor_call(x, y),
        "torch_eager_step": torch_call,
    }
    timings = time_interleaved(steps, repeat=r, number=n)

    # eager access of one parametrized kernel vs the chain as a plain jitted function
    layer = model.layers[0]
    plist = layer.parametrizations.kernel
    if kind == "weight_norm":
        chain = jax.jit(wn)
        g, v = plist.original0[...], plist.original1[...]
        direct = lambda: chain(g, v)  # noqa: E731
    else:
        chain = jax.jit(lambda w, u: sn(w, u, training=True))
        w, u = plist.original[...], plist[0].u[...]
        direct = lambda: chain(w, u)  # noqa: E731
    reads = {"eager_access": lambda: layer.kernel[...], "direct_jitted_chain": direct}
    timings.update(time_interleaved(reads, repeat=r, number=n * 5))

    ratios = {
        f"{a} / {b}": round_ratio(timings, f"{a}_step", f"{b}_step")
        for a, b in (
            ("nnx_jit", "floor_jax_jit"),
            ("nnx_cached_partial", "floor_jax_jit"),
            ("nnx_jit", "torch_eager"),
            ("nnx_cached_partial", "torch_eager"),
        )
    }
    ratios["eager_access / direct_jitted_chain"] = round_ratio(
        timings, "eager_access", "direct_jitted_chain"
    )
    return {"timings": timings, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--number", type=int, default=20, help="calls per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="weight_norm,spectral_norm")
    args = parser.parse_args()

    results = {"args": vars(args), "torch_threads": torch.get_num_threads()}
    for kind in args.kinds.split(","):
        res = run(kind, args)
        results[kind] = res
        print(f"== {kind} (width {args.width}, batch {args.batch}, float32)")
        for name, tm in res["timings"].items():
            print(
                f"  {name:<26} {tm['median_s'] * 1e6:10.1f} us"
                f"   (first call {tm['first_call_s'] * 1e3:8.1f} ms)"
            )
        for name, ratio in res["ratios"].items():
            print(f"  {name:<36} {ratio:6.3f}x")
    path = write_json("bench_mechanism", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
