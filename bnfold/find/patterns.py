"""The table of foldable pairs: one row per (layer kind, position of the norm).

Adding a pattern is one row here plus tests. A row's ``check`` sees a ``LayerView`` (what the
graph pass learnt about the layer) and the norm's affine map, and returns a ``Refusal`` when that
instance cannot be folded exactly. Checks that hold for every pattern (fan-out, sharing, hooks,
dtype, channel count) live in ``bnfold.find.pairing``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bnfold.folding.math import Affine
from bnfold.records import SkipReason


class Position(str, enum.Enum):
    AFTER = "after"  # layer -> norm: fold into the layer's output channels
    BEFORE = "before"  # norm -> layer: fold into the layer's input channels


class LayerKind(str, enum.Enum):
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    LINEAR = "linear"


@dataclass(frozen=True)
class LayerView:
    """What the pattern checks need to know about one Conv/ConvTranspose/Linear call."""

    kind: LayerKind
    in_channels: int
    out_channels: int
    groups: int
    padding: tuple[int, ...]  # per spatial dim; () for Linear
    padding_mode: str  # "zeros", "reflect", "replicate", "circular"; "zeros" for Linear
    activation_rank: int  # rank of the tensor at the layer, on the norm's side (-1: unknown)
    channel_axis: int = 1  # where the norm's channels sit in that tensor
    # How a layer subclass's own forward may zero-pad its input at run time (None: never)
    runtime_padding: str | None = None


@dataclass(frozen=True)
class Refusal:
    reason: SkipReason
    detail: str


@dataclass(frozen=True)
class Pattern:
    name: str
    kind: LayerKind
    position: Position
    check: Callable[[LayerView, Affine], Refusal | None]


def _always_exact(layer: LayerView, affine: Affine) -> Refusal | None:
    return None


def _features_last(layer: LayerView, affine: Affine) -> Refusal | None:
    """A Linear acts on the last dim: the norm's channels must be there."""
    if layer.channel_axis == layer.activation_rank - 1:
        return None
    return Refusal(
        SkipReason.LINEAR_AXIS,
        f"the tensor at the Linear has rank {layer.activation_rank} and the BN's channels on "
        f"dim {layer.channel_axis}, while Linear acts on the last dim",
    )


def _padding_stays_exact(layer: LayerView, affine: Affine) -> Refusal | None:
    """BN -> Conv is exact without padding, with a padding mode that copies input values
    (reflect/replicate/circular commute with a per-channel affine map), or when the BN maps
    zero to zero on every channel (shift == 0). A subclass forward that may zero-pad at run
    time (``runtime_padding``) counts as zero padding."""
    padded = any(layer.padding) and layer.padding_mode == "zeros"
    if not padded and layer.runtime_padding is None:
        return None
    if bool(torch.all(affine.shift == 0)):
        return None
    how = f"it zero-pads by {layer.padding}" if padded else layer.runtime_padding
    return Refusal(
        SkipReason.ZERO_PADDING,
        f"{how}: padded zeros of the BN output are not the zeros of the BN input",
    )


def _transposed_input_side(layer: LayerView, affine: Affine) -> Refusal | None:
    if bool(torch.all(affine.shift == 0)):
        return None
    return Refusal(
        SkipReason.UNSUPPORTED_PATTERN,
        "a BN shift before a ConvTranspose gives an output that is not constant at the borders "
        "and between strides; no exact fold exists",
    )


PATTERNS: tuple[Pattern, ...] = (
    Pattern("conv→bn", LayerKind.CONV, Position.AFTER, _always_exact),
    Pattern("conv_transpose→bn", LayerKind.CONV_TRANSPOSE, Position.AFTER, _always_exact),
    Pattern("linear→bn", LayerKind.LINEAR, Position.AFTER, _features_last),
    Pattern("bn→conv", LayerKind.CONV, Position.BEFORE, _padding_stays_exact),
    Pattern("bn→linear", LayerKind.LINEAR, Position.BEFORE, _features_last),
    Pattern("bn→conv_transpose", LayerKind.CONV_TRANSPOSE, Position.BEFORE, _transposed_input_side),
)


_BY_SLOT = {(pattern.kind, pattern.position): pattern for pattern in PATTERNS}


def pattern_for(kind: LayerKind, position: Position) -> Pattern:
    """The table row for a layer kind and norm position."""
    return _BY_SLOT[(kind, position)]
