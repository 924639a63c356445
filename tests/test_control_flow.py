"""Models whose forward picks what runs at run time: from the input's values (``torch.cond``,
eager and exported; routes on shapes that depend on values: ``nonzero``, boolean masks), or
from an argument, the input's size or a setting (a norm per route beside one layer)."""

from __future__ import annotations

import copy

import pytest
import torch
from fold_checks import fold_fp64, randomize, rel_error, run
from torch import nn

import bnfold
from bnfold import SkipReason


class Branching(nn.Module):
    """``torch.cond`` picks which BN normalises the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return torch.cond(x.sum() > 0, lambda t: self.bn_a(t), lambda t: self.bn_b(t), (y,))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0)).abs()
    return x, -x


def test_norms_inside_cond_branches_of_a_program_stay_with_a_reason() -> None:
    model = randomize(Branching().eval())
    positive, negative = _inputs()
    program = torch.export.export(model, (positive,))
    result = bnfold.fold(program, positive)
    assert result.plan.bn_total == 2 and not result.folded
    assert {s.bn for s in result.skipped} == {"bn_a", "bn_b"}
    assert {s.reason for s in result.skipped} == {SkipReason.INPUT_DEPENDENT}
    assert all("torch.cond" in s.detail for s in result.skipped)
    for x in (positive, negative):
        assert rel_error(run(model, x), run(result.model, x)) == 0.0


def test_an_eager_cond_is_refused_with_what_to_do_and_counted_by_the_branch_taken() -> None:
    model = randomize(Branching().eval())
    positive, negative = _inputs()
    with pytest.raises(bnfold.TraceError, match="higher-order op") as caught:
        bnfold.fold(model, positive)
    assert ".pt2" in str(caught.value)
    # refused before a recording ran it under modes torch's compiler cannot trace (that would
    # break torch.cond for the rest of the process)
    model(positive)
    torch.export.export(model, (positive,))
    assert bnfold.count_bn_kernels(model, positive) == bnfold.count_bn_kernels(model, negative) == 1


class MaskRouted(nn.Module):
    """Routes by the size of a boolean selection: a shape that depends on the input's values."""

    def __init__(self, select: str) -> None:
        super().__init__()
        self.select = select
        self.conv_a = nn.Conv2d(3, 4, 3)
        self.conv_b = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.select == "mask":
            positive = x[x > 0].numel()
        elif self.select == "nonzero":
            positive = len(torch.nonzero(x > 0))
        elif self.select == "sparse":  # how many values a sparse copy keeps
            positive = (x * (x > 0)).to_sparse().indices().shape[1]
        else:
            positive = torch.masked_select(x, x > 0).numel()
        conv = self.conv_a if positive > x.numel() // 2 else self.conv_b
        return self.bn(conv(x))


@pytest.mark.parametrize("select", ["mask", "nonzero", "masked_select", "sparse"])
def test_routing_on_a_shape_that_depends_on_values_is_input_dependent(select: str) -> None:
    model = randomize(MaskRouted(select).eval())
    x = torch.randn(2, 3, 6, 6).abs()
    result = fold_fp64(model, x, folded=0, skipped=1)
    assert result.plan.method == "recorded"
    assert result.skipped[0].reason == SkipReason.INPUT_DEPENDENT
    assert any("depends on the input's values" in note for note in result.plan.notes)
    other = -x.double()  # the route the example did not take
    assert rel_error(run(copy.deepcopy(model).double(), other), run(result.model, other)) < 1e-12
    # both routes given: the pairings differ, so the BN still stays
    both = bnfold.fold(model, x, extra_inputs=[-x])
    assert [s.reason for s in both.skipped] == [SkipReason.INPUT_DEPENDENT]


class PerRoute(nn.Module):
    """One conv, a norm per route: by a Python argument, the input's size or a setting."""

    def __init__(self, by: str, width: int = 4) -> None:
        super().__init__()
        self.by = by
        self.conv = nn.Conv2d(3, 4, 3)
        self.norms = nn.ModuleList([nn.BatchNorm2d(4), nn.BatchNorm2d(width)])
        self.route = 0

    def forward(self, x: torch.Tensor, route: int = 0) -> torch.Tensor:
        if self.by == "size":
            route = 0 if x.shape[-1] >= 8 else 1
        elif self.by == "setting":
            route = self.route
        return self.norms[route](self.conv(x))


