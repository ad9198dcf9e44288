"""Differential tests: torch.nn.utils.parametrizations vs torch_compat.parametrizations.

Every scenario builds the same module twice with the same ``torch.manual_seed``,
applies torch's built-in to one and ours to the other, and compares values,
gradients, buffers, state-dict keys, training trajectories and exceptions.
"""

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrizations as TP
import torch.nn.utils.parametrize as torch_P

import torch_compat.parametrize as compat_P
from torch_compat import _bridge
from torch_compat import parametrizations as CP

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.complex64: 1e-5, torch.complex128: 1e-10}

LAYERS = {
    "linear": lambda dt: nn.Linear(5, 3, dtype=dt),
    "linear_tall": lambda dt: nn.Linear(3, 6, dtype=dt),
    "conv1d": lambda dt: nn.Conv1d(3, 4, 3, dtype=dt),
    "conv2d": lambda dt: nn.Conv2d(2, 3, 3, dtype=dt),
    "convT2d": lambda dt: nn.ConvTranspose2d(2, 3, 3, dtype=dt),
    "embedding": lambda dt: nn.Embedding(6, 4, dtype=dt),
}
INPUTS = {
    "linear": lambda dt: torch.randn(4, 5, dtype=dt),
    "linear_tall": lambda dt: torch.randn(4, 3, dtype=dt),
    "conv1d": lambda dt: torch.randn(2, 3, 7, dtype=dt),
    "conv2d": lambda dt: torch.randn(2, 2, 5, 5, dtype=dt),
    "convT2d": lambda dt: torch.randn(2, 2, 4, 4, dtype=dt),
    "embedding": lambda dt: torch.tensor([[0, 3, 5], [1, 1, 2]]),
}
BUILTINS = {
    "weight_norm": {},
    "weight_norm_dim1": {"dim": 1},
    "weight_norm_none": {"dim": None},
    "spectral_norm": {},
    "spectral_norm_3it": {"n_power_iterations": 3},
    "orthogonal": {},
    "orthogonal_cayley": {"orthogonal_map": "cayley"},
    "orthogonal_householder": {"orthogonal_map": "householder"},
    "orthogonal_householder_notriv": {"orthogonal_map": "householder", "use_trivialization": False},
}


def _fn(builtin):
    return next(f for f in ("weight_norm", "spectral_norm", "orthogonal") if builtin.startswith(f))


def _pair(layer, builtin, dtype=torch.float32, seed=0):
    """(torch module, torch_compat module), same seed for the weights and the built-in."""
    out = []
    for P in (TP, CP):
        torch.manual_seed(seed)
        m = LAYERS[layer](dtype)
        getattr(P, _fn(builtin))(m, **BUILTINS[builtin])
        out.append(m)
    return out


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=TOL[dtype])


def _state_close(a, b, dtype):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        _close(sa[k], sb[k], dtype)


def _use_client(client, monkeypatch):
    """Compiles the chains afresh on one of the bridge's clients: "inline" (its
    private one-thread client, for small chains) or "jax" (JAX's own)."""
    if client == "inline" and _bridge._INLINE.get() is None:
        pytest.skip("no inline CPU client on this platform")
    monkeypatch.setattr(_bridge, "_entries", {})
    if client == "jax":
        monkeypatch.setattr(_bridge, "_INLINE_MAX_FLOPS", -1.0)


CASES = [("linear", b) for b in BUILTINS] + [
    (layer, b)
    for layer in ("linear_tall", "conv1d", "conv2d", "convT2d", "embedding")
    for b in ("weight_norm", "spectral_norm", "orthogonal")
]
CASES += [("conv2d", "orthogonal_householder_notriv"), ("convT2d", "weight_norm_dim1")]


@pytest.mark.parametrize("layer, builtin", CASES)
def test_values_grads_and_state_match_torch(layer, builtin):
    _check_values_grads_state(layer, builtin)


@pytest.mark.parametrize("client", ["inline", "jax"])
@pytest.mark.parametrize(
    "builtin", ["weight_norm", "spectral_norm", "orthogonal", "orthogonal_cayley"]
)
def test_both_bridge_clients_match_torch(builtin, client, monkeypatch):
    # Small chains run on the bridge's inline client, large ones on JAX's: both
    # must give torch's numbers.
    _use_client(client, monkeypatch)
    _check_values_grads_state("conv2d", builtin)
    assert _bridge._entries
    assert all((e.jdev is None) == (client == "jax") for e in _bridge._entries.values())


