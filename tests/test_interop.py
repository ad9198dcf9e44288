"""Checkpoints across frameworks: jaxparam.interop against real torch models.

Each case builds a torch layer and its NNX port (same sizes, different random
weights), parametrizes both the same way, loads torch's ``state_dict`` into the
port and compares layer outputs and parametrized weights; then exports the port
back and loads it strictly into a fresh torch layer.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrizations as TP

import jaxparam.interop as I
from jaxparam import parametrizations as JP

ATOL = 1e-5


def R(seed):
    """NNX initial weights are overwritten by every test: the RBG generator compiles
    much faster than threefry for each new shape."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


# torch.nn.utils.weight_norm is deprecated, and exactly what old checkpoints used
pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")

# -- layer pairs -----------------------------------------------------------------
# Each maker returns (torch layer, NNX layer, flax attribute, perm, x_torch, x_flax),
# ``perm`` mapping flax axes to torch axes of the weight (flax axis j = torch perm[j]).


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def linear():
    t = torch.nn.Linear(5, 3)
    f = nnx.Linear(5, 3, rngs=R(1))
    x = _x((4, 5))
    return t, f, "kernel", (1, 0), x, x


def conv(nd):
    def make():
        t = getattr(torch.nn, f"Conv{nd}d")(3, 4, 3, padding=1, dilation=2)
        f = nnx.Conv(3, 4, (3,) * nd, padding=((1, 1),) * nd, kernel_dilation=2, rngs=R(1))
        x = _x((2, 3) + (6,) * nd)
        perm = tuple(range(2, nd + 2)) + (1, 0)
        return t, f, "kernel", perm, x, np.moveaxis(x, 1, -1)

    return make


def conv_transpose(nd, transpose_kernel=False):
    def make():
        t = getattr(torch.nn, f"ConvTranspose{nd}d")(3, 4, 3, stride=2, padding=1, output_padding=1)
        f = nnx.ConvTranspose(
            3,
            4,
            (3,) * nd,
            strides=2,
            padding=I.torch_conv_transpose_padding((3,) * nd, padding=1, output_padding=1),
            transpose_kernel=transpose_kernel,
            rngs=R(1),
        )
        x = _x((2, 3) + (4,) * nd)
        tail = (1, 0) if transpose_kernel else (0, 1)
        return t, f, "kernel", tuple(range(2, nd + 2)) + tail, x, np.moveaxis(x, 1, -1)

    return make


def embedding():
    t = torch.nn.Embedding(7, 4)
    f = nnx.Embed(7, 4, rngs=R(1))
    x = np.array([[0, 3, 6], [2, 2, 1]])
    return t, f, "embedding", (0, 1), x, x


def layer_norm():
    t = torch.nn.LayerNorm(5)
    f = nnx.LayerNorm(5, epsilon=1e-5, rngs=R(1))
    with torch.no_grad():  # make scale and bias non-trivial
        t.weight.normal_()
        t.bias.normal_()
    x = _x((3, 5))
    return t, f, "scale", (0,), x, x


LAYERS = {
    "linear": linear,
    "conv1d": conv(1),
    "conv2d": conv(2),
    "conv3d": conv(3),
    "conv_transpose1d": conv_transpose(1),
    "conv_transpose2d": conv_transpose(2),
    "conv_transpose3d": conv_transpose(3),
    "conv_transpose1d_transpose_kernel": conv_transpose(1, True),
    "conv_transpose2d_transpose_kernel": conv_transpose(2, True),
    "embedding": embedding,
    "layer_norm": layer_norm,
}


def t_out(t, x):
    with torch.no_grad():
        y = t(torch.from_numpy(x)).numpy()
    if y.ndim > 2 and isinstance(t, torch.nn.modules.conv._ConvNd):
        y = np.moveaxis(y, 1, -1)
    return y


def f_out(f, x):
    return np.asarray(f(jnp.asarray(x)))


def to_flax(w, perm):
    return np.transpose(w, perm)


# -- parametrizations, applied the same way on both sides ---------------------------


def flax_dim(perm, torch_dim):
    return None if torch_dim is None else perm.index(torch_dim)


def default_wn_dim(t):  # torch's weight_norm default dim=0, whatever the layer
    return 0


