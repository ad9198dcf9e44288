"""Training steps with each built-in parametrization, side by side in one run.

A 3-layer MLP (``--width`` 512 for the norms, ``--orth-width`` 256 for
orthogonal; ``--batch`` 64; float32), every kernel parametrized, one full
training step (forward, backward, optax/torch SGD-momentum update):

- ``jaxparam``: ``jaxparam.parametrizations.<builtin>`` under ``nnx.jit`` (graph
  mode, flax's default), under ``nnx.jit(graph=False)`` (tree mode), under
  ``nnx.cached_partial``, and in flax's functional style (``nnx.split`` once, the
  model merged inside one ``jax.jit``: no per-call graph traversal);
- ``floor``: the same math written by hand over a params pytree with the
  functional core, one ``jax.jit`` (what the built-ins should cost);
- ``torch``: torch eager with ``torch.nn.utils.parametrizations.<builtin>``;
- ``flax``: flax's own ``nnx.WeightNorm`` / ``nnx.SpectralNorm`` under ``nnx.jit``;
- ``equinox``: ``eqx.nn.WeightNorm`` / ``eqx.nn.SpectralNorm`` under
  ``eqx.filter_jit`` (skipped when equinox is not installed).

The variants' timing rounds are interleaved and every ratio is the median of
per-round ratios. Ratios are printed and written to
``benchmarks/results/bench_builtins.json``.

``orthogonal`` uses torch's default map (``matrix_exp`` on these square
weights); the kinds ``orthogonal_cayley`` and ``orthogonal_householder`` pick the
map explicitly (on the torch side too).

Usage: ``python benchmarks/bench_builtins.py [--kinds weight_norm,spectral_norm,orthogonal]``
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from _timing import (
    carry_step,
    nnx_functional_mse_step,
    nnx_mse_steps,
    pytree_mse_step,
    round_ratio,
    time_interleaved,
    write_json,
)
from flax import nnx
from torch.nn.utils import parametrizations as TP

from jaxparam import functional as F
from jaxparam import parametrizations as JP

LR = 1e-3


def tx():
    return optax.sgd(LR, momentum=0.9)


def mlp(width: int, seed: int) -> nnx.Sequential:
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(
        nnx.Linear(width, width, rngs=rngs),
        jax.nn.relu,
        nnx.Linear(width, width, rngs=rngs),
        jax.nn.relu,
        nnx.Linear(width, width, rngs=rngs),
    )


def linears(model):
    return model.layers[::2]


def parametrize_nnx(model, kind: str):
    for i, layer in enumerate(linears(model)):
        if kind == "weight_norm":
            JP.weight_norm(layer)
        elif kind == "spectral_norm":
            JP.spectral_norm(layer, rngs=i)
        else:
            JP.orthogonal(layer, orthogonal_map=_explicit_map(kind), rngs=nnx.Rngs(i))
    return model


def _explicit_map(kind: str) -> str | None:
    """``orthogonal_cayley`` -> ``"cayley"``; plain ``orthogonal``: the default map."""
    return kind.removeprefix("orthogonal_") if kind.startswith("orthogonal_") else None


def torch_twin(model, kind: str):
    """torch layers with the same numbers, then torch's built-in on each."""
    layers = []
    for layer in linears(model):
        lin = torch.nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(layer.kernel[...]).T))
            lin.bias.copy_(torch.from_numpy(np.array(layer.bias[...])))
        if kind.startswith("orthogonal"):
            TP.orthogonal(lin, "weight", orthogonal_map=_explicit_map(kind))
        else:
            getattr(TP, kind)(lin, "weight")
        layers.append(lin)
    return torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1], torch.nn.ReLU(), layers[2])


def floor_step(model, kind: str):
    """The built-in's math by hand: a params pytree and the functional core."""
    params, state = [], []
    for layer in linears(model):
        plist = layer.parametrizations.kernel
        b = layer.bias[...]
        if kind == "weight_norm":
            params.append({"g": plist.original0[...], "v": plist.original1[...], "b": b})
        elif kind == "spectral_norm":
            params.append({"w": plist.original[...], "b": b})
            state.append(F.SpectralNormState(plist[0]._u[...], plist[0]._v[...]))
        else:
            # base is a buffer (not trained), stored in torch's frame as the link does.
            params.append({"x": plist.original[...], "b": b})
            state.append(plist[0].base[...])
    opt = tx()

    def kernel(p, s):
        if kind == "weight_norm":
            return F.weight_norm(p["g"], p["v"], 1), s
        if kind == "spectral_norm":
            return F.spectral_norm(p["w"], s, dim=1, training=True)
        orthogonal_map = _explicit_map(kind) or F.default_orthogonal_map(p["x"])
        q = F.orthogonal(p["x"].T, s, orthogonal_map=orthogonal_map)
        return q.T, s

    def forward(params, state, x):
        new_state = []
        for i, p in enumerate(params):
            k, s = kernel(p, state[i] if state else None)
            new_state.append(s)
            x = x @ k + p["b"]
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x, (new_state if state else state)

    return pytree_mse_step(forward, params, state, opt)


