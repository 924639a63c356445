"""Folds beyond adjacency: through channel-preserving ops (both directions), across cat and
split, and into every addend of a sum. Each fixture imitates the code that holds the pattern in
real networks; each is exact in float64, keeps the fp32 error ratio, and the negative cases stay
with their reason while the outputs still match."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from fold_checks import assert_precision, fold_fp64, randomize, rel_error
from torch import nn

import bnfold
from bnfold import SkipReason

Fixture = Callable[[], tuple[nn.Module, torch.Tensor]]


class Through(nn.Module):
    """``first`` -> ops -> ``second``: a layer and a norm with channel-preserving ops between."""

    def __init__(self, first: nn.Module, ops: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first, self.ops, self.second = first, ops, second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.ops(self.first(x)))


class LinearNorm(nn.Module):
    """LeViT's Linear + BatchNorm1d on tokens: (B, N, C) flattened to (B*N, C) and back."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.c = nn.Linear(a, b, bias=False)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class Attention(nn.Module):
    """A LeViT-style attention block: qkv and proj are LinearNorms."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = LinearNorm(dim, 3 * dim)
        self.proj = LinearNorm(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class ResidualHead(nn.Module):
    """A trunk whose last residual add is followed by a BN, global pooling and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_final = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x)) + x
        x = self.bn_final(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class ChannelsLast(nn.Module):
    """ConvNeXt-style: BN, channels moved last, a Linear over them, moved back."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CatOfOne(nn.Module):
    """A concatenation of a single tensor (a list of branches that holds one) before a BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([self.conv(x)], dim=1))


class NormThenCatOfOne(nn.Module):
    """The same after a BN: the cat of one tensor between a BN and the conv it folds into."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.bn(x)], dim=1))


class MixConv(nn.Module):
    """MixNet's mixed-kernel depthwise conv: channel groups, kernels 3/5/7, cat, one BN."""

    def __init__(self, channels: int = 12) -> None:
        super().__init__()
        self.splits = [4, 4, 4]
        self.convs = nn.ModuleList(
            nn.Conv2d(4, 4, k, padding=k // 2, groups=4, bias=False) for k in (3, 5, 7)
        )
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, dim=1)
        return F.relu(
            self.bn(torch.cat([c(p) for c, p in zip(self.convs, parts, strict=False)], dim=1))
        )


