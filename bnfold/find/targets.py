"""What a norm folds into beyond adjacency, layer by layer: the part of the norm's map each
layer takes, and the conditions that a walk's targets add to a layer's own (``bnfold.find.reach``
walks, ``bnfold.find.pairing`` decides)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx

from bnfold.find.patterns import LayerKind, LayerView, Position, Refusal
from bnfold.find.reach import Reach, Target
from bnfold.find.sites import LayerSite, NormSite
from bnfold.folding.math import (
    Affine,
    FoldedWeights,
    fold_into_input,
    fold_into_output,
    largest_magnitude,
)
from bnfold.records import SkipReason


@dataclass(frozen=True)
class FoldTarget:
    """One layer a norm folds into, and the part of the norm's map it takes: the norm's scale
    and shift at the layer's channels (the shift zero on all but one addend of a sum)."""

    layer: LayerSite
    position: Position
    affine: Affine


def fold_target(target: Target, position: Position, affine: Affine) -> FoldTarget:
    """The norm's map at the layer's channels; zero shift on an addend that does not take it."""
    index = target.channels.index.to(affine.scale.device)
    shift = affine.shift[index] if target.takes_shift else torch.zeros_like(affine.shift[index])
    return FoldTarget(target.layer, position, Affine(affine.scale[index], shift))


def duplicate_layers(reach: Reach) -> Refusal | None:
    counts = Counter(t.layer.node for t in reach.targets)
    twice = [node.name for node, count in counts.items() if count > 1]
    if twice:
        return Refusal(
            SkipReason.PRODUCER_SHARED, f"{', '.join(twice)} reaches the norm on two paths"
        )
    return None


def sign_refusal(norm: NormSite, reach: Reach, affine: Affine) -> Refusal | None:
    """Max pooling on the way: every scale on the channels it pools must be >= 0."""
    for channels in reach.nonnegative:
        negative = affine.scale[channels.to(affine.scale.device)] < 0
        if bool(negative.any()):
            pool = next(label for label in reach.via if "max" in label.lower())
            return Refusal(
                SkipReason.MAX_POOL_SIGN,
                f"{pool} sits between {norm.name} and the layer and {int(negative.sum())} "
                f"channel(s) of {norm.name} have a negative scale",
            )
    return None


def conv_axis(layer: LayerSite, view: LayerView) -> Refusal | None:
    """A conv's channels are the dim before its spatial dims."""
    if layer.kind == LayerKind.LINEAR or view.activation_rank < 0:
        return None
    expected = view.activation_rank - (layer.weight.dim() - 2) - 1
    if view.channel_axis == expected:
        return None
    return Refusal(
        SkipReason.CHANNEL_MISMATCH,
        f"the norm's channels are on dim {view.channel_axis} at {layer.name}, whose channels "
        f"are on dim {expected}",
    )


def named(layer: LayerSite, refusal: Refusal | None) -> Refusal | None:
    """A pattern check's refusal, its detail led by the layer it refused."""
    if refusal is None:
        return None
    return Refusal(refusal.reason, f"{layer.label}: {refusal.detail}")


def rank(node: fx.Node | None) -> int:
    shape = node.meta.get("bnfold_shape") if node is not None else None
    return len(shape) if shape is not None else -1


def overflow_refusal(fold: FoldTarget) -> Refusal | None:
    """The folded weight and bias of a float16 layer must fit float16: a weight times a large
    scale can pass 65504 and round to inf (the other float dtypes reach 3e38, which no finite
    fold of a working model comes near). A bound from the largest magnitudes decides almost
    every layer; only where it cannot are the folded tensors computed (float64)."""
    layer = fold.layer
    weight, bias = layer.weight.detach(), layer.bias
    if weight.dtype != torch.float16:
        return None
    w, b, s, t = (
        largest_magnitude(v) for v in (weight, bias, fold.affine.scale, fold.affine.shift)
    )
    if fold.position == Position.AFTER:
        bound = max(w * s, b * s + t)
    else:
        bound = max(w * s, b + w * t * weight.numel())
    folder = fold_into_output if fold.position == Position.AFTER else fold_into_input
    return weight_overflow(
        bound,
        lambda: folder(weight, bias, fold.affine, layer.layout),
        weight.dtype,
        f"folded into {layer.name}, the weights",
    )


def weight_overflow(
    bound: float, folded: Callable[[], FoldedWeights], dtype: torch.dtype, subject: str
) -> Refusal | None:
    """Refuse folded weights ``dtype`` cannot hold: nothing to compute while ``bound`` (on their
    largest magnitude) stays below half of its largest value, else the weights ``folded()``."""
    limit = torch.finfo(dtype).max
    if bound <= limit / 2:
        return None
    weights = folded()
    largest = max(largest_magnitude(weights.weight), largest_magnitude(weights.bias))
    if largest <= limit:
        return None
    return Refusal(
        SkipReason.WEIGHT_OVERFLOW,
        f"{subject} would reach {largest:.3g}, more than {str(dtype).removeprefix('torch.')} "
        f"can hold ({limit:.3g})",
    )