def _check_values_grads_state(layer, builtin):
    dtype = torch.float32
    a, b = _pair(layer, builtin, dtype)
    assert type(a).__name__ == type(b).__name__
    la, lb = a.parametrizations.weight[0], b.parametrizations.weight[0]
    assert type(la).__name__ == type(lb).__name__
    _state_close(a, b, dtype)
    x = INPUTS[layer](dtype)
    for _ in range(2):  # spectral norm: the power iteration runs on each access
        ya, yb = a(x), b(x)
        _close(ya, yb, dtype)
        (ya**2).sum().backward()
        (yb**2).sum().backward()
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb
        _close(pa.grad, pb.grad, dtype)
    _state_close(a, b, dtype)


@pytest.mark.parametrize(
    "builtin",
    ["weight_norm", "weight_norm_none", "spectral_norm", "orthogonal", "orthogonal_cayley"],
)
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_float64_values_and_grads(layer, builtin):
    dtype = torch.float64
    a, b = _pair(layer, builtin, dtype)
    x = INPUTS[layer](dtype)
    ya, yb = a(x), b(x)
    _close(ya, yb, dtype)
    ya.sum().backward()
    yb.sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        _close(pa.grad, pb.grad, dtype)
    _state_close(a, b, dtype)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize(
    "builtin", ["weight_norm", "spectral_norm", "orthogonal", "orthogonal_householder"]
)
def test_training_steps_match_torch(builtin, opt):
    dtype = torch.float32
    a, b = _pair("linear_tall", builtin, dtype)
    mk = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1), "adam": lambda p: torch.optim.Adam(p, 1e-2)}
    oa, ob = mk[opt](a.parameters()), mk[opt](b.parameters())
    torch.manual_seed(1)
    xs = [torch.randn(8, 3) for _ in range(5)]
    for x in xs:
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    _state_close(a, b, dtype)
    with torch.no_grad():
        _close(a.weight, b.weight, dtype)


@pytest.mark.parametrize("client", ["inline", "jax"])
@pytest.mark.parametrize(
    "builtin", ["weight_norm", "spectral_norm", "orthogonal", "orthogonal_cayley"]
)
def test_channels_last_state_matches_torch(builtin, client, monkeypatch):
    # `.to(memory_format=torch.channels_last)` leaves the 4-d originals and
    # orthogonal's `base` buffer strided. The inline client's executables read
    # every buffer as row-major: a strided `base` gave orthogonal weights off by
    # 1.6 before the bridge copied such tensors to contiguous memory.
    _use_client(client, monkeypatch)
    dtype = torch.float64
    a, b = (m.to(memory_format=torch.channels_last) for m in _pair("conv2d", builtin, dtype))
    strided = [k for k, v in b.state_dict().items() if v.dim() == 4 and not v.is_contiguous()]
    assert strided, b.state_dict().keys()
    oa, ob = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (a, b))
    x = INPUTS["conv2d"](dtype).to(memory_format=torch.channels_last)
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            _close(pa.grad, pb.grad, dtype)
        oa.step()
        ob.step()
    _state_close(a, b, dtype)
    _close(a(x), b(x), dtype)


def _meta_summary(m):
    return [(k, v.shape, v.dtype, v.is_meta) for k, v in m.state_dict().items()]


@pytest.mark.parametrize(
    "builtin", ["weight_norm", "weight_norm_none", "spectral_norm", "spectral_norm_3it"]
)
@pytest.mark.parametrize("layer", ["linear", "conv2d", "convT2d"])
def test_meta_device_as_torch(layer, builtin):
    # A model built under torch.device("meta") (deferred initialization): torch's
    # weight and spectral norm give meta tensors of the right shapes, with
    # autograd, and so do ours (through jax.eval_shape: nothing is computed).
    # Then `to_empty` gives the model memory, and a state dict its numbers.
    out = []
    for P in (TP, CP):
        with torch.device("meta"):
            m = LAYERS[layer](torch.float32)
        getattr(P, _fn(builtin))(m, **BUILTINS[builtin])
        out.append(m)
    a, b = out
    assert _meta_summary(a) == _meta_summary(b)
    x = INPUTS[layer](torch.float32)
    for m in (a, b):
        w = m.weight
        assert w.is_meta and w.requires_grad
        m(x.to("meta")).sum().backward()
    assert a.weight.shape == b.weight.shape
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert pa.grad.is_meta and pb.grad.is_meta and pa.grad.shape == pb.grad.shape
    real, _ = _pair(layer, builtin)
    for m in (a, b):
        m.to_empty(device="cpu")
        m.load_state_dict(real.state_dict())
    _close(a(x), b(x), torch.float32)
    _state_close(a, b, torch.float32)