def default_sn_dim(t):  # torch's spectral_norm default: 1 for ConvTranspose, else 0
    return 1 if isinstance(t, torch.nn.modules.conv._ConvTransposeNd) else 0


def parametrize(kind, t, f, name, perm, other_dim=False):
    if kind == "none":
        return
    if kind in ("weight_norm", "legacy_weight_norm"):
        d = default_wn_dim(t)
        if other_dim:
            d = None if len(perm) == 1 else 1
        if kind == "weight_norm":
            TP.weight_norm(t, "weight", dim=d)
        else:
            torch.nn.utils.weight_norm(t, "weight", dim=d)
        JP.weight_norm(f, name, dim=flax_dim(perm, d))
    elif kind == "spectral_norm":
        TP.spectral_norm(t, "weight", dim=default_sn_dim(t))
        JP.spectral_norm(f, name, dim=flax_dim(perm, default_sn_dim(t)), rngs=R(2))
    else:
        raise AssertionError(kind)


def torch_parametrize_only(kind, t, perm, other_dim=False):
    if kind == "none":
        return
    if kind in ("weight_norm", "legacy_weight_norm"):
        d = default_wn_dim(t)
        if other_dim:
            d = None if len(perm) == 1 else 1
        (TP.weight_norm if kind == "weight_norm" else torch.nn.utils.weight_norm)(
            t, "weight", dim=d
        )
    else:
        TP.spectral_norm(t, "weight", dim=default_sn_dim(t))


def torch_weight(t):
    with torch.no_grad():
        return t.weight.detach().numpy().copy()


CASES = [
    (layer, kind, other)
    for layer in LAYERS
    for kind, other in [
        ("none", False),
        ("weight_norm", False),
        ("weight_norm", True),
        ("legacy_weight_norm", False),
        ("spectral_norm", False),
    ]
]


@pytest.mark.parametrize(("layer", "kind", "other_dim"), CASES)
def test_torch_to_nnx_and_back(layer, kind, other_dim):
    make = LAYERS[layer]
    t, f, name, perm, xt, xf = make()
    parametrize(kind, t, f, name, perm, other_dim)
    t.eval()
    f.eval()
    sd = t.state_dict()
    if kind == "legacy_weight_norm":
        assert "weight_g" in sd and "weight_v" in sd
    before = f_out(f, xf)
    assert not np.allclose(before, t_out(t, xt), atol=1e-3)

    # torch -> NNX: same parametrized weight, same outputs, no Variable reshaped
    # (weight norm's g with dim=None is 0-d on both sides)
    shapes = jax.tree.map(np.shape, nnx.state(f))
    assert I.load_torch_state_dict(f, sd) == I.IncompatibleKeys([], [])
    assert jax.tree.map(np.shape, nnx.state(f)) == shapes
    np.testing.assert_allclose(
        np.asarray(getattr(f, name)[...]),
        np.flip(to_flax(torch_weight(t), perm), _flips(f)),
        atol=ATOL,
    )
    np.testing.assert_allclose(f_out(f, xf), t_out(t, xt), atol=ATOL)

    # NNX -> torch: a fresh torch layer loads it strictly and agrees
    torch.manual_seed(123)
    t2 = make()[0]
    torch_parametrize_only(kind, t2, perm, other_dim)
    t2.eval()
    out = I.to_torch_state_dict(
        f, legacy_weight_norm=kind == "legacy_weight_norm", to_tensor=torch.from_numpy
    )
    assert sorted(out) == sorted(sd)
    t2.load_state_dict(out, strict=True)
    np.testing.assert_allclose(t_out(t2, xt), f_out(f, xf), atol=ATOL)
    for k, v in sd.items():
        assert out[k].shape == v.shape, k
        np.testing.assert_allclose(out[k].numpy(), v.numpy(), atol=1e-6, err_msg=k)


def _flips(f):
    if isinstance(f, nnx.ConvTranspose) and not f.transpose_kernel:
        return tuple(range(len(f.kernel_size)))
    return ()


