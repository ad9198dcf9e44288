"""Checkpoints across frameworks: torch ``state_dict`` <-> parametrized Flax NNX models.

In plain words:

- The **NNX model drives**. Walking it gives, for every Variable that torch would
  store (``nnx.Param``, ``nnx.BatchStat`` and their subclasses, plus every Variable
  of a parametrization), one entry: the torch key, the shape torch stores, and the
  two layout functions. A torch key is the module's torch prefix, then torch's
  name for the Variable (``kernel`` -> ``weight``, ``scale`` -> ``weight``, ...), or
  for a parametrized one ``parametrizations.<name>.original`` / ``original<i>`` /
  ``<link>.<variable>`` exactly as torch's ``parametrize`` writes them.
- **Torch prefixes** mirror the NNX path (``blocks/0/conv`` -> ``blocks.0.conv``;
  the ``layers`` list of an ``nnx.Sequential`` is transparent, as torch's
  ``Sequential`` holds its children at ``0``, ``1``, ...). A ``mapping`` of torch
  prefix -> NNX path renames subtrees where the names differ; the longest mapped
  NNX prefix wins and the rest of the path mirrors.
- **Layouts** are ``flax = flip(transpose(torch, perm), flip_axes)``, one per layer
  kind (table in ``docs/interop.md``). An array tied to a weight (weight norm's
  ``g``, which keeps size 1 on the normalized axes) has the weight's rank and takes
  the same layout; spectral norm's ``_v`` (the weight flattened with the output
  axis removed) is unflattened, laid out and flattened again; ``_u`` and 0-d
  arrays are unchanged.
- **Loading is a transaction**: every key is converted and checked first; any
  missing, unexpected or wrongly shaped key raises ONE ``ValueError`` listing all
  of them, and only when there is none are the Variables written.

Nothing here imports torch: a state dict is any mapping of array-likes (numpy
arrays, or torch tensors, read through ``.detach().cpu().numpy()``), and the
export is a dict of numpy arrays (or whatever ``to_tensor`` makes of them).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxparam.parametrizations import SpectralNorm, WeightNorm
from jaxparam.parametrize import ParametrizationList, is_parametrized

__all__ = [
    "IncompatibleKeys",
    "from_torch_state_dict",
    "load_torch_state_dict",
    "restore",
    "save",
    "to_torch_state_dict",
    "torch_conv_transpose_padding",
    "torch_state_dict_shapes",
]

# ---------------------------------------------------------------------------
# Private helpers: layouts
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """``flax = flip(transpose(torch, perm), flip)``: flax axis ``j`` is torch axis ``perm[j]``."""

    perm: tuple[int, ...] | None = None  # None: identity
    flip: tuple[int, ...] = ()  # flax axes reversed after the transpose

    def applies(self, ndim: int) -> bool:
        return self.perm is not None and ndim == len(self.perm)

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        if not self.applies(x.ndim):
            return x
        y = np.transpose(x, self.perm)
        return np.flip(y, self.flip) if self.flip else y

    def to_torch(self, y: np.ndarray) -> np.ndarray:
        if not self.applies(y.ndim):
            return y
        if self.flip:
            y = np.flip(y, self.flip)
        return np.transpose(y, np.argsort(self.perm))

    def torch_shape(self, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
        if not self.applies(len(flax_shape)):
            return tuple(flax_shape)
        inverse = np.argsort(self.perm)
        return tuple(int(flax_shape[i]) for i in inverse)


_IDENTITY = _Layout()


def _kernel_layout(module: nnx.Module, ndim: int) -> _Layout:
    """The layout of a layer's main weight (``kernel``), from the layer's kind."""
    spatial = tuple(range(2, ndim))
    if isinstance(module, nnx.ConvTranspose):
        if getattr(module, "transpose_kernel", False):
            # flax (*k, out, in) is torch's (in, out, *k) reversed: no flip needed
            return _Layout(spatial + (1, 0))
        # flax (*k, in, out) computes torch's output with the kernel flipped in space
        return _Layout(spatial + (0, 1), tuple(range(ndim - 2)))
    if isinstance(module, (nnx.Conv, nnx.Linear)) and ndim >= 2:
        return _Layout(spatial + (1, 0))
    return _IDENTITY


# flax attribute -> torch attribute, per layer kind (anything else keeps its name)
_NORMS = (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)
_BATCH_NORM_NAMES = {"scale": "weight", "mean": "running_mean", "var": "running_var"}


def _torch_name(module: nnx.Module, name: str) -> str:
    if isinstance(module, (nnx.Linear, nnx.Conv, nnx.ConvTranspose)) and name == "kernel":
        return "weight"
    if isinstance(module, nnx.Embed) and name == "embedding":
        return "weight"
    if isinstance(module, _NORMS) and name == "scale":
        return "weight"
    if isinstance(module, nnx.BatchNorm):
        return _BATCH_NORM_NAMES.get(name, name)
    return name


def _layout_of(module: nnx.Module, name: str, ndim: int) -> _Layout:
    if name == "kernel":
        return _kernel_layout(module, ndim)
    return _IDENTITY


# Variables torch never stores in a state dict.
_SKIPPED = tuple(
    getattr(nnx, n)
    for n in ("RngState", "Intermediate", "Cache", "Perturbation")
    if hasattr(nnx, n)
)


def _stored(var: Any) -> bool:
    return isinstance(var, nnx.Variable) and not isinstance(var, _SKIPPED)


# ---------------------------------------------------------------------------
# Private helpers: the plan (one entry per torch key)
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Entry:
    """One torch key and the NNX Variable it fills."""

    key: str
    variable: nnx.Variable | None  # None: a torch-only key (num_batches_tracked)
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    legacy_key: str | None = None  # torch.nn.utils.weight_norm's weight_g / weight_v


def _spectral_v(layout: _Layout, flax_shape: tuple[int, ...], flax_dim: int):
    """Layout functions for spectral norm's ``_v``: the weight flattened without ``dim``."""
    if not layout.applies(len(flax_shape)):
        return (lambda x: x), (lambda y: y)
    torch_shape = layout.torch_shape(flax_shape)
    torch_dim = layout.perm[flax_dim]
    torch_rest = torch_shape[:torch_dim] + torch_shape[torch_dim + 1 :]
    flax_kept = flax_shape[:flax_dim] + (1,) + flax_shape[flax_dim + 1 :]

    def to_flax(v: np.ndarray) -> np.ndarray:
        x = np.expand_dims(v.reshape(torch_rest), torch_dim)
        return layout.to_flax(x).reshape(-1)

    def to_torch(v: np.ndarray) -> np.ndarray:
        return layout.to_torch(v.reshape(flax_kept)).reshape(-1)

    return to_flax, to_torch


