"""Records of the find and fold stages: what was paired, what was folded, what was left and why.

All records are frozen dataclasses; ``to_dict()`` gives plain JSON values (the model itself is
left out). Renderers (``bnfold.report``) and the CLI only read these. The JSON helpers every
stage's records use (``Record``, ``to_jsonable``) and ``format_bytes`` come first.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def to_jsonable(value: Any) -> Any:
    """Convert records, enums, tuples and floats into plain JSON values (NaN/inf become strings)."""
    if isinstance(value, Record):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _fields(value: Any) -> dict[str, Any]:
    return {
        field.name: to_jsonable(getattr(value, field.name))
        for field in dataclasses.fields(value)
        if field.metadata.get("json", True)
    }


class Record:
    """Mixin for frozen dataclasses: ``to_dict()`` and ``to_json()``."""

    def to_dict(self) -> dict[str, Any]:
        return _fields(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)


def not_serialised() -> Any:
    """Field metadata marking a field (e.g. the model itself) as left out of JSON."""
    return {"json": False}


def format_bytes(size: float) -> str:
    """``512 B``, ``1.5 kB``, ``20.3 MB``, ``2.1 GB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


class BnKind(str, enum.Enum):
    """How a batch norm appears in the model."""

    MODULE = "module"  # a plain torch BatchNorm module (its forward is the stock one)
    SUBCLASS = "subclass"  # a BatchNorm subclass with its own forward (extra behaviour kept)
    FUNCTIONAL = "functional"  # a torch.nn.functional.batch_norm call in the model's forward
    # A module with running statistics buffers but no BatchNorm base class (FrozenBatchNorm2d in
    # detection backbones) whose forward is proven to be a constant per-channel affine map.
    FROZEN = "frozen"
    # Another user module proven to be a constant per-channel affine map (a learnt per-channel
    # scale/shift). It is reported only when folded; a refusal is a plan note, not a skip.
    AFFINE = "affine"


class SkipReason(str, enum.Enum):
    """Why a batch norm was not folded. Each value has a label and advice (``advice()``)."""

    NO_PRODUCER = "no_producer"
    PRODUCER_FANOUT = "producer_fanout"
    PRODUCER_SHARED = "producer_shared"
    BN_SHARED = "bn_shared"
    BN_FANOUT = "bn_fanout"
    ZERO_PADDING = "zero_padding"
    LINEAR_AXIS = "linear_axis"
    NO_RUNNING_STATS = "no_running_stats"
    FUNCTIONAL_TRAINING = "functional_training"
    NON_FLOAT = "non_float"
    CHANNEL_MISMATCH = "channel_mismatch"
    PARAMETRIZED = "parametrized"
    HOOKS = "hooks"
    UNSUPPORTED_FORWARD = "unsupported_forward"
    NON_FINITE = "non_finite"
    NEEDS_GRAPH_REWRITE = "needs_graph_rewrite"
    UNSUPPORTED_PATTERN = "unsupported_pattern"
    INPUT_DEPENDENT = "input_dependent"
    NOT_AFFINE = "not_affine"
    NOT_TRACEABLE = "not_traceable"
    NON_AFFINE_BETWEEN = "non_affine_between"
    MAX_POOL_SIGN = "max_pool_sign"
    BRANCHES_MISALIGNED = "branches_misaligned"
    BRANCH_MERGE_OFF = "branch_merge_off"
    IN_PLACE_WRITE = "in_place_write"
    WEIGHT_OVERFLOW = "weight_overflow"

    @property
    def label(self) -> str:
        return _LABELS[self][0]

    def advice(self) -> str:
        return _LABELS[self][1]