def test_conv_transpose_without_transpose_kernel_is_the_spatially_flipped_kernel():
    t, f, _, perm, xt, xf = conv_transpose(1)()
    w = torch_weight(t)
    f.kernel[...] = jnp.asarray(np.transpose(w, perm))  # not flipped: wrong outputs
    f.bias[...] = jnp.asarray(t.bias.detach().numpy())
    assert not np.allclose(f_out(f, xf), t_out(t, xt), atol=1e-3)
    I.load_torch_state_dict(f, t.state_dict())
    np.testing.assert_allclose(np.asarray(f.kernel[...]), np.transpose(w, perm)[::-1], atol=0)


@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv_transpose2d", "embedding"])
def test_spectral_norm_continues_identically_in_training_mode(layer):
    t, f, name, perm, xt, xf = LAYERS[layer]()
    parametrize("spectral_norm", t, f, name, perm)
    I.load_torch_state_dict(f, t.state_dict())
    t.train()
    f.train()
    step = nnx.jit(lambda m, x: m(x))
    for _ in range(4):  # each training forward runs one power iteration on both sides
        yt = t(torch.from_numpy(xt)).detach().numpy()
        if isinstance(t, torch.nn.modules.conv._ConvNd):
            yt = np.moveaxis(yt, 1, -1)
        np.testing.assert_allclose(np.asarray(step(f, jnp.asarray(xf))), yt, atol=ATOL)
    sn = f.parametrizations[name][0]
    np.testing.assert_allclose(
        np.asarray(sn._u[...]), t.parametrizations.weight[0]._u.numpy(), atol=ATOL
    )
    # and the exported vectors are torch's
    back = I.to_torch_state_dict(f)
    for k in ("parametrizations.weight.0._u", "parametrizations.weight.0._v"):
        np.testing.assert_allclose(back[k], t.state_dict()[k].numpy(), atol=ATOL)


# -- whole models, mappings --------------------------------------------------------


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            TP.weight_norm(torch.nn.Conv1d(2, 4, 3, padding=1)),
            torch.nn.LeakyReLU(0.1),
            TP.spectral_norm(torch.nn.Conv1d(4, 4, 3, padding=1)),
        )
        self.head = TP.weight_norm(torch.nn.Linear(4, 3))

    def forward(self, x):
        return self.head(self.net(x).mean(-1))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List(
            [
                JP.weight_norm(nnx.Conv(2, 4, 3, padding=((1, 1),), rngs=rngs)),
                JP.spectral_norm(nnx.Conv(4, 4, 3, padding=((1, 1),), rngs=rngs), rngs=rngs),
            ]
        )
        self.out = JP.weight_norm(nnx.Linear(4, 3, rngs=rngs))

    def __call__(self, x):
        x = nnx.leaky_relu(self.blocks[0](x), 0.1)
        return self.out(self.blocks[1](x).mean(1))


MAPPING = {"net.0": "blocks/0", "net.2": "blocks/1", "head": "out"}


def test_mapping_and_whole_model_round_trip():
    tnet = TorchNet().eval()
    model = NNXNet(R(0))
    model.eval()
    shapes = I.torch_state_dict_shapes(model, mapping=MAPPING)
    assert shapes == {k: tuple(v.shape) for k, v in tnet.state_dict().items()}
    x = _x((2, 2, 9))
    I.load_torch_state_dict(model, tnet.state_dict(), mapping=MAPPING)
    np.testing.assert_allclose(
        f_out(model, np.moveaxis(x, 1, -1)), tnet(torch.from_numpy(x)).detach().numpy(), atol=ATOL
    )
    t2 = TorchNet().eval()
    t2.load_state_dict(I.to_torch_state_dict(model, mapping=MAPPING, to_tensor=torch.from_numpy))
    np.testing.assert_allclose(
        t2(torch.from_numpy(x)).detach().numpy(), tnet(torch.from_numpy(x)).detach().numpy()
    )


def test_automatic_mapping_mirrors_names_and_sequential():
    tseq = torch.nn.Sequential(
        TP.weight_norm(torch.nn.Linear(3, 4)), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )
    fseq = nnx.Sequential(
        JP.weight_norm(nnx.Linear(3, 4, rngs=R(0))),
        jnp.tanh,
        nnx.Linear(4, 2, rngs=R(0)),
    )
    assert I.torch_state_dict_shapes(fseq) == {
        k: tuple(v.shape) for k, v in tseq.state_dict().items()
    }
    I.load_torch_state_dict(fseq, tseq.state_dict())
    x = _x((5, 3))
    np.testing.assert_allclose(f_out(fseq, x), t_out(tseq, x), atol=ATOL)


