"""Parallel branches summed on one input merge into one conv (RepVGG, MobileOne, ACNet-style
blocks): exact in float64, precise in float32, one conv per block; blocks that do not align
keep their structure, with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from fold_checks import fold_fp64, precision_ratio, randomize, run
from torch import nn

import bnfold
from bnfold import SkipReason
from bnfold.records import BranchKind

#: fp32 error ratio bound for merged blocks (folded error / original error, both vs float64).
#: A merged block is one longer accumulation with one fused bias where the original summed a
#: few short ones (an identity or 1x1 branch adds one or C terms); measured over seeds: native
#: kernels 0.9-2.4, oneDNN 1.1-3.1 (its fused-bias rounding, see fold_checks, takes a plain 3-D
#: conv -> BN fold to 2.4 on the same inputs).
MERGED_RATIO_MAX = 3.5

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV_TYPES = tuple(CONV.values())
BN_TYPES = tuple(BN.values())


class ConvBN(nn.Sequential):
    """A conv and its norm, as re-parameterisable blocks write them."""

    def __init__(self, dim: int, c_in: int, c_out: int, kernel, **kwargs) -> None:
        super().__init__()
        self.conv = CONV[dim](c_in, c_out, kernel, bias=kwargs.pop("bias", False), **kwargs)
        self.bn = BN[dim](c_out)


class Branches(nn.Module):
    """Sums its branches on one input (a ``None`` branch is the input itself), then a ReLU."""

    def __init__(self, branches: list[nn.Module | None]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(b for b in branches if b is not None)
        self.plain_identity = any(b is None for b in branches)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        terms = [branch(x) for branch in self.branches] + ([x] if self.plain_identity else [])
        out = terms[0]
        for term in terms[1:]:
            out = out + term
        return self.act(out)


def repvgg(dim: int = 2, c: int = 8, groups: int = 1, identity: bool = True) -> Branches:
    branches = [
        ConvBN(dim, c, c, 3, padding=1, groups=groups),
        ConvBN(dim, c, c, 1, groups=groups),
    ]
    return Branches([*branches, BN[dim](c)] if identity else branches)


def mobileone(c: int = 8, k: int = 3, groups: int = 1) -> Branches:
    dense = [ConvBN(2, c, c, 3, padding=1, groups=groups) for _ in range(k)]
    return Branches([*dense, ConvBN(2, c, c, 1, groups=groups), nn.BatchNorm2d(c)])


def acnet(c: int = 8) -> Branches:
    return Branches(
        [
            ConvBN(2, c, c, 3, padding=1),
            ConvBN(2, c, c, (1, 3), padding=(0, 1)),
            ConvBN(2, c, c, (3, 1), padding=(1, 0)),
        ]
    )


def plain_identity(c: int = 8) -> Branches:
    return Branches([ConvBN(2, c, c, 3, padding=1), nn.Conv2d(c, c, 1), None])


def stride2(c_in: int = 8, c_out: int = 12) -> Branches:
    return Branches(
        [ConvBN(2, c_in, c_out, 3, padding=1, stride=2), ConvBN(2, c_in, c_out, 1, stride=2)]
    )


def dilated(c: int = 8) -> Branches:
    return Branches([ConvBN(2, c, c, 3, padding=2, dilation=2), ConvBN(2, c, c, 1, bias=True)])


def bare(block: Branches) -> Branches:
    """The block without its activation: the next block reads its sum directly."""
    block.act = nn.Identity()
    return block


class SumThenMore(nn.Module):
    """A RepVGG block's sum, then a term that is no branch (a pooled context, broadcast)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dense, self.one = ConvBN(2, c, c, 3, padding=1), ConvBN(2, c, c, 1)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.one(x) + self.identity(x) + x.mean((2, 3), keepdim=True)


