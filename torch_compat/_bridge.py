"""The torch <-> JAX bridge: zero-copy DLPack transfers, autograd, JAX links.

In plain words:

* ``to_jax(t)`` views a torch tensor as a ``jax.Array`` without copying (same
  memory, checked by pointer in the tests); ``to_torch(a)`` does the reverse.
* A chain of consecutive JAX parametrizations ("links") is traced into ONE pure
  function ``(inputs) -> (value, new_buffers)``. It is compiled once per chain
  structure and input shapes/dtypes, and run by ``_JaxFunction``, a
  ``torch.autograd.Function``:

  - forward runs one compiled call that returns the value, the new values of the
    buffers the links mutated, and the VJP residuals (``jax.vjp`` inside the
    compiled function; the returned ``VJP`` object is a pytree whose leaves are
    the residual arrays);
  - backward runs one compiled VJP on those residuals.

  A small chain on CPU tensors (XLA's cost analysis: at most 160 MFLOP divided
  by the number of CPUs, and 32 MB) runs on ``_InlineCPU``, a private XLA
  client that executes on the calling thread with one thread; JAX's own client
  (asynchronous, multi-threaded) would spend more on thread hand-offs than on
  the arithmetic. Larger chains, and every GPU chain, run on JAX's client.

  The inputs (and the output) are saved with ``ctx.save_for_backward`` so that
  torch's version counter catches an in-place edit between forward and backward.
  A residual that is one of those saved tensors (weight norm keeps ``v``,
  spectral norm keeps ``W``) is not returned by the forward (XLA would copy it
  into a fresh buffer): the backward reads it from the saved tensor instead.
  Small residuals (per-row norms, scalars) leave the forward packed into one
  array per dtype, and the backward reuses the forward's views of the saved
  tensors: each array crossing a call costs a few microseconds of runtime
  bookkeeping, more than copying a few kilobytes.
* Higher order and ``torch.func``: the backward is once differentiable (a
  second differentiation through it raises, lazily, as torch's
  ``once_differentiable`` does). Inside torch.func's transforms the chain runs
  through ``_JaxFunctionInTransforms`` (the ``setup_context`` form they
  require), so ``functional_call`` with ``grad`` and ``vjp`` works. A
  cotangent batched by ``vmap`` (per-sample gradients, ``jacrev``) runs one
  compiled ``jax.vmap`` of the VJP. ``vmap`` over the chain's inputs (model
  ensembling) runs the chain as a new entry, itself under ``jax.vmap``
  (``_batched_entry``), through the Function's ``vmap`` rule, or
  ``_run_vmapped`` without grad; ``grad`` inside such a ``vmap`` re-runs it
  with residuals in ``setup_context`` (``_setup_vmapped``).
* Forward mode (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``):
  when an input may carry a tangent, the forward also returns the residuals of
  ``jax.linearize`` (``_Residuals``, as for the VJP), and the Functions' ``jvp``
  runs one compiled linear map on them (under ``jax.vmap`` for ``jacfwd``'s
  batched tangents). A derivative of the bridge's derivatives (a backward under
  forward mode, a tangent under a second differentiating level) raises.
* Accepted dtypes: float16, bfloat16, float32, float64, complex64, complex128
  (differentiable), and int8/16/32/64, uint8, bool (passed through, never
  differentiated). Anything else (complex32, float8, quantized, ...) raises
  ``TypeError``.
* 64-bit dtypes keep their precision without touching the global JAX
  configuration: the import skips JAX's dtype canonicalization, and tracing,
  compiling and running happen inside ``jax.enable_x64(True)``, a thread-local,
  scoped context. It is entered only when an input is 64-bit, so a float32
  function never sees float64 defaults.
* Non-contiguous tensors, and views with torch's lazy conjugate or negative
  bit: ``to_jax`` refuses them (``ValueError``; XLA needs dense row-major
  memory, and DLPack does not carry the bits, so a view would be a hidden
  copy). Inside a parametrization chain, the inputs of a JAX link are made
  contiguous with ``Tensor.contiguous()`` (differentiable; a copy only when
  needed), because a torch link may legitimately return a transposed view; any
  other tensor that crosses (a link's parameter or buffer, a gradient, a
  tangent) is made dense by ``_import`` (``_dense``), a sparse gradient too.
* CPU tensors whose data pointer is not 64-byte aligned (a view at an odd
  offset) cannot be viewed by XLA; they are copied, which is always safe.
* No aliasing: outputs are fresh XLA buffers handed to torch (an output that
  would alias an input is cloned); residuals stay inside the ``VJP`` object and
  are never exposed to torch; mutated buffers are written back with ``copy_``
  after the computation finished.

Example:
    >>> import torch, jax.numpy as jnp
    >>> from torch_compat._bridge import to_jax, to_torch
    >>> t = torch.ones(2, 2)
    >>> a = to_jax(t)
    >>> a.unsafe_buffer_pointer() == t.data_ptr()
    True
    >>> to_torch(a * 2).sum().item()
    8.0
"""

from __future__ import annotations

import collections
import contextlib
import copy
import math
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch._C._functorch as _functorch
import torch._functorch.pyfunctorch as _pyfunctorch
import torch.autograd.forward_ad as _fwad
from flax import nnx

from jaxparam._checks import link_name
from jaxparam.functional import forward_mode_ad

#: torch's node whose backward raises (what ``once_differentiable`` uses).
_DelayedError = torch._C._functions.DelayedError
#: The saved-tensor hooks in force (``None`` when none): non-reentrant
#: ``torch.utils.checkpoint``, ``save_on_cpu``, ``saved_tensors_hooks``.
_saved_tensors_hooks = torch._C._autograd._top_saved_tensors_default_hooks

try:  # The fast path: skip jax.dlpack.from_dlpack's Python overhead (~30 us).
    from jax._src.lib import _jax as _jaxlib

    _dlpack_to_buffer = _jaxlib.dlpack_managed_tensor_to_buffer
    _buffer_to_dlpack = _jaxlib.buffer_to_dlpack_managed_tensor
    _JaxRuntimeError: type[Exception] = _jaxlib.JaxRuntimeError
except (ImportError, AttributeError):  # pragma: no cover - other jaxlib versions
    _dlpack_to_buffer = _buffer_to_dlpack = None
    _JaxRuntimeError = RuntimeError

try:  # A private CPU client for small computations (see `_InlineCPU`).
    from jax._src.lib import xla_client as _xla_client

    _DeviceList = _jaxlib.DeviceList
except (ImportError, AttributeError, NameError):  # pragma: no cover - other jaxlib versions
    _xla_client = _DeviceList = None

__all__ = [
    "JaxParametrization",
    "NNXParametrization",
    "is_jax_link",
    "run_chain",
    "to_jax",
    "to_torch",
]

_INEXACT = frozenset(
    {
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    }
)
_PASS_THROUGH = frozenset(
    {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool}
)
_SUPPORTED = _INEXACT | _PASS_THROUGH
_X64 = frozenset({torch.float64, torch.complex128, torch.int64})
_COMPLEX = frozenset({torch.complex64, torch.complex128})
_JAX_X64 = frozenset({np.dtype("float64"), np.dtype("complex128"), np.dtype("int64")})

_DL_CPU = 1
_NULL = contextlib.nullcontext()


def _x64_ctx(enable: bool):
    # jax.enable_x64 is a thread-local State: entering it changes nothing for
    # other threads and is undone on exit.
    return jax.enable_x64(True) if enable else _NULL


# --------------------------------------------------------------------------- #
# Devices, checks and raw transfers
# --------------------------------------------------------------------------- #

_device_cache: dict[torch.device, jax.Device] = {}


def _jax_device(device: torch.device) -> jax.Device:
    dev = _device_cache.get(device)
    if dev is not None:
        return dev
    if device.type == "cpu":
        dev = jax.devices("cpu")[0]
    elif device.type == "cuda":
        try:
            gpus = jax.devices("gpu")
        except RuntimeError:
            gpus = []
        index = device.index if device.index is not None else torch.cuda.current_device()
        matches = [d for d in gpus if d.local_hardware_id == index]
        if not matches:
            raise ValueError(
                "Cannot pass a tensor to JAX: JAX does not see its device.\n"
                f"tensor.device: {device}\n"
                f"jax devices: {jax.devices()}\n"
                "Install a CUDA-enabled jaxlib, or move the module to the CPU."
            )
        dev = matches[0]
    elif device.type == "meta":
        raise ValueError(
            "Cannot pass a meta tensor to JAX: it has no data. (A JAX parametrization "
            "whose inputs are all meta tensors runs on their shapes only, as torch's "
            "do; not under torch.func transforms, nor with real tensors mixed in.)\n"
            "Give the module memory first: `module.to_empty(device='cpu')`, then "
            "initialize it or load a state dict."
        )
    else:
        raise ValueError(
            "Cannot pass a tensor to JAX: JAX does not see its device.\n"
            f"tensor.device: {device}\n"
            f"jax devices: {jax.devices()}\n"
            "Move the tensor to the CPU (or to a CUDA device JAX sees)."
        )
    _device_cache[device] = dev
    return dev


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _SUPPORTED:
        raise TypeError(
            "Cannot pass a tensor to JAX: unsupported dtype.\n"
            f"tensor.dtype: {dtype}\n"
            "supported: float16, bfloat16, float32, float64, complex64, complex128 "
            "(differentiable) and int8/16/32/64, uint8, bool. Cast the tensor first."
        )


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a contiguous copy without lazy conjugate/negative bits
    (and a dense one of a sparse tensor: the gradient of a sparse embedding)."""
    strided = t.layout == torch.strided
    if strided and t.is_contiguous() and not t.is_conj() and not t.is_neg():
        return t
    t = t.detach() if strided else t.detach().to_dense()
    return t.resolve_conj().resolve_neg().contiguous()


def _import(t: torch.Tensor, jdev: jax.Device | None = None) -> jax.Array:
    """Views a contiguous, supported, detached-or-not tensor as a jax.Array.

    ``jdev``: the CPU device to view it on (the inline client's); default: JAX's.
    A non-contiguous tensor (a transposed view, a ``channels_last`` buffer) is
    copied first: the inline client's executables read every buffer as
    row-major, whatever strides DLPack described, and would compute on the
    wrong numbers. So is a view with torch's lazy conjugate or negative bit (a
    gradient through ``w.conj()`` or ``w.mH``): DLPack exports the memory
    without the bit.
    """
    t = _dense(t)
    device = t.device
    if device.type == "cpu" and _dlpack_to_buffer is not None:
        jdev = jdev or _device_cache.get(device) or _jax_device(device)
        capsule = torch.utils.dlpack.to_dlpack(t.detach())
        try:
            return _dlpack_to_buffer(capsule, jdev, None, False, _DL_CPU)
        except _JaxRuntimeError as e:
            if "aligned" not in str(e):
                raise
            # XLA cannot view unaligned memory: copy (always safe).
            capsule = torch.utils.dlpack.to_dlpack(t.detach())
            return _dlpack_to_buffer(capsule, jdev, None, True, _DL_CPU)
    # The public path synchronises streams on GPU.
    jdev = _jax_device(device)
    with _x64_ctx(t.dtype in _X64):
        return jax.dlpack.from_dlpack(t.detach(), device=jdev)


_GATHER = (
    "fix: gather it onto one device first, e.g. `jax.device_put(array, jax.devices()[0])` "
    "(or `jax.device_get(array)` for a NumPy copy); a fully replicated array is refused "
    "too, for the same reason."
)
_NO_MESH = (
    "fix: return a single-device array: do not place the result on a mesh inside the "
    "JAX function (`with_sharding_constraint`, `device_put` with a multi-device sharding)."
)


def _several_devices(what: str, shape: Any, sharding: Any, fix: str = _GATHER) -> ValueError:
    return ValueError(
        f"Cannot pass {what} to torch: it spans several devices, and DLPack exports "
        "one device buffer (torch would see a single shard).\n"
        f"shape: {tuple(shape)}\n"
        f"sharding: {sharding}\n" + fix
    )


def _check_compiled(compiled: Any, what: str) -> None:
    """Refuses a compiled chain whose inputs or outputs span several devices.

    A JAX link that shards its output (``with_sharding_constraint`` on a mesh)
    makes XLA compile for the whole mesh; torch can take only single-device
    buffers. Checked once, when the chain is compiled.
    """
    for info in jax.tree.leaves(compiled.out_info):
        if info.sharding is not None and len(info.sharding.device_set) > 1:
            raise _several_devices(f"the output of {what}", info.shape, info.sharding, _NO_MESH)
    for sharding in jax.tree.leaves(compiled.input_shardings):
        if len(sharding.device_set) > 1:  # the inputs follow the outputs' mesh
            raise _several_devices(f"the output of {what}", (), sharding, _NO_MESH)


def _export(a: jax.Array, cpu: bool | None = None) -> torch.Tensor:
    if cpu is None:
        cpu = next(iter(a.devices())).platform == "cpu"
    if cpu and _buffer_to_dlpack is not None:
        return torch.utils.dlpack.from_dlpack(_buffer_to_dlpack(a, stream=None))
    return torch.from_dlpack(a)


def to_jax(tensor: torch.Tensor) -> jax.Array:
    """Views a torch tensor as a ``jax.Array`` without copying.

    Args:
        tensor: a contiguous tensor with a supported dtype on a device JAX sees,
            that does not require grad (use the parametrization machinery, or
            ``tensor.detach()``, to cross with autograd).

    Returns:
        A ``jax.Array`` sharing memory with ``tensor``. JAX assumes arrays are
        immutable: do not modify ``tensor`` in place while the array is alive.

    Raises:
        TypeError: if ``tensor`` is not a ``torch.Tensor`` or its dtype is unsupported.
        ValueError: if it requires grad, is not contiguous, or lives on a device
            JAX does not see.

    Example:
        >>> import torch
        >>> t = torch.arange(4.0)
        >>> to_jax(t).unsafe_buffer_pointer() == t.data_ptr()
        True
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_jax expects a torch.Tensor. Got {type(tensor).__name__}.")
    _check_dtype(tensor.dtype)
    if tensor.requires_grad:
        raise ValueError(
            "Cannot pass a tensor that requires grad to JAX as a value: JAX would not "
            "see torch's autograd graph. Call `tensor.detach()` first, or register the "
            "JAX function as a parametrization to get gradients."
        )
    if not tensor.is_contiguous():
        raise ValueError(
            "Cannot pass a non-contiguous tensor to JAX without a copy.\n"
            f"tensor.shape: {tuple(tensor.shape)}\n"
            f"tensor.stride(): {tensor.stride()}\n"
            "Call `tensor.contiguous()` first."
        )
    if tensor.is_conj() or tensor.is_neg():
        conj = tensor.is_conj()
        bit, fix = ("conjugate", "resolve_conj") if conj else ("negative", "resolve_neg")
        raise ValueError(
            f"Cannot pass a tensor with torch's lazy {bit} bit to JAX without a copy: "
            f"DLPack exports the memory without the bit.\nCall `tensor.{fix}()` first."
        )
    _jax_device(tensor.device)
    return _import(tensor)