class TwoPathStem(nn.Module):
    """An Inception/PeleeNet-style stem: two convs concatenated, or summed, then one BN."""

    def __init__(self, combine: str, extra: bool = False) -> None:
        super().__init__()
        self.combine, self.extra = combine, extra
        width = 6 if combine == "sum" else 3
        self.a = nn.Conv2d(3, width, 3, padding=1)
        self.b = nn.Conv2d(3, width, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        if self.combine == "cat_axis":  # torch's NumPy-style keyword
            y = torch.cat([a, b], axis=1)
        else:
            y = torch.cat([a, b], 1) if self.combine == "cat" else a + b
        out = self.bn(y)
        return out + a.sum() if self.extra else out


class SplitAfterNorm(nn.Module):
    """BN, then chunk along channels, each piece into its own conv."""

    def __init__(self, padding: int = 0, from_end: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)
        self.left = nn.Conv2d(4, 5, 3 if padding else 1, padding=padding)
        self.right = nn.Conv2d(4, 5, 1)
        self.from_end = from_end  # the second piece read as pieces[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = self.bn(x).chunk(2, dim=1)
        left, right = (pieces[0], pieces[-1]) if self.from_end else pieces
        return torch.cat([self.left(left), self.right(right)], 1)


def _through(first: nn.Module, ops: nn.Module, second: nn.Module, shape: tuple) -> Fixture:
    return lambda: (randomize(Through(first, ops, second).eval()), torch.randn(shape))


def _module(build: Callable[[], nn.Module], shape: tuple) -> Fixture:
    return lambda: (randomize(build().eval()), torch.randn(shape))


FOLDS: dict[str, tuple[Fixture, int]] = {  # fixture, BNs folded (none left)
    "conv_dropout_bn": (
        _through(nn.Conv2d(4, 6, 3), nn.Dropout(0.3), nn.BatchNorm2d(6), (2, 4, 7, 7)),
        1,
    ),
    "conv_avgpool_bn": (
        _through(nn.Conv2d(4, 6, 3), nn.AvgPool2d(2), nn.BatchNorm2d(6), (2, 4, 9, 9)),
        1,
    ),
    "conv_padded_avgpool_exclude_pad_bn": (
        _through(
            nn.Conv2d(4, 6, 3),
            nn.AvgPool2d(3, 1, 1, count_include_pad=False),
            nn.BatchNorm2d(6),
            (2, 4, 9, 9),
        ),
        1,
    ),
    "conv_maxpool_bn": (
        _through(nn.Conv2d(4, 6, 3), nn.MaxPool2d(3, 2, 1), nn.BatchNorm2d(6), (2, 4, 9, 9)),
        1,
    ),
    "conv_upsample_nearest_bn": (
        _through(nn.Conv2d(4, 6, 3), nn.Upsample(scale_factor=2), nn.BatchNorm2d(6), (2, 4, 7, 7)),
        1,
    ),
    "convt_upsample_bilinear_bn": (
        _through(
            nn.ConvTranspose2d(4, 6, 2, 2),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.BatchNorm2d(6),
            (2, 4, 5, 5),
        ),
        1,
    ),
    "conv_pixel_shuffle_bn": (
        _through(
            nn.Conv2d(4, 24, 3, padding=1), nn.PixelShuffle(2), nn.BatchNorm2d(6), (2, 4, 5, 5)
        ),
        1,
    ),
    "conv_channel_shuffle_bn": (
        _through(nn.Conv2d(4, 6, 1), nn.ChannelShuffle(3), nn.BatchNorm2d(6), (2, 4, 5, 5)),
        1,
    ),
    "bn_channel_shuffle_conv": (
        _through(nn.BatchNorm2d(6), nn.ChannelShuffle(2), nn.Conv2d(6, 4, 1), (2, 6, 5, 5)),
        1,
    ),
    "bn_pixel_unshuffle_conv": (
        _through(nn.BatchNorm2d(3), nn.PixelUnshuffle(2), nn.Conv2d(12, 4, 1), (2, 3, 8, 8)),
        1,
    ),
    "bn_maxpool_conv": (
        _through(nn.BatchNorm2d(4), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), (2, 4, 8, 8)),
        1,
    ),
    "bn_flatten_linear": (
        _through(nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 9, 5), (2, 4, 3, 3)),
        1,
    ),
    "bn_pool_flatten_linear": (
        _through(
            nn.BatchNorm2d(4),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            nn.Linear(4, 5),
            (2, 4, 6, 6),
        ),
        1,
    ),
    "levit_attention": (_module(Attention, (2, 5, 16)), 2),
    "residual_bn_pool_head": (_module(ResidualHead, (2, 8, 6, 6)), 1),
    "bn_channels_last_linear": (_module(ChannelsLast, (2, 8, 3, 4)), 1),
    "mixconv_cat_bn": (_module(MixConv, (2, 12, 9, 9)), 1),
    "cat_of_one_bn": (_module(CatOfOne, (2, 4, 7, 7)), 1),
    "bn_cat_of_one_conv": (_module(NormThenCatOfOne, (2, 4, 7, 7)), 1),
    "stem_cat_bn": (_module(lambda: TwoPathStem("cat"), (2, 3, 8, 8)), 1),
    "stem_cat_axis_bn": (_module(lambda: TwoPathStem("cat_axis"), (2, 3, 8, 8)), 1),
    "stem_sum_bn": (_module(lambda: TwoPathStem("sum"), (2, 3, 8, 8)), 1),
    "bn_chunk_convs": (_module(SplitAfterNorm, (2, 8, 7, 7)), 1),
    "bn_chunk_convs_from_end": (_module(lambda: SplitAfterNorm(from_end=True), (2, 8, 7, 7)), 1),
}


@pytest.mark.parametrize("name", sorted(FOLDS))
def test_folds_beyond_adjacency_exactly(name: str) -> None:
    build, folded = FOLDS[name]
    model, x = build()
    fold_fp64(model, x, folded=folded, skipped=0)
    assert_precision(model, x)


