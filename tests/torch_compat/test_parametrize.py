"""Differential tests: torch's parametrize vs torch_compat.parametrize.

Part 1 runs the same scenario, with torch parametrizations, through both
modules and requires identical observable results (values, grads, state-dict
keys, class names, exception type and message). Part 2 writes the
parametrizations in JAX and compares them with the torch-written equivalents.
"""

import copy
import pickle

import jax.numpy as jnp
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as torch_P

import torch_compat.parametrize as compat_P
from torch_compat import _bridge

# --------------------------------------------------------------------------- #
# Torch parametrizations used in the scenarios
# --------------------------------------------------------------------------- #


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).T

    def right_inverse(self, A):
        return A.triu()


class Skew(nn.Module):
    def forward(self, X):
        A = X.triu(1)
        return A - A.T


class Double(nn.Module):
    def forward(self, X):
        return 2.0 * X

    def right_inverse(self, X):
        return 0.5 * X


class MatMul(nn.Module):
    def forward(self, a, b):
        return a @ b

    def right_inverse(self, W):
        return W, torch.eye(W.shape[1], dtype=W.dtype)


class NoneInverse(nn.Module):
    def forward(self, X):
        return X

    def right_inverse(self, X):
        return None


class BadSeq(nn.Module):
    def forward(self, x, y):
        return x

    def right_inverse(self, X):
        return X, 3


class ToInt(nn.Module):
    def forward(self, X):
        return X.long()


class Shrink(nn.Module):
    def forward(self, X):
        return X[:-1]


class NotTensor(nn.Module):
    def forward(self, X):
        return 2


class InverseChangesDtype(nn.Module):
    def forward(self, X):
        return X

    def right_inverse(self, X):
        return X.double()


# --------------------------------------------------------------------------- #
# Harness
# --------------------------------------------------------------------------- #


def _outcome(scenario, P):
    torch.manual_seed(0)
    try:
        return ("ok", scenario(P))
    except Exception as e:  # noqa: BLE001 - we compare exceptions
        return ("raised", type(e), str(e))


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _differential(scenario):
    ref = _outcome(scenario, torch_P)
    got = _outcome(scenario, compat_P)
    _assert_same(ref, got)
    return ref


def _grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def sc_register_symmetric(P):
    m = nn.Linear(4, 4)
    P.register_parametrization(m, "weight", Symmetric())
    x = torch.randn(3, 4)
    m(x).pow(2).sum().backward()
    return {
        "weight": m.weight.detach(),
        "cls": type(m).__name__,
        "before": P.type_before_parametrizations(m).__name__,
        "keys": list(m.state_dict()),
        "grads": _grads(m),
        "is": [P.is_parametrized(m), P.is_parametrized(m, "weight"), P.is_parametrized(m, "bias")],
        "plist": type(m.parametrizations.weight).__name__,
    }


def sc_chain_assign(P):
    m = nn.Linear(4, 4)
    P.register_parametrization(m, "weight", Symmetric())
    P.register_parametrization(m, "weight", Double())
    A = torch.randn(4, 4)
    m.weight = A + A.T
    return {"w": m.weight.detach(), "orig": m.parametrizations.weight.original.detach()}


def sc_multi_originals(P):
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", MatMul())
    m.weight.sum().backward()
    keys = list(m.state_dict())
    g = _grads(m)
    try:
        P.remove_parametrizations(m, "weight", leave_parametrized=False)
    except ValueError as e:
        err = str(e)
    P.remove_parametrizations(m, "weight", leave_parametrized=True)
    return {"keys": keys, "grads": g, "err": err, "w": m.weight.detach(), "cls": type(m).__name__}


def sc_remove_false(P):
    m = nn.Linear(3, 3)
    w_id = id(m.weight)
    P.register_parametrization(m, "weight", Double())
    P.remove_parametrizations(m, "weight", leave_parametrized=False)
    return {"w": m.weight.detach(), "same_id": id(m.weight) == w_id, "cls": type(m).__name__}


def sc_remove_true(P):
    m = nn.Linear(3, 3)
    w = m.weight
    P.register_parametrization(m, "weight", Double())
    P.remove_parametrizations(m, "weight", leave_parametrized=True)
    return {"w": m.weight.detach(), "same_obj": m.weight is w}


def sc_cached(P):
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", Skew())
    with P.cached():
        a, b = m.weight, m.weight
        with P.cached():
            c = m.weight
    d = m.weight
    return {"same": a is b, "nested": a is c, "after": a is d, "v": a.detach()}


