"""A module with JAX parametrizations under torch.compile (graph breaks allowed)."""

import jax.numpy as jnp
import pytest
import torch
import torch.nn as nn

import torch_compat.parametrize as P


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    P.register_parametrization(m, "weight", lambda w: jnp.triu(w) + jnp.triu(w, 1).T)
    x = torch.randn(3, 4)
    eager = m(x)
    eager.sum().backward()
    g_eager = m.parametrizations.weight.original.grad.clone()
    m.zero_grad()
    compiled = torch.compile(m, backend="eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(m.parametrizations.weight.original.grad, g_eager)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager():
    torch.manual_seed(0)
    m = nn.Linear(4, 4)
    P.register_parametrization(m, "weight", lambda w: w + w.T)

    def f(x):
        return torch.relu(m(x)) * 2

    x = torch.randn(3, 4)
    torch.testing.assert_close(torch.compile(f)(x), f(x))
