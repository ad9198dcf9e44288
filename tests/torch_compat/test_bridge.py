"""The DLPack bridge: zero copy, x64 without global config, autograd, errors, nnx."""

import collections
import copy
import functools
import gc
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as torch_P
from flax import nnx

import torch_compat.parametrize as P
from torch_compat import NNXParametrization, _bridge, to_jax, to_torch

pytestmark = [
    pytest.mark.filterwarnings("ignore:Complex modules:UserWarning"),
    pytest.mark.filterwarnings("ignore:ComplexHalf support:UserWarning"),
]

DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]


def _rand(shape, dtype):
    return (
        torch.randn(*shape, dtype=torch.float64).to(dtype)
        if not dtype.is_complex
        else (torch.randn(*shape, dtype=dtype))
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_zero_copy(dtype):
    t = _rand((5, 3), dtype)
    a = to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    assert str(a.dtype) == str(dtype).removeprefix("torch.")
    back = to_torch(a)
    assert back.data_ptr() == t.data_ptr()
    assert back.dtype == dtype
    torch.testing.assert_close(back, t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_x64_kept_without_global_config(dtype):
    assert not jax.config.jax_enable_x64
    x = _rand((4, 4), dtype) + 1e-12  # a perturbation float32 would lose
    m = nn.Linear(4, 4).to(dtype)
    P.register_parametrization(m, "weight", lambda w: w * 3.0 + w.T)
    with torch.no_grad():
        m.parametrizations.weight.original.copy_(x)
    torch.testing.assert_close(m.weight, x * 3.0 + x.T, rtol=1e-15, atol=1e-15)
    assert m.weight.dtype == dtype
    assert not jax.config.jax_enable_x64
    assert jnp.ones(2).dtype == jnp.float32


def test_x64_context_is_thread_local():
    seen = []
    started, release = threading.Event(), threading.Event()

    def other():
        started.set()
        release.wait(5)
        seen.append(jnp.ones(1).dtype)

    th = threading.Thread(target=other)
    th.start()
    started.wait(5)
    with _bridge._x64_ctx(True):
        assert jnp.ones(1).dtype == jnp.float64
        release.set()
        th.join(5)
    assert seen == [jnp.float32]
    assert jnp.ones(1).dtype == jnp.float32


def test_float32_function_is_not_promoted():
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", lambda w: w + jnp.ones(w.shape))
    assert m.weight.dtype == torch.float32


def rank_one(x, y):
    return jnp.outer(x, y) + jnp.sin(jnp.outer(x, x))[: x.shape[0], : y.shape[0]]


def test_gradcheck_several_originals_float64():
    link = _bridge.JaxParametrization(rank_one)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(link, (x, y))


def test_gradcheck_fused_chain_float64():
    m = nn.Linear(3, 3).double()

    def ab(a, b):
        return a @ b

    ab.right_inverse = lambda w: (w, jnp.eye(3, dtype=w.dtype))
    P.register_parametrization(m, "weight", ab)
    P.register_parametrization(m, "weight", lambda w: jnp.tanh(w) + w.T)
    plist = m.parametrizations.weight

    a = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _bridge.run_chain(list(plist), (a, b)), (a, b))


def test_inplace_between_forward_and_backward_is_caught():
    m = P.register_parametrization(nn.Linear(3, 3), "weight", lambda w: jnp.exp(w))
    w = m.weight
    with torch.no_grad():
        m.parametrizations.weight.original.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        w.sum().backward()


def test_inplace_on_output_is_caught():
    m = P.register_parametrization(nn.Linear(3, 3), "weight", lambda w: jnp.exp(w))
    w = m.weight
    y = w * 1  # keep w's grad_fn reachable
    with torch.no_grad():
        w.mul_(0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_raises():
    # create_graph=True alone works (first-order values); differentiating the
    # gradient again raises (more cases in test_torch_func.py).
    m = P.register_parametrization(nn.Linear(3, 3), "weight", lambda w: w**3)
    orig = m.parametrizations.weight.original
    (g,) = torch.autograd.grad(m.weight.sum(), [orig], create_graph=True)
    torch.testing.assert_close(g.detach(), 3 * orig.detach() ** 2)
    with pytest.raises(RuntimeError, match="do not support double backward"):
        torch.autograd.grad(g.sum(), [orig])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_gradients_match_torch(dtype):
    x = torch.randn(4, dtype=dtype)
    ref = x.clone().requires_grad_()
    (ref * ref.conj() * ref + ref.exp()).abs().sum().backward()
    got = x.clone().requires_grad_()
    link = _bridge.JaxParametrization(lambda z: z * jnp.conj(z) * z + jnp.exp(z))
    link(got).abs().sum().backward()
    torch.testing.assert_close(got.grad, ref.grad)


def test_output_never_aliases_input():
    x = torch.randn(3, 3, requires_grad=True)
    y = _bridge.JaxParametrization(lambda w: w)(x)
    assert y.data_ptr() != x.data_ptr()
    with torch.no_grad():
        z = _bridge.JaxParametrization(lambda w: w)(x)
    assert z.data_ptr() != x.data_ptr()


def test_cached_value_survives_optimizer_step():
    m = P.register_parametrization(nn.Linear(3, 3), "weight", lambda w: w + w.T)
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    with P.cached():
        w = m.weight
        before = w.detach().clone()
        w.sum().backward()
        opt.step()
        torch.testing.assert_close(w.detach(), before)


def test_non_contiguous_torch_link_output_feeds_jax_link():
    class Transpose(nn.Module):
        def forward(self, x):
            return x.T

    m = nn.Linear(4, 4)
    P.register_parametrization(m, "weight", Transpose())
    P.register_parametrization(m, "weight", lambda w: w * jnp.arange(4.0))
    orig = m.parametrizations.weight.original
    torch.testing.assert_close(m.weight, orig.T * torch.arange(4.0))


def test_unaligned_input_is_copied_safely():
    big = torch.randn(17)
    view = big[1:]
    assert view.data_ptr() % 64
    out = _bridge.JaxParametrization(lambda v: v * 2)(view)
    torch.testing.assert_close(out, view * 2)


def test_errors():
    with pytest.raises(TypeError, match="unsupported dtype"):
        to_jax(torch.zeros(2, dtype=torch.complex32))
    with pytest.raises(ValueError, match="non-contiguous"):
        to_jax(torch.zeros(3, 2).T)
    with pytest.raises(ValueError, match=r"meta tensor(.|\n)*to_empty"):
        to_jax(torch.zeros(3, device="meta"))
    z = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"lazy conjugate bit(.|\n)*resolve_conj\(\)"):
        to_jax(z.conj())
    with pytest.raises(ValueError, match=r"lazy negative bit(.|\n)*resolve_neg\(\)"):
        to_jax(torch._neg_view(z))
    with pytest.raises(ValueError, match="requires grad"):
        to_jax(torch.zeros(2, requires_grad=True))
    with pytest.raises(TypeError, match="expects a torch.Tensor"):
        to_jax([1.0])
    with pytest.raises(TypeError, match="concrete jax.Array"):
        to_torch(1.0)
    with pytest.raises(TypeError, match="must return a jax.Array"):
        _bridge.JaxParametrization(lambda w: 1.0)(torch.zeros(2))
    with pytest.raises(TypeError, match="must return a jax.Array"):
        P.register_parametrization(nn.Linear(2, 2), "weight", lambda w: [w])
    with pytest.raises(TypeError, match="unsupported dtype"):
        _bridge.JaxParametrization(lambda w: w)(torch.zeros(2, dtype=torch.complex32))


def test_int_and_bool_pass_through():
    out = _bridge.call_jax(
        lambda i, b: jnp.where(b, i, 0),
        torch.arange(4),
        torch.tensor([1, 0, 1, 0]).bool(),
        what="f",
    )
    assert out.tolist() == [0, 0, 2, 0]
    assert out.dtype == torch.int64


@pytest.mark.gpu
def test_cuda_round_trip_zero_copy():
    if not torch.cuda.is_available() or not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("needs a GPU visible to both torch and JAX")
    t = torch.randn(4, 4, device="cuda", dtype=torch.float64)
    a = to_jax(t)
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    m = P.register_parametrization(nn.Linear(4, 4).cuda().double(), "weight", lambda w: w + w.T)
    m.weight.sum().backward()
    assert m.parametrizations.weight.original.grad.device.type == "cuda"


# --------------------------------------------------------------------------- #
# nnx.Module parametrizations
# --------------------------------------------------------------------------- #


class PowerScale(nnx.Module):
    """Scales by a learned factor and by 1/sigma, sigma from a power iteration."""

    def __init__(self, n):
        self.scale = nnx.Param(jnp.ones(()))
        self.inner = nnx.Dict(bias=nnx.Param(jnp.zeros(())))
        self.u = nnx.BatchStat(jnp.ones((n,)) / jnp.sqrt(n))
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))
        self.deterministic = False

    def __call__(self, w):
        u = self.u[...]
        if not self.deterministic:
            v = jax.lax.stop_gradient(w).T @ u
            u = jax.lax.stop_gradient(w) @ v
            u = u / jnp.linalg.norm(u)
            self.u[...] = u
            self.calls[...] = self.calls[...] + 1
        sigma = jnp.linalg.norm(w.T @ u)
        return w * self.scale[...] / sigma + self.inner["bias"][...]

    def right_inverse(self, w):
        return w


