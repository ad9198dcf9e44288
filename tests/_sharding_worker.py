"""Sharding checks on 8 host CPU devices, run in a fresh process by ``test_sharding.py``.

``XLA_FLAGS`` must be set before jax is imported, and the rest of the suite runs
with one device in the pytest process, hence a separate process. It prints one
JSON object (the findings); the tests assert on it. Run by hand to read them:
``python tests/_sharding_worker.py``.
"""

import os
import sys

# tests/torch_compat/ would shadow the torch_compat package when run as a script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import contextlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxparam.parametrize as JP  # noqa: E402
from jaxparam import functional as F  # noqa: E402
from jaxparam.parametrizations import orthogonal, spectral_norm, weight_norm  # noqa: E402
from jaxparam.parametrize import _compiled_chain  # noqa: E402

_COLLECTIVE = re.compile(
    r"= (\w+\[[\d,]*\])\S* (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\("
)

MESH = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
EXPLICIT_MESH = Mesh(MESH.devices, MESH.axis_names, axis_types=(AxisType.Explicit,) * 2)


def part(*names):
    return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


def spec(x):
    s = x.sharding
    if isinstance(s, NamedSharding):
        return [list(a) if isinstance(a, tuple) else a for a in s.spec]
    return "single" if len(s.device_set) == 1 else repr(s)


def collectives(hlo: str) -> list[list[str]]:
    return sorted({(shape, op) for shape, op in _COLLECTIVE.findall(hlo)})


def shard(module):
    """Place the module's state on the mesh by its partitioning annotations."""
    state = nnx.state(module)
    specs = nnx.get_partition_spec(state)
    nnx.update(module, jax.device_put(state, jax.tree.map(lambda p: NamedSharding(MESH, p), specs)))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(16, 64, kernel_init=part(None, "model"), rngs=rngs)
        self.l2 = nnx.Linear(64, 64, kernel_init=part("model", None), rngs=rngs)
        self.l3 = nnx.Linear(64, 8, kernel_init=part("model", None), rngs=rngs)
        weight_norm(self.l1)  # norm over the unsharded input axis: local
        spectral_norm(self.l2, rngs=1)  # matrix-vector products over a sharded axis
        weight_norm(self.l3, dim=None)  # norm over the whole (sharded) tensor

    def __call__(self, x):
        return self.l3(jnp.tanh(self.l2(jax.nn.relu(self.l1(x)))))


def training(out):
    """The same 3 adam steps, unsharded and sharded; the train step's collectives."""
    x = jax.random.normal(jax.random.key(0), (32, 16))
    y = jax.random.normal(jax.random.key(1), (32, 8))

    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    runs = {}
    for sharded in (False, True):
        model = MLP(nnx.Rngs(0))
        if sharded:
            shard(model)
            xs = jax.device_put(x, NamedSharding(MESH, P("data", None)))
        else:
            xs = x
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        jstep = nnx.jit(step)
        losses = [float(jstep(model, opt, xs, y)) for _ in range(3)]
        runs[sharded] = (losses, nnx.state(model))
        if sharded:
            out["train_hlo_collectives"] = collectives(
                jax.jit(lambda m, o, x, y: step(m, o, x, y))
                .lower(model, opt, xs, y)
                .compile()
                .as_text()
            )
            out["train_state_specs"] = {
                "/".join(map(str, k)): spec(v.get_value())
                for k, v in nnx.to_flat_state(nnx.state(model))
            }
    out["train_losses"] = runs[False][0]
    out["train_losses_sharded"] = runs[True][0]
    flat0 = dict(nnx.to_flat_state(runs[False][1]))
    flat1 = dict(nnx.to_flat_state(runs[True][1]))
    out["train_max_param_diff"] = max(
        float(jnp.max(jnp.abs(flat0[k].get_value() - flat1[k].get_value()))) for k in flat0
    )


def builtins(out):
    """Eager reads of each built-in on a sharded 64x128 kernel: value, sharding, HLO."""
    cases = {
        "weight_norm_out": ((None, "model"), weight_norm, {}),
        "weight_norm_in": (("model", None), weight_norm, {}),
        "weight_norm_whole": (("model", None), weight_norm, {"dim": None}),
        "spectral_norm_out": ((None, "model"), spectral_norm, {}),
        "spectral_norm_in": (("model", None), spectral_norm, {}),
        "orthogonal": ((None, "model"), orthogonal, {}),
    }
    res = {}
    for name, (names, register, kw) in cases.items():
        shape = (64, 64) if register is orthogonal else (64, 128)
        plain = nnx.Linear(*shape, kernel_init=part(*names), rngs=nnx.Rngs(0))
        sharded = nnx.Linear(*shape, kernel_init=part(*names), rngs=nnx.Rngs(0))
        register(plain, **kw)
        register(sharded, **kw)
        shard(sharded)
        graphdef, state = nnx.split(sharded.parametrizations.kernel)
        hlo = _compiled_chain(graphdef).lower(state).compile().as_text()
        value = sharded.kernel[...]
        res[name] = {
            "kernel_spec": list(names),
            "read_spec": spec(value),
            "max_diff": float(jnp.max(jnp.abs(value - plain.kernel[...]))),
            "collectives": collectives(hlo),
            "full_shape": f"f32[{shape[0]},{shape[1]}]",
        }
    out["builtins"] = res