def _shape(var: nnx.Variable) -> tuple[int, ...]:
    return tuple(int(s) for s in np.shape(var.get_raw_value()))


def _plain_entry(key: str, var: nnx.Variable, layout: _Layout) -> _Entry:
    return _Entry(key, var, layout.torch_shape(_shape(var)), layout.to_flax, layout.to_torch)


def _parametrized_entries(
    prefix: str, module: nnx.Module, name: str, plist: ParametrizationList
) -> list[_Entry]:
    tname = _torch_name(module, name)
    base = f"{prefix}parametrizations.{tname}."
    # the parametrized tensor's shape decides the layout of every tied array
    weight_shape = tuple(int(s) for s in plist.originals()[-1].get_raw_value().shape)
    layout = _layout_of(module, name, len(weight_shape))
    legacy = len(plist) == 1 and isinstance(plist[0], WeightNorm) and plist.ntensors == 2
    entries = []
    if plist.is_tensor:
        entries.append(_plain_entry(base + "original", plist.original, layout))
    else:
        for i, var in enumerate(plist.originals()):
            entry = _plain_entry(f"{base}original{i}", var, layout)
            if legacy:
                entry.legacy_key = f"{prefix}{tname}_{'gv'[i]}"
            entries.append(entry)
    for i, link in enumerate(plist):
        if not isinstance(link, nnx.Module):
            continue
        for path, var in nnx.iter_graph(link):
            if not _stored(var):
                continue
            key = f"{base}{i}." + ".".join(str(p) for p in path)
            if isinstance(link, SpectralNorm) and path == ("_v",):
                to_flax, to_torch = _spectral_v(layout, weight_shape, link.dim)
                entries.append(_Entry(key, var, _shape(var), to_flax, to_torch))
            else:  # _u, orthogonal's base (kept in torch's frame), custom links' state
                entries.append(_plain_entry(key, var, _IDENTITY))
    return entries


def _norm_path(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.replace(".", "/").split("/") if p)