def to_torch(array: jax.Array) -> torch.Tensor:
    """Views a ``jax.Array`` as a torch tensor without copying.

    Args:
        array: a ``jax.Array`` on a single device.

    Returns:
        A tensor sharing memory with ``array``.

    Raises:
        TypeError: if ``array`` is not a ``jax.Array`` or its dtype has no torch
            equivalent through DLPack.
        ValueError: if ``array`` spans several devices (sharded or replicated):
            DLPack exports one device buffer. Gather it first
            (``jax.device_put(array, jax.devices()[0])``).

    Example:
        >>> import jax.numpy as jnp
        >>> to_torch(jnp.ones(3)).shape
        torch.Size([3])
    """
    if not isinstance(array, jax.Array) or isinstance(array, jax.core.Tracer):
        raise TypeError(f"to_torch expects a concrete jax.Array. Got {type(array).__name__}.")
    if len(array.sharding.device_set) > 1:
        raise _several_devices("a JAX array", array.shape, array.sharding)
    try:
        return _export(array)
    except (TypeError, BufferError, RuntimeError) as e:
        raise TypeError(
            f"Cannot pass a JAX array of dtype {array.dtype} to torch through DLPack: {e}"
        ) from e


def _check_out(y: Any, what: str) -> None:
    if not isinstance(y, jax.Array):
        raise TypeError(
            f"{what} must return a jax.Array. Got {type(y).__name__}. "
            "Return an array (e.g. `jnp.asarray(value)`), not a Python scalar, list or None."
        )


# --------------------------------------------------------------------------- #
# JAX links: a pure function (params, buffers, *xs) -> (y, new_buffers)
# --------------------------------------------------------------------------- #


def is_jax_link(module: Any) -> bool:
    """Whether ``module`` is a JAX parametrization adapter (fusable link)."""
    return isinstance(module, _JaxLink)


class _JaxLink(torch.nn.Module):
    """Base of the torch adapters that run a JAX parametrization."""

    #: The user's parametrization's name, used where torch's messages name a link.
    parametrization_name: str = "JaxParametrization"
    #: Whether autograd saves the link's inputs (``save_for_backward``), so that
    #: an in-place edit of one between forward and backward raises torch's
    #: error. A built-in whose torch original saves only values computed from
    #: its input (orthogonal) says ``False``: then only the inputs the backward
    #: reads are saved, and an original may change before the backward, as in torch.
    saves_inputs: bool = True

    def _jax_key(self) -> Any:
        raise NotImplementedError

    def _jax_apply(self) -> Callable[..., tuple[jax.Array, list[jax.Array]]]:
        raise NotImplementedError

    def _jax_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [], []

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return run_chain([self], xs)


class JaxParametrization(_JaxLink):
    """Runs a plain JAX function ``f(x) -> y`` (or ``f(x0, x1, ...)``) as a torch module.

    ``register_parametrization`` wraps any non-``nn.Module`` callable in this
    adapter. If ``f`` has a ``right_inverse`` attribute (a JAX function), the
    adapter has a ``right_inverse`` method that runs it (without grad);
    otherwise it has none, exactly like a torch module without one.

    Args:
        fn: a JAX function of one or several arrays returning one array.

    Raises:
        TypeError: if ``fn`` is not callable.

    Example:
        >>> import torch, jax.numpy as jnp
        >>> sym = JaxParametrization(lambda x: x + x.T)
        >>> sym(torch.eye(2)).tolist()
        [[2.0, 0.0], [0.0, 2.0]]
    """

    def __init__(self, fn: Callable[..., jax.Array]) -> None:
        if not callable(fn):
            raise TypeError(f"A JAX parametrization must be callable. Got {type(fn).__name__}.")
        super().__init__()
        self.fn = fn
        self.parametrization_name = link_name(fn)

    def _jax_key(self) -> Any:
        return self.fn

    def __deepcopy__(self, memo: dict[int, Any]) -> JaxParametrization:
        # A JAX function is pure: a copy shares it, as deepcopy shares plain
        # functions, and so shares its compiled calls. (A jitted function or a
        # functools.partial copied anew would compile again for every copy:
        # "keep the best model" loops, AveragedModel.)
        memo.setdefault(id(self.fn), self.fn)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def _jax_apply(self):
        fn = self.fn

        def apply(params, buffers, *xs):
            return fn(*xs), []

        return apply

    @property
    def right_inverse(self) -> Callable[[torch.Tensor], Any]:  # type: ignore[override]
        inv = getattr(self.fn, "right_inverse", None)
        if inv is None:
            raise AttributeError("right_inverse")
        return lambda value: call_jax(inv, value, what="`right_inverse`")

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__qualname__', repr(self.fn))}"


class _Holder(torch.nn.Module):
    """An empty container so that nested nnx paths become nested state-dict keys."""


def _path_names(path: tuple[Any, ...]) -> list[str]:
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                names.append(k.name)
        else:  # pragma: no cover - other key types
            names.append(str(k))
    return names


def _set_mode(module: nnx.Module, training: bool) -> None:
    # nnx's convention: train() / eval() flip `deterministic` (and friends) on
    # every submodule that has the attribute.
    for _, sub in nnx.iter_modules(module):
        if hasattr(sub, "deterministic"):
            sub.deterministic = not training
        if hasattr(sub, "use_running_average"):
            sub.use_running_average = not training