def sc_transfer(P):
    a = nn.Linear(3, 3)
    P.register_parametrization(a, "weight", Symmetric())
    P.register_parametrization(a, "bias", Double())
    b = nn.Linear(3, 3)
    P.transfer_parametrizations_and_params(a, b)
    c = nn.Linear(3, 3)
    P.transfer_parametrizations_and_params(a, c, "bias")
    return {
        "w": b.weight.detach(),
        "keys": list(b.state_dict()),
        "ckeys": list(c.state_dict()),
        "shared": b.parametrizations.weight.original is a.parametrizations.weight.original,
    }


def sc_deepcopy(P):
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", Symmetric())
    m2 = copy.deepcopy(m)
    return {
        "w": m2.weight.detach(),
        "cls": type(m2).__name__,
        "distinct": m2.parametrizations.weight.original is not m.parametrizations.weight.original,
    }


def sc_pickle(P):
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", Symmetric())
    pickle.dumps(m)


def sc_unsafe(P):
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", Shrink(), unsafe=True)
    P.register_parametrization(m, "weight", Double())
    return {"shape": tuple(m.weight.shape), "unsafe": m.parametrizations.weight.unsafe}


def sc_buffer(P):
    m = nn.BatchNorm1d(3)
    P.register_parametrization(m, "running_mean", Double())
    return {"keys": list(m.state_dict()), "v": m.running_mean}


def sc_load_state_dict(P):
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", Symmetric())
    m2 = nn.Linear(3, 3)
    P.register_parametrization(m2, "weight", Symmetric())
    m2.load_state_dict(m.state_dict())
    return m2.weight.detach()


def sc_optimizer(P):
    m = nn.Linear(4, 4)
    P.register_parametrization(m, "weight", Symmetric())
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    for _ in range(3):
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()
    return m.weight.detach()


def _err(name, *, attr="weight", unsafe=False, parametrized_first=False, factory=None):
    def scenario(P):
        m = nn.Linear(3, 4)
        if parametrized_first:
            P.register_parametrization(m, "weight", Double())
        P.register_parametrization(m, attr, factory(), unsafe=unsafe)

    scenario.__name__ = name
    return scenario


def sc_remove_unparametrized(P):
    P.remove_parametrizations(nn.Linear(2, 2), "weight")


def sc_assign_without_inverse(P):
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", Skew())
    m.weight = torch.zeros(3, 3)


def sc_assign_wrong_dtype(P):
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", InverseChangesDtype(), unsafe=True)


def sc_assign_multi_wrong_len(P):
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", MatMul())
    m.parametrizations.weight[0].right_inverse = lambda W: (W,)
    m.weight = torch.zeros(3, 3)


