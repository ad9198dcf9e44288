"""Differential tests: `jaxparam.parametrize` on NNX vs `torch.nn.utils.parametrize`.

Each scenario runs through real torch and through our code on modules holding the
very same numbers in the same layout (a raw `weight` Variable / Parameter), then
compares values, gradients, state-dict keys and exceptions (type and message).
"""

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.utils.parametrize as TP
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

import jaxparam.parametrize as P

# ---------------------------------------------------------------------------
# Paired modules (same numbers, same layout)
# ---------------------------------------------------------------------------

W = np.arange(1.0, 10.0).reshape(3, 3) / 7.0 - 0.4
B = np.array([0.1, -0.2, 0.3])
R = np.array([1.0, 2.0, 3.0])


class JM(nnx.Module):
    def __init__(self, w=W, b=B, dtype=np.float32):
        self.weight = nnx.Param(jnp.asarray(w, dtype))
        self.bias = nnx.Param(jnp.asarray(b, dtype))
        self.running = nnx.BatchStat(jnp.asarray(R, dtype))
        self.note = "not a variable"


class TM(nn.Module):
    def __init__(self, w=W, b=B, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(w, dtype=dtype))
        self.bias = nn.Parameter(torch.tensor(b, dtype=dtype))
        self.register_buffer("running", torch.tensor(R, dtype=dtype))
        self.note = "not a variable"


# -- JAX links: module-level named functions, `right_inverse` as an attribute ----


def j_sym(x):
    return jnp.triu(x) + jnp.triu(x, 1).T


j_sym.right_inverse = lambda a: jnp.triu(a)


def j_double(x):
    return 2 * x


j_double.right_inverse = lambda x: x / 2


def j_plus_one(x):
    return x + 1


j_plus_one.right_inverse = lambda x: x - 1


def j_triple(x):  # no right_inverse
    return 3 * x


def j_sum2(a, b):
    return a + b


j_sum2.right_inverse = lambda x: (jnp.triu(x), jnp.tril(x, -1))


def j_matmul2(a, b):
    return a @ b


j_matmul2.right_inverse = lambda x: (x, jnp.eye(x.shape[-1], dtype=x.dtype))


# -- torch links: nn.Modules wrapping the same math -----------------------------


class TLink(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, *xs):
        return self.f(*xs)


class TLinkInv(TLink):
    def __init__(self, f, ri):
        super().__init__(f)
        self.ri = ri

    def right_inverse(self, x):
        return self.ri(x)


def t_sym():
    return TLinkInv(lambda x: x.triu() + x.triu(1).T, lambda a: a.triu())


def t_double():
    return TLinkInv(lambda x: 2 * x, lambda x: x / 2)


def t_plus_one():
    return TLinkInv(lambda x: x + 1, lambda x: x - 1)


def t_triple():
    return TLink(lambda x: 3 * x)


def t_sum2():
    return TLinkInv(lambda a, b: a + b, lambda x: (x.triu(), x.tril(-1)))


def t_matmul2():
    return TLinkInv(lambda a, b: a @ b, lambda x: (x, torch.eye(x.shape[-1], dtype=x.dtype)))


LINKS = {
    "sym": (j_sym, t_sym),
    "double": (j_double, t_double),
    "plus_one": (j_plus_one, t_plus_one),
    "triple": (j_triple, t_triple),
    "sum2": (j_sum2, t_sum2),
    "matmul2": (j_matmul2, t_matmul2),
}


def register_both(jm, tm, name, *links, unsafe=False):
    for link in links:
        jlink, tlink = LINKS[link] if isinstance(link, str) else link
        P.register_parametrization(jm, name, jlink, unsafe=unsafe)
        TP.register_parametrization(tm, name, tlink(), unsafe=unsafe)


# ---------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------


def np_(x):
    if isinstance(x, torch.Tensor):
        return x.detach().numpy()
    if isinstance(x, nnx.Variable):
        return np.asarray(x.get_value())
    return np.asarray(x)


def assert_close(a, b, tol=1e-6):
    np.testing.assert_allclose(np_(a), np_(b), rtol=tol, atol=tol)


def state_keys(jm):
    return {".".join(str(k) for k in path) for path, _ in nnx.to_flat_state(nnx.state(jm))}


def read(jm, name, jit):
    """The parametrized value, eagerly or inside `nnx.jit`."""
    if jit:
        return nnx.jit(lambda m: getattr(m, name)[...])(jm)
    return getattr(jm, name)[...]


def _normalize(msg):
    msg = re.sub(
        r"torch\.Size\(\[([^\]]*)\]\)",
        lambda m: repr(tuple(int(s) for s in m.group(1).split(",") if s.strip())),
        msg,
    )
    return msg.replace("torch.", "")