def test_the_plan_names_every_layer_and_the_ops_between() -> None:
    model, x = FOLDS["mixconv_cat_bn"][0]()
    (pair,) = bnfold.find_pairs(model, x).pairs
    assert pair.producer == "convs.0, convs.1, convs.2"
    assert pair.via == ("cat",)
    model, x = FOLDS["residual_bn_pool_head"][0]()
    (pair,) = bnfold.find_pairs(model, x).pairs
    assert (pair.producer, pair.pattern) == ("fc", "bn→linear")
    assert pair.via == ("adaptive_avg_pool2d", "flatten")


def _negative_scale(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight[1] = -module.weight[1]
    return model


SKIPS: dict[str, tuple[Fixture, SkipReason, str]] = {  # fixture, reason, named in the detail
    "maxpool_negative_scale": (
        lambda: (
            _negative_scale(
                randomize(Through(nn.Conv2d(4, 6, 3), nn.MaxPool2d(2), nn.BatchNorm2d(6)).eval())
            ),
            torch.randn(2, 4, 8, 8),
        ),
        SkipReason.MAX_POOL_SIGN,
        "ops (MaxPool2d)",
    ),
    "avgpool_counts_padding": (
        _through(nn.Conv2d(4, 6, 3), nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(6), (2, 4, 9, 9)),
        SkipReason.ZERO_PADDING,
        "ops (AvgPool2d)",
    ),
    "avgpool_divisor_override": (
        _through(
            nn.Conv2d(4, 6, 3), nn.AvgPool2d(2, divisor_override=3), nn.BatchNorm2d(6), (2, 4, 9, 9)
        ),
        SkipReason.NON_AFFINE_BETWEEN,
        "ops (AvgPool2d)",
    ),
    "flatten_merges_space_into_bn": (
        _through(nn.Conv2d(4, 3, 1), nn.Flatten(), nn.BatchNorm1d(27), (2, 4, 3, 3)),
        SkipReason.NO_PRODUCER,
        "second reads ops (Flatten)",
    ),
    "cat_with_the_block_input": (
        _module(lambda: _CatInput(), (2, 4, 5, 5)),
        SkipReason.NO_PRODUCER,
        "x in cat",
    ),
    "sum_addend_feeds_elsewhere": (
        _module(lambda: TwoPathStem("sum", extra=True), (2, 3, 8, 8)),
        SkipReason.PRODUCER_FANOUT,
        "a output also feeds",
    ),
    "split_piece_into_zero_padded_conv": (
        _module(lambda: SplitAfterNorm(padding=1), (2, 8, 7, 7)),
        SkipReason.ZERO_PADDING,
        "left",
    ),
}


class _CatInput(nn.Module):
    """DenseNet-style: the block input concatenated with a conv's output, then BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.cat([x, self.conv(x)], 1))


@pytest.mark.parametrize("name", sorted(SKIPS))
def test_what_must_not_fold_stays_with_its_reason(name: str) -> None:
    build, reason, named = SKIPS[name]
    model, x = build()
    result = fold_fp64(model, x, folded=0, skipped=1)
    (skip,) = result.skipped
    assert skip.reason == reason, skip
    assert named in skip.detail, skip.detail


class _Gated(nn.Module):
    """The fixture behind a shape check torch.fx cannot trace: its dataflow is recorded."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:  # a proxy cannot decide this
            raise ValueError("expects a batch")
        return self.inner(x)


# a recorded split is one node: refused
RECORDED = sorted(set(FOLDS) - {"bn_chunk_convs", "bn_chunk_convs_from_end"})


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_dataflow_folds_the_same(name: str) -> None:
    build, folded = FOLDS[name]
    model, x = build()
    result = fold_fp64(_Gated(model).eval(), x, folded=folded, skipped=0)
    assert result.plan.method == "recorded"


@pytest.mark.parametrize("name", sorted(FOLDS))
def test_exported_programs_fold_the_same(name: str) -> None:
    build, folded = FOLDS[name]
    model, x = build()
    model, x = model.double(), x.double()
    program = torch.export.export(model, (x,)).module()
    result = fold_fp64(program, x, folded=folded, skipped=0)
    assert result.graph_rewritten


class Permuted(nn.Module):
    """A stored channel permutation between a layer and a norm, by indexing or index_select."""

    def __init__(self, norm_first: bool, perm: list[int], select: bool, dim: int = 1) -> None:
        super().__init__()
        self.norm_first, self.select, self.dim = norm_first, select, dim
        self.register_buffer("perm", torch.tensor(perm))
        self.conv = nn.Conv2d(6, 6, 1) if norm_first else nn.Conv2d(4, 6, 3)
        self.bn = nn.BatchNorm2d(6)

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        return torch.index_select(x, self.dim, self.perm) if self.select else x[:, self.perm]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            return self.conv(self.permute(self.bn(x)))
        return self.bn(self.permute(self.conv(x)))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("select", [False, True])
def test_stored_channel_permutations_fold_with_the_permuted_map(norm_first, select) -> None:
    model = randomize(Permuted(norm_first, [3, 0, 5, 1, 4, 2], select).eval())
    x = torch.randn(2, 6 if norm_first else 4, 7, 7)
    result = fold_fp64(model, x, folded=1, skipped=0)
    assert result.folded[0].pair.via == ("index_select" if select else "getitem",)
    assert_precision(model, x)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("select", [False, True])
def test_stored_permutations_fold_in_a_recorded_dataflow(norm_first, select) -> None:
    model = randomize(Permuted(norm_first, [3, 0, 5, 1, 4, 2], select).eval())
    x = torch.randn(2, 6 if norm_first else 4, 7, 7)
    result = fold_fp64(_Gated(model).eval(), x, folded=1, skipped=0)
    assert result.plan.method == "recorded"
    assert result.folded[0].pair.via == ("index_select" if select else "index",)


@pytest.mark.parametrize("norm_first", [False, True])
def test_a_permutation_selected_along_a_negative_dim_folds(norm_first: bool) -> None:
    model = randomize(Permuted(norm_first, [3, 0, 5, 1, 4, 2], select=True, dim=-3).eval())
    x = torch.randn(2, 6 if norm_first else 4, 7, 7)
    fold_fp64(model, x, folded=1, skipped=0)
    assert_precision(model, x)


def test_an_index_that_repeats_channels_is_no_permutation() -> None:
    model = randomize(Permuted(False, [0, 0, 1, 2, 3, 4], select=True).eval())
    result = fold_fp64(model, torch.randn(2, 4, 7, 7), folded=0, skipped=1)
    assert result.skipped[0].reason == SkipReason.NO_PRODUCER


class Diamonds(nn.Module):
    """Each level adds two views of the level below: 2**depth paths from the BN to the conv."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        for _ in range(self.depth):
            y = y.flatten(2).view_as(x) + y.reshape(2, 4, 3, 3)
        return self.bn(y)


def test_paths_that_multiply_are_not_followed_forever() -> None:
    """A graph whose paths double at each level: the walk stops after a bounded number of
    nodes (2**40 paths would never end) and the BN stays with a reason."""
    model = randomize(Diamonds(40).eval())
    started = time.perf_counter()
    plan = bnfold.find_pairs(model, torch.randn(2, 4, 3, 3))
    assert time.perf_counter() - started < 30
    assert [s.bn for s in plan.skipped] == ["bn"]


@torch.fx.wrap
def mean(x: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    """A user function named like ``torch.mean`` that is not an average."""
    return x.abs().mean(dim)


class NamedLikeTorch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(mean(self.bn(x), (2, 3)))


def test_a_user_function_named_like_a_torch_op_is_not_followed() -> None:
    result = fold_fp64(randomize(NamedLikeTorch()), torch.randn(2, 4, 5, 5), folded=0, skipped=1)
    assert result.skipped[0].reason == SkipReason.NON_AFFINE_BETWEEN


class MeanOfEverything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x).mean(dim=[]).expand(2, 4))


def test_a_mean_over_every_dim_is_not_followed() -> None:
    fold_fp64(randomize(MeanOfEverything()), torch.randn(5, 4), folded=0, skipped=1)


class ChannelsLastBySize(nn.Module):
    """BN2d -> reshape(N, -1, C) -> Linear(C): channels last only where H = W = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x).reshape(x.shape[0], -1, 4))