SCENARIOS = [
    sc_register_symmetric,
    sc_chain_assign,
    sc_multi_originals,
    sc_remove_false,
    sc_remove_true,
    sc_cached,
    sc_transfer,
    sc_deepcopy,
    sc_pickle,
    sc_unsafe,
    sc_buffer,
    sc_load_state_dict,
    sc_optimizer,
    sc_remove_unparametrized,
    sc_assign_without_inverse,
    sc_assign_wrong_dtype,
    sc_assign_multi_wrong_len,
    _err("missing", attr="foo", factory=Double),
    _err("none_inverse", factory=NoneInverse),
    _err("bad_seq", factory=BadSeq),
    _err("to_int", factory=ToInt),
    _err("shrink", factory=Shrink),
    _err("not_tensor", factory=NotTensor),
    _err("inverse_dtype", factory=InverseChangesDtype),
    _err("chain_to_int", factory=ToInt, parametrized_first=True),
    _err("chain_shrink", factory=Shrink, parametrized_first=True),
    _err("chain_not_tensor", factory=NotTensor, parametrized_first=True),
    _err("chain_inverse_dtype", factory=InverseChangesDtype, parametrized_first=True),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_differential_torch_parametrizations(scenario):
    _differential(scenario)


def test_errors_are_raised_in_both():
    kinds = {s.__name__: _differential(s)[0] for s in SCENARIOS}
    assert kinds["sc_pickle"] == "raised"
    assert kinds["missing"] == "raised"
    assert kinds["sc_register_symmetric"] == "ok"


def test_parametrization_list_is_a_torch_parametrization_list():
    m = compat_P.register_parametrization(nn.Linear(2, 2), "weight", Double())
    assert isinstance(m.parametrizations.weight, torch_P.ParametrizationList)
    assert torch_P.is_parametrized(m, "weight")


def test_public_api_matches_torch():
    import inspect

    assert set(compat_P.__all__) == set(torch_P.__all__)
    for name in torch_P.__all__:
        ours = getattr(compat_P, name)
        assert ours.__doc__, name
        if name not in ("ParametrizationList", "cached"):
            ref = inspect.signature(getattr(torch_P, name))
            got = inspect.signature(ours)
            assert list(ref.parameters) == list(got.parameters), name


def test_non_callable_parametrization_raises():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        compat_P.register_parametrization(nn.Linear(2, 2), "weight", 3)


# --------------------------------------------------------------------------- #
# Part 2: the same math written in JAX
# --------------------------------------------------------------------------- #


def jax_symmetric(X):
    return jnp.triu(X) + jnp.triu(X, 1).T


jax_symmetric.right_inverse = jnp.triu  # type: ignore[attr-defined]


def jax_skew(X):
    A = jnp.triu(X, 1)
    return A - A.T


def jax_double(X):
    return 2.0 * X


jax_double.right_inverse = lambda X: 0.5 * X  # type: ignore[attr-defined]


def jax_matmul(a, b):
    return a @ b


jax_matmul.right_inverse = lambda W: (W, jnp.eye(W.shape[1], dtype=W.dtype))  # type: ignore[attr-defined]

PAIRS = {
    "symmetric": ([Symmetric], [jax_symmetric]),
    "skew": ([Skew], [jax_skew]),
    "matmul": ([MatMul], [jax_matmul]),
    "sym_double": ([Symmetric, Double], [jax_symmetric, jax_double]),
    "mixed": ([Symmetric, Double, Skew], [jax_symmetric, Double, jax_skew]),
}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _train(links, dtype, steps=3):
    torch.manual_seed(0)
    m = nn.Linear(4, 4).to(dtype)
    for link in links:
        compat_P.register_parametrization(m, "weight", link() if isinstance(link, type) else link)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(6, 4, dtype=dtype)
    history = []
    for _ in range(steps):
        opt.zero_grad()
        m(x).tanh().pow(2).sum().backward()
        history.append((m.weight.detach().clone(), _grads(m)))
        opt.step()
    history.append((m.weight.detach().clone(), {}))
    return m, history


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pair", list(PAIRS), ids=str)
def test_jax_matches_torch_through_training(pair, dtype):
    torch_links, jax_links = PAIRS[pair]
    m_ref, ref = _train(torch_links, dtype)
    m_jax, got = _train(jax_links, dtype)
    tol = TOL[dtype]
    for (w_r, g_r), (w_j, g_j) in zip(ref, got, strict=True):
        torch.testing.assert_close(w_j, w_r, rtol=tol, atol=tol)
        assert g_r.keys() == g_j.keys()
        for k in g_r:
            torch.testing.assert_close(g_j[k], g_r[k], rtol=tol, atol=tol)
    assert [k.split(".")[-1] for k in m_ref.state_dict()] == [
        k.split(".")[-1] for k in m_jax.state_dict()
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_jax_right_inverse_assignment_and_removal(dtype):
    tol = TOL[dtype]
    A = torch.randn(4, 4, dtype=dtype)
    A = A + A.T
    out = {}
    for name, links in (("torch", [Symmetric(), Double()]), ("jax", [jax_symmetric, jax_double])):
        m = nn.Linear(4, 4).to(dtype)
        for link in links:
            compat_P.register_parametrization(m, "weight", link)
        m.weight = A
        orig = m.parametrizations.weight.original.detach().clone()
        w = m.parametrizations.weight.original
        compat_P.remove_parametrizations(m, "weight", leave_parametrized=True)
        assert m.weight is w  # id kept: the optimizer still tracks it
        out[name] = (orig, m.weight.detach().clone())
        # torch owns the memory: an in-place step is fine and visible
        with torch.no_grad():
            m.weight.add_(1.0)
        torch.testing.assert_close(m.weight.detach(), out[name][1] + 1.0)
    for a, b in zip(out["torch"], out["jax"], strict=True):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
    torch.testing.assert_close(out["jax"][1], A, rtol=tol, atol=tol)


def test_jax_multi_originals_state_dict_and_removal():
    m = compat_P.register_parametrization(nn.Linear(3, 3), "weight", jax_matmul)
    assert list(m.state_dict()) == [
        "bias",
        "parametrizations.weight.original0",
        "parametrizations.weight.original1",
    ]
    w = m.weight.detach().clone()
    with pytest.raises(ValueError, match="Cannot leave unparametrized"):
        compat_P.remove_parametrizations(m, "weight", leave_parametrized=False)
    compat_P.remove_parametrizations(m, "weight")
    assert isinstance(m.weight, nn.Parameter)
    torch.testing.assert_close(m.weight.detach(), w)


class _TorchSplitTwice(nn.Module):
    def forward(self, a, b, c):
        return a + b + c

    def right_inverse(self, x):
        z = torch.zeros_like(x)
        return [x, z, z]  # the same tensor twice


def _jax_split_twice(a, b, c):
    return a + b + c


def _jax_split_twice_inverse(x):
    z = jnp.zeros_like(x)
    return [x, z, z]  # the same array twice


_jax_split_twice.right_inverse = _jax_split_twice_inverse


def test_jax_right_inverse_returning_an_array_twice_shares_memory_as_torch():
    # torch makes one Parameter per returned tensor: the same tensor twice gives
    # two originals sharing memory, so an SGD step on both moves it twice
    out = {}
    for P, link in ((torch_P, _TorchSplitTwice()), (compat_P, _jax_split_twice)):
        torch.manual_seed(0)
        m = P.register_parametrization(nn.Linear(3, 3), "weight", link)
        plist = m.parametrizations.weight
        ptrs = [getattr(plist, f"original{i}").data_ptr() for i in range(3)]
        assert ptrs[1] == ptrs[2] != ptrs[0]
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(torch.ones(2, 3)).sum().backward()
        opt.step()
        out[P] = [getattr(plist, f"original{i}").detach().clone() for i in range(3)]
    for a, b in zip(out[torch_P], out[compat_P], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out[compat_P][1], 2 * -0.1 * torch.full((3, 3), 2.0))


def test_jax_cached_and_deepcopy_and_pickle():
    m = compat_P.register_parametrization(nn.Linear(3, 3), "weight", jax_skew)
    with compat_P.cached():
        assert m.weight is m.weight
    m2 = copy.deepcopy(m)
    torch.testing.assert_close(m2.weight, m.weight)
    assert type(m2.parametrizations.weight[0]) is _bridge.JaxParametrization
    with pytest.raises(RuntimeError, match="Serialization of parametrized modules"):
        pickle.dumps(m)


@pytest.mark.parametrize("opened_by", [torch_P, compat_P])
def test_one_cache_for_both_libraries(opened_by):
    # Third-party code wraps calls in torch's `cached()`: it must cache
    # torch_compat's modules (spectral norm then iterates once, as torch's), and
    # ours must cache modules parametrized with torch's register_parametrization.
    from torch.nn.utils import parametrizations as torch_builtins

    from torch_compat import parametrizations as compat_builtins

    torch.manual_seed(0)
    ref = torch_builtins.spectral_norm(nn.Linear(6, 6))
    torch.manual_seed(0)
    ours = compat_builtins.spectral_norm(nn.Linear(6, 6))
    plain = torch_P.register_parametrization(nn.Linear(3, 3), "weight", Symmetric())
    with opened_by.cached():
        assert ours.weight is ours.weight and plain.weight is plain.weight
        with torch_P.cached():
            ref_w = ref.weight
        assert ref.weight is ref_w
        torch.testing.assert_close(ours.weight, ref_w)
    assert not torch_P._cache_enabled and torch_P._cache == {}
    torch.testing.assert_close(
        ours.parametrizations.weight[0]._u, ref.parametrizations.weight[0]._u
    )


def test_jax_transfer():
    a = compat_P.register_parametrization(nn.Linear(3, 3), "weight", jax_symmetric)
    b = compat_P.transfer_parametrizations_and_params(a, nn.Linear(3, 3))
    torch.testing.assert_close(a.weight, b.weight)
    assert b.parametrizations.weight[0] is a.parametrizations.weight[0]


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda x: x.astype(jnp.int32), "may not change the dtype"),
        (lambda x: x[:-1], "may not change the shape"),
    ],
)
def test_jax_registration_errors_match_torch(fn, match):
    m = nn.Linear(3, 4)
    with pytest.raises(ValueError, match=match):
        compat_P.register_parametrization(m, "weight", fn)
    assert not compat_P.is_parametrized(m)
    assert type(m) is nn.Linear