def torch_step(model_t):
    opt = torch.optim.SGD(model_t.parameters(), lr=LR, momentum=0.9)

    def call(x, y):
        opt.zero_grad(set_to_none=True)
        loss = ((model_t(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return call


def flax_own_step(width: int, seed: int, kind: str):
    rngs = nnx.Rngs(seed)
    wrap = {
        "weight_norm": lambda lin: nnx.WeightNorm(lin, rngs=rngs),
        "spectral_norm": lambda lin: nnx.SpectralNorm(lin, rngs=rngs),
    }.get(kind)
    if wrap is None:
        return None
    model = nnx.Sequential(
        wrap(nnx.Linear(width, width, rngs=rngs)),
        jax.nn.relu,
        wrap(nnx.Linear(width, width, rngs=rngs)),
        jax.nn.relu,
        wrap(nnx.Linear(width, width, rngs=rngs)),
    )
    return nnx_mse_steps(model, tx()).jit


def equinox_step(width: int, seed: int, kind: str):
    try:
        import equinox as eqx
    except ImportError:
        return None
    if kind not in ("weight_norm", "spectral_norm"):
        return None
    keys = jax.random.split(jax.random.key(seed), 6)
    layers = []
    for i in range(3):
        lin = eqx.nn.Linear(width, width, key=keys[i])
        if kind == "weight_norm":
            layers.append(eqx.nn.WeightNorm(lin))
        else:
            layers.append(eqx.nn.SpectralNorm(lin, "weight", key=keys[3 + i]))
    if kind == "weight_norm":
        model, state = layers, None

        def forward(model, state, x):
            for i, layer in enumerate(model):
                x = jax.vmap(layer)(x)
                if i < 2:
                    x = jax.nn.relu(x)
            return x, state
    else:
        model, state = eqx.nn.make_with_state(lambda: layers)()

        def forward(model, state, x):
            for i, layer in enumerate(model):
                x, state = jax.vmap(layer, in_axes=(0, None), out_axes=(0, None))(x, state)
                if i < 2:
                    x = jax.nn.relu(x)
            return x, state

    opt = tx()
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, state, x, y):
        def loss_fn(model):
            out, new_state = forward(model, state, x)
            return jnp.mean((out - y) ** 2), new_state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, state, loss

    return carry_step(step, model, opt_state, state)


def run(kind: str, width: int, args) -> dict:
    key = jax.random.key(args.seed)
    x = jax.random.normal(key, (args.batch, width))
    y = jax.random.normal(jax.random.fold_in(key, 1), (args.batch, width))
    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y))

    model = parametrize_nnx(mlp(width, args.seed), kind)
    model_t = torch_twin(mlp(width, args.seed), kind)
    nnx_steps = nnx_mse_steps(model, tx())
    steps = {
        "jaxparam_nnx_jit": lambda: nnx_steps.jit(x, y),
        "jaxparam_nnx_jit_tree": lambda: nnx_steps.tree(x, y),
        "jaxparam_cached_partial": lambda: nnx_steps.cached(x, y),
        "jaxparam_functional": (lambda f: lambda: f(x, y))(nnx_functional_mse_step(model, tx())),
        "floor_jax_jit": (lambda f: lambda: f(x, y))(floor_step(model, kind)),
        "torch_eager": (lambda f: lambda: f(xt, yt))(torch_step(model_t)),
    }
    flax_own = flax_own_step(width, args.seed, kind)
    if flax_own is not None:
        steps["flax_own_nnx_jit"] = lambda: flax_own(x, y)
    eqx_step = equinox_step(width, args.seed, kind)
    if eqx_step is not None:
        steps["equinox_filter_jit"] = lambda: eqx_step(x, y)

    timings = time_interleaved(steps, repeat=args.repeat, number=args.number)
    ratios = {f"{name} / torch_eager": round_ratio(timings, name, "torch_eager") for name in steps}
    for name in (
        "jaxparam_nnx_jit",
        "jaxparam_nnx_jit_tree",
        "jaxparam_cached_partial",
        "jaxparam_functional",
    ):
        ratios[f"{name} / floor"] = round_ratio(timings, name, "floor_jax_jit")
    return {"width": width, "timings": timings, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="weight_norm,spectral_norm,orthogonal")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--orth-width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    results = {"args": vars(args), "torch_threads": torch.get_num_threads()}
    for kind in args.kinds.split(","):
        width = args.orth_width if kind.startswith("orthogonal") else args.width
        res = run(kind, width, args)
        results[kind] = res
        print(f"== {kind} (width {width}, batch {args.batch}, float32)")
        for name, tm in res["timings"].items():
            print(
                f"  {name:<26} {tm['median_s'] * 1e6:10.1f} us"
                f"   (first call {tm['first_call_s'] * 1e3:8.1f} ms)"
            )
        for name, ratio in res["ratios"].items():
            print(f"  {name:<40} {ratio:6.3f}x")
    print(f"wrote {write_json('bench_builtins', results)}")


if __name__ == "__main__":
    main()