def _nnx_linear(n=4):
    m = nn.Linear(n, n)
    P.register_parametrization(m, "weight", PowerScale(n))
    return m


def test_nnx_state_dict_and_parameters():
    m = _nnx_linear()
    link = m.parametrizations.weight[0]
    assert isinstance(link, NNXParametrization)
    keys = set(m.state_dict())
    assert {
        "parametrizations.weight.0.scale",
        "parametrizations.weight.0.inner.bias",
        "parametrizations.weight.0.u",
        "parametrizations.weight.0.calls",
        "parametrizations.weight.original",
    } <= keys
    names = {n for n, _ in m.named_parameters()}
    assert "parametrizations.weight.0.scale" in names
    assert "parametrizations.weight.0.u" not in names


def test_nnx_buffers_written_back_in_train_not_in_eval():
    m = _nnx_linear()
    link = m.parametrizations.weight[0]
    u0 = link.u.clone()
    c0 = int(link.calls)
    _ = m.weight
    assert int(link.calls) == c0 + 1
    assert not torch.equal(link.u, u0)
    m.eval()
    assert link._skeleton.deterministic
    u1, c1 = link.u.clone(), int(link.calls)
    _ = m.weight
    assert torch.equal(link.u, u1)
    assert int(link.calls) == c1


def test_nnx_params_trained_by_torch_optimizer_and_grads_match_reference():
    m = _nnx_linear().eval()
    link = m.parametrizations.weight[0]
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(5, 4)
    scale0 = link.scale.detach().clone()
    opt.zero_grad()
    m(x).pow(2).sum().backward()
    # reference with torch ops
    w = m.parametrizations.weight.original.detach().clone().requires_grad_()
    s = link.scale.detach().clone().requires_grad_()
    sigma = torch.linalg.norm(w.T @ link.u)
    torch.nn.functional.linear(x, w * s / sigma + link.inner.bias, m.bias).pow(2).sum().backward()
    torch.testing.assert_close(link.scale.grad, s.grad)
    torch.testing.assert_close(m.parametrizations.weight.original.grad, w.grad)
    opt.step()
    assert not torch.equal(link.scale.detach(), scale0)


