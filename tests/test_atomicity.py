"""Every failing operation leaves the module exactly as it was.

Beyond torch (whose registration can mutate the original before a later check
fails): same class, same attributes, the same Variable objects holding the same
values, the same link objects and link state, the same graphdef.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxparam.parametrize as P

W = np.arange(1.0, 10.0).reshape(3, 3) / 7.0 - 0.4
X = np.array([[4.0, 1.0, -2.0], [1.0, 3.0, 0.5], [-2.0, 0.5, 1.0]], np.float32)


class M(nnx.Module):
    def __init__(self, b_shape=(3,)):
        self.weight = nnx.Param(jnp.asarray(W, jnp.float32))
        self.bias = nnx.Param(jnp.ones(b_shape, jnp.float32))
        self.running = nnx.BatchStat(jnp.zeros((3,), jnp.float32))
        self.note = "not a variable"


class Count(nnx.Variable):
    pass


class Counter(nnx.Module):
    """Identity that counts its evaluations (eagerly written back)."""

    def __init__(self):
        self.calls = Count(jnp.array(0, jnp.int32))

    def __call__(self, x):
        self.calls[...] = self.calls[...] + 1
        return x

    def right_inverse(self, x):
        return x


class Switch:
    """A link whose forward / right_inverse can be made to fail after registration."""

    def __init__(self):
        self.fail_forward = False
        self.fail_inverse = False

    def __call__(self, x):
        if self.fail_forward:
            raise ArithmeticError("forward failed")
        return 2 * x

    def right_inverse(self, x):
        if self.fail_inverse:
            raise ArithmeticError("right_inverse failed")
        return x / 2


def sym(x):
    return jnp.triu(x) + jnp.triu(x, 1).T


sym.right_inverse = lambda a: jnp.triu(a)


def double(x):
    return 2 * x


double.right_inverse = lambda x: x / 2


def sum2(a, b):
    return a + b


sum2.right_inverse = lambda x: (jnp.triu(x), jnp.tril(x, -1))


def no_inverse(x):
    return 3 * x


def link(forward, right_inverse=None):
    def f(*xs):
        return forward(*xs)

    if right_inverse is not None:
        f.right_inverse = right_inverse
    return f


def raising(exc):
    def f(*_):
        raise exc

    return f


# ---------------------------------------------------------------------------
# The one helper
# ---------------------------------------------------------------------------


def snapshot(module):
    nodes = {}
    for path, node in nnx.iter_graph(module):
        if any(str(k).startswith("_pytree__") for k in path):
            continue
        key = "/".join(str(k) for k in path)
        if isinstance(node, nnx.Variable):
            raw = node.get_raw_value()
            dtype = str(getattr(raw, "dtype", type(raw)))
            nodes[key] = ("variable", id(node), type(node), np.array(raw), dtype)
        elif isinstance(node, nnx.Pytree):
            nodes[key] = ("node", id(node), type(node), sorted(vars(node)))
        else:
            nodes[key] = ("static", id(node), type(node), node)
    return {
        "class": type(module),
        "keys": sorted(vars(module)),
        "nodes": nodes,
        "graphdef": nnx.graphdef(module),
    }


def assert_unchanged(module, before):
    after = snapshot(module)
    assert after["class"] is before["class"]
    assert after["keys"] == before["keys"]
    assert set(after["nodes"]) == set(before["nodes"])
    for key, (kind, ident, typ, *rest) in before["nodes"].items():
        a_kind, a_ident, a_typ, *a_rest = after["nodes"][key]
        assert (a_kind, a_typ) == (kind, typ), key
        if kind == "variable":
            assert a_ident == ident, f"{key}: a different Variable object"
            np.testing.assert_array_equal(a_rest[0], rest[0], err_msg=key)
            assert a_rest[1] == rest[1], key
        elif kind == "node":
            assert a_ident == ident, f"{key}: a different object"
            assert a_rest == rest, key
        else:
            assert a_rest[0] is rest[0] or a_rest[0] == rest[0], key
    assert after["graphdef"] == before["graphdef"]


def fails(module, exc_type, op):
    before = snapshot(module)
    with pytest.raises(exc_type):
        op()
    assert_unchanged(module, before)
    # and it still works
    if P.is_parametrized(module, "weight"):
        _ = module.weight[...]


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------


def plain():
    return M()


def parametrized():
    m = M()
    P.register_parametrization(m, "weight", sym)
    return m


def stateful_chain():
    m = M()
    P.register_parametrization(m, "weight", sym)
    P.register_parametrization(m, "weight", Counter())
    P.register_parametrization(m, "bias", double)
    return m


def several():
    m = M()
    P.register_parametrization(m, "weight", sum2)
    P.register_parametrization(m, "weight", Counter())
    return m


MODULES = {"plain": plain, "parametrized": parametrized, "stateful": stateful_chain}

BAD_LINKS = {
    "forward_dtype": (ValueError, lambda x: x.astype(jnp.float16)),
    "forward_shape": (ValueError, lambda x: x[:2]),
    "forward_non_tensor": (ValueError, lambda x: "nope"),
    "forward_raises": (ArithmeticError, raising(ArithmeticError("boom"))),
    "ri_raises": (ArithmeticError, link(lambda x: x, raising(ArithmeticError("boom")))),
    "ri_dtype": (ValueError, link(lambda x: x, lambda x: x.astype(jnp.float16))),
    "ri_non_tensor": (ValueError, link(lambda x: x, lambda x: 3.0)),
}


@pytest.mark.parametrize("case", sorted(BAD_LINKS))
@pytest.mark.parametrize("make", sorted(MODULES))
def test_register_bad_link(make, case):
    m = MODULES[make]()
    exc, bad = BAD_LINKS[case]
    fails(m, exc, lambda: P.register_parametrization(m, "weight", bad))


@pytest.mark.parametrize("make", sorted(MODULES))
def test_register_stateful_link_that_fails_the_checks(make):
    # A module link whose call writes its own state, then fails the shape check.
    class CountingSlicer(Counter):
        def __call__(self, x):
            super().__call__(x)
            return x[:2]

    m = MODULES[make]()
    fails(m, ValueError, lambda: P.register_parametrization(m, "weight", CountingSlicer()))


@pytest.mark.parametrize("bad", ["ri_sequence_element", "several_forward_shape"])
def test_register_bad_several_originals(bad):
    m = stateful_chain()
    cases = {
        "ri_sequence_element": link(lambda a, b: a, lambda x: (x, "nope")),
        "several_forward_shape": link(lambda a, b: a[:1], lambda x: (x, x)),
    }
    fails(m, ValueError, lambda: P.register_parametrization(m, "running", cases[bad]))
    m = plain()
    fails(m, ValueError, lambda: P.register_parametrization(m, "weight", cases[bad]))


@pytest.mark.parametrize("name", ["missing", "note", "flag"])
@pytest.mark.parametrize("make", sorted(MODULES))
def test_register_on_a_bad_name(make, name):
    m = MODULES[make]()
    m.flag = nnx.Variable(3)
    fails(m, ValueError, lambda: P.register_parametrization(m, name, double))


def test_register_not_callable():
    m = stateful_chain()
    fails(m, TypeError, lambda: P.register_parametrization(m, "weight", 3))


# ---------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["attr", "ellipsis", "index"])
def test_assignment_on_a_chain_missing_a_right_inverse(how):
    # The last link's right_inverse runs, then the first link has none.
    m = M()
    P.register_parametrization(m, "weight", no_inverse)
    P.register_parametrization(m, "weight", Counter())
    P.register_parametrization(m, "weight", double)

    # `m.weight[...] = x` reads first (one evaluation: the counter moves, as in
    # torch); the failing assignment itself must change nothing.
    view = m.weight

    def assign():
        if how == "attr":
            m.weight = jnp.asarray(X)
        elif how == "ellipsis":
            view[...] = jnp.asarray(X)
        else:
            view[0] = jnp.ones(3)

    fails(m, RuntimeError, assign)


@pytest.mark.parametrize(
    "result, exc",
    [
        (lambda x: "nope", ValueError),
        (lambda x: x.astype(jnp.float16), ValueError),
        (raising(ArithmeticError("boom")), ArithmeticError),
    ],
)
def test_assignment_single_original_bad_inverse(result, exc):
    m = stateful_chain()
    sw = Switch()
    P.register_parametrization(m, "running", sw)
    sw.right_inverse = result
    fails(m, exc, lambda: setattr(m, "running", jnp.ones(3)))


@pytest.mark.parametrize(
    "result",
    [
        lambda x: x,  # not a sequence
        lambda x: (x, x, x),  # wrong length
        lambda x: (x, "nope"),  # element 1 not a tensor
        lambda x: (x, x.astype(jnp.float16)),  # element 1 dtype (torch sets element 0 first)
    ],
)
def test_assignment_several_originals_bad_inverse(result):
    m = M()
    f = link(sum2, sum2.right_inverse)
    P.register_parametrization(m, "weight", f)
    f.right_inverse = result
    fails(m, ValueError, lambda: setattr(m, "weight", jnp.asarray(X)))


def test_assignment_with_a_failing_link_in_the_middle():
    m = stateful_chain()
    sw = Switch()
    P.register_parametrization(m, "weight", sw)
    P.register_parametrization(m, "weight", double)
    sw.fail_inverse = True
    fails(m, ArithmeticError, lambda: setattr(m, "weight", jnp.asarray(X)))


# ---------------------------------------------------------------------------
# Removal
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", sorted(MODULES))
def test_remove_unparametrized_name(make):
    m = MODULES[make]()
    fails(m, ValueError, lambda: P.remove_parametrizations(m, "running"))


def test_remove_several_originals_leave_false():
    m = several()
    fails(m, ValueError, lambda: P.remove_parametrizations(m, "weight", leave_parametrized=False))


@pytest.mark.parametrize("make", [stateful_chain, several])
def test_remove_when_the_chain_raises(make):
    m = make()
    sw = Switch()
    P.register_parametrization(m, "weight", sw)
    sw.fail_forward = True
    before = snapshot(m)
    with pytest.raises(ArithmeticError):
        P.remove_parametrizations(m, "weight")
    assert_unchanged(m, before)


def test_read_that_raises_leaves_state_unchanged():
    m = stateful_chain()
    sw = Switch()
    P.register_parametrization(m, "weight", sw)
    sw.fail_forward = True
    before = snapshot(m)
    with pytest.raises(ArithmeticError):
        _ = m.weight
    assert_unchanged(m, before)


# ---------------------------------------------------------------------------
# Transfer
# ---------------------------------------------------------------------------


def test_transfer_failing_midway():
    src = M()
    P.register_parametrization(src, "weight", sym)
    P.register_parametrization(src, "bias", double)
    dst = M()
    dst.bias = "not a variable"  # the second name fails after the first succeeded
    src_before = snapshot(src)
    fails(dst, ValueError, lambda: P.transfer_parametrizations_and_params(src, dst))
    assert_unchanged(src, src_before)


def test_transfer_failing_midway_on_a_parametrized_destination():
    src = M()
    P.register_parametrization(src, "weight", sym)
    P.register_parametrization(src, "bias", lambda x: x[:2] * 0 + x[:2], unsafe=True)
    dst = stateful_chain()  # bias parametrized; appending the slicer fails the shape check
    fails(dst, ValueError, lambda: P.transfer_parametrizations_and_params(src, dst))