@pytest.mark.parametrize("builtin", ["weight_norm", "orthogonal", "spectral_norm"])
def test_registered_under_inference_mode_as_torch(builtin):
    # A model parametrized under torch.inference_mode() has inference tensors as
    # originals. Read outside it, torch's weight norm and orthogonal give values
    # that do not require grad; spectral norm's training read refuses to update
    # its inference buffers.
    out = []
    for P in (TP, CP):
        torch.manual_seed(0)
        with torch.inference_mode():
            m = getattr(P, builtin)(nn.Linear(4, 4))
        try:
            w = m.weight
            m(torch.ones(2, 4)).sum().backward()
            out.append((w.requires_grad, w, m.bias.grad))
        except RuntimeError as e:
            out.append(str(e).split(".")[0])
    if builtin == "spectral_norm":
        assert (
            out[0]
            == out[1]
            == "Inplace update to inference tensor outside InferenceMode is not allowed"
        )
    else:
        assert out[0][0] is out[1][0] is False
        _close(out[0][1], out[1][1], torch.float32)
        _close(out[0][2], out[1][2], torch.float32)  # the bias still trains


@pytest.mark.parametrize("hooks", ["checkpoint", "save_on_cpu"])
@pytest.mark.parametrize("builtin", ["weight_norm", "spectral_norm", "orthogonal"])
def test_saved_tensor_hooks_as_torch(builtin, hooks):
    # Non-reentrant activation checkpointing frees what the backward needs and
    # recomputes it: spectral norm's backward then uses the recomputed power
    # iteration (a gradient 0.95 away from the plain one here: 32 wide, so that
    # one more iteration moves u), and the bridge's
    # residuals must be recomputed too. save_on_cpu moves every saved tensor.
    from torch.utils.checkpoint import checkpoint

    out = []
    for P in (TP, CP):
        torch.manual_seed(0)
        m = getattr(P, builtin)(nn.Linear(32, 32))
        x = torch.randn(3, 32)
        for _ in range(2):
            if hooks == "checkpoint":
                y = checkpoint(m, x, use_reentrant=False)
            else:
                with torch.autograd.graph.save_on_cpu():
                    y = m(x)
            y.pow(2).mean().backward()
        out.append(m)
    a, b = out
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        _close(pa.grad, pb.grad, torch.float32)
    _state_close(a, b, torch.float32)


@pytest.mark.parametrize(
    "builtin",
    ["weight_norm", "spectral_norm", "orthogonal", "orthogonal_cayley", "orthogonal_householder"]
    + ["orthogonal_householder_notriv"],
)
@pytest.mark.parametrize("change", ["optimizer_step", "functional_call"])
def test_original_changed_before_backward_as_torch(builtin, change):
    # torch's orthogonal saves only values computed from the original, so the
    # original may change between forward and backward: an optimizer step before
    # the backward, or `functional_call` with a weight (its right_inverse writes
    # the original, and the original comes back after the forward). Weight and
    # spectral norm save it: torch's in-place error, and ours.
    from torch.func import functional_call

    out = []
    for P in (TP, CP):
        torch.manual_seed(0)
        m = LAYERS["linear"](torch.float32)
        getattr(P, _fn(builtin))(m, **BUILTINS[builtin])
        x, w = torch.randn(2, 5), torch.randn(3, 5)
        original = next(m.parametrizations.weight.parameters())
        try:
            if change == "functional_call":
                y = functional_call(m, {"weight": w}, (x,))
            else:
                y = m(x)
                with torch.no_grad():
                    original.add_(0.1)
            y.pow(2).sum().backward()
            out.append([p.grad for p in m.parameters()])
        except RuntimeError as e:
            out.append(str(e).split(":")[0])
    if isinstance(out[0], str) or isinstance(out[1], str):
        assert out[0] == out[1]
        assert builtin in ("weight_norm", "spectral_norm")
    else:
        for a, b in zip(*out, strict=True):
            _close(a, b, torch.float32)


def test_spectral_norm_train_eval_and_in_place_buffers():
    a, b = _pair("linear", "spectral_norm")
    sn = b.parametrizations.weight[0]
    u, v = sn._u, sn._v
    for m in (a, b):  # a non-converged start, so that an iteration is visible
        m.parametrizations.weight[0]._v.copy_(torch.eye(5)[0])
    u0 = u.clone()
    x = torch.randn(2, 5)
    b(x)
    assert sn._u is u and sn._v is v  # same tensor objects, updated in place
    assert not torch.equal(u, u0)
    a(x)
    _state_close(a, b, torch.float32)
    a.eval(), b.eval()
    assert not sn.training
    u1 = u.clone()
    for _ in range(3):
        _close(a(x), b(x), torch.float32)
    assert torch.equal(u, u1)  # no power iteration in eval mode
    a.train(), b.train()
    for m in (a, b):
        m.parametrizations.weight[0]._v.copy_(torch.eye(5)[1])
    _close(a(x), b(x), torch.float32)
    assert not torch.equal(u, u1)
    _state_close(a, b, torch.float32)