class NNXParametrization(_JaxLink):
    """Runs a ``flax.nnx.Module`` parametrization as a torch module.

    Its ``nnx.Param``s become ``nn.Parameter``s (trained by torch optimizers)
    and its other Variables become buffers, under the same names (nested
    modules become nested keys: ``parametrizations.weight.0.inner.kernel``).
    The torch tensors are the state: each call merges them into the nnx module
    inside the compiled function. Variables the call mutates (a power
    iteration in training mode, say) are written back into the buffers in
    place, under ``no_grad``. ``train(mode)`` reaches the nnx module
    (``deterministic = not mode`` on submodules that have that attribute).

    A typed PRNG key Variable (an ``nnx.Rngs`` stream's ``key``, e.g. in an
    ``nnx.Dropout`` built with ``rngs=``) is stored as its raw key data
    (``jax.random.key_data``, a ``uint32`` buffer) and rewrapped with its impl
    inside each call; its ``count`` is an ordinary buffer, so each call in
    training mode draws anew and ``state_dict()`` saves where the stream is.
    Unsigned integer buffers reach JAX as the signed type of the same width
    (a bit cast), which the bridge passes through.

    Args:
        module: the nnx module; its ``__call__`` takes the original tensor(s)
            and returns one array; an optional ``right_inverse`` method.

    Raises:
        TypeError: if ``module`` is not an ``nnx.Module``, or holds a PRNG key
            that cannot be stored as key data (or as an ``nnx.Param``).

    Example:
        >>> import torch, jax.numpy as jnp
        >>> from flax import nnx
        >>> class Scale(nnx.Module):
        ...     def __init__(self):
        ...         self.s = nnx.Param(jnp.ones(()))
        ...     def __call__(self, x):
        ...         return x * self.s[...]
        >>> p = NNXParametrization(Scale())
        >>> sorted(p.state_dict())
        ['s']
    """

    def __init__(self, module: nnx.Module) -> None:
        if not isinstance(module, nnx.Module):
            raise TypeError(f"Expected an nnx.Module. Got {type(module).__name__}.")
        super().__init__()
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        # The skeleton only provides the graph structure and the mode flags;
        # its arrays are never read again (the torch tensors are the state).
        object.__setattr__(self, "_skeleton", module)
        self._graphdef = graphdef
        p_paths, self._p_tree = jax.tree_util.tree_flatten_with_path(params)
        b_paths, self._b_tree = jax.tree_util.tree_flatten_with_path(rest)
        self.parametrization_name = link_name(module)
        # Checked before anything is registered: a refused key leaves no trace.
        for path, leaf in p_paths:
            if self._is_key(leaf):
                raise self._key_error(path, leaf, "an nnx.Param cannot hold a PRNG key")
        stored = [self._encode_leaf(path, leaf) for path, leaf in b_paths]
        codecs = tuple(c for _, c in stored)
        #: Per buffer: None, or (the unsigned JAX dtype, the key impl or None).
        self._codecs = codecs if any(c is not None for c in codecs) else None
        self._p_names = [self._register(path, leaf, True) for path, leaf in p_paths]
        self._b_names = [
            self._register(path, leaf, False)
            for (path, _), (leaf, _) in zip(b_paths, stored, strict=True)
        ]
        self._has_inverse = callable(getattr(module, "right_inverse", None))

    #: None: every buffer is passed as it is (no keys, no unsigned buffers).
    _codecs: tuple[Any, ...] | None = None

    # Unsigned buffers cross as the signed type of the same width (the bridge
    # passes signed integers through; torch has few kernels for uint16/32/64).
    _SIGNED = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
    _UNSIGNED = (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))

    @staticmethod
    def _is_key(leaf: Any) -> bool:
        dtype = getattr(leaf, "dtype", None)
        return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)

    def _key_error(self, path, leaf, why: str) -> TypeError:
        return TypeError(
            f"Cannot register the nnx parametrization `{self.parametrization_name}`: "
            f"{why}.\n"
            f"variable: {'.'.join(_path_names(path))}\n"
            f"key dtype: {leaf.dtype}\n"
            "fix: keep keys in an nnx.Rngs (or nnx.RngKey) made from a built-in impl, "
            "e.g. `nnx.Rngs(0)` or `jax.random.key(seed, impl='threefry2x32')`; or pass "
            "the rngs at call time (`self.dropout(w, rngs=rngs)`) instead of storing them."
        )

    def _encode_leaf(self, path, leaf) -> tuple[Any, Any]:
        """The array a buffer stores for ``leaf``, and how to rebuild ``leaf`` from it."""
        if self._is_key(leaf):
            try:
                impl = jax.random.key_impl(leaf)
                data = jax.random.key_data(leaf)
                ok = data.dtype == np.uint32
                ok = ok and jax.random.wrap_key_data(data, impl=impl).dtype == leaf.dtype
                hash(impl)
            except Exception as e:  # any failure means: it cannot be stored
                raise self._key_error(
                    path, leaf, f"its PRNG key cannot be stored as key data ({e})"
                ) from e
            if not ok:
                raise self._key_error(
                    path, leaf, f"its PRNG key (impl {impl!r}) does not rebuild from its key data"
                )
            return data, (np.dtype(np.uint32), impl)
        leaf = jnp.asarray(leaf)
        if leaf.dtype in self._UNSIGNED:
            return leaf, (leaf.dtype, None)
        return leaf, None

    @staticmethod
    def _decode(codec: Any, a: Any) -> Any:
        """The nnx value of a buffer from the signed array the bridge passes."""
        if codec is None:
            return a
        dtype, impl = codec
        u = jax.lax.bitcast_convert_type(a, dtype)
        return u if impl is None else jax.random.wrap_key_data(u, impl=impl)

    @staticmethod
    def _encode(codec: Any, v: Any) -> Any:
        """The signed array the bridge writes back for a buffer's new nnx value."""
        dtype, impl = codec
        if impl is not None:
            v = jax.random.key_data(v)
        signed = np.dtype(f"int{dtype.itemsize * 8}")
        return jax.lax.bitcast_convert_type(jnp.asarray(v).astype(dtype), signed)

    def _register(self, path, leaf, is_param: bool) -> tuple[str, ...]:
        names = _path_names(path)
        owner: torch.nn.Module = self
        for name in names[:-1]:
            if name not in owner._modules:
                owner.add_module(name, _Holder())
            owner = owner._modules[name]
        # Own the memory: the nnx module (or its user) may still hold `leaf`.
        value = _export(jnp.array(leaf, copy=True)).clone()
        if is_param:
            owner.register_parameter(names[-1], torch.nn.Parameter(value))
        else:
            owner.register_buffer(names[-1], value)
        return tuple(names)

    def _get(self, names: tuple[str, ...]) -> torch.Tensor:
        owner: torch.nn.Module = self
        for name in names[:-1]:
            owner = owner._modules[name]
        return getattr(owner, names[-1])

    def _jax_key(self) -> Any:
        if self._codecs is None:
            return self._graphdef
        return (self._graphdef, self._codecs)

    def _jax_state(self):
        params = [self._get(n) for n in self._p_names]
        if self._codecs is None:
            return params, [self._get(n) for n in self._b_names]
        bufs = []
        for n, codec in zip(self._b_names, self._codecs, strict=True):
            t = self._get(n)
            # A view: the bridge's in-place write-back lands in the buffer.
            bufs.append(t if codec is None else t.view(self._SIGNED.get(t.dtype, t.dtype)))
        return params, bufs

    def _jax_apply(self):
        return _nnx_apply(self._graphdef, self._p_tree, self._b_tree, "__call__", self._codecs)

    def train(self, mode: bool = True) -> NNXParametrization:
        super().train(mode)
        _set_mode(self._skeleton, mode)
        self._graphdef = nnx.split(self._skeleton, nnx.Param, ...)[0]
        return self

    @property
    def right_inverse(self) -> Callable[[torch.Tensor], Any]:  # type: ignore[override]
        if not self._has_inverse:
            raise AttributeError("right_inverse")
        apply = _nnx_apply(
            self._graphdef, self._p_tree, self._b_tree, "right_inverse", self._codecs
        )
        params, buffers = self._jax_state()
        n_p = len(params)

        def inverse(*arrays):
            return apply(
                list(arrays[:n_p]),
                list(arrays[n_p : n_p + len(buffers)]),
                *arrays[n_p + len(buffers) :],
            )[0]  # noqa: E501

        inverse.__jax_key__ = ("right_inverse", self._jax_key())  # type: ignore[attr-defined]
        return lambda value: call_jax(
            inverse, *params, *buffers, value, what="`right_inverse`", key=inverse.__jax_key__
        )

    def to_nnx(self) -> nnx.Module:
        """Returns a new nnx module holding copies of the current torch state.

        Example:
            >>> # m = p.to_nnx(); m.s[...]
        """
        p, b = ([jnp.array(to_jax(_dense(t.detach()))) for t in ts] for ts in self._jax_state())
        if self._codecs is not None:  # keys rewrapped, unsigned buffers cast back
            b = [self._decode(c, a) for c, a in zip(self._codecs, b, strict=True)]
        p, b = jax.tree.unflatten(self._p_tree, p), jax.tree.unflatten(self._b_tree, b)
        return nnx.merge(self._graphdef, p, b)


def _nnx_apply(graphdef, p_tree, b_tree, method: str, codecs=None):
    def apply(params, buffers, *xs):
        p = jax.tree.unflatten(p_tree, params)
        if codecs is not None:
            decode = NNXParametrization._decode
            values = [decode(c, a) for c, a in zip(codecs, buffers, strict=True)]
        else:
            values = buffers
        b = jax.tree.unflatten(b_tree, values)
        m = nnx.merge(graphdef, p, b)
        y = getattr(m, method)(*xs)
        _, _, new_b = nnx.split(m, nnx.Param, ...)
        new = jax.tree.leaves(new_b)
        if codecs is not None:
            # An unchanged value comes back as the input itself (the bridge
            # tells mutated buffers by identity); a changed one is re-encoded.
            new = [
                v if c is None else a if v is d else NNXParametrization._encode(c, v)
                for c, a, d, v in zip(codecs, buffers, values, new, strict=True)
            ]
        return y, new

    return apply


# --------------------------------------------------------------------------- #
# Small CPU computations: a private, synchronous, single-threaded XLA client
# --------------------------------------------------------------------------- #


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - macOS, Windows


#: A chain whose compiled forward costs at most this (XLA's cost analysis) runs
#: on the inline client; a larger one keeps JAX's multi-threaded client. Measured
#: on 2 CPUs, the inline client is faster up to ~80 MFLOP (an orthogonal map of
#: n = 128, a 256 householder); with more CPUs the threads pay off sooner.
_INLINE_MAX_FLOPS = 160e6 / max(_cpu_count(), 2)
_INLINE_MAX_BYTES = 32e6


class _InlineCPU:
    """A private XLA CPU client that runs small computations on the calling thread.

    JAX's own CPU client hands every call to a worker thread (asynchronous
    dispatch) and splits each large-enough loop over its thread pool. For the
    bridge's small calls (a weight norm of a 512x512 weight: two passes over 1 MB)
    those thread hand-offs cost more than the arithmetic: 210 us per call against
    about 100 us here, where the call runs synchronously with one thread. The
    client is created once, with the process's JAX configuration untouched: it is
    ``xla_client.make_cpu_client(asynchronous=False)`` made from a helper thread
    pinned to one CPU, so that its thread pool (sized from the CPUs it may use)
    has one thread and XLA compiles for one. Set ``TORCH_COMPAT_INLINE_CPU=0`` in
    the environment to run everything on JAX's client.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = False
        self.client: Any = None
        self.device: Any = None

    def get(self) -> Any:
        """The client's device, or ``None`` when there is no inline client."""
        if not self._started:
            with self._lock:
                if not self._started:
                    self._start()
                    self._started = True
        return self.device

    def _start(self) -> None:
        if (
            os.environ.get("TORCH_COMPAT_INLINE_CPU", "1") == "0"
            or _xla_client is None
            or not hasattr(os, "sched_setaffinity")
        ):
            return
        cpu = min(os.sched_getaffinity(0))
        made: dict[str, Any] = {}

        def make() -> None:
            try:
                os.sched_setaffinity(0, {cpu})  # this helper thread only
                made["client"] = _xla_client.make_cpu_client(asynchronous=False)
            except Exception:  # pragma: no cover - then JAX's client serves
                pass

        thread = threading.Thread(target=make, name="torch_compat-inline-cpu")
        thread.start()
        thread.join()
        if "client" in made:
            self.client, self.device = made["client"], made["client"].devices()[0]

    def compile(self, lowered: Any) -> Callable[..., Any] | None:
        """``lowered`` compiled for this client, called like a ``jax.stages.Compiled``.

        ``None`` if it cannot be (then the caller keeps JAX's client): a
        computation with host callbacks (``jax.debug.print``, ``pure_callback``)
        or other effects, or one for several devices, stays on JAX's client,
        which holds the callbacks and the mesh.
        """
        args = getattr(getattr(lowered, "_lowering", None), "compile_args", None)
        if (
            not isinstance(args, dict)
            or args.get("host_callbacks")
            or args.get("keepalive")
            or args.get("ordered_effects")
            or args.get("unordered_effects")
            or args.get("num_devices") != 1
        ):
            return None
        try:
            exe = self.client.compile_and_load(
                lowered.as_text(), _DeviceList((self.device,)), _xla_client.CompileOptions()
            )
        except Exception:  # pragma: no cover - an op this path cannot take
            return None
        out_tree, n_in = lowered.out_tree, lowered.in_tree.num_leaves
        if len(exe.get_parameter_layouts()) != n_in:  # pragma: no cover - hoisted constants
            return None

        def call(*args: Any) -> Any:
            outs = exe.execute_sharded(jax.tree.leaves(args))
            flat = [a[0] for a in outs.disassemble_into_single_device_arrays()]
            return jax.tree.unflatten(out_tree, flat)

        return call


_INLINE = _InlineCPU()