class SummedFromZero(Branches):
    """The branches summed with Python's ``sum``, which starts at 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(sum(branch(x) for branch in self.branches))


def _net(*blocks: nn.Module) -> nn.Module:
    return randomize(nn.Sequential(*blocks).eval())


def _input(dim: int, c: int = 8, size: int = 9) -> torch.Tensor:
    return torch.randn((2, c) + (size,) * dim, generator=torch.Generator().manual_seed(1))


MERGING = {
    "repvgg": lambda: (_net(repvgg(), repvgg()), _input(2), 2, 6),
    "repvgg_1d": lambda: (_net(repvgg(1), repvgg(1)), _input(1), 2, 6),
    "repvgg_3d": lambda: (_net(repvgg(3)), _input(3, size=5), 1, 3),
    "mobileone": lambda: (_net(mobileone()), _input(2), 1, 5),
    "mobileone_depthwise": lambda: (_net(mobileone(groups=8)), _input(2), 1, 5),
    "mobileone_grouped": lambda: (_net(mobileone(groups=2, k=2)), _input(2), 1, 4),
    "acnet": lambda: (_net(acnet()), _input(2), 1, 3),
    "plain_identity_and_bn_free_conv": lambda: (_net(plain_identity()), _input(2), 1, 1),
    "stride2_no_identity": lambda: (_net(stride2(), repvgg(c=12)), _input(2), 2, 5),
    "dilated": lambda: (_net(dilated()), _input(2), 1, 2),
    "back_to_back": lambda: (_net(bare(repvgg()), bare(plain_identity())), _input(2), 2, 4),
    "sum_then_more": lambda: (_net(SumThenMore()), _input(2), 1, 3),
    "summed_from_zero": lambda: (_net(SummedFromZero(repvgg().branches)), _input(2), 1, 3),
}


def _convs(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, CONV_TYPES)]


@pytest.mark.parametrize("name", MERGING)
def test_blocks_merge_into_one_conv_each(name: str) -> None:
    model, x, blocks, norms = MERGING[name]()
    result = fold_fp64(model, x, folded=norms, skipped=0)
    assert len(result.merges) == blocks == len(result.plan.merges)
    assert len(_convs(result.model)) == blocks
    assert not any(isinstance(m, BN_TYPES) for m in result.model.modules())
    assert {p.pattern for p in result.plan.pairs} == {"branches→conv"}
    assert {p.producer for p in result.plan.pairs} == {m.conv for m in result.merges}
    assert "merged into one conv" in result.summary()
    for native in (True, False):
        assert precision_ratio(model, x, native_kernels=native) <= MERGED_RATIO_MAX


def test_merge_record_names_the_branches() -> None:
    model, x, _, _ = MERGING["repvgg"]()
    merge = bnfold.find_pairs(model, x).merges[0]
    kinds = [b.kind for b in merge.branches]
    assert kinds == [BranchKind.CONV_BN, BranchKind.CONV_BN, BranchKind.BN]
    assert [b.kernel for b in merge.branches] == [(3, 3), (1, 1), None]
    assert merge.branches[2].bn == "0.branches.2"
    assert (merge.conv, merge.conv_type, merge.kernel) == ("0.branches.merged", "Conv2d", (3, 3))
    assert (merge.stride, merge.padding, merge.groups) == ((1, 1), (1, 1), 1)
    assert merge.to_dict()["branches"][0]["kind"] == "conv→bn"


def test_precision_ratios_stay_near_one() -> None:
    model, x, _, _ = MERGING["mobileone"]()
    for native in (True, False):
        assert precision_ratio(model, x, native_kernels=native) <= 2.0


def _bn_map(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def test_merged_weights_are_the_hand_written_deploy_conversion_rounded_once() -> None:
    """RepVGG's own conversion, written out in float64: 3x3·s3 + centred 1x1·s1 + identity·s,
    biases summed; bnfold's merged conv holds exactly that, rounded once to float32."""
    model = _net(repvgg(c=6))
    result = bnfold.fold(model, _input(2, c=6))
    block = model[0].branches
    (s3, t3), (s1, t1), (s0, t0) = (_bn_map(m) for m in (block[0].bn, block[1].bn, block[2]))
    weight = block[0].conv.weight.double() * s3.view(-1, 1, 1, 1)
    weight[:, :, 1:2, 1:2] += block[1].conv.weight.double() * s1.view(-1, 1, 1, 1)
    weight[range(6), range(6), 1, 1] += s0
    merged = result.model.get_submodule(result.plan.merges[0].conv)
    assert torch.equal(merged.weight, weight.float())
    assert torch.equal(merged.bias, (t3 + t1 + t0).float())


