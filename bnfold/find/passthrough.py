"""Ops a batch norm's affine map passes through, and where each one puts the channels.

A per-channel map ``a(x) = s * x + t`` commutes with an op that acts on each channel alone and
keeps affine combinations: identity and dropout in eval, views whose channel axis the recorded
shapes prove (``bnfold.find.channels``), permutations of axes, averages whose weights sum to 1
and never include padding zeros (adaptive and unpadded average pooling, a mean over other dims,
every interpolation mode), channel shuffles and stored channel permutations (with the permuted
``s`` and ``t``). Max pooling commutes only where ``s >= 0``: the step says so and the pairing
checks it.

``step`` reads one graph node (a module call, a torch function or Tensor method, an ATen op of an
exported program or of a recorded dataflow) and returns where the channels are on its other side;
None for any other op (the walk stops there).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from bnfold.find.calls import call_arguments, is_aten, is_recorded, op_name, shape_of
from bnfold.find.channels import (
    SIZED_VIEWS,
    Channels,
    carry_view,
    gather,
    general_view,
    inverse,
    scatter_unique,
    view_sizes,
)
from bnfold.find.functional import fetch_attr
from bnfold.find.patterns import Refusal
from bnfold.find.sharing import has_hooks
from bnfold.find.sites import input_of
from bnfold.records import SkipReason


@dataclass(frozen=True)
class Call:
    """One op call read from a graph node: its name, tensor input and other arguments."""

    name: str  # e.g. "view", "adaptive_avg_pool2d", "AvgPool2d" (module class)
    input: fx.Node
    args: tuple[Any, ...]  # the arguments after the input, as called
    kwargs: dict[str, Any]
    module: nn.Module | None
    label: str  # for skip details: "pool (AvgPool2d)", "flatten"


@dataclass(frozen=True)
class Step:
    """One op passed: its input node, the channels on the far side, and its conditions."""

    input: fx.Node
    channels: Channels
    label: str
    needs_nonnegative: bool = False  # max pooling: every scale on these channels >= 0
    refusal: Refusal | None = None  # the op is understood but blocks the fold
    note: str | None = None  # what the fold across it assumes


def read_call(gm: fx.GraphModule, node: fx.Node) -> Call | None:
    """The op of ``node``, or None for a node that is not a call on a tensor."""
    first = input_of(node)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if not type(module).__module__.startswith("torch.nn") or has_hooks(module):
            return None  # a user module, or a hook that may change its output: not known
        name, args, kwargs = type(module).__name__, (), {}
        label = f"{node.target} ({name})"
    elif node.op in ("call_method", "call_function"):
        module, name = None, op_name(node)
        args, kwargs = call_arguments(node)
        args, label = tuple(args[1:]), name
    else:
        return None
    if first is None:
        return None
    kwargs = {key: value for key, value in kwargs.items() if key != "input"}
    args, kwargs = fx.node.map_arg((args, kwargs), lambda n: _stored(gm, n))
    return Call(name.lstrip("_"), first, args, kwargs, module, label)


def _stored(gm: fx.GraphModule, node: fx.Node) -> Any:
    """A stored tensor (``get_attr``) as its value; any other node stays a node."""
    return fetch_attr(gm, str(node.target)) if node.op == "get_attr" else node


def passes_through(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is an op a per-channel affine map may pass (whatever its arguments)."""
    call = read_call(gm, node)
    return call is not None and _rule(call.name) is not None