def metadata(out):
    """Sharding annotations through registration and removal."""
    res = {}
    lin = nnx.Linear(16, 64, kernel_init=part("model", None), rngs=nnx.Rngs(0))
    weight_norm(lin)
    plist = lin.parametrizations.kernel
    res["weight_norm_g"] = list(plist.original0.get_metadata("out_sharding"))
    res["weight_norm_v"] = list(plist.original1.get_metadata("out_sharding"))
    shard(lin)  # raised IndivisibleError before g's annotation was fitted
    res["weight_norm_g_spec"] = spec(plist.original0.get_value())
    res["weight_norm_v_spec"] = spec(plist.original1.get_value())
    JP.remove_parametrizations(lin, "kernel")
    res["weight_norm_removed"] = list(lin.kernel.get_metadata("out_sharding"))

    lin = nnx.Linear(16, 64, kernel_init=part(None, "model"), rngs=nnx.Rngs(0))
    spectral_norm(lin)
    shard(lin)
    JP.remove_parametrizations(lin, "kernel", leave_parametrized=True)
    res["spectral_norm_removed"] = list(lin.kernel.get_metadata("out_sharding"))
    res["spectral_norm_removed_spec"] = spec(lin.kernel.get_value())
    out["metadata"] = res


# Kernels sharded over an explicit mesh axis: registration (on the sharded kernel),
# eager reads and training. The full matrix (every map, square and not, Conv kernels,
# evaluation mode, placing after registration) was checked by hand; two cases keep
# the worker short.
EXPLICIT_CASES = {
    "spectral_norm": spectral_norm,
    "orthogonal": orthogonal,  # (64, 128): householder, base completed by concatenation
}


class Branches(nnx.Module):
    """One parametrized Linear(64, 128) per case, all on the same input."""

    def __init__(self):
        for name, register in EXPLICIT_CASES.items():
            layer = nnx.Linear(64, 128, kernel_init=part(None, "model"), rngs=nnx.Rngs(0))
            setattr(self, name, register(layer))

    def __call__(self, x):
        return sum(jnp.mean(jnp.tanh(getattr(self, name)(x))) for name in EXPLICIT_CASES)


def explicit_axes(out):
    """The same 3 adam steps on one device and on a mesh with explicit axes."""
    x = jax.random.normal(jax.random.key(0), (8, 64))

    def step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: m(x))(model)
        opt.update(model, grads)
        return loss

    runs = {}
    for sharded in (False, True):
        with contextlib.ExitStack() as stack:
            if sharded:  # kernels are created sharded, and registered so
                stack.enter_context(jax.set_mesh(EXPLICIT_MESH))
                stack.enter_context(nnx.use_eager_sharding(True))
            model = Branches()
            xs = jax.device_put(x, NamedSharding(EXPLICIT_MESH, P("data"))) if sharded else x
            reads = {name: getattr(model, name).kernel[...] for name in EXPLICIT_CASES}
            # Eager calls of the functional core outside `_eager`'s jit, on the
            # explicit mesh: the orthogonality test, evaluation-mode spectral norm.
            sn = model.spectral_norm.parametrizations.kernel
            state = F.SpectralNormState(sn[0]._u[...], sn[0]._v[...])
            eager = (
                bool(F.is_orthogonal(reads["orthogonal"].T)),
                np.asarray(F.spectral_norm(sn.original[...], state, dim=1, training=False)[0]),
            )
            opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
            jstep = nnx.jit(step)
            losses = [float(jstep(model, opt, xs)) for _ in range(3)]
            params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
            runs[sharded] = (reads, losses, params, eager)
    (reads0, losses0, params0, eager0), (reads1, losses1, params1, eager1) = runs[False], runs[True]

    def diff(a, b):
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))

    out["explicit"] = {
        "eager_is_orthogonal": [eager0[0], eager1[0]],
        "eager_eval_diff": diff(eager1[1], eager0[1]),
        "losses": losses0,
        "losses_sharded": losses1,
        "read_diff": {name: diff(reads1[name], reads0[name]) for name in EXPLICIT_CASES},
        "read_spec": {name: spec(reads1[name]) for name in EXPLICIT_CASES},
        "max_param_diff": max(
            diff(params1[k].get_value(), params0[k].get_value()) for k in params0
        ),
        "original_spec": {
            name: spec(params1[(name, "parametrizations", "kernel", "original")].get_value())
            for name in EXPLICIT_CASES
        },
    }


def torch_bridge(out):
    from torch_compat import to_torch

    array = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(MESH, P(None, "model")))
    try:
        t = to_torch(array)
        out["to_torch_sharded"] = {"error": None, "shape": list(t.shape)}
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["to_torch_sharded"] = {"error": type(e).__name__, "message": str(e)}


if __name__ == "__main__":
    findings = {"devices": jax.device_count()}
    with nnx.use_eager_sharding(False):  # place state explicitly with `shard`
        for check in (training, builtins, metadata, explicit_axes, torch_bridge):
            start = time.perf_counter()
            check(findings)
            findings[f"seconds_{check.__name__}"] = round(time.perf_counter() - start, 2)
    print(json.dumps(findings))