def test_graph_module_given_is_not_changed() -> None:
    model, x, _, _ = MERGING["repvgg"]()
    gm = fx.symbolic_trace(model.double())
    code = gm.code
    result = fold_fp64(gm, x.double(), folded=6)
    assert gm.code == code and len(result.merges) == 2
    assert sum(isinstance(m, BN_TYPES) for m in gm.modules()) == 6


def test_exported_program_merges() -> None:
    model, x, _, _ = MERGING["repvgg"]()
    gm = torch.export.export(model.double(), (x.double(),)).module()
    result = bnfold.fold(gm, x.double())
    assert len(result.merges) == 2 and not result.skipped
    assert torch.allclose(run(gm, x.double()), run(result.model, x.double()), rtol=0, atol=1e-12)


# Blocks that must not merge: every BN stays or folds as it would without merging.


def _kept(model: nn.Module, x: torch.Tensor, reasons: list, **kwargs) -> bnfold.FoldResult:
    result = fold_fp64(model, x, **kwargs)
    assert not result.merges and not result.plan.merges
    assert [s.reason for s in result.skipped] == reasons
    return result


class Spread(nn.Module):
    """Two conv branches and an identity BN with the given conv keywords per branch."""

    def __init__(self, first: dict, second: dict, c: int = 8) -> None:
        super().__init__()
        identity = second.pop("identity", True)
        self.a = ConvBN(2, c, c, first.pop("kernel", 3), **first)
        self.b = ConvBN(2, c, c, second.pop("kernel", 1), **second)
        self.identity = nn.BatchNorm2d(c) if identity else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.a(x) + self.b(x)
        return out + self.identity(x) if self.identity is not None else out


MISALIGNED = {
    "stride": ({"padding": 1}, {"stride": (1, 2)}, (1, 1), "stride"),
    "dilation": ({"padding": 1}, {"kernel": 3, "padding": 2, "dilation": 2}, (9, 9), "dilation"),
    "groups": ({"padding": 1}, {"groups": 2}, (9, 9), "groups"),
    "padding_not_centred": (
        {"padding": 1, "stride": 5},
        {"padding": 2, "stride": 5, "identity": False},
        (11, 11),
        "does not sit centred",
    ),
    "padding_mode": ({"padding": 1, "padding_mode": "reflect"}, {}, (9, 9), "padding_mode"),
    "identity_stride2": ({"padding": 1, "stride": 2}, {"stride": 2}, (1, 1), "stride 1"),
}


@pytest.mark.parametrize("name", MISALIGNED)
def test_misaligned_blocks_fold_adjacently(name: str) -> None:
    first, second, size, words = MISALIGNED[name]
    model = _net(Spread(dict(first), dict(second)))
    x = torch.randn(2, 8, *size)
    reasons = [SkipReason.BRANCHES_MISALIGNED] if model[0].identity is not None else []
    result = _kept(model, x, reasons, folded=2)
    if reasons:
        assert result.skipped[0].bn == "0.identity" and words in result.skipped[0].detail
    assert {f.pair.pattern for f in result.folded} == {"conv→bn"}
    assert any(words in note for note in result.plan.notes)


class Escaping(nn.Module):
    """A RepVGG block whose 3x3 branch output also leaves the block."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dense, self.one, self.identity = (
            ConvBN(2, c, c, 3, padding=1),
            ConvBN(2, c, c, 1),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x)
        return torch.cat([y + self.one(x) + self.identity(x), y], 1)


class SharedConv(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn_a, self.bn_b, self.identity = (
            nn.BatchNorm2d(c),
            nn.BatchNorm2d(c),
            nn.BatchNorm2d(c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x)) + self.identity(x)


def test_branch_output_used_elsewhere_keeps_the_block() -> None:
    result = _kept(_net(Escaping()), _input(2), [SkipReason.NO_PRODUCER], folded=2)
    assert result.skipped[0].bn == "0.identity"
    assert "merges no branches: 0.dense.bn (BatchNorm2d) is no branch" in result.skipped[0].detail


class ActivatedBranch(SumThenMore):
    """A RepVGG block whose 1x1 branch has its own ReLU: the sum is no block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + torch.relu(self.one(x)) + self.identity(x)


