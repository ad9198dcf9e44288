"""Shared test configuration: strict JAX settings, helpers for float64, and the
subprocess checks that run in the background while the rest of the suite runs."""

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
import threading

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


# -- subprocess checks in the background ------------------------------------------
#
# A few checks need a fresh Python process (the benchmark scripts run as a user
# runs them; the sharding worker needs XLA_FLAGS set before jax is imported). They
# take about 90 s together, mostly imports and compilation on one core, so they
# run one after another on a background thread from the end of collection, beside
# the rest of the suite, and the tests that read their results wait for them.
# A test module declares its jobs in a module-level ``BACKGROUND_JOBS`` dict,
# ``{key: dict(argv=[...], env={...} or None, timeout=seconds)}``; the jobs that
# the selected tests may read start, and a test reads one with the ``background``
# fixture. The benchmark tests run last (see
# ``pytest_collection_modifyitems``) so that their scripts have had time to finish.


class _Job:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 300):
        self.argv, self.timeout = argv, timeout
        self.workdir = tempfile.mkdtemp(prefix="jaxparam-bg-")
        self.env = dict(os.environ if env is None else env, JAXPARAM_BENCH_RESULTS=self.workdir)
        self.done = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.result: subprocess.CompletedProcess | BaseException | None = None

    def run(self) -> None:
        try:
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            self.proc = subprocess.Popen(
                self.argv, cwd=root, env=self.env, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                out, err = self.proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
                raise
            self.result = subprocess.CompletedProcess(self.argv, self.proc.returncode, out, err)
        except BaseException as e:  # re-raised in the test that reads it
            self.result = e
        finally:
            self.done.set()

    def stop(self) -> None:
        """At the end of the session: no process left behind, no folder."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


_JOBS: dict[tuple[str, str], _Job] = {}


def pytest_collection_modifyitems(config, items):
    last = [it for it in items if it.path.name == "test_benchmarks.py"]
    if last:
        items[:] = [it for it in items if it.path.name != "test_benchmarks.py"] + last


def _wanted(item) -> set[str]:
    """The keys of its module's jobs that a selected test may read: the one its
    parameters name (``test_benchmark_script_runs[bench_bridge]``), else all."""
    keys = set(getattr(getattr(item, "module", None), "BACKGROUND_JOBS", {}))
    params = set(map(str, getattr(getattr(item, "callspec", None), "params", {}).values()))
    return keys & params or keys


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for item in session.items:
        for key in _wanted(item):
            if (item.module.__name__, key) not in _JOBS:
                _JOBS[(item.module.__name__, key)] = _Job(**item.module.BACKGROUND_JOBS[key])
    jobs = list(_JOBS.values())

    def run_all():
        for job in jobs:
            job.run()

    if jobs:
        threading.Thread(target=run_all, name="background-checks", daemon=True).start()


def pytest_sessionfinish(session, exitstatus):
    for job in _JOBS.values():
        job.stop()


@pytest.fixture
def background(request):
    """``background(key)``: the finished process of this module's job ``key`` and
    the folder it ran with as ``JAXPARAM_BENCH_RESULTS``."""

    def result(key: str) -> tuple[subprocess.CompletedProcess, str]:
        name = request.module.__name__
        job = _JOBS.get((name, key))
        if job is None:  # not started at collection: run it here
            job = _JOBS[(name, key)] = _Job(**request.module.BACKGROUND_JOBS[key])
            job.run()
        # Jobs ahead of this one in the queue may still be running: wait for all.
        if not job.done.wait(sum(j.timeout for j in _JOBS.values()) + 60):
            raise TimeoutError(f"the background job {key!r} did not finish")
        if isinstance(job.result, BaseException):
            raise job.result
        return job.result, job.workdir

    return result
