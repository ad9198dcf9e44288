"""Numerics: an orthogonal RNN cell stays orthogonal along a long training run.

The recurrent kernel of a float32 RNN cell (hidden 32) is parametrized with
``jaxparam.parametrizations.orthogonal`` and trained with adam. The training
loop is compiled once: ``jax.lax.scan`` over time inside the cell, and
``jax.lax.scan`` over chunks of training steps outside, so the deviation
``max |W^T W - I|`` is measured after **every** step, not only at the end. The
default run trains 500 steps per map; the ``slow`` run 10,000.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxparam.parametrizations import orthogonal

HIDDEN = 32
TOLERANCE = 1e-4
MAPS = ["matrix_exp", "cayley", "householder"]


class OrthogonalRNN(nnx.Module):
    def __init__(self, orthogonal_map: str, *, rngs: nnx.Rngs):
        self.inp = nnx.Linear(4, HIDDEN, rngs=rngs)
        self.rec = nnx.Linear(HIDDEN, HIDDEN, use_bias=False, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 1, rngs=rngs)
        orthogonal(self.rec, orthogonal_map=orthogonal_map, rngs=rngs)

    def __call__(self, xs: jax.Array) -> jax.Array:  # xs: (time, batch, 4)
        w = self.rec.kernel[...]  # computed once per sequence, not per time step
        inputs = self.inp(xs)

        def cell(h, u):
            return jnp.tanh(h @ w + u), None

        h, _ = jax.lax.scan(cell, jnp.zeros((xs.shape[1], HIDDEN)), inputs)
        return self.out(h)


def _deviation(w: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(w.T @ w - jnp.eye(w.shape[-1], dtype=w.dtype)))


def _train_step(model, opt, key):
    xs = jax.random.normal(key, (16, 8, 4))
    y = jnp.sin(xs.sum((0, 2)))[:, None]
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(xs) - y) ** 2))(model)
    opt.update(model, grads)
    return loss, _deviation(model.rec.kernel[...])


def _train(orthogonal_map: str, steps: int, chunk: int = 500):
    """Losses and the deviation after each step; the final model."""
    model = OrthogonalRNN(orthogonal_map, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    @jax.jit
    def run_chunk(state, keys):
        def body(state, key):
            model, opt = nnx.merge(graphdef, state)
            out = _train_step(model, opt, key)
            return nnx.state((model, opt)), out

        return jax.lax.scan(body, state, keys)

    keys = jax.random.split(jax.random.key(1), steps).reshape(-1, chunk)
    losses, deviations = [], []
    for chunk_keys in keys:  # one compilation, reused for every chunk
        state, (loss, dev) = run_chunk(state, chunk_keys)
        losses.append(np.asarray(loss))
        deviations.append(np.asarray(dev))
    nnx.update((model, opt), state)
    return np.concatenate(losses), np.concatenate(deviations), model


def _check(orthogonal_map: str, steps: int) -> None:
    losses, deviations, model = _train(orthogonal_map, steps)
    assert deviations.shape == (steps,)
    assert np.all(np.isfinite(losses))
    worst = int(deviations.argmax())
    assert deviations[worst] < TOLERANCE, (
        f"{orthogonal_map}: |W^T W - I| = {deviations[worst]:.3g} after step {worst + 1}"
    )
    # It trained: the loss went down.
    assert losses[-50:].mean() < losses[:50].mean()
    # The eager read (one compiled call outside the trace) agrees.
    assert float(_deviation(model.rec.kernel[...])) < TOLERANCE


@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_orthogonal_rnn_stays_orthogonal_500_steps(orthogonal_map):
    _check(orthogonal_map, 500)


@pytest.mark.slow
@pytest.mark.parametrize("orthogonal_map", MAPS)
def test_orthogonal_rnn_stays_orthogonal_10000_steps(orthogonal_map):
    _check(orthogonal_map, 10_000)
