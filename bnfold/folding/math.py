"""Fold math: tensors in, tensors out, in float64. Imports nothing from torch.fx.

A batch norm in eval mode is a per-channel affine map
``BN(y) = gamma * (y - mu) / sqrt(var + eps) + beta = s * y + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mu * s`` (gamma = 1, beta = 0 when affine=False).

Weights are handled in one canonical grouped view ``[groups, out/groups, in/groups, K]``:

* Conv / Linear weights are ``[C_out, C_in/g, k...]``: output channels on axis 0.
* ConvTranspose weights are ``[C_in, C_out/g, k...]``: output channel ``c`` of group ``j`` lives
  on axis 1 inside the rows of group ``j``, so the canonical view permutes those two axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BnParams:
    """The eval-mode parameters of one batch norm (weight/bias None when affine=False)."""

    running_mean: Tensor
    running_var: Tensor
    weight: Tensor | None
    bias: Tensor | None
    eps: float

    @property
    def num_features(self) -> int:
        return self.running_mean.numel()


@dataclass(frozen=True)
class Affine:
    """A per-channel affine map ``y -> scale * y + shift``, both float64 vectors."""

    scale: Tensor
    shift: Tensor


@dataclass(frozen=True)
class Layout:
    """How a layer's weight is laid out: grouping and whether it is transposed."""

    groups: int = 1
    transposed: bool = False


@dataclass(frozen=True)
class FoldedWeights:
    """Float64 weight and bias after a fold (the bias always exists after a fold)."""

    weight: Tensor
    bias: Tensor


def bn_affine(bn: BnParams) -> Affine:
    """Return ``s = gamma / sqrt(var + eps)`` and ``t = beta - mu * s`` in float64."""
    var = bn.running_var.detach().to(torch.float64)
    mean = bn.running_mean.detach().to(torch.float64)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(torch.float64)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(torch.float64)
    return Affine(scale=scale, shift=shift)


def _canonical(weight: Tensor, layout: Layout) -> Tensor:
    """View ``weight`` as ``[g, out/g, in/g, K]`` (no copy)."""
    g = layout.groups
    if layout.transposed:
        c_in, out_per_group = weight.shape[0], weight.shape[1]
        grouped = weight.reshape(g, c_in // g, out_per_group, -1)
        return grouped.permute(0, 2, 1, 3)
    c_out, in_per_group = weight.shape[0], weight.shape[1] if weight.dim() > 1 else 1
    return weight.reshape(g, c_out // g, in_per_group, -1)


def _from_canonical(canonical: Tensor, like: Tensor, layout: Layout) -> Tensor:
    """Inverse of ``_canonical``: back to the layer's own weight shape."""
    if layout.transposed:
        canonical = canonical.permute(0, 2, 1, 3)
    return canonical.reshape(like.shape)


def fold_into_output(
    weight: Tensor, bias: Tensor | None, affine: Affine, layout: Layout
) -> FoldedWeights:
    """Fold ``affine`` applied *after* the layer: ``W' = W * s`` on output channels,
    ``b' = b * s + t`` (``b = 0`` without bias). Computed in float64."""
    w = weight.detach().to(torch.float64, copy=True)  # a private copy: scaled in place below
    canon = _canonical(w, layout)
    canon.mul_(
        affine.scale.reshape(canon.shape[0], canon.shape[1], 1, 1)
    )  # faster than a mixed-dtype product
    return FoldedWeights(weight=_from_canonical(canon, w, layout), bias=output_bias(bias, affine))


#: Elements per float64 block in ``scale_output_channels_``: small enough to stay in cache.
BLOCK = 1 << 17


class Workspace:
    """Float64 scratch memory, one buffer per device, reused by every block of a fold (a fresh
    allocation per block costs more than the arithmetic)."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, Tensor] = {}

    def take(self, numel: int, device: torch.device) -> Tensor:
        buffer = self._buffers.get(device)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(max(numel, BLOCK), dtype=torch.float64, device=device)
            self._buffers[device] = buffer
        return buffer[:numel]


def scale_output_channels_(
    weight: Tensor, scale: Tensor, layout: Layout, workspace: Workspace | None = None
) -> None:
    """In place ``W <- W * s`` on output channels, computed in float64 and rounded once to the
    weight's dtype: the numbers of ``fold_into_output``, block by block instead of through a
    weight-sized float64 copy. ``weight`` must be contiguous."""
    rows = _row_scale(weight, scale, layout)
    view = weight.view(rows.shape[0], rows.shape[1], -1)
    per_block = max(1, BLOCK // max(1, view[0].numel()))
    scratch = (workspace or Workspace()).take(
        min(view.shape[0], per_block) * view[0].numel(), weight.device
    )
    for start in range(0, view.shape[0], per_block):
        block = view[start : start + per_block]
        wide = scratch[: block.numel()].view(block.shape)
        wide.copy_(block)
        wide.mul_(rows[start : start + per_block])
        block.copy_(wide)


def _row_scale(weight: Tensor, scale: Tensor, layout: Layout) -> Tensor:
    """The factor of each (row of axis 0, position on axis 1) of the weight, shaped to broadcast:
    ``[C_out, 1, 1]``, or for ConvTranspose ``[C_in, C_out/g, 1]`` (row ``i`` is in group
    ``i // (C_in/g)``)."""
    if not layout.transposed:
        return scale.reshape(weight.shape[0], 1, 1)
    per_group = scale.reshape(layout.groups, weight.shape[1])
    return per_group.repeat_interleave(weight.shape[0] // layout.groups, dim=0).unsqueeze(-1)


def output_bias(bias: Tensor | None, affine: Affine) -> Tensor:
    """``b' = b * s + t`` in float64 (``b = 0`` without bias)."""
    b = _bias64(bias, affine.scale.numel(), affine.scale.device)
    return b * affine.scale + affine.shift


def fold_into_input(
    weight: Tensor, bias: Tensor | None, affine: Affine, layout: Layout
) -> FoldedWeights:
    """Fold ``affine`` applied *before* the layer (no padding in between):
    ``W'[o, i, k] = W[o, i, k] * s[c(i)]`` and ``b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[c(i)]``
    where ``c(i)`` is the input channel of position ``i`` in the output's group."""
    w = weight.detach().to(torch.float64)
    canon = _canonical(w, layout)
    g, out_per_group, in_per_group = canon.shape[0], canon.shape[1], canon.shape[2]
    scale = affine.scale.reshape(g, 1, in_per_group, 1)
    shift = affine.shift.reshape(g, 1, in_per_group, 1)
    b = _bias64(bias, g * out_per_group, w.device)
    extra = (canon * shift).sum(dim=(2, 3)).reshape(-1)
    return FoldedWeights(weight=_from_canonical(canon * scale, w, layout), bias=b + extra)


def _bias64(bias: Tensor | None, channels: int, device: torch.device) -> Tensor:
    if bias is None:
        return torch.zeros(channels, dtype=torch.float64, device=device)
    return bias.detach().to(torch.float64)


def largest_magnitude(tensor: Tensor | None) -> float:
    """The largest ``|value|`` in ``tensor`` (0 for None or empty), without an ``abs`` copy."""
    if tensor is None or tensor.numel() == 0:
        return 0.0
    low, high = torch.aminmax(tensor.detach())
    return max(-float(low), float(high))