def test_meta_tensors_give_shapes_and_autograd_as_torch():
    # On meta tensors (torch.device("meta")) a JAX chain runs through
    # jax.eval_shape: meta outputs of the right shapes and dtypes, with meta
    # gradients, as torch's own parametrizations give.
    class Split(nn.Module):  # torch's reference: two originals from right_inverse
        def forward(self, a, b):
            return torch.cat([a, b], 0).T

        def right_inverse(self, w):
            return w.T[:2], w.T[2:]

    def jax_split(a, b):
        return jnp.concatenate([a, b], 0).T

    jax_split.right_inverse = lambda w: [w.T[:2], w.T[2:]]
    summaries = []
    links = ((torch_P.register_parametrization, Split()), (P.register_parametrization, jax_split))
    for register, link in links:
        with torch.device("meta"):
            m = nn.Linear(3, 4, dtype=torch.float64)
        register(m, "weight", link)
        w = m.weight
        m(torch.empty(2, 3, device="meta", dtype=torch.float64)).sum().backward()
        summaries.append(
            (
                (w.shape, w.dtype, w.is_meta, w.requires_grad),
                [(k, v.shape, v.dtype, v.is_meta) for k, v in m.state_dict().items()],
                [(p.grad.shape, p.grad.dtype, p.grad.is_meta) for p in m.parameters()],
            )
        )
    assert summaries[0] == summaries[1]
    assert summaries[1][1][1] == ("parametrizations.weight.original0", (2, 4), torch.float64, True)
    with torch.device("meta"):
        m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", lambda x: None, unsafe=True)
    with pytest.raises(TypeError, match="must return a jax.Array"):
        m.weight  # noqa: B018


class _Double(nn.Module):
    def forward(self, x):
        return 2 * x * x