def test_an_identity_bn_of_a_sum_that_is_no_block_says_why() -> None:
    result = _kept(_net(ActivatedBranch()), _input(2), [SkipReason.NO_PRODUCER], folded=2)
    assert "merges no branches: relu is no branch on the block input" in result.skipped[0].detail


def test_shared_conv_keeps_the_block() -> None:
    result = fold_fp64(_net(SharedConv()), _input(2), folded=0)
    reasons = {s.bn: s.reason for s in result.skipped}
    assert reasons["0.identity"] == SkipReason.NO_PRODUCER and not result.merges
    assert reasons["0.bn_a"] == reasons["0.bn_b"] == SkipReason.PRODUCER_SHARED


def test_merge_off_keeps_the_structure() -> None:
    model, x = _net(repvgg()), _input(2)
    plan = bnfold.find_pairs(model, x, merge_branches=False)
    assert not plan.merges and [s.reason for s in plan.skipped] == [SkipReason.BRANCH_MERGE_OFF]
    result = bnfold.fold(model.double(), x.double(), merge_branches=False)
    assert [s.reason for s in result.skipped] == [SkipReason.BRANCH_MERGE_OFF]
    assert len(_convs(result.model)) == 2 and len(result.folded) == 2
    assert torch.allclose(run(model, x.double()), run(result.model, x.double()), atol=1e-12)
    assert bnfold.count_bn_kernels(result.model, x.double()) == 1


def test_inplace_on_a_plain_module_keeps_the_structure() -> None:
    model, x = _net(repvgg()).double(), _input(2).double()
    expected = run(model, x)
    result = bnfold.fold(model, x, inplace=True)
    assert result.model is model and not result.merges
    assert [s.reason for s in result.skipped] == [SkipReason.NEEDS_GRAPH_REWRITE]
    assert "inplace=False" in result.skipped[0].detail
    assert torch.allclose(expected, run(model, x), atol=1e-12)


class Untraceable(nn.Module):
    """fx's proxies are no tensors: the trace takes the other branch, so the dataflow is
    recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.block = repvgg()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = x * 0
        return self.block(x)


def test_recorded_dataflow_does_not_merge() -> None:
    model, x = randomize(Untraceable().eval()), _input(2)
    result = fold_fp64(model, x, folded=2)
    assert result.plan.method == "recorded" and not result.merges
    assert [s.reason for s in result.skipped] == [SkipReason.NEEDS_GRAPH_REWRITE]
    assert "recorded" in result.skipped[0].detail
    assert "torch.export" in SkipReason.NEEDS_GRAPH_REWRITE.advice()
    result = bnfold.fold(model, x, merge_branches=False)  # the user's choice, not the trace
    assert [s.reason for s in result.skipped] == [SkipReason.BRANCH_MERGE_OFF]
    assert len(result.folded) == 2


def test_caller_model_is_not_changed() -> None:
    model, x, _, _ = MERGING["mobileone"]()
    before = copy.deepcopy(model.state_dict())
    bnfold.fold(model, x)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_branch_norm_that_runs_an_activation_keeps_the_block() -> None:
    """x + BatchNormAct(conv(x)): the subclass's ReLU runs on its branch before the sum, so the
    branches are no affine sum; the norm folds into its conv and keeps its activation."""
    from wild_models import BatchNormAct2d

    block = Branches([ConvBN(2, 8, 8, 1), None])
    block.branches[0].bn = BatchNormAct2d(8)
    model = _net(block)
    result = fold_fp64(model, _input(2), folded=1, skipped=0)
    assert not result.plan.merges
    assert result.folded[0].pair.pattern == "conv→bn"


class StdConv(nn.Conv2d):
    """Weight standardisation: the conv computes with a weight that is not its stored one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def test_a_branch_conv_with_its_own_forward_keeps_the_block() -> None:
    """A BN-free branch whose conv overrides forward is no plain conv: the block is not merged
    (the identity BN stays), whatever the merge would assume of its stored weight."""
    model = _net(Branches([ConvBN(2, 8, 8, 3, padding=1), StdConv(8, 8, 1), nn.BatchNorm2d(8)]))
    result = fold_fp64(model, _input(2), folded=1, skipped=1)
    assert not result.plan.merges
    assert result.skipped[0].bn == "0.branches.2"