def test_spectral_norm_1d_and_convtranspose_dim():
    a, b = [], []
    for P, out in ((TP, a), (CP, b)):
        torch.manual_seed(0)
        m = nn.Linear(4, 3)
        P.spectral_norm(m, "bias")
        out.append(m)
    assert sorted(a[0].state_dict()) == sorted(b[0].state_dict())
    _close(a[0].bias, b[0].bias, torch.float32)
    ta, tb = _pair("convT2d", "spectral_norm")
    assert tb.parametrizations.weight[0].dim == 1 == ta.parametrizations.weight[0].dim
    assert tb.parametrizations.weight[0]._u.shape == (3,)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("builtin", ["orthogonal", "orthogonal_cayley", "spectral_norm"])
def test_complex_matches_torch(builtin, dtype):
    for shape in ((4, 4), (3, 5)):
        out = []
        for P in (TP, CP):
            torch.manual_seed(0)
            m = nn.Linear(*shape, dtype=dtype)
            getattr(P, _fn(builtin))(m, **BUILTINS[builtin])
            out.append(m)
        a, b = out
        _state_close(a, b, dtype)
        x = torch.randn(2, shape[0], dtype=dtype)
        ya, yb = a(x), b(x)
        _close(ya, yb, dtype)
        ya.abs().sum().backward()
        yb.abs().sum().backward()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            _close(pa.grad, pb.grad, dtype)


@pytest.mark.parametrize("client", ["inline", "jax"])
@pytest.mark.parametrize("builtin", ["orthogonal", "spectral_norm"])
def test_complex_gradients_through_lazy_conjugates_match_torch(builtin, client, monkeypatch):
    # `w.conj()`, `w.mH` and `.imag` of a conjugate hand the backward gradients
    # that are views with torch's lazy conjugate or negative bit. DLPack exports
    # the memory without the bit: before the bridge resolved them, the gradients
    # were off by 1.1-11 (silently). A conjugate view as a buffer likewise.
    _use_client(client, monkeypatch)
    dtype = torch.complex128
    out = []
    for P in (TP, CP):
        torch.manual_seed(0)
        m = nn.Linear(4, 4, dtype=dtype)
        getattr(P, _fn(builtin))(m, **BUILTINS[builtin])
        out.append(m)
    a, b = out
    if builtin == "orthogonal":  # the trivialization's base, as a conjugate view
        for m in (a, b):
            m.parametrizations.weight[0].base = m.parametrizations.weight[0].base.conj()
        assert b.parametrizations.weight[0].base.is_conj()
    y = torch.randn(4, 4, dtype=dtype)
    losses = [  # one at a time: a sum of them would hand on a resolved gradient
        lambda w: (w.conj() * y).real.sum(),
        lambda w: (w.mH @ y).abs().sum(),
        lambda w: w.conj().imag.sum(),
    ]
    for loss in losses:
        for m in (a, b):
            m.zero_grad()
            loss(m.weight).backward()
        _close(a.weight, b.weight, dtype)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            if pa.grad is None:
                assert pb.grad is None
            else:
                _close(pa.grad, pb.grad, dtype)
    _state_close(a, b, dtype)


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
@pytest.mark.parametrize("shape", [(4, 4), (6, 3), (2, 3, 5)])
@pytest.mark.parametrize("use_trivialization", [True, False])
def test_orthogonal_maps_shapes_and_assignment(orthogonal_map, shape, use_trivialization):
    out = []
    for P in (TP, CP):
        torch.manual_seed(0)
        m = nn.Module()
        m.weight = nn.Parameter(torch.randn(*shape))
        P.orthogonal(m, "weight", orthogonal_map, use_trivialization=use_trivialization)
        out.append(m)
    a, b = out
    _state_close(a, b, torch.float32)
    _close(a.weight, b.weight, torch.float32)
    torch.manual_seed(3)
    Q = torch.linalg.qr(torch.randn(*shape) if shape[-2] >= shape[-1] else torch.randn(*shape).mT)
    Q = Q.Q if shape[-2] >= shape[-1] else Q.Q.mT
    for target in (Q, torch.randn(*shape)):
        errs = []
        for m in (a, b):
            torch.manual_seed(4)  # the completion draws torch.randn
            try:
                m.weight = target
                errs.append(None)
            except NotImplementedError as e:
                errs.append(str(e))
        assert errs[0] == errs[1]
        _state_close(a, b, torch.float32)
        _close(a.weight, b.weight, torch.float32)