@pytest.mark.parametrize("form", ["torch", "jax"])
def test_lazy_modules_refuse_as_torch_and_stay_unchanged(form):
    # An uninitialized (lazy) parameter refuses every operation, even `detach`:
    # the error is torch's own, wherever a module holds one.
    link = _Double() if form == "torch" else (lambda x: 2 * x * x)
    errors = []
    for register, lk in (
        (torch_P.register_parametrization, _Double()),
        (P.register_parametrization, link),
    ):
        m = nn.LazyLinear(4)
        with pytest.raises(RuntimeError) as info:
            register(m, "weight", lk)
        errors.append(str(info.value).split("\n")[0])
        assert type(m) is nn.LazyLinear and not hasattr(m, "parametrizations")
    assert errors[0] == errors[1]

    class Mixed(nn.Module):  # a lazy tensor beside the one parametrized
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 3))
            self.lazy = nn.parameter.UninitializedParameter()

    m = Mixed()
    P.register_parametrization(m, "weight", link)
    torch.testing.assert_close(m.weight, 2 * m.parametrizations.weight.original**2)


def test_sparse_gradient_of_an_embedding():
    # nn.Embedding(sparse=True) hands the parametrization a sparse gradient; JAX
    # takes it dense, and the original's gradient is dense (torch's is sparse).
    grads = []
    for register, link in (
        (torch_P.register_parametrization, _Double()),
        (P.register_parametrization, lambda x: 2 * x * x),
    ):
        torch.manual_seed(0)
        e = nn.Embedding(5, 3, sparse=True)
        register(e, "weight", link)
        e(torch.tensor([1, 2, 2])).sum().backward()
        grads.append(e.parametrizations.weight.original.grad)
    assert grads[0].layout == torch.sparse_coo and grads[1].layout == torch.strided
    torch.testing.assert_close(grads[1], grads[0].to_dense())


class TransposingBuffer(nnx.Module):
    """``w @ M``, ``M`` a buffer that each call replaces by its transpose."""

    def __init__(self, n):
        self.m = nnx.BatchStat(jnp.arange(n * n, dtype=jnp.float32).reshape(n, n))

    def __call__(self, w):
        m = self.m[...]
        self.m[...] = m.T
        return w @ m


@pytest.mark.parametrize("client", ["inline", "jax"])
def test_nnx_strided_buffer_is_read_and_written_back(client, monkeypatch):
    # A buffer that is a transposed view: the JAX call must see its values (the
    # inline client would read its memory as row-major), and the update must land
    # in the buffer itself, not in a contiguous copy.
    if client == "inline" and _bridge._INLINE.get() is None:
        pytest.skip("no inline CPU client on this platform")
    monkeypatch.setattr(_bridge, "_entries", {})
    if client == "jax":
        monkeypatch.setattr(_bridge, "_INLINE_MAX_FLOPS", -1.0)
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", TransposingBuffer(3))
    link = m.parametrizations.weight[0]
    with torch.no_grad():
        link.m = torch.randn(3, 3).t()
    buf = link.m
    assert not buf.is_contiguous()
    values = buf.clone()
    w = m.parametrizations.weight.original.detach().clone().requires_grad_()
    torch.testing.assert_close(m.weight, w @ values)
    assert link.m is buf
    torch.testing.assert_close(buf, values.T)
    assert not buf.is_contiguous()
    # to_nnx copies the torch state, strided or not
    torch.testing.assert_close(torch.from_numpy(np.asarray(link.to_nnx().m[...])), buf)
    m.weight.sum().backward()
    (w @ values.T).sum().backward()
    torch.testing.assert_close(m.parametrizations.weight.original.grad, w.grad)


def test_nnx_load_state_dict_round_trip():
    a, b = _nnx_linear(), _nnx_linear()
    _ = a.weight
    with torch.no_grad():
        a.parametrizations.weight[0].scale.fill_(3.0)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    torch.testing.assert_close(a.weight, b.weight)
    fresh = a.parametrizations.weight[0].to_nnx()
    assert float(fresh.scale[...]) == 3.0


def test_nnx_gradients_not_corrupted_by_write_back():
    m = _nnx_linear()
    w = m.weight  # train mode: u is written back after forward
    _ = m.weight  # and again: the buffer changes between forward and backward
    w.sum().backward()
    assert torch.isfinite(m.parametrizations.weight.original.grad).all()


def test_nnx_param_memory_is_owned_by_torch():
    module = PowerScale(3)
    m = nn.Linear(3, 3)
    P.register_parametrization(m, "weight", module)
    with torch.no_grad():
        m.parametrizations.weight[0].scale.add_(1.0)
    assert float(module.scale[...]) == 1.0