def step(gm: fx.GraphModule, node: fx.Node, channels: Channels, toward_input: bool) -> Step | None:
    """Pass ``node``: with ``toward_input`` the channels are known at its output and sought at
    its input (a walk from a norm back to the layer before it), else the other way round."""
    call = read_call(gm, node)
    if call is None:
        return None
    rule = _rule(call.name)
    in_shape, out_shape = shape_of(call.input), shape_of(node)
    if rule is None or in_shape is None or out_shape is None:
        return None
    known, other = (out_shape, in_shape) if toward_input else (in_shape, out_shape)
    if not 0 <= channels.axis < len(known) or known[channels.axis] != channels.size:
        return None
    moved = rule(call, channels, known, other, toward_input)
    if moved is None:
        return None
    refusal = _avg_padding_refusal(call) if _AVG_POOL.fullmatch(call.name) else None
    axes = (moved.axis, channels.axis) if toward_input else (channels.axis, moved.axis)
    note = None
    if call.name in SIZED_VIEWS:
        note = _literal_note(node, call, channels.size, axes[1])
        if not general_view(call.args, in_shape, out_shape, axes):
            refusal = Refusal(
                SkipReason.INPUT_DEPENDENT,
                f"{call.label} turns {tuple(in_shape)} into {tuple(out_shape)}: where it puts the "
                "channels is proven from sizes, and a size-1 dim fits many views, so the proof "
                "may hold at this input size only; fold with an example input without size-1 dims",
            )
    nonnegative = bool(_MAX_POOL.fullmatch(call.name))
    return Step(call.input, moved, call.label, nonnegative, refusal, note)


def _literal_note(node: fx.Node, call: Call, channels: int, out_axis: int) -> str | None:
    """A note for a view to sizes given as numbers (not -1, 1 or the channel count at the
    channels' axis): a number stays when the input's size changes, which may move the channels.
    A size an fx trace reads from a tensor is a node; a recording has numbers only; an exported
    program is fixed to its sizes (no note)."""
    recorded = is_recorded(node)
    if is_aten(node) and not recorded:
        return None
    literal = [
        str(size)
        for index, size in enumerate(view_sizes(call.args))
        if not isinstance(size, fx.Node)
        and size not in (-1, 1)
        and not (index == out_axis and size == channels)
    ]
    if not literal:
        return None
    if recorded:
        how = (
            "as recorded (a recording cannot tell a size written out from one read from the input)"
        )
        fix = "extra_inputs of other sizes check it"
    else:
        how, fix = "written out", "read sizes from the input, x.size(0) or -1, to make it hold"
    return (
        f"{call.label} to sizes with {', '.join(literal)} {how}: the fold holds where that view "
        f"puts the channels as on this input ({fix})"
    )


#: (call, channels, known shape, other shape, toward_input) -> the channels on the other side
Rule = Callable[[Call, Channels, tuple, tuple, bool], Channels | None]


def _same(call: Call, ch: Channels, known: tuple, other: tuple, back: bool) -> Channels | None:
    return ch if tuple(known) == tuple(other) else None


def _eval_dropout(
    call: Call, ch: Channels, known: tuple, other: tuple, back: bool
) -> Channels | None:
    training = call.kwargs.get("training", call.kwargs.get("train"))
    if training is None and len(call.args) > 1:
        training = call.args[1]
    return _same(call, ch, known, other, back) if training is False else None


def _view(call: Call, ch: Channels, known: tuple, other: tuple, back: bool) -> Channels | None:
    return carry_view(ch, known, other)


def _permute(call: Call, ch: Channels, known: tuple, other: tuple, back: bool) -> Channels | None:
    perm = _permutation(call, len(known))
    if perm is None:
        return None
    axis = perm[ch.axis] if back else perm.index(ch.axis)
    return ch.moved(axis) if other[axis] == ch.size else None