def _is_cheap(lowered: Any) -> bool:
    """Whether ``lowered`` is small enough for the inline client (before compiling)."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # pragma: no cover - no cost model: stay on JAX's client
        return False
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float("inf")
    if isinstance(cost, dict) and ("flops" in cost or "transcendentals" in cost):
        # XLA leaves out "flops" when there are none (an elementwise `jnp.sin`).
        flops = cost.get("flops", 0.0) + cost.get("transcendentals", 0.0)
    arrays = jax.tree.leaves((lowered.in_avals, lowered.out_info))
    size = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays)
    return 0 <= flops <= _INLINE_MAX_FLOPS and size <= _INLINE_MAX_BYTES


# --------------------------------------------------------------------------- #
# Fused, compiled chains
# --------------------------------------------------------------------------- #


class _Residuals:
    """One linearization of a chain, as its compiled forward hands it on.

    ``tree`` is the treedef of JAX's VJP object (``jax.vjp``) or linear map
    (``jax.linearize``): it holds the linearized jaxpr, and its leaves are the
    residual arrays. Per leaf, ``src`` says where the later call finds it:
    ``("s", j)`` is the saved tensor ``j`` (``saved_used[j]`` indexes the
    differentiable inputs followed by the output), ``("r", k)`` the forward's
    residual output ``k``, ``("p", k, start, shape)`` a slice of the packed
    output ``k``. ``specs``: the forward's residual outputs; ``saved_specs``:
    the saved tensors the later call reads.
    """

    __slots__ = ("tree", "specs", "src", "saved_used", "saved_specs")

    def split(self, linearized: Any, saved: list[Any]) -> list[Any]:
        """The arrays the forward returns for ``linearized`` (trace time).

        A residual that is a differentiable input or the output (``saved``,
        matched by tracer identity) is already saved by torch
        (``save_for_backward``): returning it would make XLA copy it into a
        fresh buffer. Small ones are packed (`_pack`).
        """
        all_leaves, self.tree = jax.tree_util.tree_flatten(linearized)
        leaves: list[Any] = []
        src: list[tuple[Any, ...]] = []
        for leaf in all_leaves:
            j = next((j for j, x in enumerate(saved) if leaf is x), None)
            if j is None:
                src.append(("r", len(leaves)))
                leaves.append(leaf)
            else:
                src.append(("s", j))
        leaves = _pack(leaves, src)
        self.src = src
        self.specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves]
        return leaves

    def finish(self, all_saved: list[Any]) -> None:
        """Keeps only the saved tensors the residuals read (after tracing)."""
        used = sorted({j for k, j, *_ in self.src if k == "s"})
        self.src = tuple(("s", used.index(j)) if k == "s" else (k, j, *r) for k, j, *r in self.src)
        self.saved_used = tuple(used)
        self.saved_specs = [all_saved[j] for j in used]

    def views(self, arrays: Sequence[Any], diff_pos: Sequence[int], y: Any) -> list[Any]:
        """The saved tensors as the forward's views of the same memory."""
        views = [arrays[i] for i in diff_pos] + [y]
        return [views[j] for j in self.saved_used]

    def rebuild(self, computed: Sequence[Any], saved: Sequence[Any]) -> Any:
        """The VJP object or linear map from the residual arrays (traced)."""
        leaves = []
        for kind, j, *packed in self.src:
            if kind == "s":
                leaves.append(saved[j])
            elif kind == "r":
                leaves.append(computed[j])
            else:
                start, shape = packed
                flat = jax.lax.slice(computed[j], (start,), (start + math.prod(shape),))
                leaves.append(flat.reshape(shape))
        return jax.tree_util.tree_unflatten(self.tree, leaves)


@contextlib.contextmanager
def _forward_mode_errors(name: str):
    """JAX's refusal to push a tangent through a ``custom_vjp``, in torch's terms."""
    try:
        yield
    except TypeError as e:
        if "forward-mode" not in str(e):
            raise
        raise NotImplementedError(_NO_FORWARD_MODE.format(name=name, error=e)) from None


def _vmapped(fn: Callable[..., Any], levels: Sequence[tuple[int | None, ...]]):
    """``fn(residuals, saved, *batched)`` under one ``jax.vmap`` per torch.func
    vmap level, the first peeled (the innermost ``vmap``) innermost; each
    level gives the batch dimension of each batched argument (or ``None``),
    and the batch dimensions come out in front, the outermost level's first."""
    for axes in levels:
        fn = jax.vmap(fn, in_axes=(None, None, *axes))
    return fn


class _Entry:
    """One compiled forward for a chain structure + input shapes/dtypes.

    ``vjp_res`` (reverse mode) and ``lin_res`` (forward mode) describe the
    residuals the forward returns, after the mutated buffers: the VJP's
    arrays, then the linear map's (each list empty when not asked for).
    """

    __slots__ = (
        "x64",
        "cpu",
        "compiled",
        "diff_pos",
        "diff_specs",
        "in_specs",
        "in_jvp",
        "buf_pos",
        "mutated",
        "conj",
        "vjp_res",
        "lin_res",
        "ct_spec",
        "bwd",
        "jvp",
        "jdev",
        "batched_bwd",
        "batched_jvp",
        "key",
        "core",
        "n_x",
        "param_pos",
        "name",
        "save_inputs",
    )

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def _lower(self, fn: Callable[..., Any], res: _Residuals, *specs: Any) -> Any:
        with _x64_ctx(self.x64):
            return jax.jit(fn, keep_unused=True).trace(res.specs, res.saved_specs, *specs).lower()

    def _compile(self, lowered: Any, what: str) -> Any:
        """Compiles a later call on the client that holds the forward's residuals."""
        if self.jdev is not None:
            compiled = _INLINE.compile(lowered)
            if compiled is None:  # pragma: no cover - the forward compiled inline
                raise RuntimeError(f"{self.name}: its {what} did not compile.")
            return compiled
        with _x64_ctx(self.x64):
            return lowered.compile()

    def lower_backward(self) -> Any:
        """The VJP ``(residual leaves, saved inputs, cotangent) -> grads``, lowered."""
        return self._lower(self._vjp, self.vjp_res, self.ct_spec)

    def lower_jvp(self) -> Any:
        """The JVP ``(residual leaves, saved inputs, *tangents) -> tangent``, lowered."""
        with _forward_mode_errors(self.name):
            return self._lower(self._jvp, self.lin_res, *self.diff_specs)

    def backward(self) -> Any:
        """The compiled VJP (built once, on JAX's client unless built inline)."""
        if self.bwd is None:
            self.bwd = self._compile(self.lower_backward(), "VJP")
        return self.bwd

    def forward_jvp(self) -> Any:
        """The compiled JVP (built once, on the client of the forward)."""
        if self.jvp is None:
            self.jvp = self._compile(self.lower_jvp(), "JVP")
        return self.jvp

    def input_jvp(self) -> Any:
        """The compiled JVP of the chain at its inputs, ``(inputs, tangents) ->
        tangent`` (the forward recomputed; for `_CotangentLinear`)."""
        if self.in_jvp is None:
            core, diff_pos = self.core, self.diff_pos

            def jvp(flat, tangents):
                f = _of_diff(core, flat, diff_pos)
                with forward_mode_ad():
                    return jax.jvp(f, [flat[i] for i in diff_pos], list(tangents))[1][0]

            with _forward_mode_errors(self.name), _x64_ctx(self.x64):
                lowered = jax.jit(jvp).trace(self.in_specs, self.diff_specs).lower()
            self.in_jvp = self._compile(lowered, "JVP")
        return self.in_jvp

    def batched_backward(self, bdims: tuple[int, ...], ct_shape: tuple[int, ...]) -> Any:
        """The compiled VJP of a cotangent batched by torch.func.vmap.

        ``bdims``: the batch dimension of each vmap level in the order the
        wrappers are peeled (the innermost ``vmap`` first; each indexes the
        tensor under its wrapper, which still holds the outer levels' batch
        dimensions); ``ct_shape``: the shape of the tensor under all of them.
        The gradients come back with the batch dimensions in front, the
        outermost ``vmap``'s first. Compiled once per ``bdims`` and shape, on
        the client that holds the residuals.
        """
        key = (bdims, ct_shape)
        cache = self.batched_bwd
        if cache is None:
            cache = self.batched_bwd = {}
        if key not in cache:
            fn = _vmapped(self._vjp, [(b,) for b in bdims])
            ct_spec = jax.ShapeDtypeStruct(ct_shape, self.ct_spec.dtype)
            cache[key] = self._compile(self._lower(fn, self.vjp_res, ct_spec), "batched VJP")
        return cache[key]

    def batched_forward_jvp(
        self, levels: tuple[tuple[int | None, ...], ...], shapes: tuple[tuple[int, ...], ...]
    ) -> Any:
        """The compiled JVP of tangents batched by torch.func.vmap (``jacfwd``).

        ``levels`` as peeled (the innermost ``vmap`` first), each with the
        batch dimension of every tangent or ``None``; ``shapes``: the tangents'
        shapes under all the wrappers. The output's batch dimensions come out
        in front, the outermost ``vmap``'s first.
        """
        key = (levels, shapes)
        cache = self.batched_jvp
        if cache is None:
            cache = self.batched_jvp = {}
        if key not in cache:
            specs = [
                jax.ShapeDtypeStruct(shape, s.dtype)
                for shape, s in zip(shapes, self.diff_specs, strict=True)
            ]
            fn = _vmapped(self._jvp, levels)
            cache[key] = self._compile(self._lower(fn, self.lin_res, *specs), "batched JVP")
        return cache[key]

    def _vjp(self, computed, saved, ct):
        """The VJP from the forward's residual arrays (traced, never called eagerly)."""
        vjp_fn = self.vjp_res.rebuild(computed, saved)
        if self.conj:  # torch's complex gradient convention is the conjugate of JAX's
            return [jnp.conj(g) for g in vjp_fn(jnp.conj(ct))]
        return list(vjp_fn(ct))

    def _jvp(self, computed, saved, *tangents):
        """The JVP from the forward's residual arrays (traced, never called eagerly).

        Forward mode has no convention to mind: JAX and torch both push a
        tangent forward through the same real-linear map, complex or not.
        """
        return self.lin_res.rebuild(computed, saved)(*tangents)


_entries: dict[Any, _Entry] = {}
_lock = threading.Lock()

#: At most this many compiled chains are kept (and as many `call_jax`
#: functions), the oldest dropped first. A key holds the user's JAX function,
#: and what it captures (a lambda made for each new model may capture the
#: model); each compiled chain holds about half a megabyte. A process that
#: builds model after model (a hyper-parameter search) stays bounded; a model
#: needs far fewer (one per chain structure, shapes, dtypes and mode).
_MAX_ENTRIES = 256


def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
    while len(cache) >= _MAX_ENTRIES:
        del cache[next(iter(cache))]
    cache[key] = value


#: Residuals of at most this many bytes are packed (per dtype) into one array.
_PACK_MAX_BYTES = 64 * 1024


def _pack(leaves: list[Any], src: list[tuple[Any, ...]]) -> list[Any]:
    """The residual arrays the forward returns, with small ones packed.

    ``src`` holds ``("r", j)`` for ``leaves[j]``, to be rewritten: a small leaf
    becomes ``("p", k, start, shape)``, a slice of the packed array ``k`` of the
    returned list. Trace time only.
    """
    groups: dict[Any, list[int]] = {}
    for j, leaf in enumerate(leaves):
        if leaf.size * leaf.dtype.itemsize <= _PACK_MAX_BYTES:
            groups.setdefault(leaf.dtype, []).append(j)
    packed_of: dict[int, tuple[int, int]] = {}
    out: list[Any] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        starts, start = [], 0
        for j in members:
            starts.append(start)
            start += leaves[j].size
        k = len(out)
        out.append(jnp.concatenate([leaves[j].reshape(-1) for j in members]))
        packed_of.update({j: (k, st) for j, st in zip(members, starts, strict=True)})
    index: dict[int, int] = {}
    for j, leaf in enumerate(leaves):
        if j not in packed_of:
            index[j] = len(out)
            out.append(leaf)
    for i, (kind, j) in enumerate(src):
        if kind == "r":
            if j in packed_of:
                k, st = packed_of[j]
                src[i] = ("p", k, st, tuple(leaves[j].shape))
            else:
                src[i] = ("r", index[j])
    return out