def test_a_view_proven_only_through_size_1_dims_is_not_followed() -> None:
    """On a 1x1 example the reshape keeps each channel whole; on 2x2 it does not (the model
    runs on both). The proof from sizes cannot tell, so the BN stays."""
    model = randomize(ChannelsLastBySize())
    result = fold_fp64(model, torch.randn(2, 4, 1, 1), folded=0, skipped=1)
    assert result.skipped[0].reason == SkipReason.INPUT_DEPENDENT
    assert "without size-1 dims" in result.skipped[0].detail
    fold_fp64(model, torch.randn(2, 4, 2, 2), folded=0, skipped=1)


class ViewTo(nn.Module):
    """BN1d(6) on (N, 6, L) -> a view to 2-D written several ways -> Linear(12)."""

    def __init__(self, view: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(6)
        self.fc = nn.Linear(12, 3)
        self.view = view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.view(self.bn(x)))


LITERAL_VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "batch_written_out": lambda y: y.reshape(2, -1),  # the example's batch size
    "width_written_out": lambda y: y.view(-1, 12),  # 6 channels x the example's L = 2
    "tuple_of_literals": lambda y: torch.reshape(y, (2, 12)),
}


@pytest.mark.parametrize("name", sorted(LITERAL_VIEWS))
def test_a_fold_across_a_view_to_literal_sizes_comes_with_a_note(name: str) -> None:
    """At another batch size or L the literal stays and the channels land elsewhere (the model
    still runs): the fold is exact on the example and the plan says what it assumed."""
    model = randomize(ViewTo(LITERAL_VIEWS[name])).double().eval()
    result = fold_fp64(model, torch.randn(2, 6, 2), folded=1, skipped=0)
    notes = [note for note in result.plan.notes if note.startswith("bn -> fc: ")]
    assert len(notes) == 1 and "written out" in notes[0], result.plan.notes


