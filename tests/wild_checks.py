"""Fold checks for real-world models: any input structure (tuples, dicts), any output
structure, frozen and affine norms in the coverage count."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from fold_checks import FP64_REL_TOL, assert_same_snapshot, snapshot
from torch import nn
from torch.utils import _pytree as pytree  # noqa: PLC2701 (torch has no public name for it)

import bnfold
from bnfold.io.inputs import as_args
from bnfold.records import BnKind


def to_double(value: Any) -> Any:
    return pytree.tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, value
    )


def outputs(model: nn.Module, args: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        result = model(*as_args(args))
    return [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]


def max_rel_error(model_a: nn.Module, model_b: nn.Module, args: Any) -> float:
    """Max over outputs of max abs diff / max abs reference output."""
    errors = []
    for a, b in zip(outputs(model_a, args), outputs(model_b, args), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        scale = a.abs().max().clamp_min(1e-300)
        errors.append(float((a - b).abs().max() / scale))
    return max(errors, default=0.0)


def counted_kinds(records: Sequence[Any]) -> int:
    """Norms the kernel counter sees: every kind but AFFINE (a learnt scale is no norm)."""
    kinds = [r.pair.bn_kind if hasattr(r, "pair") else r.bn_kind for r in records]
    return sum(kind != BnKind.AFFINE for kind in kinds)


def fold_checked(
    model: nn.Module,
    args: Any,
    *,
    extra_inputs: Sequence[Any] = (),
    method: str | None = None,
    merge_branches: bool = True,
) -> bnfold.FoldResult:
    """Fold a float64 copy and check: exact (< 1e-10 relative), caller untouched, batch-norm
    count before/after matches the records, every norm has a verdict with a reason."""
    model = copy.deepcopy(model).double().eval()
    args = to_double(args)
    extra_inputs = [to_double(e) for e in extra_inputs]
    before = snapshot(model)
    result = bnfold.fold(model, args, extra_inputs=extra_inputs, merge_branches=merge_branches)
    assert_same_snapshot(before, model)
    for inputs in (args, *extra_inputs):
        error = max_rel_error(model, result.model, inputs)
        assert error < FP64_REL_TOL, (error, result.summary())
    kernels_before = bnfold.count_bn_kernels(model, args)
    kernels_after = bnfold.count_bn_kernels(result.model, args)
    assert kernels_after == counted_kinds(result.skipped), (kernels_after, result.skipped)
    assert kernels_before - kernels_after == counted_kinds(result.folded)
    assert all(s.detail and s.reason.advice() for s in result.skipped)
    assert not result.model.training
    if method is not None:
        assert result.plan.method == method, result.plan.notes
    return result


def reasons(result: bnfold.FoldResult) -> dict[str, str]:
    return {s.bn: s.reason.value for s in result.skipped}


def folded(result: bnfold.FoldResult) -> dict[str, str]:
    return {f.pair.bn: f.pair.producer for f in result.folded}
