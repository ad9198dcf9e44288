"""torch.func with JAX parametrizations, side by side with torch's own parametrize.

``torch.func.functional_call`` with ``grad``, ``vjp``, per-sample gradients
(``vmap`` over ``grad``), ``jacrev`` and model ensembling (``vmap`` over stacked
weights, ``grad`` inside it) give torch's numbers; what the bridge cannot do
(higher-order gradients through a JAX link, ``jacrev`` inside ``vmap`` over
weights, forward-mode AD through them) raises a clear error instead of a wrong
value.
"""

from __future__ import annotations

import threading

import jax.numpy as jnp
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.utils.parametrizations as torch_builtins
import torch.nn.utils.parametrize as torch_P
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import torch_compat.parametrize as compat_P
from torch_compat import _bridge
from torch_compat import parametrizations as compat_builtins

DOUBLE = "do not support double backward"


class _Scaled(nn.Module):
    """Two originals: ``w = a * b.tanh()`` (torch side)."""

    def forward(self, a, b):
        return a * b.tanh()

    def right_inverse(self, w):
        return w, torch.full_like(w, 0.5)


def _jax_scaled(a, b):
    return a * jnp.tanh(b)


_jax_scaled.right_inverse = lambda w: (w, jnp.full_like(w, 0.5))


def _build(side: str, kind: str) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Linear(4, 3, dtype=torch.float64)
    builtins = torch_builtins if side == "torch" else compat_builtins
    if kind == "weight_norm":
        builtins.weight_norm(m)
    elif kind == "spectral_norm":
        builtins.spectral_norm(m)
    elif kind == "orthogonal":
        builtins.orthogonal(m)
    else:
        P = torch_P if side == "torch" else compat_P
        P.register_parametrization(m, "weight", _Scaled() if side == "torch" else _jax_scaled)
    return m


KINDS = ["weight_norm", "spectral_norm", "orthogonal", "two_originals"]


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _assert_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-10, msg=k)


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(5, 4, dtype=torch.float64)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
def test_func_grad_and_vjp_match_torch(kind, training, x):
    results = {}
    for side in ("torch", "compat"):
        m = _build(side, kind).train(training)
        params = _params(m)

        def loss(p, m=m):
            return functional_call(m, p, (x,)).pow(2).sum()

        g = grad(loss)(params)
        value, pullback = vjp(loss, params)
        (v,) = pullback(torch.ones((), dtype=torch.float64))
        buffers = {k: b.clone() for k, b in m.named_buffers()}  # spectral norm's u, v
        results[side] = (g, v, value, buffers)
    (g_t, v_t, value_t, buf_t), (g_c, v_c, value_c, buf_c) = results["torch"], results["compat"]
    _assert_close(g_c, g_t)
    _assert_close(v_c, v_t)
    torch.testing.assert_close(value_c, value_t, rtol=1e-10, atol=1e-10)
    _assert_close(buf_c, buf_t)


@pytest.mark.parametrize("kind", KINDS)
def test_create_graph_first_order_works_second_order_raises(kind, x):
    grads = {}
    for side in ("torch", "compat"):
        m = _build(side, kind)
        originals = list(m.parametrizations.weight.parameters())
        grads[side] = torch.autograd.grad(m(x).pow(2).sum(), originals, create_graph=True)
    for got, ref in zip(grads["compat"], grads["torch"], strict=True):
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-10, atol=1e-10)
    m = _build("compat", kind)
    originals = list(m.parametrizations.weight.parameters())
    first = torch.autograd.grad(m(x).pow(2).sum(), originals, create_graph=True)
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.grad(first[0].sum(), originals)
    with pytest.raises(RuntimeError, match=DOUBLE):
        sum(f.sum() for f in first).backward()


def test_second_order_through_the_forward_only_works(x):
    """The bias's gradient depends on the weight through the JAX forward only:
    differentiating it again never reaches the JAX backward, and matches torch."""
    second = {}
    for side in ("torch", "compat"):
        m = _build(side, "weight_norm")
        params = {k: v.requires_grad_() for k, v in _params(m).items()}
        g = grad(lambda p, m=m: functional_call(m, p, (x,)).pow(2).sum())(params)
        v = params["parametrizations.weight.original1"]
        second[side] = torch.autograd.grad(g["bias"].sum(), [v])[0]
    torch.testing.assert_close(second["compat"], second["torch"], rtol=1e-10, atol=1e-10)
    # ... while the gradient of an original, which the JAX backward made, refuses.
    m = _build("compat", "weight_norm")
    params = {k: v.requires_grad_() for k, v in _params(m).items()}
    g = grad(lambda p: functional_call(m, p, (x,)).pow(2).sum())(params)
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.grad(g["parametrizations.weight.original1"].sum(), [params["bias"]])