def same_error(run_torch, run_jax, torch_repr=None, jax_repr=None, names=()):
    """Both raise the same type; torch's (normalized) lines all appear in ours, the
    first as a prefix. `torch_repr`/`jax_repr` replace the module reprs; `names`
    pairs (torch_name, jax_name) for type names that legitimately differ."""
    with pytest.raises(Exception) as te:
        run_torch()
    with pytest.raises(Exception) as je:
        run_jax()
    assert type(je.value) is type(te.value), (je.value, te.value)
    t, j = str(te.value), str(je.value)
    if torch_repr is not None:
        t = t.replace(torch_repr, "<module>")
        j = j.replace(jax_repr, "<module>", 1)
    for tname, jname in names:
        j = j.replace(jname, tname)
    t = _normalize(t)
    tlines, jlines = t.splitlines(), j.splitlines()
    assert jlines[0].startswith(tlines[0]), (j, t)
    for line in tlines[1:]:
        assert line in jlines, (j, t)
    return je.value


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [True, False])
def test_register_single(jit):
    jm, tm = JM(), TM()
    original = jm.weight
    assert not P.is_parametrized(jm) and not TP.is_parametrized(tm)
    register_both(jm, tm, "weight", "sym")

    assert_close(read(jm, "weight", jit), tm.weight)
    assert_close(jm.parametrizations.weight.original, tm.parametrizations.weight.original)
    assert state_keys(jm) == set(tm.state_dict())
    assert "parametrizations.weight.original" in state_keys(jm)
    # The very Variable moved, its type kept.
    assert jm.parametrizations.weight.original is original
    assert type(original) is nnx.Param
    assert type(jm).__name__ == "ParametrizedJM" and type(tm).__name__ == "ParametrizedTM"
    assert P.type_before_parametrizations(jm) is JM
    assert TP.type_before_parametrizations(tm) is TM
    for name in (None, "weight", "bias", "running", "nothing"):
        assert P.is_parametrized(jm, name) == TP.is_parametrized(tm, name), name
    assert isinstance(jm.parametrizations.weight, P.ParametrizationList)
    assert len(jm.parametrizations.weight) == len(tm.parametrizations.weight) == 1
    assert jm.parametrizations.weight[0] is j_sym
    assert jm.parametrizations.weight[-1] is j_sym


def test_register_buffer_keeps_variable_type():
    jm, tm = JM(), TM()
    register_both(jm, tm, "running", "double")
    assert_close(jm.running[...], tm.running)
    assert state_keys(jm) == set(tm.state_dict())
    assert type(jm.parametrizations.running.original) is nnx.BatchStat
    assert "parametrizations.running.original" in dict(tm.named_buffers())


def test_type_before_parametrizations_unparametrized():
    assert P.type_before_parametrizations(JM()) is JM
    assert not P.is_parametrized(JM(), "weight")


@pytest.mark.parametrize("link", ["sum2", "matmul2"])
@pytest.mark.parametrize("jit", [True, False])
def test_right_inverse_tuple_gives_several_originals(link, jit):
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", link)
    plist = jm.parametrizations.weight
    assert not plist.is_tensor and plist.ntensors == 2
    assert not hasattr(plist, "original")
    for i in range(2):
        var = getattr(plist, f"original{i}")
        assert type(var) is nnx.Param
        assert_close(var, getattr(tm.parametrizations.weight, f"original{i}"))
    assert state_keys(jm) == set(tm.state_dict())
    assert_close(read(jm, "weight", jit), tm.weight)
    assert_close(jm.weight[...], W)


# ---------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", [("double", "plus_one"), ("plus_one", "double")])
@pytest.mark.parametrize("jit", [True, False])
def test_chain_order_and_reverse_right_inverse(order, jit):
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sym", *order)
    assert len(jm.parametrizations.weight) == 3
    assert_close(read(jm, "weight", jit), tm.weight)
    # registration-time right_inverse only runs for the first link
    assert_close(jm.parametrizations.weight.original, tm.parametrizations.weight.original)
    x = np.array([[1.0, 2.0, 3.0], [2.0, 5.0, 6.0], [3.0, 6.0, 9.0]], np.float32)
    jm.weight = jnp.asarray(x)
    with torch.no_grad():
        tm.weight = torch.tensor(x)
    assert_close(jm.parametrizations.weight.original, tm.parametrizations.weight.original)
    assert_close(read(jm, "weight", jit), tm.weight)
    assert_close(jm.weight[...], x)


