"""The main job: parametrize a small Flax NNX model, train it, report what changed.

Run it with ``python -m jaxparam.demo`` (``--steps``, ``--seed``, ``--quiet``).

Part 1 builds a 4-layer MLP on a synthetic regression task and parametrizes its
kernels with :mod:`jaxparam.parametrize` and :mod:`jaxparam.parametrizations`:

- layer 1: the built-in ``weight_norm`` (originals ``original0`` = ``g``,
  ``original1`` = ``v``);
- layer 2: a hand-written chain making the kernel symmetric (two links), with the
  built-in ``spectral_norm`` appended to the chain;
- layer 3: the built-in ``orthogonal`` (Cayley map);
- layer 4: a positive kernel written as a function with a ``right_inverse``
  attribute (``exp``/``log``);

then trains the originals with optax under ``nnx.jit`` and prints the loss, the
state layout and the constraints that still hold.

Part 2 (needs torch: ``pip install 'jaxparam[torch]'``) ports a weight-normed
1-d convolution block from torch to NNX through its ``state_dict``, fine-tunes
it in JAX and converts it back (see :mod:`jaxparam._demo_interop`).
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
from jaxparam._checks import link_name
from jaxparam.parametrizations import orthogonal, spectral_norm, weight_norm


def upper(x: jax.Array) -> jax.Array:
    """Keep the upper triangle."""
    return jnp.triu(x)


def mirror(x: jax.Array) -> jax.Array:
    """Mirror an upper-triangular matrix into a symmetric one."""
    return x + jnp.triu(x, 1).T


def positive(x: jax.Array) -> jax.Array:
    return jnp.exp(x)


positive.right_inverse = jnp.log  # type: ignore[attr-defined]


LAYERS = ("layer1", "layer2", "layer3", "layer4")


class MLP(nnx.Module):
    def __init__(self, din: int, width: int, dout: int, *, rngs: nnx.Rngs):
        self.layer1 = nnx.Linear(din, width, rngs=rngs)
        self.layer2 = nnx.Linear(width, width, rngs=rngs)
        self.layer3 = nnx.Linear(width, width, rngs=rngs)
        self.layer4 = nnx.Linear(width, dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.layer1(x))
        x = jax.nn.gelu(self.layer2(x))
        x = x + jax.nn.gelu(self.layer3(x))
        return self.layer4(x)


def build(seed: int, din: int = 8, width: int = 64, dout: int = 1) -> MLP:
    model = MLP(din, width, dout, rngs=nnx.Rngs(seed))
    weight_norm(model.layer1)
    P.register_parametrization(model.layer2, "kernel", upper)
    P.register_parametrization(model.layer2, "kernel", mirror)
    spectral_norm(model.layer2, rngs=nnx.Rngs(seed))
    orthogonal(model.layer3, orthogonal_map="cayley", rngs=nnx.Rngs(seed))
    model.layer4.kernel[...] = jnp.abs(model.layer4.kernel[...]) + 0.1
    P.register_parametrization(model.layer4, "kernel", positive)
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

    print("jaxparam demo, part 1: a 4-layer MLP with parametrized kernels")
    for name in LAYERS:
        layer = getattr(model, name)
        chain = "original"
        for link in layer.parametrizations.kernel:
            chain = f"{link_name(link)}({chain})"
        print(f"  {name}: {type(layer).__name__}, kernel = {chain}")
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
    k4 = model.layer4.kernel[...]
    print(f"loss: {loss0:.4f} -> {loss_end:.4f} in {args.steps} steps ({elapsed:.2f} s)")
    print("what changed, and what held:")
    col_norms = jnp.linalg.norm(k1, axis=0)
    gap = float(jnp.max(jnp.abs(col_norms - p1.original0[...].ravel())))
    print(f"  layer1 weight norm:   max | ||w_j|| - g_j | = {gap:.2e}")
    sym = float(jnp.max(jnp.abs(k2 - k2.T)))
    sigma = float(jnp.linalg.norm(k2, ord=2))
    moved = float(jnp.linalg.norm(k2 - k2_before))
    print(f"  layer2 symmetric+SN: max |K - K^T| = {sym:.2e}, sigma(K) = {sigma:.4f}")
    print("                       (sigma from one power iteration per step, as in torch)")
    print(f"                       moved by {moved:.3f}")
    orth = float(jnp.max(jnp.abs(k3.T @ k3 - jnp.eye(k3.shape[1]))))
    print(f"  layer3 orthogonal:   max |K^T K - I| = {orth:.2e}")
    print(f"  layer4 positive:     min K = {float(jnp.min(k4)):.3e}")

    P.remove_parametrizations(model.layer2, "kernel", leave_parametrized=True)
    print(f"  after remove_parametrizations: layer2 is {type(model.layer2).__name__} again")
    ok = (
        loss_end < loss0
        and sym < 1e-5
        and abs(sigma - 1.0) < 5e-2
        and orth < 1e-4
        and float(jnp.min(k4)) > 0
    )
    print("part 1 OK" if ok else "part 1 FAILED")

    try:
        import torch  # noqa: F401
    except ImportError:
        print("part 2 (torch interop) skipped: pip install 'jaxparam[torch]'")
    else:
        from jaxparam._demo_interop import run as run_interop

        print("jaxparam demo, part 2: a weight-normed conv block, torch -> NNX -> torch")
        ok = run_interop(quiet=args.quiet) and ok
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