@pytest.mark.parametrize("layer", ["linear", "conv1d", "convT2d", "embedding"])
def test_state_dict_cross_loading_both_ways(layer):
    x = INPUTS[layer](torch.float32)
    for builtin in ("weight_norm", "spectral_norm", "orthogonal"):
        for src, dst in ((TP, CP), (CP, TP)):
            torch.manual_seed(0)
            m_src = getattr(src, builtin)(LAYERS[layer](torch.float32))
            m_src(x)
            torch.manual_seed(5)  # different init: loading must overwrite everything
            m_dst = getattr(dst, builtin)(LAYERS[layer](torch.float32))
            assert list(m_src.state_dict()) == list(m_dst.state_dict())
            m_dst.load_state_dict(m_src.state_dict(), strict=True)
            m_src.eval(), m_dst.eval()
            _close(m_src(x), m_dst(x), torch.float32)
            m_src.train(), m_dst.train()
            _close(m_src(x), m_dst(x), torch.float32)


def test_weight_norm_old_keys_hook():
    torch.manual_seed(0)
    old = torch.nn.utils.weight_norm(nn.Linear(4, 5))
    m = CP.weight_norm(nn.Linear(4, 5))
    m.load_state_dict(old.state_dict())
    x = torch.randn(3, 4)
    _close(old(x), m(x), torch.float32)