_LABELS: dict[SkipReason, tuple[str, str]] = {
    SkipReason.NO_PRODUCER: (
        "no adjacent Conv/Linear",
        "the BN's input and output are not a Conv, ConvTranspose or Linear (e.g. BN after an add "
        "or before an activation); nothing to fold it into",
    ),
    SkipReason.PRODUCER_FANOUT: (
        "residual fan-out",
        "the layer's output also feeds something other than the BN; folding would change that "
        "other path",
    ),
    SkipReason.PRODUCER_SHARED: (
        "shared layer",
        "the layer (or its weight tensor) is used at another call site; give each call site its "
        "own module to fold it",
    ),
    SkipReason.BN_SHARED: (
        "shared BN",
        "the same BN module is called at several places; give each call site its own BN",
    ),
    SkipReason.BN_FANOUT: (
        "BN output fan-out",
        "the BN output feeds more than the following layer, so the BN cannot move into it",
    ),
    SkipReason.ZERO_PADDING: (
        "zero-padded BN→Conv",
        "the conv after the BN pads with zeros, which would no longer be the BN's zero; use "
        "padding=0 or a reflect/replicate/circular padding_mode",
    ),
    SkipReason.LINEAR_AXIS: (
        "Linear on N-D input",
        "BatchNorm1d normalises dim 1 but Linear acts on the last dim; only 2-D (N, C) "
        "activations can be folded",
    ),
    SkipReason.NO_RUNNING_STATS: (
        "no running stats",
        "track_running_stats=False: eval mode uses batch statistics, which cannot be folded",
    ),
    SkipReason.FUNCTIONAL_TRAINING: (
        "functional BN in training mode",
        "F.batch_norm(..., training=True) normalises with batch statistics; pass training=False",
    ),
    SkipReason.NON_FLOAT: (
        "non-floating-point weights",
        "the layer's weights are not floating point (e.g. quantized); fold before quantizing",
    ),
    SkipReason.CHANNEL_MISMATCH: (
        "channel mismatch",
        "the BN's channel count differs from the layer's channels on the folded axis",
    ),
    SkipReason.PARAMETRIZED: (
        "parametrized weight",
        "the layer's weight is computed (parametrization or weight norm); remove it first "
        "(torch.nn.utils.parametrize.remove_parametrizations)",
    ),
    SkipReason.HOOKS: (
        "module hooks",
        "a forward hook or pre-hook on the BN or layer (or one registered for every module) "
        "would see different tensors after folding; remove the hook to fold",
    ),
    SkipReason.UNSUPPORTED_FORWARD: (
        "custom forward not understood",
        "a Conv/Linear subclass whose forward is not pads then the plain layer (e.g. weight "
        "standardisation), or a BN subclass whose forward is not one batch norm plus extra "
        "ops; bnfold cannot prove the fold exact, so it leaves the pair",
    ),
    SkipReason.NON_FINITE: (
        "non-finite statistics",
        "running statistics or affine parameters hold NaN/inf or a negative variance; "
        "recalibrate first",
    ),
    SkipReason.NEEDS_GRAPH_REWRITE: (
        "needs graph rewrite",
        "folding it rewrites the forward (a functional batch norm, or parallel branches merged "
        "into one conv): call fold(..., inplace=False) for a module that is not a GraphModule; "
        "a model torch.fx cannot trace is never rewritten, so make its forward traceable or "
        "fold a torch.export program (.pt2)",
    ),
    SkipReason.UNSUPPORTED_PATTERN: (
        "unsupported pattern",
        "this layer/BN arrangement has no exact fold (e.g. BN before ConvTranspose)",
    ),
    SkipReason.INPUT_DEPENDENT: (
        "input-dependent routing",
        "the forward reads tensor values to decide what runs, so another input may route this "
        "layer or norm elsewhere; pass extra example inputs that take every branch "
        "(extra_inputs=...) so the pairing can be checked on each, or make the branch static",
    ),
    SkipReason.NOT_AFFINE: (
        "not a per-channel affine",
        "the module's forward could not be proven to be a constant per-channel affine map "
        "(scale and shift along dim 1) on its input",
    ),
    SkipReason.NOT_TRACEABLE: (
        "functional BN, model not traceable",
        "a batch norm called as a function (or from an unregistered module) can only be folded "
        "by rewriting the traced graph; make the forward traceable by torch.fx or fold a "
        "torch.export program (.pt2)",
    ),
    SkipReason.NON_AFFINE_BETWEEN: (
        "non-affine op between",
        "an activation or another op that is not a per-channel affine map sits between the BN "
        "and the layer (e.g. BN → ReLU → Conv); no exact fold exists",
    ),
    SkipReason.MAX_POOL_SIGN: (
        "max pooling, negative scale",
        "max pooling commutes with the BN only on channels whose scale gamma/sqrt(var + eps) "
        "is not negative; a negative scale turns the max into a min",
    ),
    SkipReason.BRANCHES_MISALIGNED: (
        "branches do not align",
        "parallel branches summed on one input merge into one conv only when their strides, "
        "dilations, groups and paddings align (each kernel centred in the largest)",
    ),
    SkipReason.BRANCH_MERGE_OFF: (
        "branch merge off",
        "the BN sits on parallel branches that merge into one conv; fold with "
        "merge_branches=True (drop --no-merge-branches) to fold it",
    ),
    SkipReason.WEIGHT_OVERFLOW: (
        "folded weights overflow",
        "the folded weights would not fit the layer's dtype (float16 holds at most 65504): the "
        "BN's scale gamma/sqrt(var + eps) is too large for them; fold a float32 copy "
        "(model.float()), or recalibrate if the variance is stale",
    ),
    SkipReason.IN_PLACE_WRITE: (
        "input written in place",
        "an op writes in place into the BN's input (or a branch block's input) before the layer "
        "reads it; folded, the layer would read the changed values. Make that op out of place "
        "(inplace=False, x = x + y) to fold",
    ),
}