def test_unsafe_shape_change_and_flag_sticks():
    jm, tm = JM(), TM()
    TP.register_parametrization(tm, "weight", TLink(lambda x: x[:2]), unsafe=True)
    P.register_parametrization(jm, "weight", lambda x: x[:2], unsafe=True)
    assert jm.weight.shape == tuple(tm.weight.shape) == (2, 3)
    assert_close(jm.weight[...], tm.weight)
    assert jm.parametrizations.weight.unsafe and tm.parametrizations.weight.unsafe
    # A later safe registration keeps the chain unsafe (torch's `unsafe |= unsafe`).
    register_both(jm, tm, "weight", "double")
    assert jm.parametrizations.weight.unsafe and tm.parametrizations.weight.unsafe
    assert_close(jm.weight[...], tm.weight)
    # An unsafe append may change the shape again; checks are skipped.
    TP.register_parametrization(tm, "weight", TLink(lambda x: x.reshape(-1)), unsafe=True)
    P.register_parametrization(jm, "weight", lambda x: x.reshape(-1), unsafe=True)
    assert_close(jm.weight[...], tm.weight)
    assert jm.weight.shape == (6,)


def test_unsafe_dtype_change():
    jm, tm = JM(), TM()
    TP.register_parametrization(tm, "weight", TLink(lambda x: x.to(torch.float16)), unsafe=True)
    P.register_parametrization(jm, "weight", lambda x: x.astype(jnp.float16), unsafe=True)
    assert jm.weight.dtype == jnp.float16 and tm.weight.dtype == torch.float16
    assert_close(jm.weight[...].astype(np.float32), tm.weight.float(), tol=1e-3)


# Links that fail torch's checks, as (jax link, torch link factory).
def _j_ri(forward, ri):
    def link(*xs):
        return forward(*xs)

    link.right_inverse = ri
    return link


FIRST_REGISTRATION_ERRORS = {
    "forward_dtype": (lambda x: x.astype(jnp.float16), lambda: TLink(lambda x: x.half())),
    "forward_shape": (lambda x: x[:2], lambda: TLink(lambda x: x[:2])),
    "forward_non_tensor": (lambda x: "nope", lambda: TLink(lambda x: "nope")),
    "ri_non_tensor": (
        _j_ri(lambda x: x, lambda x: 3),
        lambda: TLinkInv(lambda x: x, lambda x: 3),
    ),
    "ri_dtype": (
        _j_ri(lambda x: x, lambda x: x.astype(jnp.float16)),
        lambda: TLinkInv(lambda x: x, lambda x: x.half()),
    ),
    "ri_sequence_element": (
        _j_ri(lambda a, b: a, lambda x: (x, "nope")),
        lambda: TLinkInv(lambda a, b: a, lambda x: (x, "nope")),
    ),
    "several_forward_shape": (
        _j_ri(lambda a, b: a[:1], lambda x: (x, x)),
        lambda: TLinkInv(lambda a, b: a[:1], lambda x: (x, x)),
    ),
}


@pytest.mark.parametrize("case", sorted(FIRST_REGISTRATION_ERRORS))
def test_first_registration_errors(case):
    jlink, tlink = FIRST_REGISTRATION_ERRORS[case]
    jm, tm = JM(), TM()
    same_error(
        lambda: TP.register_parametrization(tm, "weight", tlink()),
        lambda: P.register_parametrization(jm, "weight", jlink),
    )
    assert not P.is_parametrized(jm) and type(jm) is JM


APPEND_ERRORS = {
    "forward_dtype": FIRST_REGISTRATION_ERRORS["forward_dtype"],
    "forward_shape": FIRST_REGISTRATION_ERRORS["forward_shape"],
    "forward_non_tensor": FIRST_REGISTRATION_ERRORS["forward_non_tensor"],
    "ri_non_tensor": (
        _j_ri(lambda x: x, lambda x: 3.0),
        lambda: TLinkInv(lambda x: x, lambda x: 3.0),
    ),
    "ri_dtype": FIRST_REGISTRATION_ERRORS["ri_dtype"],
    "ri_shape": (
        _j_ri(lambda x: x, lambda x: x[:2]),
        lambda: TLinkInv(lambda x: x, lambda x: x[:2]),
    ),
}


@pytest.mark.parametrize("case", sorted(APPEND_ERRORS))
def test_append_consistency_errors(case):
    jlink, tlink = APPEND_ERRORS[case]
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sym")
    same_error(
        lambda: TP.register_parametrization(tm, "weight", tlink()),
        lambda: P.register_parametrization(jm, "weight", jlink),
    )
    assert len(jm.parametrizations.weight) == 1


def test_append_right_inverse_not_implemented_is_skipped():
    def no_ri(x):
        raise NotImplementedError

    jlink = _j_ri(lambda x: 2 * x, no_ri)
    tlink = TLinkInv(lambda x: 2 * x, no_ri)
    jm, tm = JM(), TM()
    TP.register_parametrization(tm, "weight", tlink)
    P.register_parametrization(jm, "weight", jlink)
    # first registration: NotImplementedError means identity
    assert_close(jm.parametrizations.weight.original, tm.parametrizations.weight.original)
    register_both(jm, tm, "weight", (jlink, lambda: tlink))
    assert_close(jm.weight[...], tm.weight)