def _fused(applies, n_x: int, layout) -> Callable[..., tuple[jax.Array, list[jax.Array]]]:
    """The pure function of the whole chain on the flat input list."""

    def core(flat):
        xs = flat[:n_x]
        pos = n_x
        new_bufs = []
        y = None
        for i, (apply, (n_p, n_b)) in enumerate(zip(applies, layout, strict=True)):
            params = list(flat[pos : pos + n_p])
            bufs = list(flat[pos + n_p : pos + n_p + n_b])
            pos += n_p + n_b
            y, nb = apply(params, bufs, *xs) if i == 0 else apply(params, bufs, y)
            _check_out(y, "A JAX parametrization")
            new_bufs.extend(nb)
        return y, new_bufs

    return core


def _get_entry(links, tensors, grad: bool, fwd: bool) -> _Entry:
    avals = tuple((t.shape, t.dtype, t.device) for t in tensors)
    key = (tuple(link._jax_key() for link in links), avals, grad, fwd)
    entry = _entries.get(key)
    if entry is not None:
        return entry
    with _lock:
        return _build_entry(key, links, tensors, grad, fwd)


def _chain_name(links) -> str:
    names = ", ".join(f"`{link.parametrization_name}`" for link in links)
    return f"the JAX parametrization {names}" if len(links) == 1 else f"JAX links {names}"


def _build_entry(key, links, tensors, grad: bool, fwd: bool) -> _Entry:
    for t in tensors:
        _check_dtype(t.dtype)
        _jax_device(t.device)
    core, n_x, param_pos, buf_pos = _chain_core(links, tensors)
    name = _chain_name(links)
    saves_inputs = any(link.saves_inputs for link in links)
    return _compile_entry(
        key, core, n_x, param_pos, buf_pos, tensors, grad, name, fwd, saves_inputs
    )


def _chain_core(links, tensors):
    """The chain as one pure function of the flat inputs (``_fused``), the number
    of chain inputs, and where the links' parameters and buffers sit."""
    n_x = len(tensors) - sum(len(p) + len(b) for p, b in (lk._jax_state() for lk in links))
    applies, layout = [], []
    pos = n_x
    buf_pos: list[int] = []
    param_pos: list[int] = []
    for link in links:
        params, bufs = link._jax_state()
        applies.append(link._jax_apply())
        layout.append((len(params), len(bufs)))
        param_pos.extend(range(pos, pos + len(params)))
        pos += len(params)
        buf_pos.extend(range(pos, pos + len(bufs)))
        pos += len(bufs)
    return _fused(applies, n_x, layout), n_x, param_pos, buf_pos


def _batched_entry(
    entry: _Entry, in_axes: tuple[int | None, ...], tensors, grad: bool, fwd: bool = False
) -> _Entry:
    """``entry``'s chain under ``jax.vmap`` with ``in_axes`` (one per tensor), for
    torch.func.vmap over its inputs; the output's batch dimension comes first."""
    avals = tuple((t.shape, t.dtype, t.device) for t in tensors)
    key = ("vmap", entry.key, in_axes, avals, grad, fwd)
    batched = _entries.get(key)
    if batched is not None:
        return batched
    core, buf_pos = entry.core, entry.buf_pos

    def vmapped(flat):
        changed: list[bool] = []

        def one(*f):
            y, new_bufs = core(list(f))
            # Trace time: an unchanged buffer comes back as the very same tracer.
            changed.extend(n is not f[i] for n, i in zip(new_bufs, buf_pos, strict=True))
            return y

        y = jax.vmap(one, in_axes=in_axes)(*flat)
        if any(changed):
            raise RuntimeError(_NO_VMAP_BUFFERS.format(name=entry.name))
        return y, [flat[i] for i in buf_pos]

    with _lock:
        return _compile_entry(
            key, vmapped, entry.n_x, entry.param_pos, buf_pos, tensors, grad, entry.name, fwd
        )


def _of_diff(core, flat: Sequence[Any], diff_pos: Sequence[int]) -> Callable[..., Any]:
    """The chain ``core`` as a function of its differentiable inputs, the other
    inputs fixed to ``flat``'s (trace time)."""

    def f(*diff):
        full = list(flat)
        for i, d in zip(diff_pos, diff, strict=True):
            full[i] = d
        return core(full)

    return f


def _compile_entry(
    key,
    core,
    n_x,
    param_pos,
    buf_pos,
    tensors,
    grad: bool,
    name: str,
    fwd: bool = False,
    saves_inputs: bool = True,
) -> _Entry:
    """Traces and compiles the chain ``core`` (flat inputs -> output, new buffers).

    ``grad``: the forward also returns the VJP's residuals (reverse mode);
    ``fwd``: the linear map's (``jax.linearize``, forward mode);
    ``saves_inputs``: autograd saves every differentiable input, not only those
    the backward reads (`_JaxLink.saves_inputs`).
    """
    dtypes = [t.dtype for t in tensors]
    diff_pos = tuple(i for i in [*range(n_x), *param_pos] if dtypes[i] in _INEXACT)  # never buffers
    complex_pos = tuple(i for i in diff_pos if dtypes[i] in _COMPLEX)
    x64 = any(d in _X64 for d in dtypes)
    mutated: list[int] = []
    vjp_res = _Residuals() if grad else None
    lin_res = _Residuals() if fwd else None
    ct_spec: list[Any] = []

    def fwd_fn(*flat):
        f = _of_diff(core, flat, diff_pos)
        primals = [flat[i] for i in diff_pos]
        vjp_leaves: list[Any] = []
        lin_leaves: list[Any] = []
        if grad:
            y, vjp_fn, new_bufs = jax.vjp(f, *primals, has_aux=True)
            vjp_leaves = vjp_res.split(vjp_fn, [*primals, y])
        if fwd:
            # The linear map's residuals leave the call as flat arrays; its
            # treedef (which holds the linearized jaxpr) is recorded once, here.
            # With grad too, XLA computes the shared primal work once.
            with forward_mode_ad():
                y, lin_fn, new_bufs = jax.linearize(f, *primals, has_aux=True)
            lin_leaves = lin_res.split(lin_fn, [*primals, y])
        if not grad and not fwd:
            y, new_bufs = core(list(flat))
        ct_spec[:] = [jax.ShapeDtypeStruct(y.shape, y.dtype)]
        # Trace time: an unchanged buffer comes back as the very same tracer.
        old = [flat[i] for i in buf_pos]
        mutated[:] = [i for i, (n, o) in enumerate(zip(new_bufs, old, strict=True)) if n is not o]
        return y, [new_bufs[i] for i in mutated], vjp_leaves, lin_leaves

    specs = [jax.ShapeDtypeStruct(tuple(t.shape), _jax_dtype(t.dtype)) for t in tensors]
    with _x64_ctx(x64):
        with _forward_mode_errors(name) if fwd else contextlib.nullcontext():
            lowered = jax.jit(fwd_fn, keep_unused=True).trace(*specs).lower()
    # The saved tensors (diff inputs, then y) the later calls may read.
    all_saved = [specs[i] for i in diff_pos] + ct_spec
    for res in (vjp_res, lin_res):
        if res is not None:
            res.finish(all_saved)
    # Without `saves_inputs`, only the output is saved, unless the backward reads
    # an input's memory. Decided before the entry is shared with other threads.
    if not saves_inputs and vjp_res is not None:
        saves_inputs = any(j < len(diff_pos) for j in vjp_res.saved_used)
    entry = _Entry(
        x64=x64,
        cpu=all(t.device.type == "cpu" for t in tensors),
        diff_pos=diff_pos,
        diff_specs=[specs[i] for i in diff_pos],
        in_specs=specs,
        buf_pos=tuple(buf_pos),
        mutated=tuple(mutated),
        conj=bool(complex_pos) or jnp.issubdtype(ct_spec[0].dtype, jnp.complexfloating),
        vjp_res=vjp_res,
        lin_res=lin_res,
        ct_spec=ct_spec[0],
        key=key,
        core=core,
        n_x=n_x,
        param_pos=tuple(param_pos),
        name=name,
        save_inputs=saves_inputs,
    )
    if entry.cpu and _INLINE.get() is not None and _is_cheap(lowered):
        # The forward and its later calls all inline, or none: the residuals live
        # on the client that made them. (`_INLINE.compile` refuses anything for
        # several devices, so `_check_compiled` has nothing to refuse there.)
        fwd_inline = _INLINE.compile(lowered)
        bwd_inline = _INLINE.compile(entry.lower_backward()) if grad else None
        jvp_inline = _INLINE.compile(entry.lower_jvp()) if fwd else None
        if (
            fwd_inline is not None
            and (bwd_inline is not None or not grad)
            and (jvp_inline is not None or not fwd)
        ):
            entry.compiled, entry.bwd, entry.jvp = fwd_inline, bwd_inline, jvp_inline
            entry.jdev = _INLINE.device
    if entry.compiled is None:
        with _x64_ctx(x64):
            entry.compiled = lowered.compile()
        _check_compiled(entry.compiled, name)
        if fwd:  # now, so that a chain without forward mode refuses before it runs
            entry.forward_jvp()
    _remember(_entries, key, entry)
    return entry


_JAX_DTYPES = {
    torch.float16: jnp.float16,
    torch.bfloat16: jnp.bfloat16,
    torch.float32: jnp.float32,
    torch.float64: jnp.float64,
    torch.complex64: jnp.complex64,
    torch.complex128: jnp.complex128,
    torch.int8: jnp.int8,
    torch.int16: jnp.int16,
    torch.int32: jnp.int32,
    torch.int64: jnp.int64,
    torch.uint8: jnp.uint8,
    torch.bool: jnp.bool_,
}


def _jax_dtype(dtype: torch.dtype):
    return _JAX_DTYPES[dtype]


_TORCH_DTYPES = {np.dtype(v): k for k, v in _JAX_DTYPES.items()}


# --------------------------------------------------------------------------- #
# Meta tensors: shapes only
# --------------------------------------------------------------------------- #
#
# torch's own parametrizations run on meta tensors (a model built under
# `torch.device("meta")`, then `to_empty`): every operation gives a meta tensor
# of the right shape and dtype, with autograd. A JAX chain on meta tensors does
# the same through `jax.eval_shape`: nothing is computed, no buffer is written.


def _all_meta(tensors: Sequence[torch.Tensor]) -> bool:
    return bool(tensors) and all(t.is_meta for t in tensors)


def _meta_like(a: Any) -> torch.Tensor:
    return torch.empty(tuple(a.shape), dtype=_TORCH_DTYPES[np.dtype(a.dtype)], device="meta")


def _eval_shape(fn: Callable[..., Any], tensors: Sequence[torch.Tensor]) -> Any:
    """``fn(*arrays)``'s output shapes and dtypes for arrays shaped like ``tensors``."""
    specs = [jax.ShapeDtypeStruct(tuple(t.shape), _jax_dtype(t.dtype)) for t in tensors]
    with _x64_ctx(any(t.dtype in _X64 for t in tensors)):
        return jax.eval_shape(fn, *specs)


