"""Sharding: parametrized models on a mesh of 8 host CPU devices.

The multi-device checks run in a fresh process (``tests/_sharding_worker.py``):
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax is
imported, and this pytest process runs the rest of the suite on one device. The
worker prints its findings as JSON; the tests below assert on them. The
annotation checks (``nnx.with_partitioning`` metadata) need no devices and run
here.
"""

import json
import os
import sys

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import jaxparam.parametrize as P
from jaxparam.parametrizations import orthogonal, spectral_norm, weight_norm

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sharding_worker.py")


# The worker runs in the background from the start of the session (tests/conftest.py).
BACKGROUND_JOBS = {
    "worker": {
        "argv": [sys.executable, _WORKER],
        "env": {
            **{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
            "JAX_PLATFORMS": "cpu",
        },
    }
}


@pytest.fixture
def findings(background):
    proc, _ = background("worker")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _padded(spec, ndim=2):
    """A PartitionSpec as a list of ``ndim`` entries (trailing ``None`` made explicit)."""
    return list(spec) + [None] * (ndim - len(spec))


def _gathers(collectives):
    return [shape for shape, op in collectives if op == "all-gather"]


# -- multi-device, in the worker process ----------------------------------------


def test_worker_sees_eight_devices(findings):
    assert findings["devices"] == 8


def test_sharded_training_matches_unsharded(findings):
    # weight_norm, spectral_norm and a whole-tensor weight_norm on kernels sharded
    # over a (data=2, model=4) mesh, trained under nnx.jit with adam.
    assert findings["train_losses_sharded"] == pytest.approx(findings["train_losses"], rel=1e-5)
    assert findings["train_max_param_diff"] < 1e-5


def test_sharded_training_gathers_no_weight(findings):
    # The compiled train step only all-reduces (activation gradients, norms); no
    # weight is gathered onto every device.
    assert _gathers(findings["train_hlo_collectives"]) == []
    assert {op for _, op in findings["train_hlo_collectives"]} <= {"all-reduce"}


def test_originals_stay_sharded_after_training(findings):
    specs = findings["train_state_specs"]
    assert _padded(specs["l1/parametrizations/kernel/original1"]) == [None, "model"]
    assert _padded(specs["l1/parametrizations/kernel/original0"]) == [None, "model"]
    assert _padded(specs["l2/parametrizations/kernel/original"]) == ["model", None]
    assert _padded(specs["l3/parametrizations/kernel/original1"]) == ["model", None]


@pytest.mark.parametrize(
    "case",
    [
        "weight_norm_out",
        "weight_norm_in",
        "weight_norm_whole",
        "spectral_norm_out",
        "spectral_norm_in",
    ],
)
def test_norms_reduce_over_sharded_axes(findings, case):
    res = findings["builtins"][case]
    # Same values as on one device.
    assert res["max_diff"] < 1e-6
    # The eager read keeps the kernel's sharding: no silent gather onto one device.
    assert _padded(res["read_spec"]) == res["kernel_spec"]
    # Reductions over a sharded axis are all-reduces of vectors or scalars; the
    # weight itself is never gathered.
    assert _gathers(res["collectives"]) == []
    assert all(shape != res["full_shape"] for shape, _ in res["collectives"])


def test_weight_norm_over_unsharded_axis_is_local(findings):
    assert findings["builtins"]["weight_norm_out"]["collectives"] == []


def test_orthogonal_gathers_the_matrix(findings):
    # Documented behaviour (docs/reliability.md): the orthogonal maps (matrix
    # exponential, Cayley's solve, Householder products) need the whole matrix, so
    # XLA all-gathers a sharded kernel and the value comes back replicated.
    res = findings["builtins"]["orthogonal"]
    assert res["max_diff"] < 1e-6
    assert res["full_shape"] in _gathers(res["collectives"])
    assert _padded(res["read_spec"]) == [None, None]


def test_sharding_metadata_through_registration_and_removal(findings):
    meta = findings["metadata"]
    # weight norm on a kernel sharded over its input axis: g (1, out) cannot be
    # sharded over an axis of size 1, v keeps the kernel's annotation.
    assert meta["weight_norm_g"] == [None, None]
    assert meta["weight_norm_v"] == ["model", None]
    assert _padded(meta["weight_norm_g_spec"]) == [None, None]
    assert _padded(meta["weight_norm_v_spec"]) == ["model", None]
    assert meta["weight_norm_removed"] == ["model", None]
    assert meta["spectral_norm_removed"] == [None, "model"]
    assert _padded(meta["spectral_norm_removed_spec"]) == [None, "model"]


@pytest.mark.parametrize("case", ["spectral_norm", "orthogonal"])
def test_explicit_mesh_registration_and_reads(findings, case):
    # On a mesh with explicit axes (jax.sharding.AxisType.Explicit) JAX asks for the
    # sharding of every product over a sharded axis: the functional core runs there
    # on automatic axes. Registered on a (None, "model") kernel, the eager read has
    # the one-device value and the kernel's sharding (on an Auto mesh an orthogonal
    # value comes back replicated; here its type says where it lives).
    res = findings["explicit"]
    assert res["read_diff"][case] < 1e-6
    assert _padded(res["read_spec"][case]) == [None, "model"]


def test_explicit_mesh_eager_functional_calls(findings):
    # Eager calls that run op by op on the mesh's automatic axes (an identity
    # matrix made outside them once broke `is_orthogonal` there).
    res = findings["explicit"]
    assert res["eager_is_orthogonal"] == [True, True]
    assert res["eager_eval_diff"] < 1e-6


def test_explicit_mesh_training_matches_unsharded(findings):
    res = findings["explicit"]
    assert res["losses_sharded"] == pytest.approx(res["losses"], rel=1e-5)
    assert res["max_param_diff"] < 1e-5
    for case, spec in res["original_spec"].items():
        assert _padded(spec) == [None, "model"], case


def test_torch_compat_refuses_sharded_arrays(findings):
    res = findings["to_torch_sharded"]
    assert res["error"] in ("ValueError", "TypeError"), res
    assert "device" in res["message"]


# -- annotations, in this process (no devices needed) -----------------------------


def _linear(names, din=4, dout=6):
    with nnx.use_eager_sharding(False):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
        return nnx.Linear(din, dout, kernel_init=init, rngs=nnx.Rngs(0))


def _annotation(var):
    return tuple(var.get_metadata("out_sharding", None) or ()) or None


@pytest.mark.parametrize("names", [("data", "model"), (None, "model"), ("model", None)])
def test_weight_norm_annotations_fit_g_and_v(names):
    layer = weight_norm(_linear(names))
    plist = layer.parametrizations.kernel
    assert _annotation(plist.original1) == names  # v: the kernel's shape
    assert _annotation(plist.original0) == (None, names[1])  # g: (1, out)
    # Every annotation fits its array, so the brief's placement path works.
    specs = nnx.get_partition_spec(nnx.state(layer))
    assert specs["parametrizations"]["kernel"]["original0"].get_value() == PartitionSpec(
        None, names[1]
    )
    P.remove_parametrizations(layer, "kernel")
    assert _annotation(layer.kernel) == names


def test_weight_norm_whole_tensor_drops_annotation():
    layer = weight_norm(_linear(("data", "model")), dim=None)
    assert layer.parametrizations.kernel.original0.get_value().ndim == 0
    assert _annotation(layer.parametrizations.kernel.original0) is None


@pytest.mark.parametrize("register", [spectral_norm, orthogonal], ids=["spectral", "orthogonal"])
def test_single_original_keeps_its_annotation(register):
    layer = _linear(("data", "model"), 6, 6)
    var = layer.kernel
    register(layer)
    assert layer.parametrizations.kernel.original is var
    assert _annotation(var) == ("data", "model")
    for leave in (True, False):
        layer2 = register(_linear(("data", "model"), 6, 6))
        P.remove_parametrizations(layer2, "kernel", leave_parametrized=leave)
        assert _annotation(layer2.kernel) == ("data", "model")


def _first_columns(x):
    return x[:, :3]


def test_unsafe_shape_change_on_removal_drops_stale_annotation():
    # leave_parametrized=True writes the (4, 3) value into the (4, 6) original
    # Variable: the annotation of the changed axis no longer fits and is dropped.
    layer = _linear(("data", "model"))
    P.register_parametrization(layer, "kernel", _first_columns, unsafe=True)
    var = layer.parametrizations.kernel.original
    P.remove_parametrizations(layer, "kernel", leave_parametrized=True)
    assert layer.kernel is var
    assert layer.kernel.shape == (4, 3)
    assert _annotation(layer.kernel) == ("data", None)


def _flatten(x):
    return x.reshape(-1)


def _unflatten(x):
    return x.reshape(4, 6)


_unflatten.right_inverse = _flatten


def test_unsafe_rank_change_at_registration_drops_annotation():
    # right_inverse stores a flat original: a 2-d annotation cannot describe it.
    layer = _linear(("data", "model"))
    before = layer.kernel[...]
    P.register_parametrization(layer, "kernel", _unflatten, unsafe=True)
    original = layer.parametrizations.kernel.original
    assert original.shape == (24,)
    assert _annotation(original) is None
    assert jnp.array_equal(layer.kernel[...], before)
    # Removal keeps the parametrized (4, 6) value; the annotation stays dropped
    # (there is nothing to take it back from).
    P.remove_parametrizations(layer, "kernel", leave_parametrized=True)
    assert layer.kernel.shape == (4, 6)
    assert _annotation(layer.kernel) is None
