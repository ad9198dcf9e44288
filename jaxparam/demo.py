"""The main job: parametrize a small Flax NNX model, train it, report what changed.

Run it with ``python -m jaxparam.demo`` (``--steps``, ``--seed``, ``--quiet``).

It builds a 3-layer MLP on a synthetic regression task, registers torch-style
parametrizations on its weights with :mod:`jaxparam.parametrize`:

- layer 1: weight norm written by hand, with a ``right_inverse`` returning two
  originals (``original0`` = magnitude ``g``, ``original1`` = direction ``v``);
- layer 2: a symmetric kernel (a chain of two links);
- layer 3: a positive scale on the output kernel (``exp``/``log`` pair);

then trains the originals for a few hundred steps with optax under ``nnx.jit``
and prints the loss, the state layout and the constraints that still hold.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

import jaxparam.parametrize as P


class WeightNorm(nnx.Module):
    """``w = g * v / ||v||`` per output feature (flax kernels are ``(in, out)``)."""

    def __call__(self, g: jax.Array, v: jax.Array) -> jax.Array:
        return g * v / jnp.linalg.norm(v, axis=0, keepdims=True)

    def right_inverse(self, w: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.linalg.norm(w, axis=0, keepdims=True), w


def upper(x: jax.Array) -> jax.Array:
    """Keep the upper triangle."""
    return jnp.triu(x)


def mirror(x: jax.Array) -> jax.Array:
    """Mirror an upper-triangular matrix into a symmetric one."""
    return x + jnp.triu(x, 1).T


def positive(x: jax.Array) -> jax.Array:
    return jnp.exp(x)


positive.right_inverse = jnp.log  # type: ignore[attr-defined]


class MLP(nnx.Module):
    def __init__(self, din: int, width: int, dout: int, *, rngs: nnx.Rngs):
        self.layer1 = nnx.Linear(din, width, rngs=rngs)
        self.layer2 = nnx.Linear(width, width, rngs=rngs)
        self.layer3 = nnx.Linear(width, dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.layer1(x))
        x = jax.nn.gelu(self.layer2(x))
        return self.layer3(x)


def build(seed: int, din: int = 8, width: int = 64, dout: int = 1) -> MLP:
    model = MLP(din, width, dout, rngs=nnx.Rngs(seed))
    P.register_parametrization(model.layer1, "kernel", WeightNorm())
    P.register_parametrization(model.layer2, "kernel", upper)
    P.register_parametrization(model.layer2, "kernel", mirror)
    model.layer3.kernel[...] = jnp.abs(model.layer3.kernel[...]) + 0.1
    P.register_parametrization(model.layer3, "kernel", positive)
    return model


def make_data(seed: int, n: int = 512, din: int = 8):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, din))
    w = jax.random.normal(kw, (din,))
    y = jnp.sin(x @ w)[:, None] + 0.5 * jnp.cos(2.0 * x[:, :1])
    return x, y


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    model = build(args.seed)
    x, y = make_data(args.seed + 1)
    optimizer = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

    print("jaxparam demo: a 3-layer MLP with parametrized kernels")
    for name in ("layer1", "layer2", "layer3"):
        layer = getattr(model, name)
        links = [P._link_name(link) for link in layer.parametrizations.kernel]
        print(f"  {name}: {type(layer).__name__}, kernel = {' -> '.join(links)}(originals)")
    print("  trainable state (what the optimizer sees):")
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        print(f"    {'/'.join(map(str, path)):<45} {tuple(var.shape)}")

    k2_before = model.layer2.kernel[...]
    loss0 = float(jnp.mean((model(x) - y) ** 2))
    start = time.perf_counter()
    losses = []
    for _ in tqdm(range(args.steps), desc="training", disable=args.quiet, file=sys.stdout):
        losses.append(train_step(model, optimizer, x, y))
    loss_end = float(jax.block_until_ready(losses[-1]))
    elapsed = time.perf_counter() - start

    k1 = model.layer1.kernel[...]
    p1 = model.layer1.parametrizations.kernel
    k2 = model.layer2.kernel[...]
    k3 = model.layer3.kernel[...]
    print(f"loss: {loss0:.4f} -> {loss_end:.4f} in {args.steps} steps ({elapsed:.2f} s)")
    print("what changed, and what held:")
    col_norms = jnp.linalg.norm(k1, axis=0)
    gap = float(jnp.max(jnp.abs(col_norms - p1.original0[...].ravel())))
    print(f"  layer1 weight norm: max | ||w_j|| - g_j | = {gap:.2e}")
    print(
        f"  layer2 symmetric:   max |K - K^T| = {float(jnp.max(jnp.abs(k2 - k2.T))):.2e}"
        f", moved by {float(jnp.linalg.norm(k2 - k2_before)):.3f}"
    )
    print(f"  layer3 positive:    min K = {float(jnp.min(k3)):.3e}")

    P.remove_parametrizations(model.layer2, "kernel", leave_parametrized=True)
    print(f"  after remove_parametrizations: layer2 is {type(model.layer2).__name__} again")
    ok = loss_end < loss0 and bool(jnp.allclose(k2, k2.T)) and float(jnp.min(k3)) > 0
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
