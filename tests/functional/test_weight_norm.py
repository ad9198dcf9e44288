"""Differential tests of `jaxparam.functional.weight_norm` against torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.utils.parametrizations import _WeightNorm

from jaxparam.functional import weight_norm, weight_norm_inverse

from ._helpers import assert_close, to_numpy, to_torch_dtype

CASES = [
    ((7,), 0),
    ((7,), None),
    ((7,), -1),
    ((5, 3), 0),
    ((5, 3), 1),
    ((5, 3), -1),
    ((5, 3), -2),
    ((5, 3), None),
    ((4, 3, 2), 1),
    ((4, 3, 2), 2),
    ((4, 3, 2), -3),
    ((4, 3, 2, 2), 0),
    ((4, 3, 2, 2), 2),
    ((4, 3, 2, 2), -2),
    ((4, 3, 2, 2), None),
]


def _run(shape, dim, dtype, jit):
    rng = np.random.default_rng(0)
    w_np = rng.standard_normal(shape)
    jdt = jnp.dtype(dtype)
    w = jnp.asarray(w_np, jdt)

    tw = to_torch_dtype(w, dtype)
    mod = _WeightNorm(dim)
    tg, tv = mod.right_inverse(tw)
    inv = jax.jit(weight_norm_inverse, static_argnums=1) if jit else weight_norm_inverse
    g, v = inv(w, dim)
    assert g.shape == tuple(tg.shape) and g.dtype == jdt
    assert_close(g, to_numpy(tg), dtype)
    assert_close(v, to_numpy(tv), dtype)

    # Perturb g so the forward is not the identity.
    g = g * jnp.asarray(1.0 + rng.random(g.shape), jdt)
    tg = to_torch_dtype(g, dtype, requires_grad=True)
    tv = to_torch_dtype(v, dtype, requires_grad=True)
    tout = mod(tg, tv)
    ct = jnp.asarray(rng.standard_normal(shape), jdt)

    def value_and_vjp(g, v, ct):
        out, vjp = jax.vjp(lambda g, v: weight_norm(g, v, dim), g, v)
        return out, *vjp(ct)

    out, dg, dv = (jax.jit(value_and_vjp) if jit else value_and_vjp)(g, v, ct)
    assert out.dtype == jdt
    assert_close(out, to_numpy(tout), dtype)
    tout.backward(to_torch_dtype(ct, dtype))
    assert_close(dg, to_numpy(tg.grad), dtype)
    assert_close(dv, to_numpy(tv.grad), dtype)


@pytest.mark.parametrize(("shape", "dim"), CASES)
def test_weight_norm_float32(shape, dim):
    _run(shape, dim, "float32", jit=True)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize(("shape", "dim"), [((7,), None), ((5, 3), -1), ((4, 3, 2), -2)])
def test_weight_norm_eager_and_jit(shape, dim, jit):
    _run(shape, dim, "float32", jit)


@pytest.mark.parametrize(("shape", "dim"), CASES[::2])
def test_weight_norm_float64(shape, dim, x64):
    _run(shape, dim, "float64", jit=True)


@pytest.mark.parametrize(("shape", "dim"), [((5, 3), 0), ((4, 3, 2), 2), ((4, 3, 2, 2), 1)])
def test_weight_norm_bfloat16(shape, dim):
    _run(shape, dim, "bfloat16", jit=True)


def test_weight_norm_dim_none_g_is_scalar():
    g, _ = weight_norm_inverse(jnp.ones((3, 4)), None)
    assert g.shape == ()
    np.testing.assert_allclose(g, np.sqrt(12.0), rtol=1e-6)


@pytest.mark.parametrize("dim", [2, -3, 5])
def test_weight_norm_dim_out_of_range(dim):
    w = torch.randn(3, 4)
    with pytest.raises(IndexError) as info:
        torch.norm_except_dim(w, 2, dim)
    prefix = str(info.value)
    with pytest.raises(IndexError, match=_re(prefix)):
        weight_norm_inverse(jnp.ones((3, 4)), dim)
    with pytest.raises(IndexError, match=_re(prefix)):
        weight_norm(jnp.ones((3, 1)), jnp.ones((3, 4)), dim)


def _re(msg):
    import re

    return "^" + re.escape(msg)


def test_weight_norm_round_trip():
    w = jax.random.normal(jax.random.key(1), (6, 5, 3))
    for dim in (0, 1, 2, None):
        g, v = weight_norm_inverse(w, dim)
        np.testing.assert_allclose(jax.jit(weight_norm, static_argnums=2)(g, v, dim), w, atol=1e-6)


def test_weight_norm_torch_module_dim_none():
    # torch's public `weight_norm(dim=None)` normalizes over the whole tensor.
    lin = torch.nn.Linear(4, 3)
    torch.nn.utils.parametrizations.weight_norm(lin, dim=None)
    g0 = lin.parametrizations.weight.original0
    g, _ = weight_norm_inverse(jnp.asarray(lin.weight.detach().numpy()), None)
    assert g.shape == tuple(g0.shape)
    np.testing.assert_allclose(g, g0.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("row_norm", [1e-15, 1.0, 1e18, 1.2e19])
def test_weight_norm_gradient_keeps_float32_range(row_norm):
    # JAX's own derivative of g / n forms n**-2, which float32 flushes to zero for
    # a row norm above ~9.2e18 (and up to 1.8e19, where n**2 overflows): the
    # gradient of v was the raw cotangent. Against torch in float64.
    rng = np.random.default_rng(0)
    v64 = rng.standard_normal((4, 3))
    v64 *= row_norm / np.linalg.norm(v64, axis=1, keepdims=True)
    g64 = np.linalg.norm(v64, axis=1, keepdims=True) * (1 + rng.random((4, 1)))
    ct64 = rng.standard_normal((4, 3))
    tg = torch.tensor(g64, requires_grad=True)
    tv = torch.tensor(v64, requires_grad=True)
    torch._weight_norm(tv, tg, 0).backward(torch.tensor(ct64))
    f32 = [jnp.asarray(a, jnp.float32) for a in (g64, v64, ct64)]
    _, vjp = jax.vjp(lambda g, v: weight_norm(g, v, 0), f32[0], f32[1])
    dg, dv = vjp(f32[2])
    for ours, theirs in ((dg, tg.grad.numpy()), (dv, tv.grad.numpy())):
        err = np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / np.max(np.abs(theirs))
        assert err < 1e-6, err
