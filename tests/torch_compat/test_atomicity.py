"""torch_compat's promise beyond torch: an operation that raises changes nothing.

For every way a mutating operation can fail (registration, assignment,
``ParametrizationList.right_inverse``, removal, transfer), the test takes a
fingerprint of the module (class, class attributes, every submodule's
parameters / buffers / submodules / attributes, tensor identities, storage,
values, ``requires_grad``, state dict), runs the operation, checks that it
raises torch's exception (type and message prefix, against real torch where
torch raises too), and that the fingerprint is unchanged.
"""

import jax.numpy as jnp
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as torch_P

import torch_compat.parametrize as P
from torch_compat import parametrizations as CP


def _fingerprint(*modules):
    out = []
    for root in (m for m in modules if isinstance(m, nn.Module)):
        out.append(("class", type(root), sorted(k for k in vars(type(root)))))
        for name, m in root.named_modules(remove_duplicate=False):
            attrs = {
                k: (id(v), type(v))
                for k, v in vars(m).items()
                if k not in ("_parameters", "_buffers", "_modules")
            }
            out.append((name, type(m), attrs))
            for kind in ("_parameters", "_buffers", "_modules"):
                out.append((name, kind, {k: id(v) for k, v in getattr(m, kind).items()}))
            for k, t in (*m._parameters.items(), *m._buffers.items()):
                if t is None:
                    continue
                out.append(
                    (
                        name,
                        k,
                        id(t),
                        t.untyped_storage().data_ptr(),
                        tuple(t.shape),
                        t.stride(),
                        t.dtype,
                        t.requires_grad,
                        t.detach().clone(),
                    )
                )
        out.append(("state_dict", list(root.state_dict())))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, tuple) and x and isinstance(x[-1], torch.Tensor):
            assert x[:-1] == y[:-1]
            assert torch.equal(x[-1], y[-1]), x[:2]
        else:
            assert x == y


def _fails_atomically(op, *modules, exc=Exception, match=None):
    before = _fingerprint(*modules)
    with pytest.raises(exc, match=match) as info:
        op()
    _assert_same(before, _fingerprint(*modules))
    return info.value


# --------------------------------------------------------------------------- #
# Parametrizations used to provoke each failure
# --------------------------------------------------------------------------- #


class ScaleInverse(nn.Module):
    """right_inverse changes the values (so registration `set_`s new data), forward shrinks."""

    def forward(self, X):
        return X[:-1]

    def right_inverse(self, X):
        return 0.5 * X


class ToDouble(nn.Module):
    def forward(self, X):
        return X.double()

    def right_inverse(self, X):
        return 2.0 * X


class NotATensor(nn.Module):
    def forward(self, X):
        return [X]

    def right_inverse(self, X):
        return X + 1