@dataclass(frozen=True)
class Pair(Record):
    """One batch norm that will be folded into one layer."""

    bn: str  # module path, or the graph node name for a functional batch norm
    bn_type: str
    bn_kind: BnKind
    producer: str  # module path of the Conv/ConvTranspose/Linear (comma-separated when several)
    producer_type: str
    pattern: str  # row name in bnfold.patterns, e.g. "conv→bn"
    channels: int
    via: tuple[str, ...] = ()  # the ops between them: pooling, views, "cat", "add", "split"...


@dataclass(frozen=True)
class Skip(Record):
    """One batch norm that stays, with the reason and the modules involved."""

    bn: str
    bn_type: str
    reason: SkipReason
    detail: str
    producer: str | None = None
    pattern: str | None = None
    bn_kind: BnKind | None = None


class BranchKind(str, enum.Enum):
    """What one addend of a block of parallel branches computes from the block input."""

    CONV_BN = "conv→bn"  # a Conv followed by a BatchNorm
    CONV = "conv"  # a Conv without a BatchNorm
    BN = "bn"  # a BatchNorm of the block input (identity BN)
    IDENTITY = "identity"  # the block input itself


@dataclass(frozen=True)
class Branch(Record):
    """One branch of a merged block: its kind, its conv and norm (None where it has none) and
    the conv's kernel size (None for the identity kinds)."""

    kind: BranchKind
    conv: str | None = None
    bn: str | None = None
    kernel: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BranchMerge(Record):
    """Parallel branches on one input, summed, merged into one new conv: ``add`` is the graph
    node of the (final) sum, ``input`` the node every branch reads, ``conv`` the module path of
    the merged conv."""

    add: str
    input: str
    branches: tuple[Branch, ...]
    conv: str
    conv_type: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    groups: int


@dataclass(frozen=True)
class Plan(Record):
    """What ``find_pairs`` found: every batch norm is in exactly one of ``pairs`` or ``skipped``."""

    pairs: tuple[Pair, ...]
    skipped: tuple[Skip, ...]
    # How the dataflow was read: "fx" (symbolic trace), "graph-module" (a GraphModule as given),
    # or "recorded" (fx could not trace the model: the dataflow of real eval forwards was
    # recorded and the fold is done on the model's own modules).
    method: str
    model_was_training: bool
    notes: tuple[str, ...] = ()
    # Blocks of parallel branches merged into one conv each (their norms are in ``pairs`` with
    # pattern "branches→conv").
    merges: tuple[BranchMerge, ...] = ()

    @property
    def bn_total(self) -> int:
        return len(self.pairs) + len(self.skipped)

    def summary(self) -> str:
        """One line, e.g. ``41 of 53 BatchNorms foldable; 12 skipped: 9 residual fan-out, ...``."""
        head = f"{len(self.pairs)} of {self.bn_total} BatchNorms foldable"
        return head + _by_reason(self.skipped, "skipped") + merges_text(self.merges)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["bn_total"] = self.bn_total
        data["summary"] = self.summary()
        return data


@dataclass(frozen=True)
class FoldedPair(Record):
    """A pair that was folded, with the numbers worth knowing about it."""

    pair: Pair
    max_abs_scale: float  # max |gamma / sqrt(var + eps)|: large values amplify weight error
    min_running_var: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class FoldResult(Record):
    """What ``fold`` did: the eval-mode folded model and the record of every batch norm."""

    model: nn.Module = field(metadata=not_serialised(), repr=False, compare=False)
    plan: Plan
    folded: tuple[FoldedPair, ...]
    skipped: tuple[Skip, ...]
    graph_rewritten: bool  # True when ``model`` is a rewritten torch.fx.GraphModule
    inplace: bool
    merges: tuple[BranchMerge, ...] = ()  # the blocks of parallel branches merged

    def summary(self) -> str:
        total = len(self.folded) + len(self.skipped)
        head = f"folded {len(self.folded)} of {total} BatchNorms"
        return head + _by_reason(self.skipped, "left") + merges_text(self.merges)


def merges_text(merges: tuple[BranchMerge, ...]) -> str:
    """``; 3 branch blocks merged into one conv each`` (empty without merges)."""
    if not merges:
        return ""
    if len(merges) == 1:
        return "; 1 branch block merged into one conv"
    return f"; {len(merges)} branch blocks merged into one conv each"


def _by_reason(skipped: tuple[Skip, ...], verb: str) -> str:
    """``; 12 skipped: 9 residual fan-out, 3 shared layer`` (empty when nothing was skipped)."""
    if not skipped:
        return ""
    counts = Counter(skip.reason.label for skip in skipped)
    parts = ", ".join(f"{n} {label}" for label, n in counts.most_common())
    return f"; {len(skipped)} {verb}: {parts}"
