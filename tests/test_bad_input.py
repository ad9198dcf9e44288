"""Bad input: NaN/Inf, zero norms, empty, 0-d and 1-d tensors, integer and boolean
dtypes, parametrizations that return the wrong thing, failing ``right_inverse``,
names that are not Variables. Torch is the specification where it defines the
behaviour; each case runs through torch, ``jaxparam`` (NNX) and, where it applies,
``torch_compat``.

Layout: torch's ``(out, in)`` weight is the transposed Flax ``(in, out)`` kernel;
the NNX built-ins' defaults act per output feature, as torch's do.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.parametrize as TP
from flax import nnx
from torch.nn.utils import parametrizations as TPZ

import jaxparam.parametrize as P
import torch_compat.parametrizations as CPZ
import torch_compat.parametrize as CP
from jaxparam.parametrizations import orthogonal, spectral_norm, weight_norm


class Holder(nnx.Module):
    def __init__(self, value, kind=nnx.Param):
        self.kernel = kind(value)


def _torch_module(w, buffer=False):
    m = torch.nn.Module()
    if buffer:
        m.register_buffer("weight", w)
    else:
        m.weight = torch.nn.Parameter(w)
    return m


BUILTINS = {
    "weight_norm": (weight_norm, lambda m: TPZ.weight_norm(m, "weight", dim=0)),
    "spectral_norm": (spectral_norm, lambda m: TPZ.spectral_norm(m, "weight")),
    "orthogonal": (orthogonal, lambda m: TPZ.orthogonal(m, "weight")),
}


def _weight(kind):
    w = torch.randn(3, 4)
    if kind == "nan":
        w[1, 2] = float("nan")
    elif kind == "inf":
        w[0, 0] = float("inf")
    elif kind == "zero_row":
        w[1] = 0.0
    return w


def _nnx_value(register, w, **kw):
    module = register(Holder(jnp.asarray(w.numpy().T)), **kw)
    return np.asarray(module.kernel[...]).T


# -- NaN, Inf, zero norms ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("builtin", sorted(BUILTINS))
def test_non_finite_originals_propagate_as_in_torch(builtin, kind):
    # weight_norm: only the rows (output features) holding the NaN/Inf become NaN
    # (an Inf row is inf/inf). spectral_norm and orthogonal: the whole matrix.
    ours, theirs = BUILTINS[builtin]
    w = _weight(kind)
    expected = theirs(_torch_module(w.clone())).weight.detach().numpy()
    got = _nnx_value(ours, w)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    if builtin == "weight_norm":
        np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-6)


def test_weight_norm_zero_row_is_nan_as_in_torch():
    # g = ||0|| = 0 and v = 0: w = 0 * (0 / 0) = NaN on that row, as torch.
    w = _weight("zero_row")
    expected = TPZ.weight_norm(_torch_module(w.clone()), "weight", dim=0).weight.detach()
    got = _nnx_value(weight_norm, w)
    assert torch.isnan(expected[1]).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected.numpy()))
    np.testing.assert_allclose(got[[0, 2]], expected.numpy()[[0, 2]], rtol=1e-6)


# -- empty, 0-d and 1-d tensors --------------------------------------------------------


@pytest.mark.parametrize(
    "builtin, shape",
    [
        (builtin, shape)
        for builtin in ("weight_norm", "orthogonal")
        for shape in [(4, 0), (0, 4), (0, 0)]
    ]
    + [
        ("spectral_norm", (4, 0)),
        ("spectral_norm", (0, 4)),
        ("spectral_norm", (0, 0)),
    ],
    ids=str,
)
def test_empty_weights(builtin, shape):
    # torch (out, in) = `shape`; torch returns an empty tensor of the same shape
    # (torch's weight_norm fails on out == 0 with a reshape error, an artifact: we
    # return the empty tensor).
    ours, theirs = BUILTINS[builtin]
    w = torch.zeros(shape)
    if builtin != "weight_norm" or shape[0] != 0:
        assert tuple(theirs(_torch_module(w.clone())).weight.shape) == shape
    assert _nnx_value(ours, w).shape == shape


@pytest.mark.parametrize("ndim", [0, 1])
def test_orthogonal_refuses_fewer_than_two_dims(ndim):
    value = jnp.ones((3,) * ndim)
    with pytest.raises(ValueError) as theirs:
        TPZ.orthogonal(_torch_module(torch.ones((3,) * ndim)), "weight")
    module = Holder(value)
    with pytest.raises(ValueError) as ours:
        orthogonal(module)
    assert str(ours.value) == str(theirs.value)
    assert type(module) is Holder


def test_one_d_weights_as_torch():
    w = torch.tensor([3.0, -4.0, 0.5, 1.0, 2.0])
    for name, (ours, theirs) in BUILTINS.items():
        if name == "orthogonal":
            continue
        expected = theirs(_torch_module(w.clone())).weight.detach().numpy()
        got = np.asarray(ours(Holder(jnp.asarray(w.numpy())), dim=0).kernel[...])
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=name)
    # torch's weight_norm(dim=None) on a 1-d weight too.
    expected = TPZ.weight_norm(_torch_module(w.clone()), "weight", dim=None).weight
    got = weight_norm(Holder(jnp.asarray(w.numpy())), dim=None).kernel[...]
    np.testing.assert_allclose(np.asarray(got), expected.detach().numpy(), rtol=1e-6)


@pytest.mark.parametrize("dim", [0, None])
def test_weight_norm_refuses_0d_as_torch(dim):
    # torch raises at registration (dim=0) or at the first read (dim=None); we
    # refuse at registration in both cases.
    with pytest.raises(IndexError) as theirs:
        _ = TPZ.weight_norm(_torch_module(torch.tensor(-3.0)), "weight", dim=dim).weight
    module = Holder(jnp.asarray(-3.0))
    with pytest.raises(IndexError) as ours:
        weight_norm(module, dim=dim)
    assert str(ours.value).startswith(str(theirs.value))
    assert "fix:" in str(ours.value)
    assert type(module) is Holder


def test_spectral_norm_refuses_0d():
    with pytest.raises(IndexError):
        TPZ.spectral_norm(_torch_module(torch.tensor(-3.0)), "weight")
    module = Holder(jnp.asarray(-3.0))
    with pytest.raises(IndexError, match="Dimension out of range"):
        spectral_norm(module, dim=0)
    assert type(module) is Holder


# -- integer and boolean tensors --------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_generic_mechanism_accepts_any_dtype_as_torch(dtype):
    # torch: a Parameter cannot hold integers, but a buffer can, and torch's
    # register_parametrization accepts it.
    tdtype = getattr(torch, dtype)
    with pytest.raises(RuntimeError, match="Only Tensors of floating point"):
        torch.nn.Parameter(torch.ones(2, 2, dtype=tdtype))

    class Flip(torch.nn.Module):
        def forward(self, x):
            return x.flip(0)

    t = TP.register_parametrization(
        _torch_module(torch.eye(2, dtype=tdtype), buffer=True), "weight", Flip()
    )
    n = P.register_parametrization(
        Holder(jnp.eye(2, dtype=dtype), nnx.BatchStat), "kernel", lambda x: jnp.flip(x, 0)
    )
    c = CP.register_parametrization(
        _torch_module(torch.eye(2, dtype=tdtype), buffer=True), "weight", lambda x: jnp.flip(x, 0)
    )
    assert n.kernel.dtype == jnp.dtype(dtype)
    assert c.weight.dtype == t.weight.dtype == tdtype
    np.testing.assert_array_equal(np.asarray(n.kernel[...]), t.weight.numpy())
    np.testing.assert_array_equal(c.weight.numpy(), t.weight.numpy())


@pytest.mark.parametrize("dtype", ["int32", "bool"])
@pytest.mark.parametrize("builtin", sorted(BUILTINS))
def test_builtins_refuse_integer_and_boolean(builtin, dtype):
    # torch fails too, deep inside each built-in (norm(), a random draw,
    # torch.finfo); we refuse at registration with one clear message.
    ours, theirs = BUILTINS[builtin]
    with pytest.raises((RuntimeError, NotImplementedError, TypeError)):
        theirs(_torch_module(torch.ones(3, 3, dtype=getattr(torch, dtype)), buffer=True))
    module = Holder(jnp.ones((3, 3), dtype), nnx.BatchStat)
    with pytest.raises(ValueError, match=f"{builtin} needs a floating point or complex tensor"):
        ours(module)
    assert type(module) is Holder
    assert module.kernel.dtype == jnp.dtype(dtype)


# -- parametrizations that return the wrong thing -----------------------------------------


class TorchLink(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


WRONG = {
    "shape": (lambda x: x[:1], lambda x: x[:1]),
    "dtype": (lambda x: x.astype(jnp.float16), lambda x: x.half()),
    "python_scalar": (lambda x: 1.0, lambda x: 1.0),
}


@pytest.mark.parametrize("what", sorted(WRONG))
def test_wrong_output_refused_as_torch(what):
    jax_fn, torch_fn = WRONG[what]
    with pytest.raises(ValueError) as theirs:
        TP.register_parametrization(torch.nn.Linear(2, 2), "weight", TorchLink(torch_fn))
    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    before = layer.kernel[...]
    with pytest.raises(ValueError) as ours:
        P.register_parametrization(layer, "kernel", jax_fn)
    headline = str(theirs.value).splitlines()[0]
    assert str(ours.value).splitlines()[0] == headline
    assert type(layer) is nnx.Linear and layer.kernel[...] is before

    m = torch.nn.Linear(2, 2)
    if what == "python_scalar":
        # torch_compat's adapter checks what a JAX function returns before torch does.
        with pytest.raises(TypeError, match="must return a jax.Array. Got float"):
            CP.register_parametrization(m, "weight", jax_fn)
    else:
        with pytest.raises(ValueError) as compat:
            CP.register_parametrization(m, "weight", jax_fn)
        assert str(compat.value).splitlines()[0] == headline
    assert type(m) is torch.nn.Linear


def _identity(x):
    return x


def _identity_inverse(x):
    return x


_identity.right_inverse = _identity_inverse


@pytest.mark.parametrize(
    "value, error",
    [(1.0, "`right_inverse` should return a tensor"), ("int", "has dtype int32")],
    ids=["python_scalar", "int"],
)
def test_bad_assignment_refused_and_module_unchanged(value, error):
    layer = P.register_parametrization(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "kernel", _identity)
    before = layer.parametrizations.kernel.original[...]
    if value == "int":
        value = jnp.ones((2, 2), jnp.int32)
    with pytest.raises(ValueError, match=error):
        layer.kernel = value
    assert layer.parametrizations.kernel.original[...] is before


def _raising_inverse(x):
    raise ValueError("right_inverse failed")


def _with_raising_inverse(x):
    return 2 * x


_with_raising_inverse.right_inverse = _raising_inverse


class TorchRaisingInverse(torch.nn.Module):
    def forward(self, x):
        return 2 * x

    def right_inverse(self, x):
        raise ValueError("right_inverse failed")


def test_raising_right_inverse_leaves_module_unchanged():
    t = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="right_inverse failed"):
        TP.register_parametrization(t, "weight", TorchRaisingInverse())
    assert type(t) is torch.nn.Linear and not hasattr(t, "parametrizations")

    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    kernel = layer.kernel
    before = kernel[...]
    with pytest.raises(ValueError, match="right_inverse failed"):
        P.register_parametrization(layer, "kernel", _with_raising_inverse)
    assert type(layer) is nnx.Linear and layer.kernel is kernel and kernel[...] is before
    assert "parametrizations" not in vars(layer)

    c = torch.nn.Linear(2, 2)
    weight = c.weight.detach().clone()
    with pytest.raises(ValueError, match="right_inverse failed"):
        CP.register_parametrization(c, "weight", _with_raising_inverse)
    assert type(c) is torch.nn.Linear and not hasattr(c, "parametrizations")
    assert torch.equal(c.weight, weight)

    # On assignment: the original keeps its value.
    layer = P.register_parametrization(layer, "kernel", _identity)
    P.register_parametrization(layer, "kernel", _with_raising_inverse, unsafe=True)
    original = layer.parametrizations.kernel.original[...]
    with pytest.raises(ValueError, match="right_inverse failed"):
        layer.kernel = jnp.zeros((2, 2))
    assert layer.parametrizations.kernel.original[...] is original


# -- names that are not Variables ---------------------------------------------------------


class NNXModule(nnx.Module):
    def __init__(self):
        self.raw = jnp.ones((2, 2))
        self.sub = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        self.kernel = nnx.Param(jnp.ones((2, 2)))

    def method(self):
        return None


class TorchModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.raw = torch.ones(2, 2)
        self.sub = torch.nn.Linear(2, 2)
        self.weight = torch.nn.Parameter(torch.ones(2, 2))

    def method(self):
        return None


_PREFIX = "does not have a parameter, a buffer, or a parametrized element with name"


@pytest.mark.parametrize(
    "name, found",
    [
        ("missing", None),
        ("raw", "an attribute of type ArrayImpl, not an nnx.Variable"),
        ("sub", "an attribute of type Linear, not an nnx.Variable"),
        ("method", "a class attribute (a method or property), not an nnx.Variable"),
    ],
)
def test_register_on_a_non_variable(name, found):
    with pytest.raises(ValueError, match=_PREFIX):
        TP.register_parametrization(TorchModule(), name, TorchLink(lambda x: x))
    with pytest.raises(ValueError, match=_PREFIX):
        CP.register_parametrization(TorchModule(), name, _identity)
    module = NNXModule()
    with pytest.raises(ValueError) as info:
        P.register_parametrization(module, name, _identity)
    message = str(info.value)
    assert message.startswith(f"Module 'NNXModule' {_PREFIX} '{name}'")
    assert "Variables of the module: kernel" in message
    assert "fix: name an nnx.Variable" in message
    if found is not None:
        assert f"found: {found}" in message
    assert type(module) is NNXModule


@pytest.mark.parametrize("builtin", sorted(BUILTINS))
def test_builtins_on_a_missing_name(builtin):
    ours, theirs = BUILTINS[builtin]
    with pytest.raises(ValueError) as torch_err:
        theirs(torch.nn.Module())
    # torch's weight_norm raises register_parametrization's message; the others their own
    words = str(torch_err.value).split("' ", 1)[1].replace("'weight'", "'raw'")
    module = NNXModule()
    with pytest.raises(ValueError) as info:
        ours(module, "raw")
    assert str(info.value).startswith(f"Module 'NNXModule' {words}")
    assert type(module) is NNXModule


def test_remove_a_name_that_is_not_parametrized():
    with pytest.raises(ValueError) as theirs:
        TP.remove_parametrizations(torch.nn.Linear(2, 2), "weight")
    layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError) as ours:
        P.remove_parametrizations(layer, "kernel")
    assert str(theirs.value).startswith("Module Linear(")
    assert str(ours.value).startswith("Module Linear does not have a parametrization on kernel")
    assert type(layer) is nnx.Linear


# -- torch_compat's built-ins against torch's --------------------------------------------

COMPAT = {
    "weight_norm": (
        lambda m, **kw: TPZ.weight_norm(m, "weight", **{"dim": 0, **kw}),
        lambda m, **kw: CPZ.weight_norm(m, "weight", **{"dim": 0, **kw}),
    ),
    "spectral_norm": (
        lambda m: TPZ.spectral_norm(m, "weight"),
        lambda m: CPZ.spectral_norm(m, "weight"),
    ),
    "orthogonal": (
        lambda m: TPZ.orthogonal(m, "weight"),
        lambda m: CPZ.orthogonal(m, "weight"),
    ),
}


@pytest.mark.parametrize("kind", ["nan", "inf", "zero_row"])
@pytest.mark.parametrize("builtin", sorted(COMPAT))
def test_compat_non_finite_as_torch(builtin, kind):
    theirs, compat = COMPAT[builtin]
    w = _weight(kind)
    expected = theirs(_torch_module(w.clone())).weight.detach()
    got = compat(_torch_module(w.clone())).weight.detach()
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))


@pytest.mark.parametrize(
    "builtin, shape",
    [
        ("weight_norm", (4, 0)),
        ("spectral_norm", (4, 0)),
        ("orthogonal", (4, 0)),
        ("orthogonal", (0, 4)),
        ("orthogonal", (0, 0)),
        ("spectral_norm", (0, 4)),
    ],
    ids=str,
)
def test_compat_empty_weights(builtin, shape):
    theirs, compat = COMPAT[builtin]
    assert tuple(theirs(_torch_module(torch.zeros(shape))).weight.shape) == shape
    assert tuple(compat(_torch_module(torch.zeros(shape))).weight.shape) == shape


def test_compat_one_d_as_torch():
    w = torch.tensor([3.0, -4.0, 0.5, 1.0, 2.0])
    for builtin in ("weight_norm", "spectral_norm"):
        theirs, compat = COMPAT[builtin]
        torch.testing.assert_close(
            compat(_torch_module(w.clone())).weight, theirs(_torch_module(w.clone())).weight
        )
    with pytest.raises(ValueError, match="Expected a matrix or batch of matrices"):
        CPZ.orthogonal(_torch_module(w.clone()), "weight")


@pytest.mark.parametrize(
    "builtin, kw",
    [pytest.param("weight_norm", {"dim": dim}, id=f"weight_norm-dim={dim}") for dim in (0, None)]
    + [("spectral_norm", {}), ("orthogonal", {})],
)
def test_compat_0d_as_torch(builtin, kw):
    theirs, compat = COMPAT[builtin]
    with pytest.raises((IndexError, ValueError)) as expected:
        _ = theirs(_torch_module(torch.tensor(-3.0)), **kw).weight
    with pytest.raises(type(expected.value)) as got:
        _ = compat(_torch_module(torch.tensor(-3.0)), **kw).weight
    assert str(got.value).startswith(str(expected.value))


@pytest.mark.parametrize("dtype", ["int32", "bool"])
@pytest.mark.parametrize(
    "builtin",
    [
        "weight_norm",
        "spectral_norm",
        "orthogonal",
    ],
)
def test_compat_refuses_integer_and_boolean(builtin, dtype):
    theirs, compat = COMPAT[builtin]
    weight = torch.ones(3, 3, dtype=getattr(torch, dtype))
    with pytest.raises((RuntimeError, NotImplementedError, TypeError)):
        theirs(_torch_module(weight.clone(), buffer=True))
    with pytest.raises((RuntimeError, NotImplementedError, TypeError, ValueError)):
        _ = compat(_torch_module(weight.clone(), buffer=True)).weight
