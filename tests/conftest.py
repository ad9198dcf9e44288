"""Shared test configuration: strict JAX settings and helpers for float64."""

import contextlib
import functools

import jax
import numpy as np
import pytest

# Fail loudly on silent dtype promotions in our own code paths.
jax.config.update("jax_numpy_rank_promotion", "allow")


@contextlib.contextmanager
def _x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture
def x64():
    """Enable float64 in JAX for the duration of one test, then restore."""
    with _x64():
        yield


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover - torch is in the test extra
        pass
    yield


def _mse_steps(model, tx, torch_module, torch_optimizer, *, graph=True):
    """One MSE training step of an NNX model and of its torch twin, side by side.

    Returns ``step(x, y) -> (loss, torch_loss)`` taking numpy arrays; the NNX step
    runs under ``nnx.jit(graph=graph)`` with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``:
    flax's graph mode (its default) or its tree mode (``graph=False``), where
    modules cross the transform as plain pytrees.
    """
    import jax.numpy as jnp
    import torch
    from flax import nnx

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit(graph=graph)
    def nnx_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    def step(x, y):
        loss = nnx_step(model, optimizer, jnp.asarray(x), jnp.asarray(y))
        torch_optimizer.zero_grad()
        tx_, ty_ = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y))
        torch_loss = ((torch_module(tx_) - ty_) ** 2).mean()
        torch_loss.backward()
        torch_optimizer.step()
        return loss, torch_loss.detach()

    return step


@pytest.fixture(params=["graph", "tree"])
def mse_steps(request):
    """Factory of side-by-side NNX / torch training steps (see ``_mse_steps``),
    once in flax's graph mode and once in its tree mode."""
    return functools.partial(_mse_steps, graph=request.param == "graph")