# ---------------------------------------------------------------------------
# Assignment through right_inverse
# ---------------------------------------------------------------------------

X = np.array([[4.0, 1.0, -2.0], [1.0, 3.0, 0.5], [-2.0, 0.5, 1.0]], np.float32)


@pytest.mark.parametrize("links", [("sym",), ("sym", "double", "plus_one"), ("sum2",)])
@pytest.mark.parametrize("how", ["attr", "ellipsis", "jit"])
def test_assignment_equals_torch(links, how):
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", *links)
    with torch.no_grad():
        tm.weight = torch.tensor(X)
    if how == "attr":
        jm.weight = jnp.asarray(X)
    elif how == "ellipsis":
        jm.weight[...] = jnp.asarray(X)
    else:

        @nnx.jit
        def assign(m, x):
            m.weight = x

        assign(jm, jnp.asarray(X))
    for name, tvar in tm.parametrizations.weight.named_parameters():
        assert_close(getattr(jm.parametrizations.weight, name), tvar)
    assert_close(jm.weight[...], tm.weight)
    assert_close(jm.weight[...], X)


def test_assignment_accepts_views_variables_and_numpy():
    jm = JM()
    P.register_parametrization(jm, "weight", j_sym)
    jm.weight = np.asarray(X)
    assert_close(jm.weight[...], X)
    other = JM(w=2 * X)
    P.register_parametrization(other, "weight", j_sym)
    jm.weight = other.weight
    assert_close(jm.weight[...], 2 * X)
    jm.weight = nnx.Param(jnp.asarray(X))
    assert_close(jm.weight[...], X)


def test_partial_index_assignment_assigns_whole_tensor():
    # Not torch's semantics (torch writes into a temporary there): the view assigns
    # the whole tensor with that part replaced.
    jm = JM()
    P.register_parametrization(jm, "weight", j_double)
    before = np.array(jm.weight[...])
    jm.weight[1] = jnp.array([7.0, 8.0, 9.0])
    before[1] = [7.0, 8.0, 9.0]
    assert_close(jm.weight[...], before)


def test_assignment_without_right_inverse():
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sym", "triple")
    err = same_error(
        lambda: setattr(tm, "weight", torch.tensor(X)),
        lambda: setattr(jm, "weight", jnp.asarray(X)),
        names=[("TLink", "j_triple")],
    )
    assert str(err).startswith("parametrization j_triple does not implement right_inverse.")


def _bad_inverse_pair(several, result):
    """A link whose right_inverse is changed after registration to return `result`."""
    if several:
        jlink, tlink = _j_ri(lambda a, b: a + b, lambda x: (x, x * 0)), None
        tlink = TLinkInv(lambda a, b: a + b, lambda x: (x, x * 0))
    else:
        jlink = _j_ri(lambda x: x, lambda x: x)
        tlink = TLinkInv(lambda x: x, lambda x: x)
    return jlink, tlink


BAD_INVERSES = {
    # (several originals, jax result, torch result)
    "not_tensor": (False, lambda x: "nope", lambda x: "nope"),
    "dtype": (False, lambda x: x.astype(jnp.float16), lambda x: x.half()),
    "not_sequence": (True, lambda x: x, lambda x: x),
    "length": (True, lambda x: (x, x, x), lambda x: (x, x, x)),
    "element_type": (True, lambda x: (x, "nope"), lambda x: (x, "nope")),
    "element_dtype": (
        True,
        lambda x: (x, x.astype(jnp.float16)),
        lambda x: (x, x.half()),
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INVERSES))
def test_bad_right_inverse_on_assignment(case):
    several, jbad, tbad = BAD_INVERSES[case]
    jlink, tlink = _bad_inverse_pair(several, None)
    jm, tm = JM(), TM()
    TP.register_parametrization(tm, "weight", tlink)
    P.register_parametrization(jm, "weight", jlink)
    tlink.ri, jlink.right_inverse = tbad, jbad
    same_error(
        lambda: setattr(tm, "weight", torch.tensor(X)),
        lambda: setattr(jm, "weight", jnp.asarray(X)),
        names=[("Tensor", "ArrayImpl")],
    )


def test_assignment_may_change_shape_like_torch_set_():
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "double")
    y = np.ones((2, 2), np.float32)
    with torch.no_grad():
        tm.weight = torch.tensor(y)
    jm.weight = jnp.asarray(y)
    assert jm.weight.shape == tuple(tm.weight.shape) == (2, 2)
    assert_close(jm.weight[...], tm.weight)


