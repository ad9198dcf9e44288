"""Differential tests of `jaxparam.functional.spectral_norm` against torch."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.utils.parametrizations import _SpectralNorm

from jaxparam.functional import SpectralNormState, spectral_norm, spectral_norm_init

from ._helpers import assert_close, to_numpy, to_torch_dtype


def _torch_module(w_t, n_power_iterations, dim, eps):
    return _SpectralNorm(w_t.detach(), n_power_iterations=n_power_iterations, dim=dim, eps=eps)


def _step(weight, state, ct, *, n, dim, eps, training, jit):
    f = functools.partial(spectral_norm, n_power_iterations=n, eps=eps, dim=dim, training=training)
    if jit:
        f = jax.jit(f)
    (out, new_state), vjp = jax.vjp(f, weight, state)
    (grad, _) = vjp((ct, jax.tree.map(jnp.zeros_like, new_state)))
    return out, new_state, grad


def _run(shape, dim, dtype, jit, n=1, eps=1e-12, steps=(True, True, False, True)):
    rng = np.random.default_rng(0)
    jdt = jnp.dtype(dtype)
    w = jnp.asarray(rng.standard_normal(shape), jdt)
    tmod = _torch_module(to_torch_dtype(w, dtype), n, dim, eps)
    if w.ndim > 1:
        # Start from torch's warm-up buffers.
        state = SpectralNormState(
            jnp.asarray(to_numpy(tmod._u), jdt), jnp.asarray(to_numpy(tmod._v), jdt)
        )
    else:
        state = spectral_norm_init(w, jax.random.key(0), dim=dim, eps=eps)
        assert state == SpectralNormState(None, None)
    for training in steps:
        tmod.train(training)
        tw = to_torch_dtype(w, dtype, requires_grad=True)
        tout = tmod(tw)
        ct = jnp.asarray(rng.standard_normal(shape), jdt)
        tout.backward(to_torch_dtype(ct, dtype))
        out, state, grad = _step(w, state, ct, n=n, dim=dim, eps=eps, training=training, jit=jit)
        assert out.dtype == jdt
        assert_close(out, to_numpy(tout), dtype)
        assert_close(grad, to_numpy(tw.grad), dtype)
        if w.ndim > 1:
            assert_close(state.u, to_numpy(tmod._u), dtype)
            assert_close(state.v, to_numpy(tmod._v), dtype)
        # Change the weight between steps, as an optimizer would.
        w = w + jnp.asarray(0.1 * rng.standard_normal(shape), jdt)


CASES = [
    ((6,), 0),
    ((5, 3), 0),
    ((3, 5), 1),
    ((4, 3, 2), 1),
    ((4, 3, 2, 2), 0),
    ((4, 3, 2, 2), -1),
]


@pytest.mark.parametrize(("shape", "dim"), CASES)
def test_spectral_norm_float32(shape, dim):
    _run(shape, dim, "float32", jit=True)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize(("shape", "dim"), [((6,), 0), ((4, 3, 2), 1)])
def test_spectral_norm_eager_and_jit(shape, dim, jit):
    _run(shape, dim, "float32", jit, steps=(True, False))


@pytest.mark.parametrize(("shape", "dim"), CASES[::2])
def test_spectral_norm_float64(shape, dim, x64):
    _run(shape, dim, "float64", jit=True, n=3)


def test_spectral_norm_several_iterations():
    _run((6, 4), 0, "float32", jit=True, n=4, eps=1e-6)


@pytest.mark.parametrize(("shape", "dim"), [((6,), 0), ((8, 6), 0)])
def test_spectral_norm_bfloat16(shape, dim):
    _run(shape, dim, "bfloat16", jit=True)


def test_spectral_norm_complex64():
    _run((5, 4), 0, "complex64", jit=True, steps=(True, False))


def test_spectral_norm_init_procedure():
    # Our init with torch's normal draws reproduces torch's buffers exactly.
    # A large spectral gap: 15 warm-up iterations converge whatever the start.
    q1, _ = torch.linalg.qr(torch.randn(3, 3))
    q2, _ = torch.linalg.qr(torch.randn(10, 3))
    w = (q1 @ torch.diag(torch.tensor([10.0, 1.0, 0.5])) @ q2.T).reshape(3, 5, 2).permute(1, 0, 2)
    w = w.contiguous()
    tmod = _torch_module(w, 1, 1, 1e-12)
    state = spectral_norm_init(jnp.asarray(w.numpy()), jax.random.key(0), dim=1)
    assert state.u.shape == (3,) and state.v.shape == (10,)
    # Converged singular vectors agree up to sign.
    sign = np.sign(np.vdot(state.u, tmod._u.numpy()))
    np.testing.assert_allclose(sign * state.u, tmod._u.numpy(), atol=1e-3)
    np.testing.assert_allclose(sign * state.v, tmod._v.numpy(), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(state.u), 1.0, rtol=1e-6)


def test_spectral_norm_eval_keeps_state():
    w = jax.random.normal(jax.random.key(0), (4, 3))
    state = spectral_norm_init(w, jax.random.key(1))
    _, new = spectral_norm(w, state, training=False)
    assert new.u is state.u and new.v is state.v


def _raises_like_torch(exc, torch_fn, our_fn):
    with pytest.raises(exc) as info:
        torch_fn()
    with pytest.raises(exc, match="^" + re.escape(str(info.value))):
        our_fn()


@pytest.mark.parametrize("dim", [2, -3])
def test_spectral_norm_dim_out_of_range(dim):
    w = torch.randn(3, 4)
    jw = jnp.ones((3, 4))
    _raises_like_torch(
        IndexError,
        lambda: _SpectralNorm(w, dim=dim),
        lambda: spectral_norm_init(jw, jax.random.key(0), dim=dim),
    )
    state = spectral_norm_init(jw, jax.random.key(0))
    _raises_like_torch(
        IndexError, lambda: _SpectralNorm(w, dim=dim), lambda: spectral_norm(jw, state, dim=dim)
    )


@pytest.mark.parametrize("n", [0, -1])
def test_spectral_norm_bad_iterations(n):
    w = torch.randn(3, 4)
    jw = jnp.ones((3, 4))
    state = spectral_norm_init(jw, jax.random.key(0))
    _raises_like_torch(
        ValueError,
        lambda: _SpectralNorm(w, n_power_iterations=n),
        lambda: spectral_norm(jw, state, n_power_iterations=n),
    )


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", [(0, 4), (0, 0), (4, 0), (0, 2, 3)], ids=str)
def test_spectral_norm_empty_weights(shape, dim):
    # torch flattens with flatten(1); reshape(h, -1) has no answer when h == 0.
    w = jnp.zeros(shape)
    state = spectral_norm_init(w, jax.random.key(0), dim=dim)
    out, new = jax.jit(functools.partial(spectral_norm, dim=dim))(w, state)
    assert out.shape == shape
    assert new.u.shape == (shape[dim],)
    grad = jax.grad(lambda w: spectral_norm(w, state, dim=dim)[0].sum())(w)
    assert grad.shape == shape