def _permutation(call: Call, rank: int) -> list[int] | None:
    """The axis order of a permute/transpose call (``perm[new] = old``)."""
    args = [*call.args, *call.kwargs.values()]
    if call.name in ("t", "numpy_T") or (call.name == "T"):
        return list(reversed(range(rank)))
    if call.name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        return [d % rank for d in dims]
    if len(args) != 2 or not all(isinstance(d, int) for d in args):
        return None
    perm = list(range(rank))
    a, b = args[0] % rank, args[1] % rank
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _mean(call: Call, ch: Channels, known: tuple, other: tuple, back: bool) -> Channels | None:
    dims = call.kwargs.get("dim", call.args[0] if call.args else None)
    keepdim = call.kwargs.get("keepdim", call.args[1] if len(call.args) > 1 else False)
    if call.kwargs.get("dtype") is not None or dims is None or not isinstance(keepdim, bool):
        return None
    rank = len(other) if back else len(known)
    dims = {d % rank for d in ((dims,) if isinstance(dims, int) else dims)}
    if not dims:  # mean(dim=[]) averages over every dim
        return None
    kept = [a for a in range(rank) if a not in dims or keepdim]
    position = {a: (a if keepdim else kept.index(a)) for a in range(rank) if a not in dims}
    if back:
        axis = next((a for a, p in position.items() if p == ch.axis), None)
    else:
        axis = position.get(ch.axis)
    return ch.moved(axis) if axis is not None and other[axis] == ch.size else None


def _spatial(call: Call, ch: Channels, known: tuple, other: tuple, back: bool) -> Channels | None:
    """Pooling and interpolation act on the trailing spatial dims only."""
    digits = re.search(r"([123])d", call.name)
    spatial = int(digits.group(1)) if digits else len(known) - 2
    lead = len(known) - spatial
    if len(known) != len(other) or ch.axis >= lead or tuple(known[:lead]) != tuple(other[:lead]):
        return None
    return ch


def _pixel_shuffle(
    call: Call, ch: Channels, known: tuple, other: tuple, back: bool
) -> Channels | None:
    """``pixel_shuffle``: input channel ``j`` goes to output channel ``j // r^2``;
    ``pixel_unshuffle``: output channel ``j`` comes from input channel ``j // r^2``."""
    if ch.axis != len(known) - 3 or len(known) != len(other):
        return None
    wide, narrow = max(ch.size, other[ch.axis]), min(ch.size, other[ch.axis])
    if narrow == 0 or wide % narrow:
        return None
    groups = torch.arange(wide) // (wide // narrow)
    unshuffle = call.name.lower().startswith("pixel_unshuffle") or call.name == "PixelUnshuffle"
    to_narrow = back == unshuffle  # shuffle forward / unshuffle backward: wide side known
    if to_narrow:
        index = scatter_unique(ch.index, groups, narrow) if ch.size == wide else None
    else:
        index = gather(ch.index, groups) if ch.size == narrow else None
    return None if index is None else Channels(ch.axis, index)