# ---------------------------------------------------------------------------
# Removal
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("leave", [True, False])
def test_remove_single_original(leave):
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sym", "double")
    original = jm.parametrizations.weight.original
    TP.remove_parametrizations(tm, "weight", leave_parametrized=leave)
    out = P.remove_parametrizations(jm, "weight", leave_parametrized=leave)
    assert out is jm
    assert type(jm) is JM and type(tm) is TM
    assert "parametrizations" not in vars(jm)
    assert jm.weight is original and type(jm.weight) is nnx.Param
    assert_close(jm.weight, tm.weight)
    assert state_keys(jm) == set(tm.state_dict())
    assert not P.is_parametrized(jm)


def test_remove_buffer_stays_buffer():
    jm, tm = JM(), TM()
    register_both(jm, tm, "running", "double")
    TP.remove_parametrizations(tm, "running")
    P.remove_parametrizations(jm, "running")
    assert type(jm.running) is nnx.BatchStat
    assert_close(jm.running, tm.running)


def test_remove_several_originals():
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sum2", "double")
    trepr, jrepr = repr(tm), type(jm).__name__
    same_error(
        lambda: TP.remove_parametrizations(tm, "weight", leave_parametrized=False),
        lambda: P.remove_parametrizations(jm, "weight", leave_parametrized=False),
        trepr,
        jrepr,
    )
    assert P.is_parametrized(jm, "weight")
    TP.remove_parametrizations(tm, "weight")
    P.remove_parametrizations(jm, "weight")
    assert type(jm) is JM and type(jm.weight) is nnx.Param
    assert_close(jm.weight, tm.weight)
    assert state_keys(jm) == set(tm.state_dict())


def test_remove_one_of_two_names():
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sym")
    register_both(jm, tm, "bias", "double")
    assert P.is_parametrized(jm, "bias") and P.is_parametrized(jm, "weight")
    TP.remove_parametrizations(tm, "weight")
    P.remove_parametrizations(jm, "weight")
    assert type(jm).__name__ == "ParametrizedJM"
    assert P.type_before_parametrizations(jm) is JM
    assert P.is_parametrized(jm) and not P.is_parametrized(jm, "weight")
    assert type(jm.weight) is nnx.Param
    assert_close(jm.bias[...], tm.bias)
    jm.bias = jnp.array([1.0, 2.0, 3.0])
    with torch.no_grad():
        tm.bias = torch.tensor([1.0, 2.0, 3.0])
    assert_close(jm.parametrizations.bias.original, tm.parametrizations.bias.original)
    assert state_keys(jm) == set(tm.state_dict())
    TP.remove_parametrizations(tm, "bias", leave_parametrized=False)
    P.remove_parametrizations(jm, "bias", leave_parametrized=False)
    assert type(jm) is JM
    assert_close(jm.bias, tm.bias)


def test_parametrizations_iterate_in_registration_order():
    # as torch's ModuleDict, also after flax's graph operations, which rebuild
    # attributes in sorted order
    jm, tm = JM(), TM()
    for name in ("weight", "running", "bias"):
        register_both(jm, tm, name, "double")
    graphdef, state = nnx.split(jm)
    for m in (jm, copy.deepcopy(jm), nnx.merge(graphdef, state)):
        assert (
            list(m.parametrizations) == list(tm.parametrizations) == ["weight", "running", "bias"]
        )
    TP.remove_parametrizations(tm, "running")
    P.remove_parametrizations(jm, "running")
    register_both(jm, tm, "running", "double")
    assert list(jm.parametrizations) == list(tm.parametrizations) == ["weight", "bias", "running"]


def test_register_remove_register_again():
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "double")
    P.remove_parametrizations(jm, "weight")
    TP.remove_parametrizations(tm, "weight")
    register_both(jm, tm, "weight", "sym")
    assert_close(jm.weight[...], tm.weight)
    assert state_keys(jm) == set(tm.state_dict())


# ---------------------------------------------------------------------------
# Errors with torch's messages
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing", "note"])
def test_register_on_a_non_variable(name):
    jm, tm = JM(), TM()
    same_error(
        lambda: TP.register_parametrization(tm, name, t_double()),
        lambda: P.register_parametrization(jm, name, j_double),
        repr(tm),
        type(jm).__name__,
    )


def test_register_on_a_non_variable_of_parametrized_module():
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sym")
    same_error(
        lambda: TP.register_parametrization(tm, "missing", t_double()),
        lambda: P.register_parametrization(jm, "missing", j_double),
        repr(tm),
        type(jm).__name__,
    )


def test_register_on_a_variable_holding_no_array():
    jm = JM()
    jm.flag = nnx.Variable(3)
    with pytest.raises(ValueError, match="Module 'JM' has a Variable 'flag'"):
        P.register_parametrization(jm, "flag", j_double)


@pytest.mark.parametrize("parametrized", [True, False])
def test_remove_unparametrized_name(parametrized):
    jm, tm = JM(), TM()
    if parametrized:
        register_both(jm, tm, "bias", "double")
    same_error(
        lambda: TP.remove_parametrizations(tm, "weight"),
        lambda: P.remove_parametrizations(jm, "weight"),
        repr(tm),
        type(jm).__name__,
    )


