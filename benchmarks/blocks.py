"""Benchmark models built of blocks whose batch norms sit beyond plain adjacency.

- ``repvgg``: RepVGG-style stages; each block sums a 3x3 conv+BN, a 1x1 conv+BN and, when the
  shapes allow (stride 1, same width), an identity BN, then a ReLU. The first block of a stage
  has stride 2 and no identity branch.
- ``mixnet``: a MixConv-style MobileNet; the depthwise conv of each block splits its channels
  into three groups convolved with 3x3, 5x5 and 7x7 kernels, concatenated, then one BN.
- ``levit``: LeViT-style attention blocks on tokens ``(B, N, C)``; every Linear (no bias) is
  followed by a BatchNorm1d over ``flatten(0, 1)`` and reshaped back (qkv, proj, MLP), and the
  head is BatchNorm1d -> Linear on the mean token.
- ``resnet_final_bn``: a small ResNet trunk whose last block returns its residual sum without an
  activation, then a final BN, global average pooling, flatten and a Linear head.

``benchmarks/deploy_forms.py`` holds each model's hand-written deploy form and its converter.
"""

from __future__ import annotations

import torch
from torch import nn

# ------------------------------------------------------------------------------------- RepVGG


class RepVGGBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 1, stride, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        identity = stride == 1 and in_ch == out_ch
        self.bn_id = nn.BatchNorm2d(in_ch) if identity else None
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))
        if self.bn_id is not None:
            y = y + self.bn_id(x)
        return self.relu(y)


class RepVGG(nn.Module):
    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        depths: tuple[int, ...] = (2, 2, 2, 1),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        blocks = [RepVGGBlock(3, widths[0], 2)]  # the stem
        in_ch = widths[0]
        for width, depth in zip(widths, depths, strict=True):
            for index in range(depth):
                blocks.append(RepVGGBlock(in_ch, width, 2 if index == 0 else 1))
                in_ch = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


# ------------------------------------------------------------------------------------- MixNet


def split_channels(channels: int, parts: int) -> list[int]:
    """``channels`` in ``parts`` near-equal groups, the first taking the remainder (as MixNet)."""
    sizes = [channels // parts] * parts
    sizes[0] += channels - sum(sizes)
    return sizes


class MixedDepthwise(nn.Module):
    """Depthwise convs of several kernel sizes, each on its own slice of the channels, then
    concatenated back."""

    def __init__(
        self, channels: int, stride: int, kernels: tuple[int, ...] = (3, 5, 7), bias: bool = False
    ) -> None:
        super().__init__()
        self.splits = split_channels(channels, len(kernels))
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, k, stride, padding=k // 2, groups=c, bias=bias)
            for c, k in zip(self.splits, kernels, strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, dim=1)  # indexed, as timm does: fx can trace it
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], dim=1)


class MixBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int = 3) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(mid)
        self.mix = MixedDepthwise(mid, stride)
        self.bn_mix = nn.BatchNorm2d(mid)
        self.project = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.bn_project = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn_expand(self.expand(x)))
        y = self.act(self.bn_mix(self.mix(y)))
        y = self.bn_project(self.project(y))
        return x + y if self.residual else y


#: (in, out, stride) of each MixNet block.
MIX_BLOCKS = ((16, 24, 2), (24, 24, 1), (24, 40, 2), (40, 40, 1), (40, 80, 2), (80, 80, 1))


class MixNet(nn.Module):
    def __init__(self, num_classes: int = 10, head: int = 160) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(*(MixBlock(i, o, s) for i, o, s in MIX_BLOCKS))
        self.head = nn.Conv2d(MIX_BLOCKS[-1][1], head, 1, bias=False)
        self.bn_head = nn.BatchNorm2d(head)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.bn_stem(self.stem(x))))
        x = self.act(self.bn_head(self.head(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# -------------------------------------------------------------------------------------- LeViT


class LinearBN(nn.Module):
    """LeViT's Linear_BN: a Linear on ``(B, N, C)`` tokens, BatchNorm1d over ``(B*N, C)``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


def attend(qkv: torch.Tensor, heads: int, key_dim: int, value_dim: int) -> torch.Tensor:
    """Multi-head attention from packed ``qkv`` tokens ``(B, N, heads*(2*key_dim+value_dim))``
    to ``(B, N, heads*value_dim)`` (shared by the original and the deploy form)."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, heads, -1).split([key_dim, key_dim, value_dim], dim=3)
    q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
    attn = ((q @ k.transpose(-2, -1)) * key_dim**-0.5).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(b, n, heads * value_dim)


class LeViTBlock(nn.Module):
    def __init__(self, dim: int, key_dim: int = 16, heads: int = 4, attn_ratio: int = 2) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, attn_ratio * key_dim
        self.qkv = LinearBN(dim, heads * (2 * key_dim + self.value_dim))
        self.proj = LinearBN(heads * self.value_dim, dim)
        self.mlp1 = LinearBN(dim, 2 * dim)
        self.mlp2 = LinearBN(2 * dim, dim)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = attend(self.qkv(x), self.heads, self.key_dim, self.value_dim)
        x = x + self.proj(self.act(y))
        return x + self.mlp2(self.act(self.mlp1(x)))


class LeViT(nn.Module):
    """Input: tokens ``(B, N, dim)``."""

    def __init__(self, dim: int = 64, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(LeViTBlock(dim) for _ in range(depth)))
        self.head_bn = nn.BatchNorm1d(dim)  # LeViT's BN_Linear head: BN, then Linear
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_bn(self.blocks(x).mean(dim=1)))


# ---------------------------------------------------------------------- ResNet with final BN


class ResBlock(nn.Module):
    """A BasicBlock; with ``act=False`` it returns the residual sum itself (no ReLU)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.down: nn.Conv2d | None = None
        self.bn_down: nn.BatchNorm2d | None = None
        if stride != 1 or in_ch != out_ch:
            self.down = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
            self.bn_down = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.bn_down(self.down(x))
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        y = y + identity
        return self.relu(y) if self.act else y


#: (in, out, stride) of each block of ``FinalBNResNet``.
RES_BLOCKS = ((16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1))


class FinalBNResNet(nn.Module):
    """``bn_final(x + residual)`` after the last block, then pooling and the Linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        self.bn_stem = nn.BatchNorm2d(16)
        last = len(RES_BLOCKS) - 1
        self.blocks = nn.Sequential(
            *(ResBlock(i, o, s, act=n != last) for n, (i, o, s) in enumerate(RES_BLOCKS))
        )
        self.bn_final = nn.BatchNorm2d(RES_BLOCKS[-1][1])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(RES_BLOCKS[-1][1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.relu(self.bn_stem(self.stem(x))))
        x = self.bn_final(x)  # after the last residual add, no activation before the head
        return self.fc(torch.flatten(self.pool(x), 1))


def repvgg() -> nn.Module:
    return RepVGG().eval()


def mixnet() -> nn.Module:
    return MixNet().eval()


def levit() -> nn.Module:
    return LeViT().eval()


def resnet_final_bn() -> nn.Module:
    return FinalBNResNet().eval()


#: name -> (builder, example input shape).
MODELS = {
    "repvgg": (repvgg, (2, 3, 64, 64)),
    "mixnet": (mixnet, (2, 3, 64, 64)),
    "levit": (levit, (2, 49, 64)),
    "resnet_final_bn": (resnet_final_bn, (2, 3, 32, 32)),
}