def _plan(model: nnx.Module, mapping: Mapping[str, str] | None) -> list[_Entry]:
    nodes = {tuple(path): node for path, node in nnx.iter_graph(model)}
    str_nodes = {tuple(str(p) for p in path): path for path in nodes}

    # torch prefix -> NNX path, inverted and checked
    renames: dict[tuple[str, ...], str] = {}
    if mapping:
        unknown = []
        for torch_prefix, nnx_path in mapping.items():
            key = _norm_path(nnx_path)
            if key not in str_nodes or not isinstance(nodes[str_nodes[key]], nnx.Module):
                unknown.append(f'"{nnx_path}" (for torch prefix "{torch_prefix}")')
            elif key in renames:
                unknown.append(f'"{nnx_path}" (mapped twice)')
            renames[key] = torch_prefix.strip(".")
        if unknown:
            raise ValueError(
                "Error(s) in the module mapping:\n\tNNX path(s) that are not modules of the "
                f"model: {', '.join(unknown)}.\n"
                "fix: map each torch prefix to an NNX path such as 'layers/0' "
                "(see nnx.iter_graph(model) for the paths)."
            )

    def auto(path: tuple[Any, ...], start: int) -> list[str]:
        parts = []
        for i in range(start, len(path)):
            if path[i] == "layers" and isinstance(nodes.get(path[:i]), nnx.Sequential):
                continue
            parts.append(str(path[i]))
        return parts

    def torch_prefix(path: tuple[Any, ...]) -> str:
        spath = tuple(str(p) for p in path)
        for n in range(len(spath), -1, -1):
            if spath[:n] in renames:
                parts = [renames[spath[:n]]] if renames[spath[:n]] else []
                parts += auto(path, n)
                break
        else:
            parts = auto(path, 0)
        return "".join(p + "." for p in parts)

    # the Variables of parametrizations are reached through their module
    skip: set[int] = set()
    for node in nodes.values():
        if isinstance(node, nnx.Module) and is_parametrized(node):
            skip.update(id(n) for _, n in nnx.iter_graph(vars(node)["parametrizations"]))

    entries: list[_Entry] = []
    for path, module in nodes.items():
        if not isinstance(module, nnx.Module) or id(module) in skip:
            continue
        prefix = torch_prefix(path)
        for name, var in vars(module).items():
            if _stored(var) and id(var) not in skip:
                key = prefix + _torch_name(module, name)
                entries.append(_plain_entry(key, var, _layout_of(module, name, len(_shape(var)))))
        if is_parametrized(module):
            for name, plist in vars(module)["parametrizations"].items():
                entries.extend(_parametrized_entries(prefix, module, name, plist))
        if isinstance(module, nnx.BatchNorm):
            entries.append(
                _Entry(prefix + "num_batches_tracked", None, (), lambda x: x, lambda x: x)
            )
    counts = collections.Counter(e.key for e in entries)
    clashes = sorted(k for k, n in counts.items() if n > 1)
    if clashes:
        raise ValueError(
            "Error(s) in the module mapping:\n\tseveral NNX Variables map to the torch "
            f"key(s): {', '.join(f'{k!r}' for k in clashes)}.\n"
            "fix: give each NNX module its own torch prefix in `mapping`."
        )
    return entries


# ---------------------------------------------------------------------------
# Private helpers: arrays
# ---------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a numpy/jax array or a torch tensor (duck-typed)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if hasattr(x, "resolve_conj"):  # torch's lazy views: numpy() refuses them
            x = x.resolve_conj().resolve_neg()
        try:
            return x.numpy()
        except TypeError:  # torch.bfloat16 has no numpy dtype
            return x.float().numpy()
    return np.asarray(x)


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