class UnhashableScale:
    """A callable link that defines __eq__ but not __hash__ (so it is unhashable)."""

    def __init__(self, c):
        self.c = c

    def __eq__(self, other):
        return isinstance(other, UnhashableScale) and other.c == self.c

    def __call__(self, x):
        return self.c * x


@pytest.mark.parametrize("jit", [True, False])
def test_unhashable_callable_link(jit):
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", (UnhashableScale(2.0), lambda: TLink(lambda x: 2.0 * x)))
    assert_close(read(jm, "weight", jit), tm.weight)


@settings(max_examples=25, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        (3, 3),
        elements=st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False),
    )
)
def test_assign_then_read_round_trip(a):
    # right_inverse is a right inverse: reading back an assigned symmetric matrix
    # through a chain gives it back.
    a = (a + a.T) / 2
    jm = JM()
    P.register_parametrization(jm, "weight", j_sym)
    P.register_parametrization(jm, "weight", j_double)
    P.register_parametrization(jm, "weight", j_plus_one)
    jm.weight = a
    np.testing.assert_allclose(np.asarray(jm.weight[...]), a, rtol=1e-5, atol=1e-4)


def test_not_callable_parametrization():
    with pytest.raises(TypeError, match="A parametrization must be callable"):
        P.register_parametrization(JM(), "weight", 3)


# ---------------------------------------------------------------------------
# cached()
# ---------------------------------------------------------------------------


class Count(nnx.Variable):
    pass


class JCounter(nnx.Module):
    """Doubles; counts its evaluations in a Variable (written back eagerly too)."""

    def __init__(self):
        self.calls = Count(jnp.array(0, jnp.int32))

    def __call__(self, x):
        self.calls[...] = self.calls[...] + 1
        return 2 * x


class TCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return 2 * x


def test_cached_evaluates_once_and_clears_on_exit():
    jm, tm = JM(), TM()
    jc, tc = JCounter(), TCounter()
    register_both(jm, tm, "weight", (jc, lambda: tc))
    base_j, base_t = int(jc.calls[...]), tc.calls
    with P.cached(), TP.cached():
        a, b = jm.weight, jm.weight
        _ = tm.weight, tm.weight
        assert a[...] is b[...]
        with P.cached(), TP.cached():  # nested: the outer cache is kept
            c = jm.weight
            _ = tm.weight
        assert c[...] is a[...]
        d = jm.weight
        _ = tm.weight
        assert d[...] is a[...]
    assert int(jc.calls[...]) - base_j == tc.calls - base_t == 1
    _ = jm.weight, jm.weight
    _ = tm.weight, tm.weight
    assert int(jc.calls[...]) - base_j == tc.calls - base_t == 3
    assert P._cached.cache == {} and not P._cached.enabled


def test_cached_recomputes_after_assignment():
    # Deliberate improvement over torch (which would return the stale value).
    jm = JM()
    P.register_parametrization(jm, "weight", j_sym)
    with P.cached():
        jm.weight[...]
        jm.weight = jnp.asarray(X)
        assert_close(jm.weight[...], X)


class Scale(nnx.Module):
    def __init__(self):
        self.s = nnx.Param(jnp.array(2.0))

    def __call__(self, x):
        return self.s[...] * x


def test_cached_recomputes_when_the_chain_or_a_links_variable_changes():
    # torch returns the stale value in each case; the docs promise we do not.
    jm = JM()
    scale = Scale()
    P.register_parametrization(jm, "weight", scale)
    with P.cached():
        assert_close(jm.weight[...], 2 * W)
        scale.s[...] = 5.0  # a link's own Variable
        assert_close(jm.weight[...], 5 * W)
        P.register_parametrization(jm, "weight", lambda x: x + 1.0)  # a link appended
        assert_close(jm.weight[...], 5 * W + 1)
        P.remove_parametrizations(jm, "weight", leave_parametrized=False)
        P.register_parametrization(jm, "weight", lambda x: 3 * x)  # a new chain
        assert_close(jm.weight[...], 3 * W)
        nnx.update(jm, jax.tree.map(lambda a: a + 1, nnx.state(jm)))  # new arrays
        assert_close(jm.weight[...], 3 * (W + 1))


