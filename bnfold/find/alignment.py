"""When parallel conv branches on one input compute, together, what one conv computes.

Branch ``i`` (kernel ``k_i``, padding ``p_i``, stride ``s``, dilation ``d``) reads input position
``o*s - p_i + d*j`` for its tap ``j``. One conv with kernel ``K`` and padding ``P`` reads
``o*s - P + d*J``; so branch ``i``'s kernel fits at offset ``(P - p_i) / d`` in the merged kernel
when that is a whole number, and it must be the centred one, ``(K - k_i) / 2``: only then is the
branch's output size that of the merged conv at every input size (``2p - d(k - 1)`` equal; an
off-centre branch with stride > 1 agrees on some sizes only, and a sum broadcasts on others).
Both convs zero-pad, so a tap outside the input reads zero in either. ``P`` is the padding of the
branches with the largest kernel, which must agree. An identity branch is a unit tap at ``P / d``,
which must be the centre (stride 1, as many output channels as input channels). Pure geometry:
no graph, no weights (``geometry`` reads a conv's from its site).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnfold.find.functional import LAYER_ARGS, bound_args
from bnfold.find.patterns import Refusal
from bnfold.find.sites import LayerSite, padding_amount, per_dim
from bnfold.records import SkipReason


@dataclass(frozen=True)
class Geometry:
    """One conv branch as the alignment sees it (``padding`` None: not the same on both sides)."""

    name: str
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | None
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    in_channels: int
    out_channels: int


@dataclass(frozen=True)
class Alignment:
    """The merged conv's geometry, each conv branch's kernel offset inside it (in the order
    given) and the identity's unit tap (None without an identity branch)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    in_channels: int
    out_channels: int
    offsets: tuple[tuple[int, ...], ...]
    centre: tuple[int, ...] | None


def align(convs: Sequence[Geometry], identity: str | None) -> Alignment | Refusal:
    """The merged conv of ``convs`` (at least one) and, when ``identity`` names an identity
    branch, that branch too; a ``BRANCHES_MISALIGNED`` refusal naming the branch and the
    mismatch when they do not add up to one conv."""
    refusal = _uniform(convs)
    if refusal is not None:
        return refusal
    first = convs[0]
    kernel = tuple(max(c.kernel[i] for c in convs) for i in range(len(first.kernel)))
    dilation = _dilation(convs, kernel)
    padding = _padding(convs, kernel)
    if isinstance(dilation, Refusal):
        return dilation
    if isinstance(padding, Refusal):
        return padding
    offsets = []
    for conv in convs:
        offset = _offset(conv, kernel, padding, dilation)
        if offset is None:
            return _misaligned(
                f"{conv.name}'s kernel {conv.kernel} with padding {conv.padding} does not sit "
                f"centred in the {kernel} kernel with padding {padding}: its taps would move, "
                "or its output size would differ at other input sizes"
            )
        offsets.append(offset)
    centre = None
    if identity is not None:
        centre = _centre(first, identity, kernel, padding, dilation)
        if isinstance(centre, Refusal):
            return centre
    return Alignment(
        kernel,
        first.stride,
        padding,
        dilation,
        first.groups,
        first.in_channels,
        first.out_channels,
        tuple(offsets),
        centre,
    )


def _misaligned(detail: str) -> Refusal:
    return Refusal(SkipReason.BRANCHES_MISALIGNED, detail)


def _uniform(convs: Sequence[Geometry]) -> Refusal | None:
    """Zero padding on both sides, and one stride, group count and channel count for all."""
    first = convs[0]
    for conv in convs:
        if conv.padding_mode != "zeros":
            return _misaligned(f"{conv.name} pads with padding_mode='{conv.padding_mode}'")
        if conv.padding is None:
            return _misaligned(f"{conv.name} pads its two sides differently")
        for what in ("stride", "groups", "in_channels", "out_channels"):
            if getattr(conv, what) != getattr(first, what):
                return _misaligned(
                    f"{conv.name} has {what} {getattr(conv, what)}, {first.name} has "
                    f"{getattr(first, what)}"
                )
    return None