class IncompatibleKeys(NamedTuple):
    """Keys skipped by a non-strict load, as torch's ``_IncompatibleKeys``."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def torch_state_dict_shapes(
    model: nnx.Module,
    *,
    mapping: Mapping[str, str] | None = None,
    legacy_weight_norm: bool = False,
) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of the torch ``state_dict`` equivalent to ``model``.

    Shapes are in torch's layout. Use it to check a ``mapping`` before converting.

    Args:
      model: the NNX model (concrete, or abstract from ``nnx.eval_shape``).
      mapping: torch prefix -> NNX path renames (see `from_torch_state_dict`).
      legacy_weight_norm: name weight norm's originals ``<name>_g`` / ``<name>_v``
        (``torch.nn.utils.weight_norm``) instead of ``parametrizations.<name>.original0/1``.

    Returns:
      ``{torch key: torch shape}``.

    Raises:
      ValueError: an NNX path of ``mapping`` is not a module of the model.

    Example:
      >>> from flax import nnx
      >>> from jaxparam.interop import torch_state_dict_shapes
      >>> from jaxparam.parametrizations import weight_norm
      >>> model = nnx.Sequential(weight_norm(nnx.Linear(3, 4, rngs=nnx.Rngs(0))))
      >>> for key, shape in torch_state_dict_shapes(model).items():
      ...     print(key, shape)
      0.bias (4,)
      0.parametrizations.weight.original0 (4, 1)
      0.parametrizations.weight.original1 (4, 3)
    """
    return {
        (e.legacy_key if legacy_weight_norm and e.legacy_key else e.key): e.torch_shape
        for e in _plan(model, mapping)
    }


def from_torch_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    mapping: Mapping[str, str] | None = None,
    strict: bool = True,
) -> nnx.State:
    """Convert a torch ``state_dict`` to the state of ``model``, without touching it.

    ``model`` is the NNX port of the torch model, parametrized as the torch model
    is (``jaxparam.parametrizations.weight_norm`` for torch's ``weight_norm``, with
    the ``dim`` mapped to the Flax axis, ...). It may be abstract (``nnx.eval_shape``):
    only its structure, shapes and dtypes are read. Torch tensors are accepted
    as they are (read through ``.detach().cpu().numpy()``; torch is never imported).

    Keys: torch module prefixes mirror the NNX paths (``blocks/0`` <-> ``blocks.0``;
    an ``nnx.Sequential``'s ``layers`` list is transparent). ``mapping`` renames
    subtrees, torch prefix -> NNX path, e.g. ``{"net": "layers", "head.proj": "out"}``
    (the longest mapped NNX path wins; the rest of the path mirrors). Weight norm's
    originals are read from ``parametrizations.<name>.original0/1`` or from the
    old ``<name>_g`` / ``<name>_v`` keys of ``torch.nn.utils.weight_norm``.
    Values are cast to the dtypes of the model's Variables.

    Args:
      model: the parametrized NNX model.
      state_dict: torch key -> tensor or array.
      mapping: torch prefix -> NNX path ('/'- or '.'-separated) renames.
      strict: as torch's: when False, missing and unexpected keys are allowed (the
        Variables keep their values); wrongly shaped keys still raise.

    Returns:
      An ``nnx.State`` holding the converted Variables (same types and paths as
      ``nnx.state(model)``); ``nnx.update(model, state)`` loads it.

    Raises:
      ValueError: one error for all bad keys: every missing key with its expected
        shape, every unexpected key, every shape mismatch (torch's message
        format); or an NNX path of ``mapping`` that is not a module.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from jaxparam.interop import from_torch_state_dict
      >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> sd = {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)}
      >>> state = from_torch_state_dict(layer, sd)
      >>> state["kernel"].shape
      (3, 2)
    """
    state, _ = _convert(model, state_dict, mapping, strict)
    return state


def load_torch_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    mapping: Mapping[str, str] | None = None,
    strict: bool = True,
) -> IncompatibleKeys:
    """Load a torch ``state_dict`` into ``model``, as torch's ``load_state_dict``.

    Converts with `from_torch_state_dict` (keys, layouts and ``mapping`` as there),
    then writes the Variables. If it raises, ``model`` is untouched.

    Args:
      model: the parametrized NNX model (updated in place).
      state_dict: torch key -> tensor or array.
      mapping: torch prefix -> NNX path renames.
      strict: when False, missing and unexpected keys are skipped and returned.

    Returns:
      The missing and unexpected keys (empty when ``strict``).

    Raises:
      ValueError: as `from_torch_state_dict`; one error naming every bad key.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from jaxparam.interop import load_torch_state_dict
      >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> sd = {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)}
      >>> load_torch_state_dict(layer, sd)
      IncompatibleKeys(missing_keys=[], unexpected_keys=[])
      >>> layer.kernel.shape
      (3, 2)
    """
    state, incompatible = _convert(model, state_dict, mapping, strict)
    nnx.update(model, state)
    return incompatible


