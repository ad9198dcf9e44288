"""Shared test configuration: strict JAX settings and helpers for float64."""

import contextlib

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