def test_cached_spectral_norm_iterates_once_as_torch():
    # A training read updates the link's own _u/_v; the next read inside the
    # context is still a hit (one power iteration), as with torch's cache.
    from jaxparam.parametrizations import spectral_norm

    t = nn.Linear(4, 3)
    f = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    f.kernel[...] = jnp.asarray(t.weight.detach().numpy().T)
    torch.nn.utils.parametrizations.spectral_norm(t)
    spectral_norm(f, rngs=nnx.Rngs(0))
    sn_t, sn_f = t.parametrizations.weight[0], f.parametrizations.kernel[0]
    sn_f._u[...] = jnp.asarray(sn_t._u.numpy())
    sn_f._v[...] = jnp.asarray(sn_t._v.numpy())
    with P.cached(), TP.cached():
        a, b = f.kernel[...], f.kernel[...]
        ta, tb = t.weight, t.weight
    assert a is b and ta is tb
    assert_close(a, tb.detach().numpy().T, 1e-5)
    assert_close(sn_f._u[...], sn_t._u.numpy(), 1e-5)


def test_cached_is_per_thread():
    # torch's cache is process-wide; ours is per thread: another thread inside
    # cached() neither caches this thread's reads nor sees its values.
    import threading

    jm, jc = JM(), JCounter()
    P.register_parametrization(jm, "weight", jc)
    inside, done = threading.Event(), threading.Event()

    def other():
        other_m = JM()
        P.register_parametrization(other_m, "weight", j_double)
        with P.cached():
            _ = other_m.weight
            inside.set()
            done.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert inside.wait(10)
        base = int(jc.calls[...])
        _ = jm.weight, jm.weight
        assert int(jc.calls[...]) - base == 2
        assert P._cached.cache == {}  # this thread's view
    finally:
        done.set()
        thread.join()


def test_cached_under_jit_does_not_leak_tracers():
    jm = JM()
    P.register_parametrization(jm, "weight", j_double)
    with P.cached():
        out = nnx.jit(lambda m: m.weight[...] + m.weight[...])(jm)
        eager = jm.weight[...]
    assert not isinstance(eager, jax.core.Tracer)
    assert_close(out, 2 * W)  # right_inverse halved the original


# ---------------------------------------------------------------------------
# transfer_parametrizations_and_params
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tensor_name", [None, "weight"])
def test_transfer(tensor_name):
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sym", "double")
    register_both(jm, tm, "bias", "plus_one")
    jdst, tdst = JM(w=X, b=-B), TM(w=X, b=-B)
    TP.transfer_parametrizations_and_params(tm, tdst, tensor_name)
    out = P.transfer_parametrizations_and_params(jm, jdst, tensor_name)
    assert out is jdst
    assert state_keys(jdst) == set(tdst.state_dict())
    assert jdst.parametrizations.weight.original is jm.parametrizations.weight.original
    assert_close(jdst.weight[...], tdst.weight)
    assert_close(jdst.bias[...], tdst.bias)
    assert len(jdst.parametrizations.weight) == len(tdst.parametrizations.weight) == 2
    # shared: assigning through one is seen through the other
    jm.weight = jnp.asarray(X)
    assert_close(jdst.weight[...], X)


def test_transfer_several_originals_to_module_missing_attribute():
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sum2")
    jdst, tdst = nnx.Module(), nn.Module()
    TP.transfer_parametrizations_and_params(tm, tdst)
    P.transfer_parametrizations_and_params(jm, jdst)
    assert state_keys(jdst) == set(tdst.state_dict())
    for i in range(2):
        name = f"original{i}"
        assert getattr(jdst.parametrizations.weight, name) is getattr(
            jm.parametrizations.weight, name
        )
    assert_close(jdst.weight[...], tdst.weight)


def test_transfer_from_unparametrized_is_noop():
    jdst = JM(w=X)
    assert P.transfer_parametrizations_and_params(JM(), jdst) is jdst
    assert type(jdst) is JM


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------

C = np.array([[0.3, -1.0, 2.0], [0.5, 0.25, -0.7], [1.5, -0.2, 0.9]])


def _grads_both(links, dtype, tdtype, jit, originals=None):
    jm, tm = JM(dtype=dtype), TM(dtype=tdtype)
    register_both(jm, tm, "weight", *links)
    if originals is not None:
        for name, value in originals.items():
            getattr(jm.parametrizations.weight, name)[...] = jnp.asarray(value, dtype)
            with torch.no_grad():
                getattr(tm.parametrizations.weight, name).copy_(torch.tensor(value))

    def loss(m):
        return jnp.sum(jnp.sin(m.weight[...]) * jnp.asarray(C, dtype)) + jnp.sum(m.bias[...] ** 2)

    grad = nnx.grad(loss)
    if jit:
        grad = nnx.jit(grad)
    g = grad(jm)
    tloss = (torch.sin(tm.weight) * torch.tensor(C, dtype=tdtype)).sum() + (tm.bias**2).sum()
    tloss.backward()
    return g, tm


def _check_grads(g, tm, tol):
    flat = {".".join(str(k) for k in path): v for path, v in nnx.to_flat_state(g)}
    tgrads = {name: p.grad for name, p in tm.named_parameters()}
    assert set(flat) == set(tgrads)
    for name, tg in tgrads.items():
        assert_close(flat[name], tg, tol)


