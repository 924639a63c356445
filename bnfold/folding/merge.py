"""Merge math for parallel branches summed on one input: tensors in, tensors out, in float64.
Imports nothing from torch.fx.

The sum of branches ``sum_i BN_i(conv_i(x))`` (plus identity terms ``BN(x)`` or ``x``) is one
conv ``W x + b`` when the branches align (``bnfold.find.alignment``):

* each conv branch is folded with its norm (``W_i' = W_i * s_i`` on output channels,
  ``b_i' = b_i * s_i + t_i``; ``s = 1, t = 0`` without a norm), from the original weights;
* its kernel is zero-padded into the merged kernel at its offset (centred for "same" padding);
* an identity branch is a unit kernel per group: output channel ``c`` reads input channel ``c``
  (position ``c mod C/g`` in its group) at the centre tap, times ``s_c``; its bias is ``t``;
* ``W = sum_i W_i'`` and ``b = sum_i b_i'``, kept in float64 for the caller to round once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bnfold.folding.math import Affine, FoldedWeights, Layout, fold_into_output


@dataclass(frozen=True)
class BranchTerm:
    """One branch as stored in the model: its conv weight (None for an identity branch) and
    bias, its norm's affine map (None without a norm), and where it sits in the merged kernel
    (the index of its first tap; for an identity branch, its unit tap)."""

    weight: Tensor | None
    bias: Tensor | None
    affine: Affine | None
    offset: tuple[int, ...]


@dataclass(frozen=True)
class MergedShape:
    """The merged conv: output and input channels, groups and kernel size."""

    out_channels: int
    in_channels: int
    groups: int
    kernel: tuple[int, ...]


def merge_branches(
    terms: Sequence[BranchTerm], shape: MergedShape, device: torch.device
) -> FoldedWeights:
    """The float64 weight ``[C_out, C_in/g, *kernel]`` and bias ``[C_out]`` of the one conv that
    computes the sum of ``terms`` (see the module doc)."""
    in_per_group = shape.in_channels // shape.groups
    weight = torch.zeros(
        (shape.out_channels, in_per_group, *shape.kernel), dtype=torch.float64, device=device
    )
    bias = torch.zeros(shape.out_channels, dtype=torch.float64, device=device)
    for term in terms:
        if term.weight is None:
            kernel, term_bias = _identity_kernel(term.affine, shape, device), _identity_bias(term)
        else:
            kernel, term_bias = _folded(term, shape.groups)
        where = tuple(
            slice(start, start + size)
            for start, size in zip(term.offset, kernel.shape[2:], strict=True)
        )
        weight[(slice(None), slice(None), *where)] += kernel
        bias += term_bias.to(device)
    return FoldedWeights(weight=weight, bias=bias)


def _folded(term: BranchTerm, groups: int) -> tuple[Tensor, Tensor]:
    """A conv branch's float64 kernel and bias with its norm (if any) folded in."""
    device, channels = term.weight.device, term.weight.shape[0]
    if term.affine is None:
        ones = torch.ones(channels, dtype=torch.float64, device=device)
        affine = Affine(ones, torch.zeros_like(ones))
    else:
        affine = Affine(term.affine.scale.to(device), term.affine.shift.to(device))
    folded = fold_into_output(term.weight, term.bias, affine, Layout(groups))
    return folded.weight, folded.bias


def _identity_kernel(affine: Affine | None, shape: MergedShape, device: torch.device) -> Tensor:
    """``[C, C/g, 1, ...]``: output channel ``c`` reads input channel ``c`` times ``s_c`` (1
    without a norm); the caller places it at the centre tap."""
    channels, per_group = shape.out_channels, shape.in_channels // shape.groups
    ones = (1,) * len(shape.kernel)
    kernel = torch.zeros((channels, per_group, *ones), dtype=torch.float64, device=device)
    scale = (
        affine.scale.to(device, torch.float64)
        if affine is not None
        else torch.ones(channels, dtype=torch.float64, device=device)
    )
    rows = torch.arange(channels, device=device)
    kernel[(rows, rows % per_group, *((0,) * len(shape.kernel)))] = scale
    return kernel


def _identity_bias(term: BranchTerm) -> Tensor:
    if term.affine is None:
        return torch.zeros((), dtype=torch.float64)
    return term.affine.shift.to(torch.float64)