def _dilation(convs: Sequence[Geometry], kernel: tuple[int, ...]) -> tuple[int, ...] | Refusal:
    """Per dim, the one dilation of the convs with more than one tap there (1 when none has)."""
    dilation = []
    for dim in range(len(kernel)):
        spread = [c for c in convs if c.kernel[dim] > 1]
        values = {c.dilation[dim] for c in spread}
        if len(values) > 1:
            return _misaligned(
                f"{spread[-1].name} has dilation {spread[-1].dilation}, {spread[0].name} has "
                f"{spread[0].dilation}"
            )
        dilation.append(values.pop() if values else 1)
    return tuple(dilation)


def _padding(convs: Sequence[Geometry], kernel: tuple[int, ...]) -> tuple[int, ...] | Refusal:
    """Per dim, the padding of the convs with the largest kernel there (they must agree)."""
    padding = []
    for dim in range(len(kernel)):
        largest = [c for c in convs if c.kernel[dim] == kernel[dim]]
        values = {c.padding[dim] for c in largest}
        if len(values) > 1:
            return _misaligned(
                f"{largest[-1].name} has padding {largest[-1].padding}, {largest[0].name} has "
                f"{largest[0].padding} with the same kernel size"
            )
        padding.append(values.pop())
    return tuple(padding)


def _offset(
    conv: Geometry, kernel: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...] | None:
    offset = []
    for dim, size in enumerate(kernel):
        shift = padding[dim] - conv.padding[dim]
        if conv.kernel[dim] == size and shift == 0:
            offset.append(0)
            continue
        # centred, or the branch's output size differs from the merged conv's at some input
        # sizes (with stride > 1 they agree on some, where a sum may broadcast)
        if shift % dilation[dim] or 2 * (shift // dilation[dim]) != size - conv.kernel[dim]:
            return None
        offset.append(shift // dilation[dim])
    return tuple(offset)


def _centre(
    conv: Geometry,
    identity: str,
    kernel: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> tuple[int, ...] | Refusal:
    """The merged kernel's tap that reads output position ``o`` at input position ``o``."""
    if any(s != 1 for s in conv.stride):
        return _misaligned(
            f"identity branch {identity} needs stride 1; the convs have {conv.stride}"
        )
    if conv.in_channels != conv.out_channels:
        return _misaligned(
            f"identity branch {identity} needs as many output channels as input channels; the "
            f"convs map {conv.in_channels} to {conv.out_channels}"
        )
    centre = tuple(p // d for p, d in zip(padding, dilation, strict=True))
    if any(p % d for p, d in zip(padding, dilation, strict=True)) or any(
        2 * c != k - 1 for c, k in zip(centre, kernel, strict=True)
    ):
        return _misaligned(
            f"identity branch {identity} has no tap in the {kernel} kernel with padding "
            f"{padding} and dilation {dilation}"
        )
    return centre


def geometry(layer: LayerSite) -> Geometry:
    """A conv's kernel, stride, padding (per side), dilation, groups and channels."""
    kernel = tuple(layer.weight.shape[2:])
    if layer.module is not None:
        module = layer.module
        stride, padding, dilation = module.stride, module.padding, module.dilation
        mode = module.padding_mode
    else:
        args = bound_args(layer.node, LAYER_ARGS[layer.node.target][1])
        stride, padding = args.get("stride", 1), args.get("padding", 0)
        dilation, mode = args.get("dilation", 1), "zeros"
    dilation = per_dim(dilation, len(kernel))
    return Geometry(
        name=layer.name,
        kernel=kernel,
        stride=per_dim(stride, len(kernel)),
        padding=_side_padding(padding, kernel, dilation),
        dilation=dilation,
        groups=layer.view.groups,
        padding_mode=mode,
        in_channels=layer.view.in_channels,
        out_channels=layer.view.out_channels,
    )


def _side_padding(
    padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]
) -> tuple[int, ...] | None:
    """Padding on each side per dim; None when "same" pads the two sides differently."""
    total = padding_amount(padding, kernel, dilation)
    if padding != "same":
        return total
    return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