def test_nested_func_grad_raises(x):
    m = _build("compat", "weight_norm")
    params = _params(m)

    def loss(p):
        return functional_call(m, p, (x,)).pow(2).sum()

    with pytest.raises(RuntimeError, match=DOUBLE):
        grad(lambda p: grad(loss)(p)["parametrizations.weight.original1"].sum())(params)


def test_vmap_over_inputs_matches_torch():
    """The parametrized weight does not depend on the vmapped input: it works."""
    xs = torch.randn(3, 5, 4, dtype=torch.float64)
    out = {}
    for side in ("torch", "compat"):
        m = _build(side, "weight_norm")
        params = _params(m)
        out[side] = vmap(lambda xx, m=m, p=params: functional_call(m, p, (xx,)))(xs)
    torch.testing.assert_close(out["compat"], out["torch"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("client", ["inline", "jax"])
@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients_and_jacrev_match_torch(kind, client, monkeypatch):
    """vmap over grad with the parameters unbatched (torch's per-sample-gradients
    recipe), at one and two vmap levels and a batch dimension that is not first,
    and jacrev: the cotangent is batched, the weights are not."""
    if client == "inline" and _bridge._INLINE.get() is None:
        pytest.skip("no inline CPU client on this platform")
    monkeypatch.setattr(_bridge, "_entries", {})  # compile afresh, on the chosen client
    if client == "jax":
        monkeypatch.setattr(_bridge, "_INLINE_MAX_FLOPS", -1.0)
    torch.manual_seed(2)
    xs, ys = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    got = {}
    for side in ("torch", "compat"):
        m = _build(side, kind)
        params, bufs = _params(m), dict(m.named_buffers())

        def loss(p, x, y, m=m, bufs=bufs):
            return (functional_call(m, (p, bufs), (x[None],)) - y).pow(2).sum()

        per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
        got[side] = [
            per_sample(params, xs, ys),
            vmap(per_sample, in_dims=(None, 0, 0))(params, xs.view(2, 3, 4), ys.view(2, 3, 3)),
            vmap(vmap(grad(loss), in_dims=(None, 1, 1)), in_dims=(None, 0, 0))(
                params, xs.view(2, 3, 4).transpose(1, 2), ys.view(2, 3, 3).transpose(1, 2)
            ),
            jacrev(lambda p, m=m, bufs=bufs: functional_call(m, (p, bufs), (xs,)))(params),
            {k: v.clone() for k, v in bufs.items()},  # spectral norm's u and v, updated
        ]
    for got_c, got_t in zip(got["compat"], got["torch"], strict=True):
        _assert_close(got_c, got_t)
    assert _bridge._entries
    assert all((e.jdev is None) == (client == "jax") for e in _bridge._entries.values())


def _ensemble(side: str, kind: str, n: int = 3, dim: int = 0):
    """``n`` models stacked along ``dim`` (torch's model-ensembling recipe), and
    the model whose structure functional_call uses."""
    members = [_build(side, kind) for _ in range(n)]
    for i, m in enumerate(members):  # distinct members, the same on both sides
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(1 + 0.25 * i)
    m = members[0].eval()  # spectral norm: torch cannot vmap its training update
    for member in members:
        member.eval()
    params = {
        k: torch.stack([dict(mm.named_parameters())[k].detach() for mm in members], dim)
        for k, _ in m.named_parameters()
    }
    buffers = {
        k: torch.stack([dict(mm.named_buffers())[k] for mm in members], dim)
        for k, _ in m.named_buffers()
    }
    return m, params, buffers


@pytest.mark.parametrize("kind", KINDS)
def test_model_ensembling_matches_torch(kind, x):
    """vmap over stacked weights: forward with and without grad, the batch of
    weights along another dimension, vmap over weights and inputs together,
    and each member's gradient through grad of the summed loss and through
    .backward()."""
    got = {}
    for side in ("torch", "compat"):
        m, params, buffers = _ensemble(side, kind)

        def f(p, b, xx, m=m):
            return functional_call(m, (p, b), (xx,))

        ens = vmap(f, in_dims=(0, 0, None))
        out = [ens(params, buffers, x)]
        with torch.no_grad():
            out.append(ens(params, buffers, x))
        _, params1, buffers1 = _ensemble(side, kind, dim=1)
        out.append(vmap(f, in_dims=(1, 1, None))(params1, buffers1, x))
        xs = torch.stack([x, 2 * x])
        out.append(
            vmap(vmap(f, in_dims=(None, None, 0)), in_dims=(0, 0, None))(params, buffers, xs)
        )
        g = grad(lambda p, ens=ens, b=buffers: ens(p, b, x).pow(2).sum())(params)
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        ens(leaves, buffers, x).pow(2).sum().backward()
        got[side] = (
            {str(i): o for i, o in enumerate(out)},
            g,
            {k: v.grad for k, v in leaves.items()},
        )
    for got_c, got_t in zip(got["compat"], got["torch"], strict=True):
        _assert_close(got_c, got_t)


@pytest.mark.parametrize("kind", KINDS)
def test_grad_inside_vmap_over_weights_matches_torch(kind, x):
    """vmap(grad(loss)) over stacked weights: each member's gradient, for the
    weights and for an input shared by all members. Run on a new thread: the
    bridge's per-thread state starts empty there, as in a fresh process."""
    got: dict = {}

    def run(side):
        m, params, buffers = _ensemble(side, kind)

        def loss(p, b, xx, m=m):
            return functional_call(m, (p, b), (xx,)).pow(2).sum()

        xs = torch.stack([x, 2 * x, 3 * x])
        got[side] = (
            vmap(grad(loss))(params, buffers, xs),
            vmap(grad(loss, argnums=(0, 2)), in_dims=(0, 0, None))(params, buffers, x),
        )

    for side in ("torch", "compat"):
        thread = threading.Thread(target=run, args=(side,))
        thread.start()
        thread.join()
    per_member, with_x = got["compat"]
    ref_per_member, ref_with_x = got["torch"]
    _assert_close(per_member, ref_per_member)
    _assert_close(with_x[0], ref_with_x[0])
    torch.testing.assert_close(with_x[1], ref_with_x[1], rtol=1e-10, atol=1e-10)
    assert with_x[1].shape == (3, *x.shape)  # one gradient of x per member


def test_vmap_limits_raise_clearly(x):
    m, params, buffers = _ensemble("compat", "spectral_norm")
    before = {k: v.clone() for k, v in m.state_dict().items()}

    def out(p, b):
        return functional_call(m, (p, b), (x,))

    with pytest.raises(RuntimeError, match="one vmap level directly around the grad"):
        vmap(jacrev(out))(params, buffers)
    nested = {k: torch.stack([v, v]) for k, v in params.items()}
    nested_b = {k: torch.stack([v, v]) for k, v in buffers.items()}
    with pytest.raises(RuntimeError, match="one vmap level directly around the grad"):
        vmap(vmap(grad(lambda p, b: out(p, b).sum())))(nested, nested_b)
    m.train()  # spectral norm's power iteration cannot take a batch of updates
    for no_grad in (False, True):
        with torch.set_grad_enabled(not no_grad):
            with pytest.raises(RuntimeError, match=r"`_SpectralNorm`: it updates its buffers"):
                vmap(lambda p, b: out(p, b).sum())(params, buffers)
    # Nothing was left half-done: the module is as it was, and still works.
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    m(x).sum().backward()


@pytest.mark.parametrize("kind", ["spectral_norm", "orthogonal", "two_originals"])
def test_forward_mode_wrt_the_input_matches_torch(kind, x):
    """jvp with respect to the input only: the weights carry no tangent."""
    tangents = {}
    for side in ("torch", "compat"):
        m = _build(side, kind).eval()
        _, tangents[side] = jvp(m, (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangents["compat"], tangents["torch"], rtol=1e-10, atol=1e-10)


FORWARD_KINDS = [*KINDS, "orthogonal_cayley", "orthogonal_householder", "orthogonal_complex"]


def _build_forward(side: str, kind: str) -> nn.Module:
    """`_build`, plus orthogonal's other maps and a complex weight."""
    if not kind.startswith("orthogonal_"):
        return _build(side, kind)
    builtins = torch_builtins if side == "torch" else compat_builtins
    torch.manual_seed(0)
    if kind == "orthogonal_complex":
        m = nn.Linear(4, 4, dtype=torch.complex128)
        return builtins.orthogonal(m)
    m = nn.Linear(4, 3, dtype=torch.float64)
    return builtins.orthogonal(m, orthogonal_map=kind.removeprefix("orthogonal_"))


def _tangents(params: dict) -> dict:
    gen = torch.Generator().manual_seed(2)
    return {
        k: torch.randn(v.shape, dtype=v.dtype, generator=gen) for k, v in sorted(params.items())
    }


def _jvp_by_reverse_mode(f, params: dict, tangents: dict):
    """The value, J t and J from torch's reverse mode, in one call of ``f`` (for
    what torch's forward mode does not support: weight norm, spectral norm's
    training update)."""

    def with_value(p):
        out = f(p)
        return out, out

    jac, out = jacrev(with_value, has_aux=True)(params)
    tangent = sum(
        (jac[k].reshape(out.numel(), -1) @ tangents[k].reshape(-1)).reshape(out.shape)
        for k in params
    )
    return out, tangent, jac


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", FORWARD_KINDS)
def test_forward_mode_through_the_weights_matches_torch(kind, training, x):
    """torch.func.jvp and jacfwd through the weights, and the dual tensors of
    torch.autograd.forward_ad (with grad on or off), give torch's tangents.
    torch's weight norm, and its spectral norm in training mode, have no
    forward-mode formula: their reference is torch's reverse mode. Each
    measurement starts from a fresh module (spectral norm's training update
    changes the buffers on every call), and the buffers after it match."""
    if kind == "orthogonal_complex":
        x = x.to(torch.complex128)
    reverse_only = kind == "weight_norm" or (kind == "spectral_norm" and training)
    got: dict = {}
    for side in ("torch", "compat"):

        def fresh(side=side):
            m = _build_forward(side, kind).train(training)
            params = _params(m)
            return m, params, _tangents(params), lambda p: functional_call(m, p, (x,))

        m, params, tangents, f = fresh()
        if side == "torch" and reverse_only:
            value, tangent, jac = _jvp_by_reverse_mode(f, params, tangents)
            results = {"value": value, "tangent": tangent, "jac": jac}
            results.update({f"dual{i}": tangent for i in range(2)})
            results["buffers"] = {k: b.clone() for k, b in m.named_buffers()}
            got[side] = results
            continue
        value, tangent = jvp(f, (params,), (tangents,))
        results = {"value": value, "tangent": tangent}
        results["buffers"] = {k: b.clone() for k, b in m.named_buffers()}
        if kind != "orthogonal_complex":  # torch.func.jacfwd refuses complex inputs
            results["jac"] = jacfwd(fresh()[3])(params)
        for i, grad_on in enumerate((False, True)):
            _, params, tangents, f = fresh()
            with fwAD.dual_level(), torch.set_grad_enabled(grad_on):
                dual = {k: fwAD.make_dual(v, tangents[k]) for k, v in params.items()}
                results[f"dual{i}"] = fwAD.unpack_dual(f(dual)).tangent
        got[side] = results
    if kind == "orthogonal_complex":
        got["torch"].pop("jac", None)
    assert got["compat"].keys() == got["torch"].keys()
    for key in got["torch"]:
        c, t = got["compat"][key], got["torch"][key]
        if isinstance(t, dict):
            _assert_close(c, t)
        else:
            torch.testing.assert_close(c, t, rtol=1e-10, atol=1e-10, msg=key)


@pytest.mark.parametrize("client", ["inline", "jax"])
def test_forward_mode_on_either_client_matches_torch(client, x, monkeypatch):
    """jvp, jacfwd and a jacfwd over two vmap levels (a batch of directions
    nested twice) on the inline client and on JAX's."""
    if client == "inline" and _bridge._INLINE.get() is None:
        pytest.skip("no inline CPU client on this platform")
    monkeypatch.setattr(_bridge, "_entries", {})  # compile afresh, on the chosen client
    if client == "jax":
        monkeypatch.setattr(_bridge, "_INLINE_MAX_FLOPS", -1.0)
    got = {}
    for side in ("torch", "compat"):
        m = _build(side, "orthogonal")
        params = _params(m)
        tangents = _tangents(params)

        def f(p, m=m):
            return functional_call(m, p, (x,))

        def push(t, f=f, params=params):
            return jvp(f, (params,), (t,))[1]

        stacked = {k: torch.stack([v, 2 * v, -v]) for k, v in tangents.items()}
        nested = {k: torch.stack([v, 0.5 * v]) for k, v in stacked.items()}
        got[side] = {
            "jvp": push(tangents),
            "vmap": vmap(push)(stacked),
            "vmap2": vmap(vmap(push), in_dims=(1,))(
                {k: v.transpose(0, 1) for k, v in nested.items()}
            ),
            **{f"jac/{k}": v for k, v in jacfwd(f)(params).items()},
        }
    _assert_close(got["compat"], got["torch"])
    assert _bridge._entries
    assert all((e.jdev is None) == (client == "jax") for e in _bridge._entries.values())


@pytest.mark.parametrize(
    "kind",
    ["two_originals", "weight_norm", "orthogonal_complex", "orthogonal_cayley", "spectral_norm"],
)
def test_gradcheck_forward_ad_and_batched_grads(kind, x):
    """gradcheck with forward mode and its batched checks, which run the
    bridge's backward and jvp under torch's legacy vmap (torch._vmap_internals);
    spectral norm in eval mode, as torch's tests check it. (Householder's
    ``int()`` of the diagonal makes a finite difference jump at ``-I``.)"""
    if kind == "orthogonal_complex":
        x = x.to(torch.complex128)
    m = _build_forward("compat", kind).eval()
    names = [k for k, _ in m.named_parameters()]

    def f(*ps):
        return functional_call(m, dict(zip(names, ps, strict=True)), (x,))

    inputs = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    assert torch.autograd.gradcheck(
        f, inputs, check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True
    )
    # The legacy vmap over the chain's inputs themselves is refused clearly.
    from torch._vmap_internals import _vmap

    name = names[-1]
    stacked = torch.stack([inputs[-1].detach()] * 2)
    with pytest.raises(RuntimeError, match="Use torch.func.vmap"):
        _vmap(lambda w: functional_call(m, {name: w}, (x,)))(stacked)


def test_dual_tensors_that_require_grad(x):
    """A dual original that also requires grad: the forward keeps both
    linearizations, and the tangent is torch's; a backward through the dual
    would owe its gradients a tangent too (torch computes one), and raises."""
    got = {}
    for side in ("torch", "compat"):
        m = _build(side, "spectral_norm").eval()  # torch: no forward mode in training
        w = m.parametrizations.weight.original
        tangent = _tangents({"w": w})["w"]
        with fwAD.dual_level():
            dual = fwAD.make_dual(w, tangent)
            out = functional_call(m, {"parametrizations.weight.original": dual}, (x,))
            got[side] = {"value": out.detach(), "tangent": fwAD.unpack_dual(out).tangent}
            if side == "compat":
                with pytest.raises(RuntimeError, match=DOUBLE):
                    torch.autograd.grad(out.pow(2).sum(), [w])
    _assert_close(got["compat"], got["torch"])


@pytest.mark.parametrize("kind", KINDS)
def test_jvp_inside_vmap_over_weights_matches_torch(kind, x):
    """vmap(jvp) over stacked weights (an ensemble's directional derivatives)."""
    got = {}
    for side in ("torch", "compat"):
        m, params, buffers = _ensemble(side, kind)
        tangents = {k: torch.ones_like(v) for k, v in params.items()}

        def tangent(p, t, m=m, b=buffers):
            return jvp(lambda q: functional_call(m, q, (x,)), (p,), (t,))[1]

        if side == "torch" and kind == "weight_norm":
            # no forward-mode formula in torch: J t member by member
            members = []
            for i in range(3):
                p = {k: v[i] for k, v in params.items()}
                b = {k: v[i] for k, v in buffers.items()}
                members.append(
                    _jvp_by_reverse_mode(
                        lambda q, b=b, m=m: functional_call(m, (q, b), (x,)),
                        p,
                        {k: v[i] for k, v in tangents.items()},
                    )[1]
                )
            got[side] = torch.stack(members)
            continue

        def member(p, t, b, m=m):
            return jvp(lambda q: functional_call(m, (q, b), (x,)), (p,), (t,))[1]

        got[side] = vmap(member)(params, tangents, buffers)
    torch.testing.assert_close(got["compat"], got["torch"], rtol=1e-10, atol=1e-10)


def test_forward_mode_through_a_custom_vjp_raises_as_torch(x):
    """A JAX link with a custom VJP (here a gradient clip) has no forward mode:
    torch's prefix for an op without a forward-mode formula
    (``NotImplementedError``), and the module is unchanged and usable."""
    import jax

    @jax.custom_vjp
    def clip(w):
        return w

    clip.defvjp(lambda w: (w, None), lambda _, g: (jnp.clip(g, -1, 1),))
    m = nn.Linear(4, 3, dtype=torch.float64)
    compat_P.register_parametrization(m, "weight", clip)
    params = _params(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ones = {k: torch.ones_like(v) for k, v in params.items()}
    with pytest.raises(NotImplementedError, match="Trying to use forward AD with") as err:
        jvp(lambda p: functional_call(m, p, (x,)), (params,), (ones,))
    assert "custom_jvp" in str(err.value) and "`clip`" in str(err.value)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward AD"):
        functional_call(m, {**params, "bias": fwAD.make_dual(params["bias"], ones["bias"])}, (x,))
        name = "parametrizations.weight.original"
        functional_call(m, {**params, name: fwAD.make_dual(params[name], ones[name])}, (x,))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    m(x).sum().backward()
    assert m.parametrizations.weight.original.grad.abs().max() <= 1


def test_second_order_with_forward_mode_raises(x):
    """hessian (jacfwd of jacrev), grad of jvp and a dual tensor reaching
    autograd.grad would each need the bridge's derivatives differentiated
    again: they raise instead of treating them as constants."""
    m = _build("compat", "orthogonal")
    params = _params(m)
    ones = {k: torch.ones_like(v) for k, v in params.items()}
    before = {k: v.clone() for k, v in m.state_dict().items()}

    def loss(p):
        return functional_call(m, p, (x,)).pow(2).sum()

    with pytest.raises(RuntimeError, match=DOUBLE):
        hessian(loss)(params)
    with pytest.raises(RuntimeError, match=DOUBLE):
        jvp(grad(loss), (params,), (ones,))
    with pytest.raises(RuntimeError, match=DOUBLE):
        grad(lambda p: jvp(loss, (p,), (ones,))[1])(params)
    name = "parametrizations.weight.original"
    w = params[name].clone().requires_grad_()
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=DOUBLE):
        dual = fwAD.make_dual(w, ones[name])
        torch.autograd.grad(loss({**params, name: dual}), [w], create_graph=True)
    # torch.autograd.functional.hvp differentiates a gradient toward the weights.
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.functional.hvp(
            lambda w: functional_call(m, {**params, name: w}, (x,)).pow(2).sum(),
            params[name],
            ones[name],
        )
    # Nothing was left half-done: the module still works as before.
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    m(x).sum().backward()


@pytest.mark.parametrize("bdims", [(0, 0), (1, 0), (0, 2), (2, 1)])
def test_batched_backward_nests_the_levels_in_torch_order(bdims):
    """torch gives vmap's cotangents with the batch dimension first in every case
    we could build, so the nesting is checked directly: ``bdims[0]`` (the
    innermost vmap, peeled first) indexes the tensor under its wrapper, which
    still holds the outer level's batch dimension at ``bdims[1]``."""
    _bridge._entries.clear()
    m = _build("compat", "two_originals")
    m.weight.pow(2).sum().backward()  # compiles the chain, with grad
    (entry,) = [e for e in _bridge._entries.values() if e.vjp_res is not None]
    originals = [p.detach() for p in m.parametrizations.weight.parameters()]
    a, b = (_bridge._import(o, entry.jdev) for o in originals)
    out = entry.compiled(a, b)
    views = [[a, b][i] for i in entry.diff_pos] + [out[0]]
    saved = [views[j] for j in entry.vjp_res.saved_used]
    outer, inner = 2, 3
    sample = torch.randn(3, 4, dtype=torch.float64)
    cts = torch.randn(outer, inner, *sample.shape, dtype=torch.float64)  # [i, j] -> sample
    t1 = [cts[i].movedim(0, bdims[0]) for i in range(outer)]  # under the outer wrapper
    t0 = torch.stack(t1).movedim(0, bdims[1]).contiguous()
    batched = entry.batched_backward(bdims, tuple(t0.shape))
    got = batched(out[2], saved, _bridge._import(t0, entry.jdev))
    plain = entry.backward()
    for i in range(outer):
        for j in range(inner):
            want = plain(out[2], saved, _bridge._import(cts[i, j].contiguous(), entry.jdev))
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(
                    _bridge.to_torch(g)[i, j], _bridge.to_torch(w), rtol=1e-12, atol=1e-12
                )


@pytest.mark.parametrize("kind", [*KINDS, "orthogonal_cayley", "orthogonal_householder"])
def test_autograd_functional_jvp_matches_torch(kind, x):
    """torch.autograd.functional.jvp differentiates a gradient with respect to
    the cotangent (the double-vjp trick): first order, J w, computed by the
    chain's JVP at the forward's inputs; matches torch's. Its vjp and jacobian
    too. Differentiating the same gradient toward the weights still raises."""
    got = {}
    for side in ("torch", "compat"):
        m = _build_forward(side, kind).eval()
        names = [k for k, _ in m.named_parameters()]
        ps = tuple(p.detach() for p in m.parameters())
        tangents = tuple(_tangents(dict(zip(names, ps, strict=True))).values())

        def f(*qs, m=m, names=names):
            return functional_call(m, dict(zip(names, qs, strict=True)), (x,))

        value, tangent = torch.autograd.functional.jvp(f, ps, tangents)
        got[side] = {"value": value, "tangent": tangent}
        got[side]["vjp"] = torch.autograd.functional.vjp(f, ps, torch.ones_like(value))[1][-1]
        got[side]["jacobian"] = torch.autograd.functional.jacobian(f, ps)[-1]
    _assert_close(got["compat"], got["torch"])
    # the first-order gradient built with create_graph, differentiated toward a weight
    m = _build_forward("compat", kind).eval()
    w = list(m.parametrizations.weight.parameters())
    u = torch.ones(5, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x), w[:1], u, create_graph=True)
    (ju,) = torch.autograd.grad(g, u, torch.ones_like(g), retain_graph=True)  # first order
    assert ju.shape == u.shape
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.grad(g, w[:1], torch.ones_like(g))


def test_autograd_functional_jvp_of_a_complex_or_updating_chain_raises(x):
    """Where J w cannot be computed at the forward's inputs (spectral norm in
    training mode has already updated its buffers in place; complex chains are
    left out), the double-vjp trick raises, pointing to torch.func.jvp."""
    m = _build("compat", "spectral_norm").train()
    params = _params(m)
    name = "parametrizations.weight.original"
    with pytest.raises(RuntimeError, match="use torch.func.jvp"):
        torch.autograd.functional.jvp(
            lambda w: functional_call(m, {**params, name: w}, (x,)),
            params[name],
            torch.ones_like(params[name]),
        )


def test_graph_tracing_raises_clearly(x):
    """make_fx (which torch.func.linearize uses) and torch.export would record the
    JAX call's result as a constant (linearize returned NaN tangents, the traced
    ones of its uninitialized tangents): they raise instead, and the module is
    unchanged; torch.func.jvp gives what linearize would."""
    from torch.fx.experimental.proxy_tensor import make_fx

    m = _build("compat", "orthogonal")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = _params(m)

    def f(p):
        return functional_call(m, p, (x,))

    tracing = "cannot be traced into a torch graph"
    with pytest.raises(RuntimeError, match=tracing):
        torch.func.linearize(f, params)
    with pytest.raises(RuntimeError, match=tracing):
        make_fx(f)(params)
    with pytest.raises(RuntimeError, match=tracing):
        torch.export.export(m, (x,), strict=False)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    ref = _build("torch", "orthogonal")
    ones = {k: torch.ones_like(v) for k, v in params.items()}
    torch.testing.assert_close(
        jvp(f, (params,), (ones,))[1],
        jvp(lambda p: functional_call(ref, p, (x,)), (params,), (ones,))[1],
        rtol=1e-10,
        atol=1e-10,
    )