class DropConnect(nnx.Module):
    """Drops weight entries: an nnx.Dropout that keeps its own rngs (a typed key)."""

    def __init__(self, impl=None):
        seed = jax.random.key(0, impl=impl) if impl else 0
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(seed))

    def __call__(self, w):
        return self.drop(w)


def _drop_linear(impl=None):
    m = nn.Linear(3, 4)
    P.register_parametrization(m, "weight", DropConnect(impl))
    return m


_KEY = "parametrizations.weight.0.drop.rngs.key"
_COUNT = "parametrizations.weight.0.drop.rngs.count"


def test_nnx_rng_key_is_stored_as_key_data_and_draws_anew_in_train():
    module = DropConnect()
    m = nn.Linear(3, 4)
    P.register_parametrization(m, "weight", module)
    sd = m.state_dict()
    assert sd[_KEY].dtype == torch.uint32 and sd[_COUNT].dtype == torch.uint32
    key_data = np.asarray(jax.random.key_data(module.drop.rngs.key[...]))
    np.testing.assert_array_equal(sd[_KEY].numpy(), key_data)
    link = m.parametrizations.weight[0]
    key0, count0 = link.drop.rngs.key.clone(), int(link.drop.rngs.count)
    original = m.parametrizations.weight.original
    w1, w2 = m.weight, m.weight
    assert not torch.equal(w1, w2)  # a new mask for each read
    for w in (w1, w2):  # DropConnect: each entry dropped or scaled by 1/keep
        kept = w != 0
        assert 0 < kept.sum() < w.numel()
        torch.testing.assert_close(w[kept], 2 * original.detach()[kept])
    assert int(link.drop.rngs.count) == count0 + 2
    assert torch.equal(link.drop.rngs.key, key0)  # the stream's key itself stays
    m.eval()
    assert torch.equal(m.weight, original) and torch.equal(m.weight, original)
    assert int(link.drop.rngs.count) == count0 + 2
    m.train()
    assert not torch.equal(m.weight, original)


def test_nnx_rng_state_dict_reload_and_deepcopy_reproduce_the_next_mask():
    import io

    m = _drop_linear()
    _ = m.weight
    saved = io.BytesIO()
    torch.save(m.state_dict(), saved)
    copied = copy.deepcopy(m)
    expected = m.weight
    other = _drop_linear()
    saved.seek(0)
    other.load_state_dict(torch.load(saved, weights_only=True))
    torch.testing.assert_close(other.weight, expected)
    torch.testing.assert_close(copied.weight, expected)
    # the copy's stream is its own: the copy one draw ahead, the original catches up
    ahead = copied.weight
    assert int(copied.state_dict()[_COUNT]) == int(m.state_dict()[_COUNT]) + 1
    torch.testing.assert_close(m.weight, ahead)


def test_nnx_rng_gradients_flow_to_the_original_through_the_mask():
    m = _drop_linear()
    x = torch.randn(5, 3)
    w = m.weight
    y = torch.nn.functional.linear(x, w, m.bias)
    y.sum().backward()
    mask = (w.detach() != 0).to(torch.float32) * 2  # dropped: 0, kept: 1 / keep
    expected = mask * x.sum(0)[None, :].expand(4, 3)
    torch.testing.assert_close(m.parametrizations.weight.original.grad, expected)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_nnx_rng_key_impls_match_nnx_and_to_nnx_rewraps(impl):
    # rbg and unsafe_rbg keys have the same key data shape: their compiled calls
    # must not be shared.
    m = _drop_linear(impl)
    link = m.parametrizations.weight[0]
    for _ in range(2):
        ref = link.to_nnx()
        assert ref.drop.rngs.key[...].dtype == jax.random.key(0, impl=impl).dtype
        assert int(ref.drop.rngs.count[...]) == int(link.drop.rngs.count)
        expected = ref(to_jax(m.parametrizations.weight.original.detach()))
        torch.testing.assert_close(m.weight, torch.from_numpy(np.asarray(expected)))


class UnsignedCounter(nnx.Module):
    def __init__(self):
        self.calls = nnx.Variable(jnp.array(2**32 - 2, jnp.uint32))

    def __call__(self, w):
        self.calls[...] += 1
        return w * self.calls[...].astype(w.dtype)