def _convert(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    mapping: Mapping[str, str] | None,
    strict: bool,
) -> tuple[nnx.State, IncompatibleKeys]:
    entries = _plan(model, mapping)
    paths = {id(var): path for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Variable)}
    used: set[str] = set()
    missing: list[_Entry] = []
    mismatched: list[str] = []
    flat: list[tuple[tuple[Any, ...], nnx.Variable]] = []
    for entry in entries:
        key = entry.key
        if key not in state_dict and entry.legacy_key in state_dict:
            key = entry.legacy_key
        if key not in state_dict:
            if entry.variable is not None:
                missing.append(entry)
            continue
        used.add(key)
        if entry.variable is None:
            continue
        value = _to_numpy(state_dict[key])
        if tuple(value.shape) != entry.torch_shape:
            mismatched.append(
                f"size mismatch for {key}: copying a param with shape {_fmt(value.shape)} "
                f"from checkpoint, the shape in current model is {_fmt(entry.torch_shape)}."
            )
            continue
        raw = entry.variable.get_raw_value()
        # order="C" keeps a 0-d value 0-d (np.ascontiguousarray makes it 1-d).
        new = np.asarray(entry.to_flax(value)).astype(raw.dtype, order="C")
        sharding = getattr(raw, "sharding", None)
        new = (
            jax.device_put(new, sharding) if isinstance(raw, jax.Array) else jax.numpy.asarray(new)
        )
        flat.append((paths[id(entry.variable)], entry.variable.replace(new)))
    unexpected = [k for k in state_dict if k not in used]
    errors = []
    if strict and missing:
        described = (f'"{e.key}" (expected shape {_fmt(e.torch_shape)})' for e in missing)
        errors.append(f"Missing key(s) in state_dict: {', '.join(described)}.")
    if strict and unexpected:
        quoted = ", ".join(f'"{k}"' for k in unexpected)
        errors.append(f"Unexpected key(s) in state_dict: {quoted}.")
    errors.extend(mismatched)
    if errors:
        raise ValueError(
            f"Error(s) in loading state_dict for {type(model).__name__}:\n\t"
            + "\n\t".join(errors)
            + "\nNothing was loaded. Shapes are in torch's layout.\n"
            "fix: build the NNX model with the torch model's sizes and parametrizations "
            "(a weight norm's `dim` decides g's shape), map renamed modules with "
            "`mapping={torch_prefix: nnx_path}`, and compare with "
            "`torch_state_dict_shapes(model)`."
        )
    state = nnx.from_flat_state(flat)
    if strict:
        return state, IncompatibleKeys([], [])
    return state, IncompatibleKeys([e.key for e in missing], unexpected)


def to_torch_state_dict(
    model: nnx.Module,
    *,
    mapping: Mapping[str, str] | None = None,
    legacy_weight_norm: bool = False,
    to_tensor: Callable[[np.ndarray], Any] | None = None,
) -> dict[str, Any]:
    """The torch ``state_dict`` of ``model``, loadable with ``load_state_dict(strict=True)``.

    The inverse of `from_torch_state_dict`: same keys, ``mapping`` and layouts, for
    the torch model built with ``torch.nn.utils.parametrizations`` (or
    ``torch_compat``) as the NNX model is. Values are fresh, contiguous, writable
    numpy arrays, so ``torch.from_numpy`` takes them as they are.

    Args:
      model: the parametrized NNX model (concrete).
      mapping: torch prefix -> NNX path renames.
      legacy_weight_norm: write weight norm's originals as ``<name>_g`` /
        ``<name>_v``, for a torch model using the old ``torch.nn.utils.weight_norm``.
      to_tensor: applied to every array, e.g. ``torch.from_numpy``.

    Returns:
      ``{torch key: array}``, in the model's order.

    Raises:
      ValueError: an NNX path of ``mapping`` is not a module of the model.

    Example:
      >>> from flax import nnx
      >>> from jaxparam.interop import to_torch_state_dict
      >>> sd = to_torch_state_dict(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
      >>> {k: v.shape for k, v in sd.items()}
      {'weight': (2, 3), 'bias': (2,)}
    """
    out: dict[str, Any] = {}
    for entry in _plan(model, mapping):
        key = entry.legacy_key if legacy_weight_norm and entry.legacy_key else entry.key
        if entry.variable is None:  # num_batches_tracked: flax does not count batches
            value = np.zeros((), np.int64)
        else:
            # A C-ordered copy; 0-d stays 0-d (np.ascontiguousarray makes it 1-d).
            value = np.array(entry.to_torch(np.asarray(entry.variable.get_value())), order="C")
        out[key] = to_tensor(value) if to_tensor is not None else value
    return out