class Counter(nn.Module):
    """right_inverse mutates its own buffer, then a later check fails."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, X):
        return X.sum(0)

    def right_inverse(self, X):
        self.calls += 1
        return X


class Split(nn.Module):
    def forward(self, a, b):
        return a + b

    def right_inverse(self, X):
        return X.clone(), X - X


class HalfBadSplit(Split):
    """The first output is fine, the second has the wrong dtype (set after the first)."""

    def right_inverse(self, X):
        return X * 3, (X * 0).double()


class ShortSplit(Split):
    def right_inverse(self, X):
        return (X,)


class RaisingInverse(nn.Module):
    def __init__(self, armed=True):
        super().__init__()
        self.armed = armed

    def forward(self, X):
        return X

    def right_inverse(self, X):
        if self.armed:
            raise ValueError("boom in right_inverse")
        return X


class RaisingForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.armed = False

    def forward(self, X):
        if self.armed:
            raise RuntimeError("boom in forward")
        return X


class NoInverse(nn.Module):
    def forward(self, X):
        return X


def _sn_linear():
    torch.manual_seed(0)
    m = CP.spectral_norm(nn.Linear(5, 4))
    with torch.no_grad():  # a non-converged power iteration, so that one more step shows
        m.parametrizations.weight[0]._v.copy_(torch.eye(5)[0])
    return m


# --------------------------------------------------------------------------- #
# Registration
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "make_link, match",
    [
        (ScaleInverse, "may not change the shape"),
        (ToDouble, "may not change the dtype"),
        (NotATensor, "must return a tensor"),
        (Counter, "may not change the shape"),
        (HalfBadSplit, "may not change the dtype"),
        (lambda: lambda x: x.sum(0), "may not change the shape"),
        (lambda: lambda x: [x], "must return a jax.Array"),
    ],
)
def test_register_new_fails_atomically(make_link, match):
    m = nn.Linear(3, 3)
    link = make_link()
    _fails_atomically(
        lambda: P.register_parametrization(m, "weight", link), m, link, exc=Exception, match=match
    )
    assert type(m) is nn.Linear
    if isinstance(link, nn.Module):  # torch fails the same way (non-atomically)
        with pytest.raises(Exception, match=match):
            torch_P.register_parametrization(nn.Linear(3, 3), "weight", make_link())


def test_register_missing_name_and_bad_type_fail_atomically():
    m = nn.Linear(3, 3)
    _fails_atomically(lambda: P.register_parametrization(m, "nope", NoInverse()), m, exc=ValueError)
    _fails_atomically(lambda: P.register_parametrization(m, "weight", 3), m, exc=TypeError)


@pytest.mark.parametrize(
    "link, match",
    [
        (ScaleInverse(), "may not change the shape"),
        (ToDouble(), "may not change the dtype"),
        (Counter(), "may not change the shape"),
        (NotATensor(), "must return a tensor"),
    ],
)
def test_register_append_fails_atomically_including_power_iteration(link, match):
    m = _sn_linear()  # the check forward runs a power iteration (u, v in place)
    _fails_atomically(
        lambda: P.register_parametrization(m, "weight", link), m, link, exc=ValueError, match=match
    )
    assert len(m.parametrizations.weight) == 1


def test_register_append_right_inverse_dtype_fails_atomically():
    class BadInverse(nn.Module):
        def forward(self, X):
            return X

        def right_inverse(self, X):
            return X.double()

    m = P.register_parametrization(nn.Linear(3, 3), "weight", NoInverse())
    _fails_atomically(
        lambda: P.register_parametrization(m, "weight", BadInverse()),
        m,
        exc=ValueError,
        match="right_inverse must have the same dtype",
    )


# --------------------------------------------------------------------------- #
# Assignment (right_inverse through the chain)
# --------------------------------------------------------------------------- #


def test_assignment_multi_original_fails_after_setting_the_first():
    m = P.register_parametrization(nn.Linear(3, 3), "weight", Split())
    m.parametrizations.weight[0].__class__ = HalfBadSplit  # now its right_inverse misbehaves

    def assign():
        m.weight = torch.ones(3, 3)

    err = _fails_atomically(assign, m, exc=ValueError)
    assert "dtype" in str(err) or "right_inverse" in str(err)


@pytest.mark.parametrize(
    "value, link, exc, match",
    [
        (torch.ones(3, 3, dtype=torch.float64), NoInverse, ValueError, "has dtype"),
        (torch.ones(3, 3), None, RuntimeError, "does not implement right_inverse"),
        (torch.ones(3, 3), RaisingInverse, ValueError, "boom"),
    ],
)
def test_assignment_single_original_fails_atomically(value, link, exc, match):
    class Identity(nn.Module):
        def forward(self, X):
            return X

        def right_inverse(self, X):
            return X

    m = P.register_parametrization(nn.Linear(3, 3), "weight", Identity())
    if link is None:
        P.register_parametrization(m, "weight", NoInverse())
    elif link is RaisingInverse:
        P.register_parametrization(m, "weight", RaisingInverse(), unsafe=True)

    def assign():
        m.weight = value

    _fails_atomically(assign, m, exc=exc, match=match)


def test_assignment_wrong_length_fails_atomically():
    m = P.register_parametrization(nn.Linear(3, 3), "weight", Split())
    m.parametrizations.weight[0].__class__ = ShortSplit

    def assign():
        m.weight = torch.ones(3, 3)

    _fails_atomically(assign, m, exc=ValueError, match="length 2")


def test_assignment_restores_link_state_set_before_a_later_failure():
    # [RaisingInverse, orthogonal]: orthogonal's right_inverse (run first) replaces
    # its `base`, then RaisingInverse raises: base must come back.
    torch.manual_seed(0)
    raising = RaisingInverse(armed=False)
    m = P.register_parametrization(nn.Linear(4, 4), "weight", raising)
    m = CP.orthogonal(m)
    raising.armed = True
    orth = m.parametrizations.weight[1]
    torch.manual_seed(1)
    orth.right_inverse(torch.randn(4, 4))  # give it a base
    base = orth.base

    def assign():
        m.weight = torch.eye(4)

    _fails_atomically(assign, m, exc=ValueError, match="boom")
    assert orth.base is base


def test_direct_right_inverse_call_fails_atomically():
    m = P.register_parametrization(nn.Linear(3, 3), "weight", Split())
    m.parametrizations.weight[0].__class__ = HalfBadSplit
    plist = m.parametrizations.weight
    _fails_atomically(lambda: plist.right_inverse(torch.ones(3, 3)), m, exc=ValueError)


@pytest.mark.parametrize(
    "kw, value, exc, match",
    [
        ({}, torch.eye(4), ValueError, "Expected a matrix or batch of matrices of shape"),
        ({"use_trivialization": False}, torch.eye(3), NotImplementedError, "not possible"),
    ],
)
def test_builtin_assignment_errors_are_atomic(kw, value, exc, match):
    m = CP.orthogonal(nn.Linear(3, 3), **kw)

    def assign():
        m.weight = value

    _fails_atomically(assign, m, exc=exc, match=match)


# --------------------------------------------------------------------------- #
# Removal and transfer
# --------------------------------------------------------------------------- #


def test_remove_errors_are_atomic():
    m = P.register_parametrization(nn.Linear(3, 3), "weight", Split())
    _fails_atomically(
        lambda: P.remove_parametrizations(m, "bias"), m, exc=ValueError, match="does not have"
    )
    _fails_atomically(
        lambda: P.remove_parametrizations(m, "weight", leave_parametrized=False),
        m,
        exc=ValueError,
        match="Cannot leave unparametrized",
    )


def test_remove_fails_after_power_iteration_atomically():
    m = _sn_linear()
    failing = RaisingForward()
    P.register_parametrization(m, "weight", failing)
    failing.armed = True  # spectral norm runs (u, v move), then this raises
    _fails_atomically(
        lambda: P.remove_parametrizations(m, "weight"), m, exc=RuntimeError, match="boom"
    )
    assert P.is_parametrized(m, "weight")


def test_transfer_fails_halfway_atomically():
    src = P.register_parametrization(nn.Linear(3, 3), "weight", NoInverse())
    P.register_parametrization(src, "bias", NoInverse())
    dst = nn.Linear(3, 3, bias=False)  # `bias` is None there: the second transfer fails
    _fails_atomically(
        lambda: P.transfer_parametrizations_and_params(src, dst), src, dst, exc=Exception
    )
    assert type(dst) is nn.Linear and not P.is_parametrized(dst)


# --------------------------------------------------------------------------- #
# Success keeps torch's results
# --------------------------------------------------------------------------- #


def test_successful_operations_still_match_torch():
    out = []
    for mod in (torch_P, P):
        torch.manual_seed(0)
        m = nn.Linear(3, 3)
        w = m.weight
        mod.register_parametrization(m, "weight", ScaleInverse(), unsafe=True)
        assert m.parametrizations.weight.original is w  # set_ in place, as torch
        m.weight = torch.ones(3, 3)
        mod.remove_parametrizations(m, "weight")
        out.append(m.weight.detach().clone())
    torch.testing.assert_close(out[0], out[1])


def test_jax_link_failure_at_registration_is_atomic():
    m = nn.Linear(3, 3)
    w = m.weight
    before = w.detach().clone()

    def bad(x):
        return jnp.zeros((2, 2), x.dtype)

    bad.right_inverse = lambda x: 2 * x
    with pytest.raises(ValueError, match="may not change the shape"):
        P.register_parametrization(m, "weight", bad)
    assert m.weight is w and torch.equal(w, before) and type(m) is nn.Linear