def test_mapping_to_an_unknown_path_is_an_error():
    with pytest.raises(ValueError, match=r'"nope/0" \(for torch prefix "net.5"\)'):
        I.torch_state_dict_shapes(NNXNet(R(0)), mapping={**MAPPING, "net.5": "nope/0"})


def test_torch_tensors_are_not_needed():
    sd = {k: v.numpy() for k, v in TorchNet().state_dict().items()}
    model = NNXNet(R(0))
    I.load_torch_state_dict(model, sd, mapping=MAPPING)
    out = I.to_torch_state_dict(model, mapping=MAPPING)
    assert all(type(v) is np.ndarray and v.flags.writeable for v in out.values())


def test_strided_and_lazy_view_tensors_load_like_plain_ones():
    # A state dict may hold views: a transposed (strided) tensor, or one with
    # torch's lazy negative bit (torch.Tensor.numpy() refuses those).
    t = torch.nn.Linear(3, 2)
    sd = t.state_dict()
    views = {
        "weight": sd["weight"].T.contiguous().T,
        "bias": torch._neg_view(-sd["bias"]),
    }
    assert not views["weight"].is_contiguous() and views["bias"].is_neg()
    a, b = nnx.Linear(3, 2, rngs=R(0)), nnx.Linear(3, 2, rngs=R(1))
    I.load_torch_state_dict(a, sd)
    I.load_torch_state_dict(b, views)
    np.testing.assert_array_equal(np.asarray(a.kernel[...]), np.asarray(b.kernel[...]))
    np.testing.assert_array_equal(np.asarray(a.bias[...]), np.asarray(b.bias[...]))


def test_dtype_follows_the_model():
    t = torch.nn.Linear(3, 2).double()
    f = nnx.Linear(3, 2, rngs=R(0))
    I.load_torch_state_dict(f, t.state_dict())
    assert f.kernel[...].dtype == jnp.float32
    t16 = torch.nn.Linear(3, 2).to(torch.bfloat16)
    I.load_torch_state_dict(f, t16.state_dict())
    np.testing.assert_allclose(np.asarray(f.bias[...]), t16.bias.float().detach().numpy())


def test_batch_norm_names():
    t = torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        t.running_mean.normal_()
        t.weight.normal_()
    t.eval()
    f = nnx.BatchNorm(4, use_running_average=True, epsilon=1e-5, rngs=R(0))
    I.load_torch_state_dict(f, t.state_dict())
    x = _x((3, 4))
    np.testing.assert_allclose(f_out(f, x), t_out(t, x), atol=ATOL)
    torch.nn.BatchNorm1d(4).load_state_dict(I.to_torch_state_dict(f, to_tensor=torch.from_numpy))


# -- bad input: one error, every key, nothing loaded --------------------------------


def _values(model):
    return [
        np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat))
    ]