def torch_conv_transpose_padding(
    kernel_size: int | tuple[int, ...],
    padding: int | tuple[int, ...] = 0,
    output_padding: int | tuple[int, ...] = 0,
    dilation: int | tuple[int, ...] = 1,
) -> tuple[tuple[int, int], ...]:
    """The ``padding`` of ``nnx.ConvTranspose`` that gives torch's ``ConvTransposeNd`` output.

    Torch pads the output of a transposed convolution by ``-padding`` (and adds
    ``output_padding`` on the right); ``jax.lax.conv_transpose`` pads the dilated
    input instead: ``(d * (k - 1) - padding, d * (k - 1) - padding + output_padding)``
    per spatial axis. Use the same ``strides`` and ``kernel_dilation`` as torch.

    Args:
      kernel_size: torch's ``kernel_size`` (an int or one per spatial axis).
      padding: torch's ``padding``.
      output_padding: torch's ``output_padding``.
      dilation: torch's ``dilation``.

    Returns:
      One ``(low, high)`` pair per spatial axis.

    Raises:
      ValueError: the arguments give different numbers of spatial axes.

    Example:
      >>> torch_conv_transpose_padding(4, padding=1)
      ((2, 2),)
    """
    args = [kernel_size, padding, output_padding, dilation]
    nd = max(len(a) if isinstance(a, tuple | list) else 1 for a in args)
    expanded = []
    for a in args:
        a = tuple(a) if isinstance(a, tuple | list) else (a,) * nd
        if len(a) != nd:
            raise ValueError(
                f"torch_conv_transpose_padding: got arguments for {len(a)} and {nd} spatial "
                "axes.\nfix: pass ints, or tuples of one length."
            )
        expanded.append(a)
    return tuple(
        (d * (k - 1) - p, d * (k - 1) - p + op) for k, p, op, d in zip(*expanded, strict=True)
    )


# ---------------------------------------------------------------------------
# orbax checkpoints
# ---------------------------------------------------------------------------


def save(model: nnx.Module, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Save ``nnx.state(model)`` (originals, link state, RNG state) with orbax.

    Uses ``orbax.checkpoint.StandardCheckpointer`` and waits until the checkpoint
    is written. Restore it with `restore` into an identically built and
    parametrized model.

    Args:
      model: the NNX model.
      path: the checkpoint directory (made absolute); it must not exist unless
        ``force``.
      force: overwrite an existing checkpoint.

    Raises:
      ValueError: ``path`` exists and not ``force`` (orbax's error).
      ImportError: ``orbax-checkpoint`` is not installed.

    Example:
      >>> import tempfile, os
      >>> from flax import nnx
      >>> from jaxparam.interop import save
      >>> save(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), os.path.join(tempfile.mkdtemp(), "ckpt"))
    """
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(os.path.abspath(path), nnx.state(model), force=force)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()


def restore(
    target: nnx.Module | Callable[[], nnx.Module], path: str | os.PathLike[str]
) -> nnx.Module:
    """Restore a checkpoint written by `save`.

    ``target`` is either a model built and parametrized exactly as the saved one
    (its Variables are overwritten, after the whole checkpoint has been read), or a
    function building one: it then runs under ``nnx.eval_shape``, so no weights
    are initialised, and the restored model is returned.

    Args:
      target: the model to fill, or a function returning a fresh one.
      path: the checkpoint directory.

    Returns:
      The restored model (``target`` itself when a model was given).

    Raises:
      FileNotFoundError: there is no checkpoint at ``path``.
      ImportError: ``orbax-checkpoint`` is not installed.
      ValueError: the checkpoint's structure or shapes differ from the model's
        (orbax's message); the model is untouched.

    Example:
      >>> import tempfile, os
      >>> from flax import nnx
      >>> from jaxparam.interop import restore, save
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> save(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), path)
      >>> model = restore(lambda: nnx.Linear(2, 2, rngs=nnx.Rngs(1)), path)
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No checkpoint at {path}")
    if isinstance(target, nnx.Module):
        graphdef, abstract = None, jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(target))
    else:
        graphdef, abstract = nnx.split(nnx.eval_shape(target))
    checkpointer = ocp.StandardCheckpointer()
    try:
        state = checkpointer.restore(path, abstract)
    finally:
        checkpointer.close()
    if graphdef is None:
        nnx.update(target, state)
        return target
    return nnx.merge(graphdef, state)