@pytest.mark.parametrize("by", ["argument", "size", "setting"])
def test_a_norm_that_did_not_run_beside_the_layer_keeps_the_pair(by: str) -> None:
    model = randomize(PerRoute(by).eval())
    x = torch.randn(2, 3, 8, 8)
    result = fold_fp64(model, x, folded=0, skipped=1)
    (skip,) = result.skipped
    assert skip.reason == SkipReason.INPUT_DEPENDENT and "norms.1" in skip.detail
    assert any("never ran" in note and "norms.1" in note for note in result.plan.notes)
    double = copy.deepcopy(model).double()
    other = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    double.route = result.model.route = 1
    assert rel_error(run(double, (other, 1)), run(result.model, (other, 1))) < 1e-12


class WithAuxiliaryHead(nn.Module):
    """An auxiliary head that runs only in training, with a norm of the same width."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.aux = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y + self.aux(y) if self.training else y


def test_an_idle_norm_of_another_width_or_elsewhere_leaves_the_pair_alone() -> None:
    x = torch.randn(2, 3, 8, 8)
    fold_fp64(randomize(PerRoute("argument", width=5).eval()), x, folded=1, skipped=0)
    result = fold_fp64(randomize(WithAuxiliaryHead().eval()), x, folded=1, skipped=0)
    assert any("never ran" in note and "aux.1" in note for note in result.plan.notes)


class Wrapped(nn.Module):
    """A conv and BN inside ``torch.no_grad()`` or ``autocast``: a wrapper op in a program."""

    def __init__(self, context: str) -> None:
        super().__init__()
        self.context = context
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context == "no_grad":
            with torch.no_grad():
                return self.bn(self.conv(x))
        with torch.autocast("cpu", enabled=False):
            return self.bn(self.conv(x))


@pytest.mark.parametrize("context", ["no_grad", "autocast"])
def test_norms_inside_a_programs_wrapper_stay_and_are_counted(context: str) -> None:
    model = randomize(Wrapped(context).eval())
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    assert bnfold.count_bn_kernels(program.module(), x) == 1
    result = bnfold.fold(program, x)
    (skip,) = result.skipped
    assert skip.bn == "bn" and skip.reason == SkipReason.UNSUPPORTED_PATTERN
    assert "wrap_with" in skip.detail and "fold the eager model" in skip.detail
    assert rel_error(run(model, x), run(result.model, x)) == 0.0
    fold_fp64(model, x, folded=1, skipped=0)  # the eager model folds


class StoredMask(nn.Module):
    """A pruning-style stored boolean channel mask: a selection every input shares."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.register_buffer("keep", torch.tensor([True, False, True, True, False, True]))
        self.register_buffer("kept", torch.tensor([True, True, False, True]))
        self.head, self.head_bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # fx cannot decide this: the dataflow is recorded
            raise ValueError("expects images")
        y = self.bn(self.conv(x))[:, self.keep]
        return self.head_bn(self.head(y[:, torch.nonzero(self.kept).flatten()].relu()))


def test_a_stored_mask_is_no_value_read() -> None:
    result = fold_fp64(randomize(StoredMask().eval()), torch.randn(2, 3, 6, 6), folded=2)
    assert result.plan.method == "recorded"
    assert not any("reads tensor values" in note for note in result.plan.notes)


class CalledByForward(nn.Module):
    """A second BN run through ``bn2.forward`` (no module call): it ran, so it stands in for
    nothing, and the first pair folds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # fx cannot decide this: the dataflow is recorded
            raise ValueError("expects images")
        return self.bn2.forward(self.bn1(self.conv1(x)).relu())


def test_a_norm_run_through_its_forward_method_is_not_idle() -> None:
    result = fold_fp64(randomize(CalledByForward().eval()), torch.randn(2, 3, 6, 6), folded=1)
    assert result.folded[0].pair.bn == "bn1"
    assert not any("never ran" in note for note in result.plan.notes)
