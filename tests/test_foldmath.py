"""The fold math alone: float64 tensors in, compared with applying the BN explicitly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bnfold.folding import math as foldmath
from bnfold.folding.math import (
    Affine,
    BnParams,
    Layout,
    Workspace,
    bn_affine,
    fold_into_input,
    fold_into_output,
    scale_output_channels_,
)

torch.manual_seed(0)


def _bn(channels: int, affine: bool = True, eps: float = 1e-5) -> BnParams:
    g = torch.Generator().manual_seed(channels)
    return BnParams(
        running_mean=torch.randn(channels, generator=g, dtype=torch.float64),
        running_var=torch.rand(channels, generator=g, dtype=torch.float64) + 0.1,
        weight=torch.randn(channels, generator=g, dtype=torch.float64) if affine else None,
        bias=torch.randn(channels, generator=g, dtype=torch.float64) if affine else None,
        eps=eps,
    )


def _apply_bn(y: torch.Tensor, bn: BnParams) -> torch.Tensor:
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def test_affine_matches_batch_norm() -> None:
    bn = _bn(6, eps=0.3)
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    affine = bn_affine(bn)
    expected = _apply_bn(x, bn)
    got = x * affine.scale[:, None] + affine.shift[:, None]
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_affine_false_is_pure_normalisation() -> None:
    bn = _bn(3, affine=False)
    affine = bn_affine(bn)
    torch.testing.assert_close(affine.scale, torch.rsqrt(bn.running_var + bn.eps))
    torch.testing.assert_close(affine.shift, -bn.running_mean * affine.scale)


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_then_bn(groups: int, bias: bool) -> None:
    w = torch.randn(6, 12 // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if bias else None
    bn = _bn(6)
    x = torch.randn(2, 12, 7, 7, dtype=torch.float64)
    folded = fold_into_output(w, b, bn_affine(bn), Layout(groups))
    expected = _apply_bn(F.conv2d(x, w, b, groups=groups), bn)
    got = F.conv2d(x, folded.weight, folded.bias, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("c_in", "c_out", "groups"), [(8, 8, 1), (8, 4, 1), (8, 8, 2), (6, 12, 3), (8, 8, 8), (4, 6, 2)]
)
def test_conv_transpose_then_bn(c_in: int, c_out: int, groups: int) -> None:
    """ConvTranspose weights are [C_in, C_out/g, k]: the classic place for a silent bug."""
    w = torch.randn(c_in, c_out // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(c_out, dtype=torch.float64)
    bn = _bn(c_out)
    x = torch.randn(2, c_in, 5, 5, dtype=torch.float64)
    folded = fold_into_output(w, b, bn_affine(bn), Layout(groups, transposed=True))
    expected = _apply_bn(F.conv_transpose2d(x, w, b, stride=2, groups=groups), bn)
    got = F.conv_transpose2d(x, folded.weight, folded.bias, stride=2, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_linear_then_bn() -> None:
    w = torch.randn(5, 7, dtype=torch.float64)
    bn = _bn(5)
    x = torch.randn(3, 7, dtype=torch.float64)
    folded = fold_into_output(w, None, bn_affine(bn), Layout())
    torch.testing.assert_close(
        F.linear(x, folded.weight, folded.bias),
        _apply_bn(F.linear(x, w), bn),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("groups", [1, 3, 6])
def test_bn_then_conv_without_padding(groups: int) -> None:
    w = torch.randn(12, 6 // groups, 3, 3, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64)
    bn = _bn(6)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    folded = fold_into_input(w, b, bn_affine(bn), Layout(groups))
    expected = F.conv2d(_apply_bn(x, bn), w, b, groups=groups)
    got = F.conv2d(x, folded.weight, folded.bias, groups=groups)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_bn_then_linear() -> None:
    w = torch.randn(4, 6, dtype=torch.float64)
    bn = _bn(6)
    x = torch.randn(3, 6, dtype=torch.float64)
    folded = fold_into_input(w, None, bn_affine(bn), Layout())
    torch.testing.assert_close(
        F.linear(x, folded.weight, folded.bias),
        F.linear(_apply_bn(x, bn), w),
        rtol=1e-12,
        atol=1e-12,
    )


def test_bn_then_conv_with_zero_padding_is_wrong_at_borders() -> None:
    """Why the pattern table refuses zero-padded BN -> Conv: the border differs."""
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    bn = _bn(4)
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    folded = fold_into_input(w, None, bn_affine(bn), Layout())
    expected = F.conv2d(_apply_bn(x, bn), w, padding=1)
    got = F.conv2d(x, folded.weight, folded.bias, padding=1)
    interior = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    torch.testing.assert_close(got[interior], expected[interior], rtol=1e-12, atol=1e-12)
    assert (got - expected).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_result_is_float64_for_every_dtype(dtype: torch.dtype) -> None:
    """The math promotes to float64, so callers round exactly once."""
    w = torch.randn(4, 3, 3, 3).to(dtype)
    affine = Affine(torch.rand(4, dtype=torch.float64) * 3, torch.randn(4, dtype=torch.float64))
    folded = fold_into_output(w, None, affine, Layout())
    assert folded.weight.dtype == torch.float64 and folded.bias.dtype == torch.float64
    exact = w.double() * affine.scale[:, None, None, None]
    assert torch.equal(folded.weight, exact)


@pytest.mark.parametrize("block", [1, 7, 1 << 17])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((8, 3, 3, 3), Layout()),  # conv
        ((8, 2, 3), Layout(groups=4)),  # grouped conv1d
        ((6, 5), Layout()),  # linear
        ((6, 4, 3, 3), Layout(groups=1, transposed=True)),
        ((6, 2, 3, 3, 3), Layout(groups=3, transposed=True)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blockwise_output_scaling_gives_the_same_bits(
    monkeypatch, block: int, shape: tuple, layout: Layout, dtype: torch.dtype
) -> None:
    """The in-place, blockwise path must round exactly like the float64 reference path."""
    monkeypatch.setattr(foldmath, "BLOCK", block)
    weight = torch.randn(shape).to(dtype)
    channels = shape[1] * layout.groups if layout.transposed else shape[0]
    affine = bn_affine(_bn(channels))
    expected = fold_into_output(weight, None, affine, layout).weight.to(dtype)
    scaled = weight.clone()
    scale_output_channels_(scaled, affine.scale, layout, Workspace())
    assert torch.equal(scaled, expected)