def test_nnx_unsigned_variable_is_a_buffer_written_back():
    m = nn.Linear(3, 4)
    P.register_parametrization(m, "weight", UnsignedCounter(), unsafe=True)
    link = m.parametrizations.weight[0]
    assert link.calls.dtype == torch.uint32
    start = int(link.calls)
    _ = m.weight
    assert int(link.calls) == (start + 1) % 2**32
    _ = m.weight
    assert int(link.calls) == (start + 2) % 2**32  # wraps as uint32
    assert int(link.to_nnx().calls[...]) == int(link.calls)


def test_nnx_without_keys_keeps_its_plain_buffers():
    m = _nnx_linear()
    link = m.parametrizations.weight[0]
    assert link._codecs is None and link._jax_key() is link._graphdef
    assert link.calls.dtype == torch.int32


class KeyParam(nnx.Module):
    def __init__(self):
        self.key = nnx.Param(jax.random.key(0))

    def __call__(self, w):
        return w


def test_nnx_unstorable_keys_refused_at_registration_module_unchanged(monkeypatch):
    m = nn.Linear(3, 4)
    keys = sorted(m.state_dict())
    with pytest.raises(TypeError, match=r"nnx.Param cannot hold a PRNG key(.|\n)*key\b"):
        P.register_parametrization(m, "weight", KeyParam())
    assert type(m) is nn.Linear and sorted(m.state_dict()) == keys

    def refuse(data, impl=None):
        raise ValueError(f"unknown impl {impl}")

    monkeypatch.setattr(jax.random, "wrap_key_data", refuse)
    with pytest.raises(TypeError, match=r"cannot be stored as key data(.|\n)*drop.rngs.key"):
        P.register_parametrization(m, "weight", DropConnect())
    assert type(m) is nn.Linear and sorted(m.state_dict()) == keys


_SHARDED_SCRIPT = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path[:] = [p for p in sys.path if not p.endswith("tests")]
import jax, jax.numpy as jnp, numpy as np, torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import torch_compat
from torch_compat import parametrize

mesh = Mesh(np.array(jax.devices()), ("model",))
for spec in (P(None, "model"), P()):  # sharded, then fully replicated
    a = jax.device_put(jnp.ones((4, 4)), NamedSharding(mesh, spec))
    try:
        torch_compat.to_torch(a)
        print("to_torch: no error")
    except ValueError as e:
        assert "spans several devices" in str(e) and "jax.device_put" in str(e), e
assert torch_compat.to_torch(jax.device_put(a, jax.devices()[0])).shape == (4, 4)

def shard(x):
    return jax.lax.with_sharding_constraint(2 * x, NamedSharding(mesh, P(None, "model")))

m = torch.nn.Linear(4, 4)
try:
    parametrize.register_parametrization(m, "weight", shard)
    print("link: no error")
except ValueError as e:
    assert "spans several devices" in str(e) and "`shard`" in str(e), e