@pytest.mark.parametrize("links", [("sym", "double"), ("sum2",), ("matmul2", "plus_one")])
@pytest.mark.parametrize("jit", [True, False])
def test_gradients_float32(links, jit):
    originals = {"original0": W, "original1": C} if "matmul2" in links else None
    g, tm = _grads_both(links, np.float32, torch.float32, jit, originals)
    _check_grads(g, tm, 1e-5)


@pytest.mark.parametrize("links", [("sym", "double"), ("matmul2", "plus_one")])
def test_gradients_float64(x64, links):
    originals = {"original0": W, "original1": C} if "matmul2" in links else None
    g, tm = _grads_both(links, np.float64, torch.float64, True, originals)
    _check_grads(g, tm, 1e-10)


# ---------------------------------------------------------------------------
# nnx.Module parametrizations with state of their own
# ---------------------------------------------------------------------------


class JScaled(nnx.Module):
    """x * scale (a trained Param); in training mode, counts steps and tracks a
    running norm (a power-iteration-like state updated inside the call)."""

    def __init__(self):
        self.scale = nnx.Param(jnp.array(1.5, jnp.float32))
        self.steps = nnx.BatchStat(jnp.array(0.0, jnp.float32))
        self.norm = nnx.BatchStat(jnp.array(0.0, jnp.float32))
        self.deterministic = False

    def __call__(self, x):
        if not self.deterministic:
            self.steps[...] = self.steps[...] + 1
            self.norm[...] = 0.5 * self.norm[...] + 0.5 * jnp.linalg.norm(x)
        return x * self.scale[...]

    def right_inverse(self, x):
        return x / self.scale[...]


class TScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.register_buffer("steps", torch.tensor(0.0))
        self.register_buffer("norm", torch.tensor(0.0))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.steps += 1
                self.norm.copy_(0.5 * self.norm + 0.5 * torch.linalg.norm(x.detach()))
        return x * self.scale

    def right_inverse(self, x):
        return x / self.scale


def _compare_state(jm, tm, tol=1e-6):
    flat = {".".join(str(k) for k in p): v for p, v in nnx.to_flat_state(nnx.state(jm))}
    tsd = tm.state_dict()
    assert set(flat) == set(tsd)
    for k, v in tsd.items():
        assert_close(flat[k], v, tol)


@pytest.mark.parametrize("jit", [True, False])
def test_stateful_module_parametrization(jit):
    jm, tm = JM(), TM()
    register_both(jm, tm, "weight", "sym", (JScaled(), TScaled))
    assert "parametrizations.weight.1.scale" in state_keys(jm)
    assert "parametrizations.weight.1.steps" in state_keys(jm)
    _compare_state(jm, tm)  # registration checks ran the chain once in both

    def forward(m, x):
        return x @ m.weight[...]

    fwd = nnx.jit(forward) if jit else forward
    x = jnp.asarray(X)
    for _ in range(2):
        out = fwd(jm, x)
        tout = torch.tensor(X) @ tm.weight
        assert_close(out, tout)
    _compare_state(jm, tm)

    # eval()/train() reach the link through `deterministic`
    jm.eval()
    tm.eval()
    assert jm.parametrizations.weight[1].deterministic
    fwd(jm, x), tm.weight
    _compare_state(jm, tm)
    jm.train()
    tm.train()
    fwd(jm, x), tm.weight
    _compare_state(jm, tm)

    # the link's own Param is trained: gradients equal torch's
    def loss(m):
        return jnp.sum(jnp.sin(m.weight[...]) * jnp.asarray(C, jnp.float32))

    grad = nnx.jit(nnx.grad(loss)) if jit else nnx.grad(loss)
    g = grad(jm)
    tl = (torch.sin(tm.weight) * torch.tensor(C, dtype=torch.float32)).sum()
    tl.backward()
    flat = {".".join(str(k) for k in p): v for p, v in nnx.to_flat_state(g)}
    assert_close(
        flat["parametrizations.weight.1.scale"], tm.parametrizations.weight[1].scale.grad, 1e-5
    )
    assert_close(
        flat["parametrizations.weight.original"], tm.parametrizations.weight.original.grad, 1e-5
    )
    _compare_state(jm, tm)

    # assignment goes through the module link's right_inverse
    jm.weight = x
    with torch.no_grad():
        tm.weight = torch.tensor(X)
    _compare_state(jm, tm)


def test_registration_follows_module_mode():
    class Host(nnx.Module):
        def __init__(self):
            self.weight = nnx.Param(jnp.asarray(W, jnp.float32))
            self.deterministic = True

    host, link = Host(), JScaled()
    P.register_parametrization(host, "weight", link)
    assert link.deterministic  # torch: parametrization.train(module.training)
    assert float(link.steps[...]) == 0.0  # eval mode: the registration check did not count