@pytest.mark.parametrize(
    "builtin",
    ["weight_norm", "weight_norm_none", "spectral_norm", "orthogonal", "orthogonal_cayley"]
    + ["orthogonal_householder", "orthogonal_householder_notriv"],
)
def test_gradcheck_float64(builtin):
    torch.manual_seed(0)
    m = nn.Linear(4, 3, dtype=torch.float64)
    getattr(CP, _fn(builtin))(m, **BUILTINS[builtin])
    m.eval()  # spectral norm: a fixed (u, v), so the function is deterministic
    names = [n for n, _ in m.named_parameters() if n.startswith("parametrizations.")]
    x = torch.randn(2, 4, dtype=torch.float64)
    inputs = [m.get_parameter(n).detach().clone() for n in names]
    if "householder" in builtin or builtin == "orthogonal":  # (3, 4) defaults to householder
        # householder reads trunc(diag(X)): move the diagonal away from the
        # integers, where that step function jumps (in torch as well).
        inputs[0].diagonal().mul_(1.5)

    def f(*originals):
        return torch.func.functional_call(m, dict(zip(names, originals, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, tuple(t.requires_grad_() for t in inputs))


def test_gradcheck_spectral_norm_training_mode_wrt_input():
    torch.manual_seed(0)
    m = CP.spectral_norm(nn.Linear(4, 3, dtype=torch.float64))
    sn = m.parametrizations.weight[0]
    u, v = sn._u.clone(), sn._v.clone()

    def f(x):
        sn._u.copy_(u)
        sn._v.copy_(v)
        return m(x) + m(x)

    assert torch.autograd.gradcheck(f, (torch.randn(2, 4, dtype=torch.float64).requires_grad_(),))


def _raises_same(fn_torch, fn_compat):
    with pytest.raises(Exception) as et:
        fn_torch()
    with pytest.raises(Exception) as ec:
        fn_compat()
    assert type(et.value) is type(ec.value)
    assert str(ec.value).startswith(str(et.value).split("\n")[0])


@pytest.mark.parametrize(
    "call",
    [
        lambda P: P.orthogonal(nn.Linear(3, 3), "nope"),
        lambda P: P.orthogonal(nn.Linear(3, 3), "bias"),
        lambda P: P.orthogonal(nn.Linear(3, 3), orthogonal_map="svd"),
        lambda P: P.orthogonal(nn.Linear(3, 3, dtype=torch.cfloat), orthogonal_map="householder"),
        lambda P: P.spectral_norm(nn.Linear(3, 3), "nope"),
        lambda P: P.spectral_norm(nn.Linear(3, 3), dim=2),
        lambda P: P.spectral_norm(nn.Linear(3, 3), dim=-3),
        lambda P: P.spectral_norm(nn.Linear(3, 3), n_power_iterations=0),
        lambda P: P.weight_norm(nn.Linear(3, 3), "nope"),
        lambda P: P.weight_norm(nn.Linear(3, 3), dim=2),
    ],
)
def test_errors_match_torch(call):
    _raises_same(lambda: call(TP), lambda: call(CP))


@pytest.mark.parametrize(
    "builtin_kw, value",
    [
        ({"orthogonal_map": "matrix_exp", "use_trivialization": False}, torch.eye(3)),
        ({"orthogonal_map": "cayley", "use_trivialization": False}, torch.eye(3)),
        ({}, torch.eye(4)),
    ],
)
def test_orthogonal_assignment_errors_match_torch(builtin_kw, value):
    def go(P):
        m = P.orthogonal(nn.Linear(3, 3), **builtin_kw)
        m.weight = value

    _raises_same(lambda: go(TP), lambda: go(CP))


def test_orthogonal_on_chain_without_base_errors_like_torch():
    def go(P, compat):
        m = compat.register_parametrization(nn.Linear(3, 3), "weight", nn.Identity())
        P.orthogonal(m)
        return m.weight

    _raises_same(lambda: go(TP, torch_P), lambda: go(CP, compat_P))


def test_links_are_fused_jax_links_and_pickle_deepcopy():
    m = CP.spectral_norm(CP.weight_norm(nn.Linear(3, 4)))
    assert all(_bridge.is_jax_link(link) for link in m.parametrizations.weight)
    with pytest.raises(RuntimeError, match="state_dict"):
        pickle.dumps(m)
    m2 = copy.deepcopy(m)
    x = torch.randn(2, 3)
    m.eval(), m2.eval()
    _close(m(x), m2(x), torch.float32)


def test_public_api():
    assert CP.__all__ == TP.__all__
    import inspect

    for name in CP.__all__:
        sig_c, sig_t = (inspect.signature(getattr(P, name)).parameters.values() for P in (CP, TP))
        assert [(p.name, p.default, p.kind) for p in sig_c] == [
            (p.name, p.default, p.kind) for p in sig_t
        ], name
        assert getattr(CP, name).__doc__


def _buffer_module(w):
    m = nn.Module()
    m.register_buffer("weight", w)
    return m


@pytest.mark.parametrize(
    "weight, dim",
    [
        (torch.tensor(-3.0), 0),
        (torch.tensor(-3.0), None),
        (torch.tensor(-3.0), 1),
        (torch.tensor(3), 0),
        (torch.tensor(3), None),
        (torch.ones(2, 2), 5),
        (torch.ones(2, 2, dtype=torch.int32), 5),
        *((torch.ones(3, 3, dtype=dt), 0) for dt in (torch.int8, torch.int64, torch.uint8)),
        (torch.ones(3, dtype=torch.bool), None),
    ],
    ids=str,
)
def test_weight_norm_bad_weights_raise_torchs_errors(weight, dim):
    # Same exception, same message, at the same moment (registration or access).
    def outcome(register):
        m = _buffer_module(weight.clone())
        try:
            register(m, "weight", dim=dim)
        except Exception as e:  # noqa: BLE001 - compared below
            return "register", type(e), str(e)
        try:
            _ = m.weight
        except Exception as e:  # noqa: BLE001 - compared below
            return "access", type(e), str(e)
        return None

    expected = outcome(TP.weight_norm)
    assert expected is not None
    assert outcome(CP.weight_norm) == expected


@pytest.mark.parametrize("shape", [(0, 0), (0, 4), (4, 0), (2, 0, 0)], ids=str)
@pytest.mark.parametrize("builtin", ["orthogonal", "spectral_norm"])
def test_empty_weights_as_torch(builtin, shape):
    torch.manual_seed(0)
    theirs = getattr(TP, builtin)(_buffer_module(torch.zeros(shape)), "weight").weight
    ours = getattr(CP, builtin)(_buffer_module(torch.zeros(shape)), "weight").weight
    assert ours.shape == theirs.shape == shape


def _snapshot(m):
    """Everything an error must leave as it was: the tensors (values, objects) and
    the parametrizations."""
    sd = m.state_dict(keep_vars=True)
    links = {k: [type(link) for link in v] for k, v in getattr(m, "parametrizations", {}).items()}
    return {k: (v, v.detach().clone()) for k, v in sd.items()}, links


def _assert_unchanged(m, snap):
    tensors, links = snap
    sd = m.state_dict(keep_vars=True)
    assert list(sd) == list(tensors)
    for k, (obj, val) in tensors.items():
        assert sd[k] is obj, k
        assert sd[k].dtype == val.dtype and torch.equal(sd[k].detach(), val), k
    now = {k: [type(link) for link in v] for k, v in getattr(m, "parametrizations", {}).items()}
    assert now == links


def _outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - compared by the callers
        return type(e), str(e)
    return None


@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 3), (4, 3), (2, 8), (3, 4), (4, 2, 2)], ids=str)
def test_spectral_norm_uv_mismatch_raises_torchs_error(shape, training):
    # A replaced original that no longer fits `_u`/`_v`: torch's `torch.mv` / `vdot`
    # error, not JAX's, and nothing changes.
    def outcome(P):
        torch.manual_seed(0)
        m = P.spectral_norm(nn.Linear(4, 4)).train(training)
        m.parametrizations.weight.original.data = torch.randn(shape)
        snap = _snapshot(m)
        res = _outcome(lambda: m.weight)
        if res is not None and P is CP:
            _assert_unchanged(m, snap)
        return res

    expected, ours = outcome(TP), outcome(CP)
    if shape == (3, 4) and training:
        # torch resizes `_u` in place here (a deprecated `out=` resize, with a
        # warning); ours raises the error torch raises in eval mode.
        assert expected is None
        torch.manual_seed(0)
        m = TP.spectral_norm(nn.Linear(4, 4)).eval()
        m.parametrizations.weight.original.data = torch.randn(shape)
        expected = _outcome(lambda: m.weight)
        assert expected is not None and ours is not None
        assert ours[0] is expected[0] and ours[1].startswith(expected[1] + "\nfix: ")
    else:
        assert ours == expected


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_spectral_norm_transfer_to_other_shape_raises_torchs_error(training):
    def outcome(P, compat):
        torch.manual_seed(0)
        src = P.spectral_norm(nn.Linear(4, 4)).train(training)
        dst = nn.Linear(3, 3)
        snap = _snapshot(dst)
        res = _outcome(lambda: compat.transfer_parametrizations_and_params(src, dst))
        if compat is compat_P:
            _assert_unchanged(dst, snap)
            assert not compat_P.is_parametrized(dst)
        return res

    expected = outcome(TP, torch_P)
    assert expected == (RuntimeError, "size mismatch, got input (3), mat (3x3), vec (4)")
    assert outcome(CP, compat_P) == expected