def test_jax_assignment_without_right_inverse_raises_like_torch():
    m = compat_P.register_parametrization(nn.Linear(3, 3), "weight", jax_skew)
    assert not hasattr(m.parametrizations.weight[0], "right_inverse")
    with pytest.raises(RuntimeError, match="does not implement right_inverse"):
        m.weight = torch.zeros(3, 3)


def test_consecutive_jax_links_are_fused(monkeypatch):
    calls = []
    real = _bridge.run_chain

    def spy(links, xs):
        calls.append(len(links))
        return real(links, xs)

    monkeypatch.setattr(_bridge, "run_chain", spy)
    m = nn.Linear(4, 4)
    for link in (jax_symmetric, jax_double, jax_double, Skew(), jax_double):
        compat_P.register_parametrization(m, "weight", link)
    calls.clear()
    ref = Skew()(4 * jax_like_symmetric(m.parametrizations.weight.original.detach())) * 2
    torch.testing.assert_close(m.weight.detach(), ref)
    assert calls == [3, 1]


def jax_like_symmetric(X):
    return X.triu() + X.triu(1).T


def test_training_mode_reaches_adapters():
    m = nn.Linear(3, 3).eval()
    compat_P.register_parametrization(m, "weight", jax_skew)
    assert not m.parametrizations.weight[0].training
    m.train()
    assert m.parametrizations.weight[0].training
