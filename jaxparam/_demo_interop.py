"""Demo section: a weight-normed HiFi-GAN-style block, torch -> JAX -> fine-tune -> torch.

Builds a small 1-d generator in torch with
``torch.nn.utils.parametrizations.weight_norm`` on every convolution (a
ConvTranspose1d upsampler, then a HiFi-GAN ``ResBlock1``: dilations 1, 3, 5,
leaky-relu, residual adds), converts its ``state_dict`` into the NNX port built
with ``jaxparam.parametrizations.weight_norm`` (abstractly, under
``nnx.eval_shape``: the checkpoint fills every Variable), checks the outputs agree,
fine-tunes the port in JAX with optax under ``nnx.jit``, and converts it back into
a fresh torch model that must agree with the fine-tuned port.

Needs torch (the ``torch`` extra). Called by ``python -m jaxparam.demo``; also
runnable alone: ``python -m jaxparam._demo_interop``.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxparam.interop import (
    load_torch_state_dict,
    to_torch_state_dict,
    torch_conv_transpose_padding,
    torch_state_dict_shapes,
)
from jaxparam.parametrizations import weight_norm

__all__ = ["run"]

CIN, CH, K, DILATIONS, SLOPE = 8, 16, 3, (1, 3, 5), 0.1
TOL = 1e-5


# -- the torch model (what a published checkpoint comes from) --------------------------


def _torch_model():
    import torch
    from torch import nn
    from torch.nn.utils.parametrizations import weight_norm as wn

    class ResBlock(nn.Module):
        def __init__(self, ch: int):
            super().__init__()
            self.convs1 = nn.ModuleList(
                wn(nn.Conv1d(ch, ch, K, dilation=d, padding=d * (K - 1) // 2)) for d in DILATIONS
            )
            self.convs2 = nn.ModuleList(
                wn(nn.Conv1d(ch, ch, K, padding=(K - 1) // 2)) for _ in DILATIONS
            )

        def forward(self, x):
            for c1, c2 in zip(self.convs1, self.convs2, strict=True):
                xt = c2(nn.functional.leaky_relu(c1(nn.functional.leaky_relu(x, SLOPE)), SLOPE))
                x = xt + x
            return x

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_pre = wn(nn.Conv1d(CIN, CH, 7, padding=3))
            self.up = wn(nn.ConvTranspose1d(CH, CH // 2, 4, stride=2, padding=1))
            self.resblock = ResBlock(CH // 2)
            self.conv_post = wn(nn.Conv1d(CH // 2, 1, 7, padding=3))

        def forward(self, x):
            x = nn.functional.leaky_relu(self.conv_pre(x), SLOPE)
            x = self.resblock(self.up(x))
            return torch.tanh(self.conv_post(nn.functional.leaky_relu(x, SLOPE)))

    return Generator().eval()


# -- the NNX port: same attribute names, so the keys map automatically ------------------


class ResBlock(nnx.Module):
    def __init__(self, ch: int, *, rngs: nnx.Rngs):
        def conv(d: int) -> nnx.Conv:
            pad = d * (K - 1) // 2
            layer = nnx.Conv(ch, ch, K, kernel_dilation=d, padding=((pad, pad),), rngs=rngs)
            return weight_norm(layer)  # per output channel, as torch's dim=0 on a Conv1d

        self.convs1 = nnx.List([conv(d) for d in DILATIONS])
        self.convs2 = nnx.List([conv(1) for _ in DILATIONS])

    def __call__(self, x: jax.Array) -> jax.Array:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = c2(nnx.leaky_relu(c1(nnx.leaky_relu(x, SLOPE)), SLOPE)) + x
        return x


class Generator(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv_pre = weight_norm(nnx.Conv(CIN, CH, 7, padding=((3, 3),), rngs=rngs))
        up = nnx.ConvTranspose(
            CH,
            CH // 2,
            4,
            strides=2,
            padding=torch_conv_transpose_padding(4, padding=1),
            rngs=rngs,
        )
        # torch's weight_norm default dim=0 is a ConvTranspose's *input* channels:
        # Flax axis -2 of the (k, in, out) kernel.
        self.up = weight_norm(up, dim=-2)
        self.resblock = ResBlock(CH // 2, rngs=rngs)
        self.conv_post = weight_norm(nnx.Conv(CH // 2, 1, 7, padding=((3, 3),), rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:  # x: (batch, time, channels)
        x = nnx.leaky_relu(self.conv_pre(x), SLOPE)
        x = self.resblock(self.up(x))
        return jnp.tanh(self.conv_post(nnx.leaky_relu(x, SLOPE)))


@nnx.jit
def _train_step(model: Generator, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def run(quiet: bool = False, steps: int = 40, seed: int = 0) -> bool:
    """Run the torch -> NNX -> fine-tune -> torch round trip; True when every check holds.

    Args:
      quiet: print only the one-line summary.
      steps: fine-tuning steps (Adam) in JAX.
      seed: seed of the torch model, the data and the NNX model.

    Returns:
      Whether the outputs agree within 1e-5 both ways and the loss went down.

    Raises:
      ImportError: torch is not installed (``pip install 'jaxparam[torch]'``).

    Example:
      >>> from jaxparam._demo_interop import run
      >>> run(quiet=True)  # doctest: +SKIP
      True
    """
    import torch

    say = (lambda *a: None) if quiet else print
    start = time.perf_counter()
    torch.manual_seed(seed)
    tmodel = _torch_model()
    sd = tmodel.state_dict()
    # Built abstractly (no weights initialised): the checkpoint fills every Variable.
    model = nnx.eval_shape(lambda: Generator(rngs=nnx.Rngs(seed)))
    keys_ok = torch_state_dict_shapes(model) == {k: tuple(v.shape) for k, v in sd.items()}
    say("interop: torch HiFi-GAN-style block (weight_norm everywhere) -> NNX -> fine-tune -> torch")
    say(f"  torch state_dict: {len(sd)} keys, e.g. {next(k for k in sd if 'original0' in k)}")

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, CIN, 32)).astype(np.float32)  # torch layout (N, C, T)
    t = np.arange(64, dtype=np.float32)
    y = np.broadcast_to(0.5 * np.sin(0.3 * t + rng.uniform(0, 6, (4, 1))), (4, 64))[..., None]
    xj, yj = jnp.asarray(x.transpose(0, 2, 1)), jnp.asarray(y.astype(np.float32))

    def torch_out(m) -> np.ndarray:
        with torch.no_grad():
            return m(torch.from_numpy(x)).numpy().transpose(0, 2, 1)

    load_torch_state_dict(model, sd)
    diff_in = float(np.max(np.abs(np.asarray(model(xj)) - torch_out(tmodel))))
    say(f"  torch -> NNX: max |y_nnx - y_torch| = {diff_in:.2e}")

    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    losses = [float(_train_step(model, optimizer, xj, yj)) for _ in range(steps)]
    say(f"  fine-tuned in JAX: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {steps} steps")

    back = _torch_model()  # fresh weights, overwritten strictly
    back.load_state_dict(to_torch_state_dict(model, to_tensor=torch.from_numpy), strict=True)
    diff_out = float(np.max(np.abs(np.asarray(model(xj)) - torch_out(back))))
    say(f"  NNX -> torch (strict load): max |y_torch - y_nnx| = {diff_out:.2e}")

    ok = keys_ok and diff_in < TOL and diff_out < TOL and losses[-1] < losses[0]
    print(
        f"interop {'OK' if ok else 'FAILED'}: diffs {diff_in:.1e} / {diff_out:.1e}, "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {time.perf_counter() - start:.1f} s"
    )
    return ok


if __name__ == "__main__":
    sys.exit(0 if run() else 1)