INT_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "fn, kw, shape",
    [
        ("orthogonal", {}, (3, 3)),
        ("orthogonal", {"orthogonal_map": "cayley"}, (3, 3)),
        ("orthogonal", {"orthogonal_map": "householder"}, (3, 3)),
        ("orthogonal", {"orthogonal_map": "householder", "use_trivialization": False}, (3, 3)),
        ("orthogonal", {}, (3, 2)),
        ("spectral_norm", {}, (3, 3)),
        ("weight_norm", {}, (3, 3)),
    ],
    ids=str,
)
def test_builtins_on_integer_buffers_register_as_torch(fn, kw, shape, dtype):
    # Registration raises torch's error (orthogonal: `torch.finfo`'s TypeError) or,
    # where torch's registration ignores a NotImplementedError of `right_inverse`,
    # succeeds as torch's; an error changes nothing.
    def outcome(P):
        m = _buffer_module(torch.ones(shape, dtype=dtype))
        snap = _snapshot(m)
        res = _outcome(lambda: getattr(P, fn)(m, "weight", **kw))
        if res is not None and P is CP:
            _assert_unchanged(m, snap)
        return res

    expected, ours = outcome(TP), outcome(CP)
    if expected is None:
        assert ours is None
    else:
        assert ours is not None and ours[0] is expected[0]
        assert ours[1].startswith(expected[1])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("use_trivialization", [True, False], ids=["triv", "notriv"])
@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
@pytest.mark.parametrize("shape", [(4, 3), (3, 4)], ids=str)
def test_orthogonal_read_of_integer_buffers_raises_as_torch(
    shape, orthogonal_map, use_trivialization, dtype
):
    # torch registers orthogonal on a non-square integer buffer (its `right_inverse`
    # leaves base unset) and on any without the trivialization; a read then fails in
    # the map's first op, before `base @ Q`. Ours raised JAX's errors (`not inexact`,
    # `triangular_solve does not accept`), the unset base's, or returned a float
    # weight (cayley). A default dtype of float64 changes householder's message.
    def outcome(P):
        m = _buffer_module(torch.ones(shape, dtype=dtype))
        P.orthogonal(
            m, "weight", orthogonal_map=orthogonal_map, use_trivialization=use_trivialization
        )
        snap = _snapshot(m)
        res = _outcome(lambda: m.weight)
        _assert_unchanged(m, snap)
        return res

    expected = outcome(TP)
    assert expected is not None and expected[0] is RuntimeError
    assert outcome(CP) == expected
    if orthogonal_map == "householder":
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            expected = outcome(TP)
            assert "Double" in expected[1] and outcome(CP) == expected
        finally:
            torch.set_default_dtype(previous)