class _MetaFunction(torch.autograd.Function):
    """A chain's autograd node on meta tensors: meta gradients of the inputs' shapes."""

    @staticmethod
    def forward(ctx, out: Any, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.specs = [(t.shape, t.dtype) for t in tensors]
        return _meta_like(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        needs = ctx.needs_input_grad[1:]
        return None, *(
            torch.empty(shape, dtype=dtype, device="meta") if need else None
            for (shape, dtype), need in zip(ctx.specs, needs, strict=True)
        )


def _run_meta(links: Sequence[_JaxLink], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    for t in tensors:
        _check_dtype(t.dtype)
    core = _chain_core(links, tensors)[0]
    out = _eval_shape(lambda *flat: core(flat), tensors)[0]  # `_fused` checks it is an array
    return _MetaFunction.apply(out, *tensors) if _needs_grad(tensors) else _meta_like(out)


#: The imported inputs of the last calls, kept alive a little longer. JAX's
#: client runs a call on a worker thread, which drops its references to the
#: inputs after the outputs are ready. If that were the last reference to a
#: torch tensor's memory, the worker would release it through torch's DLPack
#: deleter, which takes the GIL; when the interpreter is already exiting, taking
#: the GIL ends the thread, and the process aborted ("terminate called without
#: an active exception"). Held here, the last reference goes away on a Python
#: thread instead. The worker is done with a call long before the next-but-one
#: call, so two calls are held (at most a gradient's worth of memory more than
#: torch); the inline client is synchronous and needs none (`_keep`).
_recent_inputs: collections.deque = collections.deque(maxlen=2)


def _keep(jdev: jax.Device | None, arrays: Any) -> None:
    """Holds ``arrays`` (the inputs of a call on ``jdev``) in `_recent_inputs`
    when the call runs on JAX's client (``jdev`` is None)."""
    if jdev is None:
        _recent_inputs.append(arrays)


def _run(entry: _Entry, tensors: Sequence[torch.Tensor]):
    """Runs the compiled forward; returns the output tensor, the raw outputs and
    the imported inputs."""
    arrays = [_import(t, entry.jdev) for t in tensors]
    _keep(entry.jdev, arrays)
    with _x64_ctx(entry.x64):
        out = entry.compiled(*arrays)
    cpu = entry.cpu
    y = _export(out[0], cpu)
    ptr = y.data_ptr()
    for t in tensors:
        if ptr == t.data_ptr() and y.numel():
            y = y.clone()  # never hand torch memory that aliases an input
            break
    if entry.mutated:
        # The computation finished (y is exported), so no XLA read is pending.
        with torch.no_grad():
            for i, new in zip(entry.mutated, out[1], strict=True):
                tensors[entry.buf_pos[i]].copy_(_export(new, cpu))
    return y, out, arrays


def _is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by torch.func.vmap at any of its wrapping levels."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def _innermost(t: torch.Tensor) -> torch.Tensor:
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def _setup(
    ctx,
    entry: _Entry,
    tensors: Sequence[torch.Tensor],
    y: torch.Tensor,
    out,
    arrays,
    hooks: bool = False,
):
    """Keeps what the backward (and jvp) need on ``ctx``. ``hooks``: the
    residuals go through torch's saved-tensor hooks when some are in force
    (outside torch.func's transforms)."""
    ctx.entry = entry
    # The forward's inputs, and as imported (views of torch's memory, no copies):
    # for the jvp's zero tangents and for `_CotangentLinear` (create_graph=True).
    ctx.inputs, ctx.arrays = tensors, arrays
    if entry.vjp_res is not None:
        # Saved (inputs and output) so that torch's version counter catches
        # an in-place edit between forward and backward.
        saved = [tensors[i] for i in entry.diff_pos] if entry.save_inputs else []
        saved.append(y)
        if not hooks or _saved_tensors_hooks(False) is None:
            ctx.hooked = 0
            ctx.residuals = out[2]  # JAX arrays, never exposed to torch
            # The backward's saved inputs, as the forward's views of the same memory
            # (`saved_tensors` in the backward still checks that torch did not change them).
            ctx.saved_views = entry.vjp_res.views(arrays, entry.diff_pos, out[0])
        else:
            # Saved-tensor hooks see every array the backward reads: checkpoint
            # frees the residuals and recomputes them (spectral norm's backward
            # then uses the recomputed power iteration, as torch's does), and
            # save_on_cpu moves them. Views of XLA's buffers, never handed to users.
            res = [_export(r, entry.cpu) for r in out[2]]
            ctx.hooked = len(res)
            saved.extend(res)
        ctx.save_for_backward(*saved)
    if entry.lin_res is not None:  # forward mode: torch calls `jvp` right after
        ctx.lin_residuals = out[3]
        ctx.lin_views = entry.lin_res.views(arrays, entry.diff_pos, out[0])


def _backward_entry(ctx, grad: torch.Tensor):
    saved = ctx.saved_tensors  # checks the version counters
    entry: _Entry = ctx.entry
    hooked = getattr(ctx, "hooked", 0)
    if hooked:  # the residuals came through the hooks (`_setup`)
        saved, res = saved[:-hooked], saved[-hooked:]
    if not entry.save_inputs:  # only the output was saved (`_JaxLink.saves_inputs`)
        saved = (*(ctx.inputs[i] for i in entry.diff_pos), *saved)
    if hooked:  # the views `_setup` keeps otherwise, from what the hooks gave back
        ctx.residuals = [_import(r, entry.jdev) for r in res]
        ctx.saved_views = [_import(saved[j], entry.jdev) for j in entry.vjp_res.saved_used]
    if _forward_over_reverse((grad, *saved)):
        # A tangent would flow into our gradients, constants to forward mode.
        raise RuntimeError(_DOUBLE_BACKWARD.decode())
    if _functorch.maybe_current_level() is None:
        if _functorch.is_legacy_batchedtensor(grad):  # gradcheck's check_batched_grad
            levels, (t,) = _legacy_unbatch([grad])
            bwd = ctx.entry.batched_backward(tuple(a for _, (a,) in levels), tuple(t.shape))
            with torch.no_grad():
                result = _backward(ctx, t, bwd)
            return (None, *(r if r is None else _legacy_batch(r, levels) for r in result))
        if not torch.is_grad_enabled():  # the usual backward
            return (None, *_backward(ctx, grad))
        with torch.no_grad():  # create_graph=True
            result = _backward(ctx, grad)
            if not _linear_in_cotangent(ctx, result, grad, saved):
                _once_differentiable(result, (grad, *saved))
        return (None, *result)
    if _differentiating_levels() > 1:
        # torch.func.grad of torch.func.grad (or jacrev of grad, ...): the
        # outer transform would differentiate our gradients, constants to it.
        raise RuntimeError(_DOUBLE_BACKWARD.decode())
    if getattr(ctx, "vmapped", None) is not None:  # grad inside vmap over the weights
        return (None, *_backward_vmapped(ctx, grad, saved))
    if _is_batched(grad):  # vmap over grad (per-sample gradients) or jacrev
        if any(map(_is_batched, saved)):  # pragma: no cover - setup_context took it
            raise RuntimeError(_NO_VMAP_OF_GRAD)
        return (None, *_backward_batched(ctx, grad, saved))
    # torch.func.grad always builds a graph, as create_graph=True does.
    with torch.no_grad(), _pyfunctorch.temporarily_clear_interpreter_stack():
        result = _backward(ctx, grad)
        _once_differentiable(result, (grad, *saved))
    return (None, *result)


def _setup_vmapped(ctx, entry: _Entry, tensors: Sequence[torch.Tensor], output) -> None:
    """``setup_context`` for torch.func.grad inside vmap over the chain's inputs.

    torch ran the vmap rule (without grad: it cannot see the grad level above)
    and hands this grad level the batched inputs and output. The chain runs
    again as a grad entry under ``jax.vmap``, for its residuals; unbatched
    differentiable inputs are expanded along the batch, so that each member of
    the batch gets its own gradient. One vmap level directly under the grad.
    """
    unwrapped = []
    for t in tensors:
        while _functorch.is_functorch_wrapped_tensor(t) and not _functorch.is_batchedtensor(t):
            t = _functorch.get_unwrapped(t)  # this grad level's own wrapper
        unwrapped.append(t)
    level = max(_functorch.maybe_get_level(t) for t in unwrapped)
    in_axes, inner = _peel_vmap_level(unwrapped, level)
    if level == -1 or any(map(_functorch.is_functorch_wrapped_tensor, inner)):
        raise RuntimeError(_NO_VMAP_OF_GRAD)  # more than one vmap level
    size = next(u.shape[a] for u, a in zip(inner, in_axes, strict=True) if a is not None)
    for i in entry.diff_pos:
        if in_axes[i] is None:
            inner[i] = inner[i].expand(size, *inner[i].shape).contiguous()
            in_axes[i] = 0
    grad, fwd = entry.vjp_res is not None, entry.lin_res is not None
    with torch.no_grad(), _pyfunctorch.temporarily_clear_interpreter_stack():
        batched = _batched_entry(entry, tuple(in_axes), inner, grad, fwd)
        _y, out, arrays = _run(batched, inner)
    _setup(ctx, batched, tensors, output, out, arrays)
    ctx.vmapped = (level, tuple(in_axes), size)


def _backward_vmapped(ctx, grad: torch.Tensor, saved) -> list[torch.Tensor | None]:
    """The backward of `_setup_vmapped`: the batched entry's VJP, its gradients
    batched again at the vmap level (one per member, shared inputs included)."""
    level, in_axes, size = ctx.vmapped
    t, bdim = grad, None
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            if bdim is not None or _functorch.maybe_get_level(t) != level:
                raise RuntimeError(_NO_VMAP_OF_GRAD)
            bdim = _functorch.maybe_get_bdim(t)
        t = _functorch.get_unwrapped(t)
    with torch.no_grad(), _pyfunctorch.temporarily_clear_interpreter_stack():
        # The batched entry's output has the batch first.
        t = t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)
        result = _backward(ctx, t)
        _once_differentiable(result, (grad, *saved))
    return [
        None if r is None else _functorch._add_batch_dim(r, in_axes[i], level)
        for i, r in enumerate(result)
    ]


def _backward_batched(ctx, grad: torch.Tensor, saved) -> list[torch.Tensor | None]:
    """The backward for a cotangent batched by torch.func.vmap, the weights not.

    Per-sample gradients (``vmap(grad(loss), in_dims=(None, 0, ...))``) and
    ``jacrev`` batch the cotangent only: one compiled ``jax.vmap`` of the VJP
    computes every sample's gradients, which go back to torch batched at the
    same levels.
    """
    levels: list[tuple[int, int]] = []  # (level, bdim) as peeled: the innermost vmap first
    t = grad
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            levels.append((_functorch.maybe_get_level(t), _functorch.maybe_get_bdim(t)))
        t = _functorch.get_unwrapped(t)
    with torch.no_grad(), _pyfunctorch.temporarily_clear_interpreter_stack():
        bwd = ctx.entry.batched_backward(tuple(b for _, b in levels), tuple(t.shape))
        result = _backward(ctx, t, bwd)
        _once_differentiable(result, (grad, *saved))
    for i, r in enumerate(result):
        if r is not None:
            for level, _ in reversed(levels):  # the outermost vmap (lowest level) first
                r = _functorch._add_batch_dim(r, 0, level)
            result[i] = r
    return result


def _jvp_entry(ctx, _entry: None, *tangents: torch.Tensor | None) -> torch.Tensor:
    """The Functions' ``jvp``: the compiled JVP on the forward's linearization.

    One tangent per input tensor (torch passes zeros, or ``None``, for inputs
    without one); the output's tangent comes back. Tangents batched by
    torch.func.vmap (``jacfwd``) run one compiled ``jax.vmap`` of the JVP.
    """
    entry: _Entry = ctx.entry
    transforms = _functorch.maybe_current_level() is not None
    if transforms and _differentiating_levels() > 1:
        # hessian (jacfwd of jacrev), jvp of grad, grad of jvp: the tangent
        # would need the backward's own derivative, or be a constant to the
        # other level.
        raise RuntimeError(_DOUBLE_BACKWARD.decode())
    ts: list[torch.Tensor] = []
    for k, i in enumerate(entry.diff_pos):
        t = tangents[i]
        if t is None:  # zeros in the shape the (possibly batched) entry takes
            like = _innermost(ctx.inputs[i])
            t = torch.zeros(entry.diff_specs[k].shape, dtype=like.dtype, device=like.device)
        ts.append(t)
    with torch.no_grad(), _pyfunctorch.temporarily_clear_interpreter_stack():
        if getattr(ctx, "vmapped", None) is not None:  # jvp inside vmap over the weights
            level, _in_axes, size = ctx.vmapped
            inner = []
            for k, t in enumerate(ts):
                (bdim,), (u,) = _peel_vmap_level([_unwrap_jvp(t)], level)
                if _functorch.is_functorch_wrapped_tensor(u):
                    raise RuntimeError(_NO_VMAP_OF_GRAD)
                if bdim is not None:
                    u = u.movedim(bdim, 0)
                elif u.shape != entry.diff_specs[k].shape:  # shared by every member
                    u = u.expand(size, *u.shape)
                inner.append(u)
            y_dot = _jvp_call(ctx, entry.forward_jvp(), inner)
            y_dot = _functorch._add_batch_dim(y_dot, 0, level)
        elif any(map(_is_batched, ts)):  # jacfwd: tangents batched by vmap
            levels: list[tuple[int, tuple[int | None, ...]]] = []
            ts = [_unwrap_jvp(t) for t in ts]
            while any(map(_functorch.is_functorch_wrapped_tensor, ts)):
                level = max(_functorch.maybe_get_level(t) for t in ts)
                in_axes, ts = _peel_vmap_level(ts, level)
                levels.append((level, tuple(in_axes)))
                ts = [_unwrap_jvp(t) for t in ts]
            y_dot = _batched_jvp_call(ctx, levels, ts)
            for level, _ in reversed(levels):  # the outermost vmap (lowest level) first
                y_dot = _functorch._add_batch_dim(y_dot, 0, level)
        elif not transforms and any(map(_functorch.is_legacy_batchedtensor, ts)):
            # gradcheck's check_batched_forward_grad
            levels, ts = _legacy_unbatch(ts)
            y_dot = _legacy_batch(_batched_jvp_call(ctx, levels, ts), levels)
        else:
            y_dot = _jvp_call(ctx, entry.forward_jvp(), [_innermost(t) for t in ts])
    if not transforms:
        # The tangent is a constant to torch autograd: differentiating it again
        # (reverse over forward) raises rather than dropping terms.
        deps = [t for t in tangents if t is not None] + [ctx.inputs[i] for i in entry.diff_pos]
        result: list[torch.Tensor | None] = [y_dot]
        _once_differentiable(result, deps)
        y_dot = result[0]  # type: ignore[assignment]
    return y_dot


def _legacy_unbatch(tensors: Sequence[torch.Tensor]):
    """Peels the levels of torch's legacy vmap (``torch._vmap_internals``, which
    ``gradcheck`` uses for ``check_batched_grad``) off ``tensors``.

    Returns the levels as peeled (the innermost first, with each tensor's batch
    dimension: 0, or ``None`` for a tensor that is not batched) and the plain
    tensors, their batch dimensions in front, the outermost level's first. A
    batched tensor must be batched at every active level (gradcheck's are).
    """
    top = torch._C._vmapmode_increment_nesting() - 1
    torch._C._vmapmode_decrement_nesting()
    levels: list[tuple[int, tuple[int | None, ...]]] = []
    out = list(tensors)
    batched = [_functorch.is_legacy_batchedtensor(t) for t in out]
    for level in range(top, 0, -1):
        for i, t in enumerate(out):
            if batched[i]:
                try:
                    out[i] = torch._remove_batch_dim(t, level, -1, 0)
                except RuntimeError as e:
                    raise RuntimeError(_NO_LEGACY_VMAP) from e
        levels.append((level, tuple(0 if b else None for b in batched)))
    if any(map(_functorch.is_legacy_batchedtensor, out)):
        raise RuntimeError(_NO_LEGACY_VMAP)
    return levels, out


def _legacy_batch(t: torch.Tensor, levels) -> torch.Tensor:
    """`_legacy_unbatch`'s reverse for a result with the batch dimensions in front."""
    for level, _ in reversed(levels):  # the outermost level first
        t = torch._add_batch_dim(t, 0, level)
    return t


def _unwrap_jvp(t: torch.Tensor) -> torch.Tensor:
    """``t`` without the wrappers of the (one) differentiating level above it."""
    while _functorch.is_functorch_wrapped_tensor(t) and not _functorch.is_batchedtensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def _batched_jvp_call(ctx, levels, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
    """`_jvp_call` with the entry's JVP under one ``jax.vmap`` per peeled vmap
    level (``levels``: ``(level, batch dimension of each tangent)``, the
    innermost first); the batch dimensions come out in front."""
    jvp = ctx.entry.batched_forward_jvp(
        tuple(a for _, a in levels), tuple(tuple(t.shape) for t in tangents)
    )
    return _jvp_call(ctx, jvp, tangents)


def _jvp_call(ctx, jvp: Any, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
    """Runs a compiled JVP on the forward's linearization and ``tangents``."""
    entry: _Entry = ctx.entry
    arrays = [_import(t, entry.jdev) for t in tangents]
    _keep(entry.jdev, arrays)
    with _x64_ctx(entry.x64):
        out = jvp(ctx.lin_residuals, ctx.lin_views, *arrays)
    y_dot = _export(out, entry.cpu)
    if y_dot.numel() and any(y_dot.data_ptr() == t.data_ptr() for t in tangents):
        y_dot = y_dot.clone()  # never hand torch memory that aliases an input
    return y_dot


class _JaxFunction(torch.autograd.Function):
    """The autograd node of a JAX chain (outside torch.func's transforms)."""

    @staticmethod
    def forward(ctx, entry: _Entry, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y, out, arrays = _run(entry, tensors)
        _setup(ctx, entry, tensors, y, out, arrays, hooks=True)
        return y

    backward = staticmethod(_backward_entry)
    jvp = staticmethod(_jvp_entry)


#: The forward's raw outputs, for ``setup_context``: called right after
#: ``forward`` on the same thread, and once more per transform level, with the
#: output wrapped.
_last_run = threading.local()


class _JaxFunctionInTransforms(torch.autograd.Function):
    """`_JaxFunction` in the form torch.func's transforms require (``forward``
    apart from ``setup_context``). Used only inside a transform: torch binds
    the arguments of such a Function with ``inspect.signature`` on every call
    (~20 us)."""

    @staticmethod
    def forward(entry: _Entry, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y, out, arrays = _run(entry, tensors)
        _last_run.value = (y, out, arrays)
        return y

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        entry, *tensors = inputs
        run = getattr(_last_run, "value", None)
        if run is None or _innermost(output) is not run[0]:
            # torch ran the vmap rule below this grad level, not the forward:
            # torch.func.grad inside vmap over a batch of weights.
            _setup_vmapped(ctx, entry, tensors, output)
            return
        y, out, arrays = run
        _setup(ctx, entry, tensors, output, out, arrays)

    @staticmethod
    def vmap(info, in_dims, entry, *tensors):  # type: ignore[override]
        # torch.func.vmap over some of the chain's inputs (a stack of weights):
        # the same chain under jax.vmap, called on the tensors one level down
        # (torch calls this once per vmap level, and autograd records the call).
        # Under torch.func.jvp, the grad or jvp level above re-runs the chain
        # with its linearization in `setup_context` (`_setup_vmapped`).
        grad = _needs_grad(tensors)
        batched = _batched_entry(entry, tuple(in_dims[1:]), tensors, grad)
        return _call(batched, tensors, grad, torch._C._are_functorch_transforms_active()), 0

    backward = staticmethod(_backward_entry)
    jvp = staticmethod(_jvp_entry)


class _CotangentLinear(torch.autograd.Function):
    """Our gradients ``J^T u`` as a function of the cotangent ``u`` alone.

    Differentiating them with respect to ``u`` along ``w`` gives ``J w``: first
    order, what ``torch.autograd.functional.jvp`` asks for (the double-vjp
    trick). The backward runs the chain's JVP at the forward's inputs.
    """

    @staticmethod
    def forward(ctx, bridge_ctx, out_idx, grad, *results):  # type: ignore[override]
        ctx.bridge, ctx.out_idx = bridge_ctx, out_idx
        return tuple(r.view_as(r) for r in results)

    @staticmethod
    def backward(ctx, *ws):  # type: ignore[override]
        bridge = ctx.bridge
        entry: _Entry = bridge.entry
        tangents = []
        for i, spec in zip(entry.diff_pos, entry.diff_specs, strict=True):
            w = ws[ctx.out_idx.index(i)] if i in ctx.out_idx else None
            like = bridge.inputs[i]
            if w is None:
                w = torch.zeros(spec.shape, dtype=like.dtype, device=like.device)
            tangents.append(_import(w, entry.jdev))
        with torch.no_grad(), _x64_ctx(entry.x64):
            y_dot = entry.input_jvp()(bridge.arrays, tangents)
        return (None, None, _export(y_dot, entry.cpu), *([None] * len(ws)))


def _linear_in_cotangent(ctx, result: list[torch.Tensor | None], grad, saved) -> bool:
    """With ``create_graph=True``, makes ``result`` differentiable in the
    cotangent ``grad`` (exactly, `_CotangentLinear`), while differentiating it
    toward the saved inputs (second order) raises, in place. ``False`` where
    that cannot be done: a complex chain (left to `_once_differentiable`), one
    that updated its buffers in place (its inputs are gone), or a cotangent
    that does not require grad."""
    entry: _Entry = ctx.entry
    if not grad.requires_grad or entry.conj or entry.mutated:
        return False
    out_idx = tuple(i for i, r in enumerate(result) if r is not None)
    if not out_idx:
        return False
    with torch.enable_grad():
        outs = list(_CotangentLinear.apply(ctx, out_idx, grad, *(result[i] for i in out_idx)))
        deps = [s for s in saved if s.requires_grad]
        if deps:
            # A zero that depends on the saved inputs through a node whose backward
            # raises: an empty slice, so no inf or NaN in them can leak into it.
            aliases = _DelayedError(_DOUBLE_BACKWARD, len(deps))(*deps)
            zero = sum(a.reshape(-1)[:0].sum() for a in aliases)
            outs = [o + (zero.real if zero.is_complex() else zero) for o in outs]
    for i, o in zip(out_idx, outs, strict=True):
        result[i] = o
    return True


def _once_differentiable(result: list[torch.Tensor | None], inputs: Sequence[torch.Tensor]) -> None:
    """Makes differentiating the gradients in ``result`` again raise, in place.

    Our gradients are constants to torch: differentiating them again
    (``create_graph=True`` and a second backward, or torch autograd around
    ``torch.func.grad``) would silently drop the second-order terms. As with
    torch's ``once_differentiable``, they come back through a node whose backward
    raises, here with the tensors they depend on (``inputs``: the cotangent and
    the saved tensors) as its inputs too, so that any path back to those reaches
    it.
    """
    deps = [u for u in map(_innermost, inputs) if u.requires_grad]
    out = [i for i, r in enumerate(result) if r is not None]
    if not deps or not out:
        return
    with torch.enable_grad():
        aliases = _DelayedError(_DOUBLE_BACKWARD, len(out) + len(deps))(
            *(result[i] for i in out), *deps
        )
    for i, a in zip(out, aliases, strict=False):
        result[i] = a


_DOUBLE_BACKWARD = (
    b"JAX parametrizations do not support double backward or other second derivatives "
    b"through them (a gradient differentiated again, with `create_graph=True` or nested "
    b"torch.func transforms; hessian; jvp of grad or grad of jvp; a backward inside "
    b"forward_ad.dual_level whose inputs carry tangents; torch.autograd.functional.jvp "
    b"through a complex chain or one that updates its buffers, such as spectral norm in "
    b"training mode: use torch.func.jvp): the bridge's derivatives are first order. "
    b"Write the parametrization as a torch module for higher-order derivatives."
)


_NO_FORWARD_MODE = (
    "Trying to use forward AD with {name} that does not support it: JAX cannot push a "
    "tangent through it ({error}). A `jax.custom_vjp` has no forward mode; give the "
    "function a `jax.custom_jvp` instead (JAX derives reverse mode from it), or use "
    "reverse mode (backward, torch.func.grad, vjp, jacrev)."
)

_TRACING_MODES = (
    torch._C._TorchDispatchModeKey.PROXY,
    torch._C._TorchDispatchModeKey.FAKE,
    torch._C._TorchDispatchModeKey.FUNCTIONAL,
)

_NO_GRAPH_TRACING = (
    "JAX parametrizations cannot be traced into a torch graph (make_fx, which "
    "torch.func.linearize uses, or torch.export): the JAX call is opaque to torch, "
    "and its result would be recorded as a constant. Use torch.func.jvp (or vmap over "
    "jvp) instead of linearize; torch.compile works, with a graph break at the "
    "parametrization."
)

_NO_LEGACY_VMAP = (
    "torch's legacy vmap (torch._vmap_internals.vmap) reaches JAX parametrizations "
    "only through a batched cotangent or tangent, as gradcheck's check_batched_grad "
    "and check_batched_forward_grad do. Use torch.func.vmap."
)

_NO_VMAP_OF_GRAD = (
    "torch.func.grad inside torch.func.vmap over a batch of weights works through JAX "
    "parametrizations with one vmap level directly around the grad; here there are "
    "more (nested vmaps, or jacrev, which vmaps the backward). For gradients, "
    "differentiate the vmapped loss: `grad(lambda p: vmap(loss)(p, ...).sum())"
    "(stacked_params)` gives every member its own gradient; for a Jacobian per "
    "member, loop over the members."
)

_NO_VMAP_BUFFERS = (
    "torch.func.vmap over the inputs of {name}: it updates its buffers "
    "(spectral_norm's power iteration in training mode), and one buffer cannot take "
    "a batch of updates. Call `module.eval()` first (torch's own spectral_norm "
    "cannot be vmapped in training mode either)."
)


def _jvp_level_active() -> bool:
    """Whether torch.func.jvp (or jacfwd, hessian) is among the active transforms."""
    return _functorch.maybe_current_level() is not None and any(
        i.key() == _functorch.TransformType.Jvp for i in _functorch.get_interpreter_stack()
    )


def _any_dual(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a plain tensor carries a tangent of torch.autograd.forward_ad."""
    return _fwad._current_level >= 0 and any(
        not _functorch.is_functorch_wrapped_tensor(t) and _fwad.unpack_dual(t).tangent is not None
        for t in tensors
    )


def _has_tangents(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether an input may carry a forward-mode tangent (the forward must then
    keep its linearization for `_jvp_entry`): under torch.func.jvp, a wrapped
    input may carry one at the Jvp level."""
    if _jvp_level_active() and any(map(_functorch.is_functorch_wrapped_tensor, tensors)):
        return True
    return _any_dual(tensors)


def _forward_over_reverse(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a backward runs inside forward mode (``hessian``, that is jacfwd
    of jacrev, jvp of grad, or a dual tensor reaching ``autograd.grad``)."""
    return _jvp_level_active() or _any_dual(tensors)


def _differentiating_levels() -> int:
    """How many of torch.func's active transforms differentiate (grad, vjp, jvp, ...)."""
    if _functorch.maybe_current_level() is None:
        return 0
    return sum(
        i.key() in (_functorch.TransformType.Grad, _functorch.TransformType.Jvp)
        for i in _functorch.get_interpreter_stack()
    )


def _backward(ctx, grad: torch.Tensor, bwd: Any = None) -> list[torch.Tensor | None]:
    """The compiled VJP (``bwd``, by default the entry's) on the forward's
    residuals: one gradient per input tensor."""
    entry: _Entry = ctx.entry
    ct = _import(grad, entry.jdev)  # made dense and contiguous there
    if bwd is None:
        bwd = entry.backward()
    inputs = ctx.saved_views
    _keep(entry.jdev, (ct, inputs))
    with _x64_ctx(entry.x64):
        grads = bwd(ctx.residuals, inputs, ct)
    needs = ctx.needs_input_grad
    result: list[torch.Tensor | None] = [None] * (len(needs) - 1)
    cpu = entry.cpu
    for i, g in zip(entry.diff_pos, grads, strict=True):
        if needs[i + 1]:
            result[i] = _export(g, cpu)
    return result


@torch.compiler.disable  # opaque to dynamo: a clean graph break, JAX runs eagerly
def run_chain(links: Sequence[_JaxLink], xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Runs consecutive JAX links as one compiled computation.

    Args:
        links: JAX adapters, applied in order; the first gets all of ``xs``.
        xs: the input tensors.

    Returns:
        The output tensor, connected to torch's autograd graph when an input
        (an ``x`` or a link parameter) requires grad.

    Raises:
        TypeError: for a non-tensor input, an unsupported dtype, or a JAX
            function that does not return a ``jax.Array``.
        ValueError: for a tensor on a device JAX does not see.
    """
    tensors: list[torch.Tensor] = []
    for x in xs:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"A JAX parametrization expects torch tensors. Got {type(x).__name__}.")
        tensors.append(x if x.is_contiguous() else x.contiguous())
    for link in links:
        params, bufs = link._jax_state()
        tensors.extend(params)
        tensors.extend(bufs)
    if any(map(_functorch.is_legacy_batchedtensor, tensors)):
        raise RuntimeError(_NO_LEGACY_VMAP)
    if any(torch._C._get_dispatch_mode(k) is not None for k in _TRACING_MODES):
        # make_fx would bake the JAX call's result into its graph as a constant;
        # fake tensors (torch.export) have no data for JAX to read.
        raise RuntimeError(_NO_GRAPH_TRACING)
    transforms = torch._C._are_functorch_transforms_active()
    if not transforms and _all_meta(tensors):
        return _run_meta(links, tensors)
    fwd = (transforms or _fwad._current_level >= 0) and _has_tangents(tensors)
    grad = _needs_grad(tensors)
    return _call(_get_entry(links, tensors, grad, fwd), tensors, grad, transforms)


def _peel_vmap_level(tensors: Sequence[torch.Tensor], level: int):
    """The batch dimension of each tensor at vmap ``level`` (``None`` where it is
    not batched there) and the tensors under that level's wrappers."""
    in_axes: list[int | None] = []
    inner: list[torch.Tensor] = []
    for t in tensors:
        if _functorch.is_batchedtensor(t) and _functorch.maybe_get_level(t) == level:
            in_axes.append(_functorch.maybe_get_bdim(t))
            inner.append(_functorch.get_unwrapped(t))
        else:
            in_axes.append(None)
            inner.append(t)
    return in_axes, inner


def _run_vmapped(entry: _Entry, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Runs ``entry`` without grad on tensors batched by torch.func.vmap.

    What ``_JaxFunctionInTransforms``'s vmap rule does, without torch's
    Function machinery (about 100 us a call): each vmap level, from the top,
    becomes a ``jax.vmap`` of the chain, and the output is batched again at the
    same levels. ``None`` when a tensor is wrapped by another transform (grad),
    or one under the wrappers requires grad (``.backward()`` around ``vmap``):
    then the Function goes through torch's levels.
    """
    level = max(_functorch.maybe_get_level(t) for t in tensors)
    in_axes, inner = _peel_vmap_level(tensors, level)
    if any(_functorch.maybe_get_level(t) == level for t in inner):
        return None  # a wrapper of another transform at the top level
    if not any(map(_functorch.is_functorch_wrapped_tensor, inner)) and _needs_grad(inner):
        return None  # torch autograd around vmap: the Function records the call
    batched = _batched_entry(entry, tuple(in_axes), inner, False)
    if any(map(_functorch.is_functorch_wrapped_tensor, inner)):
        y = _run_vmapped(batched, inner)
        if y is None:
            return None
    else:
        with _pyfunctorch.temporarily_clear_interpreter_stack():
            y = _run(batched, inner)[0]
    return _functorch._add_batch_dim(y, 0, level)


def _needs_grad(tensors: Sequence[torch.Tensor]) -> bool:
    # An inference tensor (made under `torch.inference_mode`) does not take part
    # in autograd: torch's weight norm and orthogonal of one give a result that
    # does not require grad. (Mixed with a tensor that does, saving it raises
    # torch's own error.)
    return torch.is_grad_enabled() and any(
        t.requires_grad and not t.is_inference() for t in tensors
    )


def _call(entry: _Entry, tensors: Sequence[torch.Tensor], grad: bool, transforms: bool):
    """Runs ``entry`` on ``tensors``, with autograd when ``grad`` (`_needs_grad`)
    or forward-mode tangents (the entry keeps its linearization), inside
    torch.func's transforms (``transforms``) or not."""
    autograd = grad or entry.lin_res is not None
    if not transforms:
        return _JaxFunction.apply(entry, *tensors) if autograd else _run(entry, tensors)[0]
    batched = any(map(_is_batched, tensors))
    if batched and not autograd:
        y = _run_vmapped(entry, tensors)
        if y is not None:
            return y
    if autograd or batched:
        # torch.func's levels: the vmap rule and the forward are torch's to call.
        try:
            return _JaxFunctionInTransforms.apply(entry, *tensors)
        finally:
            _last_run.value = None  # every setup_context has run
    # Under torch.func.grad, a tensor that is not differentiated (a buffer) is a
    # wrapper: the JAX call reads the tensor underneath.
    with _pyfunctorch.temporarily_clear_interpreter_stack():
        return _run(entry, [_innermost(t) for t in tensors])[0]


_call_entries: dict[Any, Any] = {}


def call_jax(fn: Callable[..., Any], *tensors: torch.Tensor, what: str, key: Any = None) -> Any:
    """Runs a JAX function on tensors without grad; returns tensors in the same pytree.

    Raises:
        TypeError: if an output leaf is not an array.
    """
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what} expects torch tensors. Got {type(t).__name__}.")
        _check_dtype(t.dtype)
    tensors = tuple(t.detach() if t.is_contiguous() else t.detach().contiguous() for t in tensors)
    avals = tuple((t.shape, t.dtype, t.device) for t in tensors)
    ck = (key if key is not None else fn, avals)
    hit = _call_entries.get(ck)
    if hit is None:
        x64 = any(t.dtype in _X64 for t in tensors)

        same: dict[int, int] = {}

        def checked(*arrays):
            out = fn(*arrays)
            if not isinstance(out, (list, tuple)):
                _check_out(out, what)
            else:
                for j, o in enumerate(out):
                    _check_out(o, what)
                    # the same array returned twice (trace time, by identity)
                    i = next(i for i, p in enumerate(out) if p is o)
                    if i != j:
                        same[j] = i
            return out

        if _all_meta(tensors):  # shapes only, see `_run_meta`
            out = _eval_shape(checked, tensors)
            if not isinstance(out, (list, tuple)):
                return _meta_like(out)
            result = [_meta_like(a) for a in out]
            for j, i in same.items():
                result[j] = result[i]
            return type(out)(result)
        specs = [jax.ShapeDtypeStruct(tuple(t.shape), _jax_dtype(t.dtype)) for t in tensors]
        with _x64_ctx(x64):
            compiled = jax.jit(checked).trace(*specs).lower().compile()
        _check_compiled(compiled, what)
        hit = (x64, compiled, same)
        _remember(_call_entries, ck, hit)
    x64, compiled, same = hit
    arrays = [_import(t) for t in tensors]
    _keep(None, arrays)
    with torch.no_grad(), _x64_ctx(x64):
        out = compiled(*arrays)
    ptrs = {t.data_ptr() for t in tensors}

    def back(a):
        r = _export(a)
        return r.clone() if r.data_ptr() in ptrs and r.numel() else r

    if isinstance(out, (list, tuple)):
        # An array the function returned twice is one tensor returned twice, as a
        # torch function returning the same tensor twice (torch's originals made
        # from it then share memory).
        result = [back(a) for a in out]
        for j, i in same.items():
            result[j] = result[i]
        return type(out)(result)
    return back(out)