def test_bad_keys_are_all_reported_and_nothing_is_loaded():
    tnet = TorchNet()
    model = NNXNet(R(0))
    before = _values(model)
    sd = dict(tnet.state_dict())
    del sd["net.0.parametrizations.weight.original0"]  # missing
    del sd["head.bias"]  # missing
    sd["net.2.parametrizations.weight.0._v"] = torch.zeros(5)  # wrong shape
    sd["head.parametrizations.weight.original1"] = torch.zeros(3, 5)  # wrong shape
    sd["extra.weight"] = torch.zeros(1)  # unexpected
    sd["head.weight_g"] = torch.zeros(3, 1)  # unexpected (the new keys are present)
    with pytest.raises(ValueError) as err:
        I.load_torch_state_dict(model, sd, mapping=MAPPING)
    msg = str(err.value)
    assert msg.startswith("Error(s) in loading state_dict for NNXNet:")
    assert '"net.0.parametrizations.weight.original0" (expected shape (4, 1, 1))' in msg
    assert '"head.bias" (expected shape (3,))' in msg
    assert '"extra.weight"' in msg and '"head.weight_g"' in msg
    assert (
        "size mismatch for net.2.parametrizations.weight.0._v: copying a param with shape (5,) "
        "from checkpoint, the shape in current model is (12,)." in msg
    )
    assert "size mismatch for head.parametrizations.weight.original1" in msg
    assert "(3, 4)" in msg
    after = _values(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_wrong_weight_norm_dim_is_a_shape_error():
    t = TP.weight_norm(torch.nn.Conv1d(3, 4, 3))  # torch dim=0 -> g (4, 1, 1)
    f = JP.weight_norm(nnx.Conv(3, 4, 3, rngs=R(0)), dim=1)  # in-channels: g (1, 3, 1)
    with pytest.raises(ValueError, match=r"original0: copying a param with shape \(4, 1, 1\)"):
        I.load_torch_state_dict(f, t.state_dict())


def test_not_strict_reports_and_loads_the_rest():
    tnet = TorchNet()
    model = NNXNet(R(0))
    sd = dict(tnet.state_dict())
    del sd["head.bias"]
    sd["extra"] = torch.zeros(2)
    keys = I.load_torch_state_dict(model, sd, mapping=MAPPING, strict=False)
    assert keys == I.IncompatibleKeys(["head.bias"], ["extra"])
    np.testing.assert_allclose(
        np.asarray(model.out.parametrizations.kernel.original1[...]),
        sd["head.parametrizations.weight.original1"].numpy().T,
    )
    sd["head.parametrizations.weight.original1"] = torch.zeros(1)
    with pytest.raises(ValueError, match="size mismatch"):
        I.load_torch_state_dict(model, sd, mapping=MAPPING, strict=False)


def test_from_torch_state_dict_is_pure_and_works_on_abstract_models():
    tnet = TorchNet()
    model = NNXNet(R(0))
    before = _values(model)
    state = I.from_torch_state_dict(model, tnet.state_dict(), mapping=MAPPING)
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(model), strict=True))
    abstract = nnx.eval_shape(lambda: NNXNet(R(0)))
    abstract_state = I.from_torch_state_dict(abstract, tnet.state_dict(), mapping=MAPPING)
    jax.tree.map(np.testing.assert_array_equal, state, abstract_state)
    nnx.update(model, state)
    x = _x((2, 2, 9))
    model.eval()
    np.testing.assert_allclose(
        f_out(model, np.moveaxis(x, 1, -1)),
        tnet.eval()(torch.from_numpy(x)).detach().numpy(),
        atol=ATOL,
    )


def test_torch_conv_transpose_padding():
    assert I.torch_conv_transpose_padding((3, 5), padding=(1, 2), dilation=(1, 2)) == (
        (1, 1),
        (6, 6),
    )
    with pytest.raises(ValueError, match="spatial axes"):
        I.torch_conv_transpose_padding((3, 3), padding=(1, 1, 1))


# -- orthogonal (when the NNX built-in exists) ---------------------------------------


@pytest.mark.skipif(not hasattr(JP, "orthogonal"), reason="jaxparam.parametrizations.orthogonal")
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)])
def test_orthogonal_base_round_trip(shape):
    din, dout = shape
    t = TP.orthogonal(torch.nn.Linear(din, dout)).eval()
    f = JP.orthogonal(nnx.Linear(din, dout, rngs=R(0)))
    sd = t.state_dict()
    assert "parametrizations.weight.0.base" in sd
    I.load_torch_state_dict(f, sd)
    np.testing.assert_allclose(np.asarray(f.kernel[...]), torch_weight(t).T, atol=ATOL)
    x = _x((2, din))
    np.testing.assert_allclose(f_out(f, x), t_out(t, x), atol=ATOL)
    t2 = TP.orthogonal(torch.nn.Linear(din, dout)).eval()
    t2.load_state_dict(I.to_torch_state_dict(f, to_tensor=torch.from_numpy))
    np.testing.assert_allclose(t_out(t2, x), t_out(t, x), atol=ATOL)


# -- orbax ------------------------------------------------------------------------------