assert type(m) is torch.nn.Linear
print("ok")
"""


def test_multi_device_arrays_are_refused():
    # XLA_FLAGS must be set before jax is imported: a fresh process with 2 CPU devices.
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["ok"], res.stdout


def test_input_residuals_come_from_saved_tensors():
    # weight norm's VJP keeps `v` (an input): the forward must not copy it out again.
    from torch_compat import parametrizations as CPZ

    m = CPZ.weight_norm(torch.nn.Linear(6, 5, dtype=torch.float64))
    v = m.parametrizations.weight.original1
    m.weight.sum().backward()
    entries = [e.vjp_res for e in _bridge._entries.values() if e.vjp_res is not None]
    res = next(r for r in entries if any(s.shape == (5, 6) for s in r.saved_specs))
    assert all(s.shape != (5, 6) for s in res.specs)
    assert torch.autograd.gradcheck(
        lambda g, v: _bridge.run_chain([m.parametrizations.weight[0]], [g, v]),
        (
            m.parametrizations.weight.original0.detach().requires_grad_(),
            v.detach().requires_grad_(),
        ),
    )


def test_small_residuals_leave_the_forward_packed():
    # the row sums and the scalar factors (small, float64) leave the forward as one
    # array, sin(c) and exp(c) (small, float32) as another; cos(a) (80 kB, above
    # the packing limit) alone
    def fn(a, b, c):
        rows = jnp.sum(a * a, axis=1, keepdims=True)
        return jnp.sin(a) * rows * jnp.prod(b) + jnp.sum(jnp.sin(c) * jnp.exp(c)).astype(a.dtype)

    link = _bridge.JaxParametrization(fn)
    a = torch.randn(100, 100, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, dtype=torch.float32, requires_grad=True)
    _bridge.run_chain([link], [a, b, c]).sum().backward()
    res = _entry_for((100, 100)).vjp_res
    kinds = [r[0] for r in res.src]
    assert kinds.count("p") >= 4 and "r" in kinds
    packed = [s for s in res.specs if s.ndim == 1]
    assert len(packed) == 2 and {s.dtype for s in packed} == {
        jnp.dtype("float64"),
        jnp.dtype("float32"),
    }
    # fast_mode: random projections of the Jacobian (a is 100x100; the full
    # numerical Jacobian took 40 s of the suite)
    assert torch.autograd.gradcheck(
        lambda a, b: _bridge.run_chain([link], [a, b, c.detach()]), (a, b), fast_mode=True
    )
    # the float32 gradient, against torch's autograd on the same expression
    c_ref = c.detach().clone().requires_grad_()
    (a.numel() * torch.sum(torch.sin(c_ref) * torch.exp(c_ref))).backward()
    torch.testing.assert_close(c.grad, c_ref.grad)


# --- small CPU computations run on the inline client ------------------------------------


def _entry_for(shape):
    return next(
        e
        for e in reversed(list(_bridge._entries.values()))
        if e.ct_spec is not None and e.ct_spec.shape == shape
    )


def _needs_inline():
    if _bridge._INLINE.get() is None:
        pytest.skip("no inline CPU client on this platform")


def test_small_cpu_chain_runs_inline_with_full_autograd():
    _needs_inline()

    def softsign_t(w):  # a fresh function: a fresh compiled entry
        return (w / (1 + jnp.abs(w))).T

    m = P.register_parametrization(nn.Linear(5, 5).double(), "weight", softsign_t)
    m.weight.sum().backward()
    assert _entry_for((5, 5)).jdev is _bridge._INLINE.device
    x = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    link = m.parametrizations.weight[0]
    assert torch.autograd.gradcheck(lambda x: _bridge.run_chain([link], [x]), (x,))


def test_inline_and_jax_client_give_the_same_numbers(monkeypatch):
    _needs_inline()
    x = torch.randn(7, 6, dtype=torch.float64)
    ct = torch.randn(6, 7, dtype=torch.float64)
    results = []
    for max_flops in (-1.0, _bridge._INLINE_MAX_FLOPS):  # JAX's client, then inline
        monkeypatch.setattr(_bridge, "_INLINE_MAX_FLOPS", max_flops)
        fn = _bridge.JaxParametrization(lambda w: jnp.tanh(w).T @ w @ w.T)  # a fresh entry
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        y.backward(ct)
        results.append((y.detach(), leaf.grad))
        assert (_entry_for((6, 7)).jdev is None) == (max_flops < 0)
    torch.testing.assert_close(results[0], results[1], rtol=1e-13, atol=1e-13)


def test_large_cpu_chain_keeps_jax_client():
    # Two 512x512 matrix products (537 MFLOP) keep JAX's multi-threaded client.
    m = P.register_parametrization(nn.Linear(512, 512), "weight", lambda w: w @ w.T @ w)
    m.weight.sum().backward()
    assert _entry_for((512, 512)).jdev is None


def test_inline_client_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("TORCH_COMPAT_INLINE_CPU", "0")
    assert _bridge._InlineCPU().get() is None


def test_inline_client_leaves_jax_and_the_caller_alone():
    import os

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    async_dispatch = jax.config.read("jax_cpu_enable_async_dispatch")
    devices = jax.devices()
    client = _bridge._InlineCPU()
    client.get()
    assert jax.devices() == devices
    assert jax.config.read("jax_cpu_enable_async_dispatch") == async_dispatch
    if affinity is not None:
        assert os.sched_getaffinity(0) == affinity
    assert jnp.ones(2).device == devices[0]


def test_inline_chain_from_several_threads():
    _needs_inline()
    link = _bridge.JaxParametrization(lambda w: jnp.sin(w) * 2)
    xs = [torch.randn(16, 16) for _ in range(4)]
    out = [None] * 4

    def work(i):
        for _ in range(20):
            out[i] = link(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, y in zip(xs, out, strict=True):
        torch.testing.assert_close(y, torch.sin(x) * 2)


def test_host_callbacks_stay_on_jax_client(capfd):
    # jax.debug.print / pure_callback need JAX's client (it holds the callbacks):
    # such chains never run inline, however small.
    import numpy as np

    def printing(w):
        jax.debug.print("sum={s}", s=w.sum())
        return w * 2

    def calling_back(w):
        return jax.pure_callback(
            lambda a: np.asarray(a) * 3, jax.ShapeDtypeStruct(w.shape, w.dtype), w
        )

    x = torch.randn(3, 4, dtype=torch.float64)
    y = _bridge.JaxParametrization(printing)(x.clone().requires_grad_(True))
    torch.testing.assert_close(y, x * 2)
    assert _entry_for((3, 4)).jdev is None
    assert "sum=" in capfd.readouterr().out
    with torch.no_grad():
        z = _bridge.JaxParametrization(calling_back)(x)
    torch.testing.assert_close(z, x * 3)
    (entry,) = [e for k, e in _bridge._entries.items() if k[0] == (calling_back,)]
    assert entry.jdev is None


@pytest.mark.slow  # three fresh processes, ~17 s
def test_process_exits_cleanly_right_after_a_jax_client_call():
    # A call on JAX's (asynchronous) client is cleaned up by one of its worker
    # threads; that must never release the last reference to a torch tensor while
    # the interpreter exits (it aborted the process now and then, ~10% of runs).
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from torch_compat import parametrizations as CB\n"
        "for make in (CB.weight_norm, CB.spectral_norm, CB.orthogonal):\n"
        "    m = make(torch.nn.Linear(512, 512))\n"
        "    m.weight.sum().backward()\n"
    )
    for _ in range(3):
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]


# -- what the bridge keeps across calls -------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [jnp.tanh, jax.jit(lambda w: 2 * w), functools.partial(jnp.clip, min=-0.1, max=0.1)],
    ids=["jnp_function", "jitted", "partial"],
)
def test_deepcopy_shares_the_jax_function_and_its_compiled_calls(fn):
    # "Keep the best model" loops and AveragedModel deepcopy the model; a copy of
    # a jitted function or a partial is a new key, which compiled again each time.
    m = nn.Sequential(nn.Linear(4, 4))
    P.register_parametrization(m[0], "weight", fn)
    m(torch.ones(1, 4)).sum().backward()
    before = len(_bridge._entries)
    for _ in range(3):
        c = copy.deepcopy(m)
        c(torch.ones(1, 4)).sum().backward()
        assert c[0].parametrizations.weight[0].fn is fn
        original, copied = (
            m[0].parametrizations.weight.original,
            c[0].parametrizations.weight.original,
        )
        assert copied is not original and copied.data_ptr() != original.data_ptr()
        torch.testing.assert_close(copied.grad, original.grad)
    assert len(_bridge._entries) == before


def test_compiled_calls_are_bounded_and_release_what_the_function_captured(monkeypatch):
    # A lambda made for each new model (a hyper-parameter search in one process)
    # is a new key; the cache keeps at most _MAX_ENTRIES, the oldest dropped first,
    # and with it the function and what it captured (here its model).
    monkeypatch.setattr(_bridge, "_entries", {})
    monkeypatch.setattr(_bridge, "_MAX_ENTRIES", 8)
    refs = []
    for i in range(20):
        m = nn.Linear(3, 3)
        P.register_parametrization(m, "weight", lambda w, m=m, s=i: w * s)
        m.weight.sum().backward()
        refs.append(weakref.ref(m))
        del m
    gc.collect()
    assert len(_bridge._entries) <= 8
    assert refs[0]() is None and refs[-1]() is not None


@pytest.mark.parametrize("client", ["inline", "jax"])
def test_no_gradient_buffers_held_after_a_step(client, monkeypatch):
    # The calls' inputs are kept alive only for JAX's (asynchronous) client, and
    # only for the last two calls: a cotangent is weight-sized.
    if client == "inline" and _bridge._INLINE.get() is None:
        pytest.skip("no inline CPU client on this platform")
    monkeypatch.setattr(_bridge, "_entries", {})
    monkeypatch.setattr(_bridge, "_recent_inputs", collections.deque(maxlen=2))
    if client == "jax":
        monkeypatch.setattr(_bridge, "_INLINE_MAX_FLOPS", -1.0)
    m = nn.Linear(8, 8)
    P.register_parametrization(m, "weight", lambda w: jnp.sin(w))
    for _ in range(5):
        m(torch.ones(2, 8)).sum().backward()
    assert len(_bridge._recent_inputs) == (0 if client == "inline" else 2)
    # An elementwise chain without multiplications (XLA reports no "flops", only
    # transcendentals) is cheap: it runs inline.
    assert all((e.jdev is None) == (client == "jax") for e in _bridge._entries.values())