def _channel_shuffle(
    call: Call, ch: Channels, known: tuple, other: tuple, back: bool
) -> Channels | None:
    """Output position ``k`` reads input channel ``(k % g) * (C / g) + k // g``."""
    groups = call.module.groups if call.module is not None else None
    if groups is None:
        groups = call.kwargs.get("groups", call.args[0] if call.args else None)
    if ch.axis != 1 or not isinstance(groups, int) or groups <= 0 or ch.size % groups:
        return None
    k = torch.arange(ch.size)
    reads = (k % groups) * (ch.size // groups) + k // groups
    return Channels(1, gather(ch.index, inverse(reads) if back else reads))


def _permute_channels(
    call: Call, ch: Channels, known: tuple, other: tuple, back: bool
) -> Channels | None:
    """``index_select(x, dim, perm)``, ``x[:, perm]`` or ATen ``index`` with a stored
    permutation of the channels: output position ``k`` reads input channel ``perm[k]``."""
    perm = _stored_permutation(call, ch, len(known))
    if perm is None or tuple(known) != tuple(other):
        return None
    return Channels(ch.axis, gather(ch.index, inverse(perm) if back else perm))


def _stored_permutation(call: Call, ch: Channels, rank: int) -> torch.Tensor | None:
    if call.name == "index_select":
        dim = call.kwargs.get("dim", call.args[0] if call.args else None)
        index = call.kwargs.get("index", call.args[1] if len(call.args) > 1 else None)
    else:  # x[:, perm] (getitem) or aten.index(x, [None, perm])
        key = call.args[0] if call.args else None
        key = key if isinstance(key, (list, tuple)) else (key,)
        tensors = [i for i, k in enumerate(key) if isinstance(k, torch.Tensor)]
        plain = all(k is None or k == slice(None) for i, k in enumerate(key) if i not in tensors)
        if len(tensors) != 1 or not plain:
            return None
        dim, index = tensors[0], key[tensors[0]]
    if not isinstance(index, torch.Tensor) or not isinstance(dim, int) or not -rank <= dim < rank:
        return None
    dim %= rank
    index = index.detach().cpu()
    is_perm = index.dim() == 1 and not index.is_floating_point() and index.numel() == ch.size
    if dim != ch.axis or not is_perm:
        return None
    index = index.long()
    return index if torch.equal(index.sort().values, torch.arange(ch.size)) else None


IDENTITY_OPS = {
    "Identity",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "AlphaDropout",
    "FeatureAlphaDropout",
    "contiguous",
    "clone",
    "detach",
    "alias",
}
DROPOUT_OPS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_dropout"}
VIEW_OPS = {
    "view",
    "reshape",
    "unsafe_view",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "Flatten",
    "Unflatten",
    "view_as",
    "reshape_as",
}


PERMUTE_OPS = {"permute", "transpose", "swapaxes", "swapdims", "t", "numpy_T", "T"}
_AVG_POOL = re.compile(r"avg_pool[123]d|AvgPool[123]d")
_MAX_POOL = re.compile(r"(adaptive_)?max_pool[123]d(_with_indices)?|(Adaptive)?MaxPool[123]d")
_SPATIAL = re.compile(
    r"(adaptive_)?(avg|max)_pool[123]d(_with_indices)?|(Adaptive)?(Avg|Max)Pool[123]d"
    r"|interpolate|upsample\w*|Upsample|UpsamplingNearest2d|UpsamplingBilinear2d"
)


def _rule(name: str) -> Rule | None:
    if name in IDENTITY_OPS:
        return _same
    if name in DROPOUT_OPS:
        return _eval_dropout
    if name in VIEW_OPS:
        return _view
    if name in PERMUTE_OPS:
        return _permute
    if name == "mean":
        return _mean
    if _SPATIAL.fullmatch(name):
        return _spatial
    if name in ("pixel_shuffle", "pixel_unshuffle", "PixelShuffle", "PixelUnshuffle"):
        return _pixel_shuffle
    if name in ("channel_shuffle", "native_channel_shuffle", "ChannelShuffle"):
        return _channel_shuffle
    if name in ("index_select", "getitem", "index"):
        return _permute_channels
    return None


def _avg_padding_refusal(call: Call) -> Refusal | None:
    """Average pooling is exact without padding, or when the padded zeros are not counted."""
    names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor")
    if call.module is not None:
        values = {n: getattr(call.module, n, None) for n in names}
        values["divisor"] = getattr(call.module, "divisor_override", None)
    else:
        values = dict(zip(names, call.args, strict=False))
        values.update(call.kwargs)
        values.setdefault("divisor", values.get("divisor_override"))
    padding = values.get("padding", 0)
    include = values.get("count_include_pad", True)
    if values.get("divisor") is not None:
        return Refusal(
            SkipReason.NON_AFFINE_BETWEEN,
            f"{call.label} divides by a fixed divisor_override: its weights need not sum to 1",
        )
    if any(_ints(padding)) and include is not False:
        return Refusal(
            SkipReason.ZERO_PADDING,
            f"{call.label} pads by {padding} and counts the padded zeros in its average "
            "(count_include_pad=True): they are not the BN's zero",
        )
    return None


def _ints(value: Any) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value or 0),)