def test_orbax_save_and_restore(tmp_path):
    model = NNXNet(R(0))
    I.load_torch_state_dict(model, TorchNet().state_dict(), mapping=MAPPING)
    model(jnp.ones((1, 5, 2)))  # a training-mode call moves the power iteration
    path = os.fspath(tmp_path / "ckpt")
    I.save(model, path)
    x = jnp.asarray(_x((2, 9, 2)))
    model.eval()
    expected = f_out(model, x)

    restored = I.restore(lambda: NNXNet(R(5)), path)
    restored.eval()
    assert type(restored.out) is type(model.out)
    np.testing.assert_array_equal(f_out(restored, x), expected)

    into = NNXNet(R(7))
    assert I.restore(into, path) is into
    into.eval()
    np.testing.assert_array_equal(f_out(into, x), expected)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(into), nnx.state(model))

    with pytest.raises(ValueError):
        I.save(model, path)  # exists
    I.save(model, path, force=True)
    plain = NNXNet(R(3))
    JP.weight_norm(plain.blocks[1], "bias", dim=0)  # parametrized differently
    before = _values(plain)
    with pytest.raises(ValueError):
        I.restore(plain, path)
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(plain), strict=True))
    with pytest.raises(FileNotFoundError):
        I.restore(into, tmp_path / "nothing")


def test_torch_compat_models_have_torch_keys():
    from torch_compat import parametrize as CP

    def build():
        t = torch.nn.Conv1d(3, 4, 3, padding=1)
        CP.register_parametrization(t, "weight", TP._WeightNorm(0))
        return t.eval()

    t = build()
    f = JP.weight_norm(nnx.Conv(3, 4, 3, padding=((1, 1),), rngs=R(0)))
    I.load_torch_state_dict(f, t.state_dict())
    x = _x((2, 3, 7))
    np.testing.assert_allclose(f_out(f, np.moveaxis(x, 1, -1)), t_out(t, x), atol=ATOL)
    t2 = build()
    t2.load_state_dict(I.to_torch_state_dict(f, to_tensor=torch.from_numpy), strict=True)
    np.testing.assert_allclose(t_out(t2, x), t_out(t, x), atol=ATOL)


def test_two_modules_on_one_torch_key_is_an_error():
    # blocks/0 renamed to `blocks.1`, while blocks/1 mirrors to `blocks.1` too
    with pytest.raises(
        ValueError, match="several NNX Variables map to the torch key.*'blocks.1.bias'"
    ):
        I.torch_state_dict_shapes(NNXNet(R(0)), mapping={"blocks.1": "blocks/0"})


# -- layout functions: exact inverses (hypothesis) -------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    nd=st.integers(1, 3),
    sizes=st.lists(st.integers(1, 4), min_size=5, max_size=5),
    kind=st.sampled_from(["conv", "conv_transpose", "conv_transpose_tk", "linear"]),
    out_axis=st.sampled_from([-1, -2]),
)
def test_layouts_and_spectral_v_round_trip(nd, sizes, kind, out_axis):
    from jaxparam.interop import _kernel_layout, _spectral_v

    if kind == "linear":
        nd, module = 0, nnx.Linear.__new__(nnx.Linear)
    elif kind == "conv":
        module = nnx.Conv.__new__(nnx.Conv)
    else:
        module = nnx.ConvTranspose.__new__(nnx.ConvTranspose)
        vars(module)["transpose_kernel"] = kind.endswith("_tk")
    flax_shape = tuple(sizes[: nd + 2])
    layout = _kernel_layout(module, nd + 2)
    w = np.random.default_rng(0).standard_normal(layout.torch_shape(flax_shape))
    f = layout.to_flax(w)
    assert f.shape == flax_shape
    np.testing.assert_array_equal(layout.to_torch(f), w)
    d = out_axis % (nd + 2)
    to_flax, to_torch = _spectral_v(layout, flax_shape, d)
    v = np.arange(np.prod(flax_shape) // flax_shape[d], dtype=np.float64)
    np.testing.assert_array_equal(to_torch(to_flax(v)), v)
    # the same matrix-vector products: torch's W_mat @ v_t == flax's W_mat @ v_f
    torch_dim = layout.perm[d]
    w_t = np.moveaxis(w, torch_dim, 0).reshape(w.shape[torch_dim], -1)
    w_f = np.moveaxis(f, d, 0).reshape(f.shape[d], -1)
    np.testing.assert_allclose(w_t @ v, w_f @ to_flax(v))


def test_demo_section_runs(capsys):
    from jaxparam._demo_interop import run

    assert run(quiet=True, steps=10) is True
    assert capsys.readouterr().out.startswith("interop OK")
