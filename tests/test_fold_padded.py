"""Conv subclasses whose forward only pads its input ("same" padding computed at run time, as
TensorFlow-ported models do) fold like plain convs; any other custom forward stays, naming the op
it does not understand. Exact in float64 at several input sizes, odd ones included (where same
padding is asymmetric)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from fold_checks import FP64_REL_TOL, assert_precision, fold_fp64, randomize, rel_error, run
from torch import nn

import bnfold
from bnfold import SkipReason

SIZES = ((9, 9), (8, 8), (7, 10), (11, 6))


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Total padding that makes a strided conv's output ceil(size / stride) long."""
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class TfSameConv(nn.Conv2d):
    """Same padding as TensorFlow computes it, on every call: always pads (maybe by 0), the odd
    pixel on the bottom/right (timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.size()[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = same_pads(height, kh, self.stride[0], self.dilation[0])
        pw = same_pads(width, kw, self.stride[1], self.dilation[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], value=0)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class DynamicSameConv(nn.Conv2d):
    """Pads only when the input's size asks for it (efficientnet-pytorch's dynamic variant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.size()[-2:]
        ph = same_pads(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = same_pads(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class StaticSameConv(nn.Conv2d):
    """Padding fixed for one image size, held as a ZeroPad2d child (efficientnet-pytorch's static
    variant)."""

    def __init__(self, *args, image_size: int = 9, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        total = same_pads(image_size, self.kernel_size[0], self.stride[0], self.dilation[0])
        pads = (total // 2, total - total // 2) * 2
        self.static_padding = nn.ZeroPad2d(pads) if total else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class ReflectSameConv(nn.Conv2d):
    """Same padding by reflection, through the conv's own ``_conv_forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.size()[-2:]
        ph = same_pads(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = same_pads(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2], mode="reflect")
        return self._conv_forward(x, self.weight, self.bias)


class StdSameConv(TfSameConv):
    """Weight-standardised (BiT): a scale folded into the weight would be undone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(F.pad(x, [1, 1, 1, 1]), w, self.bias, self.stride)


class ScaledOutputConv(TfSameConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class OnesPaddedConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [1, 1, 1, 1], value=1.0), self.weight, self.bias, self.stride)


class NoneBiasConv(nn.Conv2d):
    """Passes ``None`` where its bias goes: the bias a fold adds would never be read."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [1, 1, 1, 1]), self.weight, None, self.stride)


class Unrecordable(nn.Module):
    """fx takes the wrong branch of its isinstance check, so the dataflow is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = TfSameConv(3, 6, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) if isinstance(x, torch.Tensor) else x


def _seq(*layers: nn.Module) -> nn.Module:
    return randomize(nn.Sequential(*layers).eval())


def _zero_shift(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A BN that maps 0 to 0 (its shift beta - mean * gamma / sqrt(var + eps) is 0)."""
    with torch.no_grad():
        bn.bias.zero_()
        bn.running_mean.zero_()
    return bn


def _efficientnet_stem() -> nn.Module:
    return _seq(
        TfSameConv(3, 8, 3, stride=2, bias=False),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        DynamicSameConv(8, 8, 3, stride=2, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        StaticSameConv(8, 6, 3, stride=2, image_size=3),
        nn.BatchNorm2d(6),
    )


def _bn_before_zero_shift() -> nn.Module:
    model = _seq(nn.BatchNorm2d(3), TfSameConv(3, 6, 3, stride=2), nn.BatchNorm2d(6))
    _zero_shift(model[0])
    return model


FOLDS = {
    "efficientnet_stem": (_efficientnet_stem, 3),
    "bn_before_zero_padded_with_zero_shift": (_bn_before_zero_shift, 2),
    "tf_same_dilated": (lambda: _seq(TfSameConv(3, 6, 3, dilation=2), nn.BatchNorm2d(6)), 1),
}


def _assert_exact_at_every_size(model: nn.Module, folded: nn.Module) -> None:
    model, folded = copy.deepcopy(model).double(), copy.deepcopy(folded).double()
    for size in SIZES:
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        assert rel_error(run(model, x), run(folded, x)) < FP64_REL_TOL, size


@pytest.mark.parametrize("name", sorted(FOLDS))
def test_padded_conv_subclass_folds_exactly_at_every_size(name: str) -> None:
    build, count = FOLDS[name]
    torch.manual_seed(0)
    model = build()
    result = fold_fp64(model, torch.randn(2, 3, 9, 9), folded=count, skipped=0)
    assert bnfold.count_bn_kernels(result.model, torch.randn(2, 3, 9, 9).double()) == 0
    _assert_exact_at_every_size(model, result.model)


# One folded layer each: the ratio of a deeper net measures its chaos more than the fold (the
# stem above gives 2.1-2.7 under oneDNN, the same as its stock-conv twin with symmetric padding).
PRECISION = {
    "tf_same_strided": lambda: _seq(TfSameConv(3, 8, 3, stride=2), nn.BatchNorm2d(8)),
    "dynamic_same_depthwise": lambda: _seq(
        DynamicSameConv(3, 6, 3, stride=2, groups=3, bias=False), nn.BatchNorm2d(6)
    ),
    "static_same": lambda: _seq(StaticSameConv(3, 8, 3, stride=2), nn.BatchNorm2d(8)),
    "bn_before_reflect_same_conv": lambda: _seq(nn.BatchNorm2d(3), ReflectSameConv(3, 8, 3)),
    "bn_before_zero_padded_with_zero_shift": lambda: _seq(
        _zero_shift(nn.BatchNorm2d(3)), TfSameConv(3, 8, 3, stride=2)
    ),
}


@pytest.mark.parametrize("name", sorted(PRECISION))
def test_padded_conv_subclass_float32_error_is_not_worse(name: str) -> None:
    """On 64 seeded samples, as in test_fold_patterns (a few outputs make a noisy ratio)."""
    torch.manual_seed(0)
    model = PRECISION[name]()
    assert_precision(model, torch.randn(64, 3, 9, 9, generator=torch.Generator().manual_seed(1)))


def test_the_size_decisions_of_a_proven_forward_are_plan_notes() -> None:
    plan = bnfold.find_pairs(_efficientnet_stem(), torch.randn(2, 3, 9, 9))
    assert len(plan.pairs) == 3
    assert any(note.startswith("0: forward specialised on") for note in plan.notes)
    assert any(note.startswith("3: forward specialised on") for note in plan.notes)
    sizes = [note for note in plan.notes if "specialised on" in note]
    assert all("x.size()" in note and "<built-in" not in note for note in sizes), sizes


def test_the_recorded_path_folds_a_padded_conv_subclass() -> None:
    model = randomize(Unrecordable().eval())
    result = fold_fp64(model, torch.randn(2, 3, 9, 9), folded=1, skipped=0)
    assert result.plan.method == "recorded"
    _assert_exact_at_every_size(model, result.model)


X = (2, 3, 9, 9)
# name -> (model, reason, text the skip's detail must hold: the op that blocks the fold)
STAYS = {
    "weight_standardised": (
        lambda: _seq(StdSameConv(3, 6, 3), nn.BatchNorm2d(6)),
        SkipReason.UNSUPPORTED_FORWARD,
        "0 (StdSameConv) overrides forward: its convolution's weight is truediv",
    ),
    "scales_its_output": (
        lambda: _seq(ScaledOutputConv(3, 6, 3), nn.BatchNorm2d(6)),
        SkipReason.UNSUPPORTED_FORWARD,
        "its forward returns mul",
    ),
    "pads_with_ones": (
        lambda: _seq(OnesPaddedConv(3, 6, 3), nn.BatchNorm2d(6)),
        SkipReason.UNSUPPORTED_FORWARD,
        "pad pads with the constant 1.0, not 0",
    ),
    "bias_not_read": (
        lambda: _seq(NoneBiasConv(3, 6, 3, bias=False), nn.BatchNorm2d(6)),
        SkipReason.UNSUPPORTED_FORWARD,
        "given a bias (as folding gives it), its convolution's bias is None",
    ),
    "bn_before_tf_same_conv": (
        lambda: _seq(nn.BatchNorm2d(3), TfSameConv(3, 6, 3, stride=2)),
        SkipReason.ZERO_PADDING,
        "1 (TfSameConv): its forward zero-pads its input (pad by [1, 1, 1, 1])",
    ),
    "bn_before_reflect_same_conv": (  # reflect pads on 9x9; another size may take another path
        lambda: _seq(nn.BatchNorm2d(3), ReflectSameConv(3, 6, 3, stride=2)),
        SkipReason.ZERO_PADDING,
        "decides from the input's size how to pad",
    ),
    "bn_before_same_conv_that_pads_on_other_sizes": (  # k=2, s=2: no pad on 8x8, one on 9x9
        lambda: _seq(nn.BatchNorm2d(3), DynamicSameConv(3, 6, 2, stride=2)),
        SkipReason.ZERO_PADDING,
        "decides from the input's size how to pad",
    ),
    "bn_before_static_zero_pad": (
        lambda: _seq(nn.BatchNorm2d(3), StaticSameConv(3, 6, 3, stride=2)),
        SkipReason.ZERO_PADDING,
        "static_padding (ZeroPad2d) by (1, 1, 1, 1)",
    ),
}


@pytest.mark.parametrize("name", sorted(STAYS))
def test_a_forward_that_is_not_pad_then_conv_stays_and_outputs_match(name: str) -> None:
    build, reason, blocker = STAYS[name]
    torch.manual_seed(0)
    model = build()
    shape = (2, 3, 8, 8) if "other_sizes" in name else X
    result = fold_fp64(model, torch.randn(shape), folded=0, skipped=1)
    (skip,) = result.skipped
    assert skip.reason == reason and blocker in skip.detail, skip.detail
    _assert_exact_at_every_size(model, result.model)


def test_the_bias_probe_leaves_the_module_as_it_was() -> None:
    model = _seq(TfSameConv(3, 6, 3, bias=False), nn.BatchNorm2d(6))
    before = dict(model[0].named_parameters())
    bnfold.find_pairs(model, torch.randn(*X))
    assert model[0].bias is None and dict(model[0].named_parameters()) == before