class GanHead(nn.Module):
    """DCGAN's generator input: Linear -> view(B, 32, 4, 4) -> BN2d; and a 1x1 view."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(8, 32 * 4 * 4), nn.BatchNorm2d(32)
        self.fc2, self.bn2 = nn.Linear(8, 16), nn.BatchNorm2d(16)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.fc(z)
        ones = self.bn2(self.fc2(z).view(z.size(0), 16, 1, 1))
        return self.bn(out.view(out.shape[0], 32, 4, 4)).relu()[:, :16] + ones


def test_views_with_literal_sizes_that_keep_the_channels_fold_at_every_batch_size() -> None:
    model = randomize(GanHead()).double().eval()
    result = fold_fp64(model, torch.randn(4, 8), folded=2, skipped=0)
    notes = [note for note in result.plan.notes if "written out" in note]
    assert len(notes) == 1 and notes[0].startswith("bn -> fc: view to sizes with 4, 4"), notes
    for batch in (1, 7):
        z = torch.randn(batch, 8, dtype=torch.float64)
        assert rel_error(model(z), result.model(z)) < 1e-10


def test_a_view_to_sizes_read_from_the_input_is_followed_at_every_batch_size() -> None:
    model = randomize(ViewTo(lambda y: y.reshape(y.shape[0], -1))).double().eval()
    result = fold_fp64(model, torch.randn(2, 6, 2), folded=1, skipped=0)
    assert not any("written out" in note for note in result.plan.notes)
    for batch in (1, 5):
        x = torch.randn(batch, 6, 2, dtype=torch.float64)
        assert rel_error(model(x), result.model(x)) < 1e-10


class TokensAsRows(nn.Module):
    """LeViT-style: Linear on (B, N, C) tokens, BN1d over ``view(-1, C)`` with the channel
    count written out, viewed back with sizes read from the input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8, bias=False)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.bn(y.view(-1, 8)).view(x.shape[0], x.shape[1], -1)


def test_the_channel_count_written_out_at_the_channels_axis_is_followed() -> None:
    model = randomize(TokensAsRows()).double().eval()
    result = fold_fp64(model, torch.randn(2, 7, 5), folded=1, skipped=0)
    assert not any("written out" in note for note in result.plan.notes)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    assert rel_error(model(x), result.model(x)) < 1e-10