class ReflectPadConv(nn.Conv2d):
    """Declares ``padding=1`` but reflect-pads by 1 itself and convolves unpadded: a proven
    pads-then-conv forward whose padding is not the module's zero padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, [1, 1, 1, 1], mode="reflect")
        return F.conv2d(padded, self.weight, self.bias, self.stride, 0)


def test_a_branch_conv_that_pads_in_its_forward_keeps_the_block() -> None:
    """Merging builds a plain zero-padded conv from the branches' declared geometry: a branch
    whose forward pads for itself (TF "same", reflect) would lose its padding. Its BN still
    folds into it (a pad before the conv does not change a fold after it)."""
    block = Branches([ConvBN(2, 8, 8, 1), nn.BatchNorm2d(8)])
    block.branches.insert(0, ConvBN(2, 8, 8, 3, padding=1))
    block.branches[0].conv = ReflectPadConv(8, 8, 3, padding=1, bias=False)
    model = _net(block)
    result = fold_fp64(model, _input(2), folded=2, skipped=1)
    assert not result.plan.merges
    assert result.skipped[0].reason == SkipReason.BRANCHES_MISALIGNED
    assert "0.branches.0.conv (ReflectPadConv) has its own forward" in result.skipped[0].detail


class OffCentre(nn.Module):
    """Stride 2: a 3x3 conv padded by 1 and a 2x2 conv unpadded. Their outputs agree in size on
    even inputs (the 2x2 kernel fits at offset 1) and differ on odd ones, where the sum
    broadcasts a 1x1 output."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.a = ConvBN(2, c, c, 3, stride=2, padding=1)
        self.b = ConvBN(2, c, c, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def test_off_centre_branches_are_not_merged_and_stay_exact_on_other_sizes() -> None:
    model = randomize(OffCentre()).double().eval()
    result = _kept(model, torch.randn(2, 8, 8, 8, dtype=torch.float64), [], folded=2)
    assert any("does not sit centred" in note for note in result.plan.notes)
    small = torch.randn(1, 8, 3, 3, dtype=torch.float64)  # branch outputs 2x2 and 1x1
    assert torch.allclose(run(result.model, small), run(model, small), rtol=1e-10, atol=1e-12)


class WrittenBlockInput(nn.Module):
    """RepVGG branches on x, with x changed in place between their reads and the sum (the
    merged conv, reading x at the sum, would read the changed values)."""

    def __init__(self, after_branches: bool) -> None:
        super().__init__()
        self.block = repvgg()
        self.after_branches = after_branches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        a, b, identity = self.block.branches
        if self.after_branches:  # then x joins the sum as a plain identity
            total = a(x) + b(x) + identity(x)
            x.mul_(3.0)
            return total + x
        first = a(x)
        F.relu(x, inplace=True)  # the later branches read relu(x)
        return first + b(x) + identity(x)


@pytest.mark.parametrize("after_branches", [False, True])
def test_a_block_whose_input_is_written_in_place_is_not_merged(after_branches: bool) -> None:
    model = randomize(WrittenBlockInput(after_branches))
    result = _kept(model, _input(2), [SkipReason.IN_PLACE_WRITE], folded=2)
    assert "writes in place into the block's input" in result.skipped[0].detail


def test_a_merge_whose_weights_float16_cannot_hold_keeps_the_block() -> None:
    """Three centre taps of 1 under BN scales of 4e4 each fit float16 alone, not summed."""
    block = repvgg(c=4)
    with torch.no_grad():
        for conv in (block.branches[0].conv, block.branches[1].conv):
            conv.weight.zero_()
        for i in range(4):
            block.branches[0].conv.weight[i, i, 1, 1] = 1.0
            block.branches[1].conv.weight[i, i, 0, 0] = 1.0
        for norm in (block.branches[0].bn, block.branches[1].bn, block.branches[2]):
            norm.weight.fill_(4e4)
    model = nn.Sequential(bare(block)).eval().half()
    x = (torch.randn(2, 4, 8, 8) * 1e-2).half()
    result = bnfold.fold(model, x)
    assert not result.merges and len(result.folded) == 2
    (skip,) = result.skipped
    assert skip.reason == SkipReason.WEIGHT_OVERFLOW and "1.2e+05" in skip.detail
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    torch.testing.assert_close(run(model, x), run(result.model, x), rtol=1e-2, atol=1.0)