HALF = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("module_half", [False, True], ids=["float32_module", "half_module"])
@pytest.mark.parametrize("value", ["eye", "randn"])
@pytest.mark.parametrize("shape", [(4, 4), (4, 3), (3, 4)], ids=str)
@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_assign_half_as_torch(orthogonal_map, shape, value, module_half, dtype):
    # torch keeps an orthogonal square half Q as `base` (then the dtype check of
    # `original` decides) and fails in its QR (`geqrf`) for any other half Q.
    def outcome(P):
        torch.manual_seed(0)
        m = P.orthogonal(nn.Linear(shape[1], shape[0]), orthogonal_map=orthogonal_map)
        if module_half:
            m.to(dtype)
        Q = torch.eye(*shape) if value == "eye" else torch.randn(shape)
        snap = _snapshot(m)

        def assign():
            m.weight = Q.to(dtype)

        res = _outcome(assign)
        if res is not None and P is CP:
            _assert_unchanged(m, snap)
        if res is None:
            return m.parametrizations.weight[0].base
        return res

    expected, ours = outcome(TP), outcome(CP)
    if isinstance(expected, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == expected.dtype
        torch.testing.assert_close(ours, expected)
    else:
        assert ours == expected


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("use_trivialization", [True, False], ids=["triv", "notriv"])
@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_maps_in_half_precision(orthogonal_map, use_trivialization, dtype):
    # cayley: torch's LU error ("lu_cpu"), never JAX's; matrix_exp computes in half as
    # torch's; householder computes too (torch has no half `orgqr`: an extension).
    kw = {"orthogonal_map": orthogonal_map, "use_trivialization": use_trivialization}

    def outcome(P):
        torch.manual_seed(0)
        m = P.orthogonal(nn.Linear(4, 4), **kw).to(dtype)
        snap = _snapshot(m)
        res = _outcome(lambda: m.weight)
        if res is not None and P is CP:
            _assert_unchanged(m, snap)
        return res if res is not None else m.weight

    expected, ours = outcome(TP), outcome(CP)
    if orthogonal_map == "cayley":
        kind = "Half" if dtype == torch.float16 else "BFloat16"
        assert expected == ours == (NotImplementedError, f"\"lu_cpu\" not implemented for '{kind}'")
    elif orthogonal_map == "householder":
        assert expected[0] is NotImplementedError
        assert ours.dtype == dtype
        eye = torch.eye(4)
        torch.testing.assert_close(ours.float().T @ ours.float(), eye, atol=5e-2, rtol=0)
    else:
        assert ours.dtype == expected.dtype == dtype
        if use_trivialization:  # (else exp of a large skew matrix: half rounding differs)
            torch.testing.assert_close(ours, expected, atol=2e-2, rtol=2e-2)


AUTOCAST_CASES = [
    # every map (and householder without the trivialization) on a wide weight, which
    # goes through the transpose
    *(
        ((4, 6), torch.float32, torch.bfloat16, kw)
        for name, kw in BUILTINS.items()
        if name.startswith("orthogonal")
    ),
    # torch's default map (householder when not square, matrix_exp when square or complex)
    ((6, 4), torch.float32, torch.bfloat16, {}),
    ((2, 4, 4), torch.float32, torch.float16, {}),
    ((4, 6), torch.float64, torch.bfloat16, {}),
    ((4, 6), torch.complex64, torch.bfloat16, {}),
]


@pytest.mark.parametrize("shape, dtype, autocast, builtin_kw", AUTOCAST_CASES, ids=str)
def test_orthogonal_under_autocast_as_torch(shape, dtype, autocast, builtin_kw):
    # torch's `base @ Q` is autocast: a real weight below float64 comes out in the
    # autocast dtype (the maps themselves are not autocast). Values, dtype and the
    # gradient (through the cast back) match torch's; float64, complex and
    # use_trivialization=False keep their dtype. Outside the context, the float
    # weight again.

    def run(P):
        torch.manual_seed(0)
        m = nn.Module()
        m.weight = nn.Parameter(torch.randn(*shape, dtype=dtype))
        P.orthogonal(m, **builtin_kw)
        original = m.parametrizations.weight.original
        with torch.no_grad():  # away from the identity, so that every map matters
            original.add_(0.3 * torch.randn(*shape, dtype=dtype))
        with torch.autocast("cpu", dtype=autocast):
            w = m.weight
        (w.real.float() * torch.arange(w.numel()).reshape(shape)).sum().backward()
        return w.detach(), original.grad, m.weight.dtype

    (w_t, g_t, after_t), (w_c, g_c, after_c) = run(TP), run(CP)
    assert w_c.dtype == w_t.dtype and after_c == after_t == dtype
    assert (w_t.dtype == autocast) == (
        dtype == torch.float32 and builtin_kw.get("use_trivialization", True)
    )
    tol = 1e-2 if w_t.dtype in HALF else TOL[dtype]
    torch.testing.assert_close(w_c, w_t, atol=tol, rtol=tol)
    # gradients reach ~|sum of weights| (hundreds): relative above 1
    scale = max(1.0, g_t.abs().max().item())
    torch.testing.assert_close(g_c, g_t, atol=tol * scale, rtol=tol)
