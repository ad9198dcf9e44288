"""Shared helpers for the functional differential tests."""

import jax.numpy as jnp
import numpy as np
import torch

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}

# float32/float64 bounds from the brief. bfloat16 has 8 significand bits (relative
# rounding 2**-8 ~ 3.9e-3); one rounding difference on O(1) values plus the different
# accumulation order of a reduction gives up to a few ulps, hence 3e-2 absolute on
# values of magnitude ~1.
ATOL = {"float32": 1e-5, "float64": 1e-10, "bfloat16": 3e-2, "complex64": 1e-5, "complex128": 1e-10}


def to_torch_dtype(x, dtype, requires_grad=False):
    x = jnp.asarray(x)
    if x.dtype == jnp.bfloat16:
        x = x.astype(jnp.float32)  # exact; converted back to bfloat16 below
    t = torch.from_numpy(np.array(x)).to(TORCH_DTYPES[dtype])
    return t.requires_grad_(requires_grad)


def to_numpy(t):
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy().copy()  # torch mutates buffers in place; never alias them


def assert_close(a, b, dtype, scale=1.0):
    a = np.asarray(
        jnp.asarray(a).astype(jnp.float32) if jnp.asarray(a).dtype == jnp.bfloat16 else a
    )
    b = np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.max(np.abs(a.astype(np.complex128) - b.astype(np.complex128))) if a.size else 0.0
    assert err <= ATOL[dtype] * scale, f"max abs diff {err} > {ATOL[dtype] * scale}"
