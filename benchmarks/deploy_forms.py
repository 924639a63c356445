"""Hand-written deploy forms of the models in ``benchmarks/blocks.py``: the same function with
every foldable batch norm already folded, each RepVGG block one 3x3 conv + ReLU (a module per
block, as RepVGG's own converter leaves it). This is the physical limit a fold can reach;
``fold_bench`` times bnfold's folded model against it.

Every converter computes the new weights in float64 from the original's eval-mode batch norms
and rounds once to the original's dtype. With ``s = gamma / sqrt(var + eps)`` and
``t = beta - mean * s`` (BN(y) = s * y + t):

- layer -> BN: ``W' = W * s`` on output channels, ``b' = b * s + t``;
- BN -> Linear (on 2-D input, or after an average): ``W' = W * s`` on input features,
  ``b' = b + W @ t``;
- RepVGG branches: pad the 1x1 kernel to 3x3 at the centre, the identity is a centred unit
  kernel per channel; sum the scaled kernels and the shifts;
- concat -> BN: each producer takes its slice of ``s`` and ``t``.
"""

from __future__ import annotations

import copy

import torch
from blocks import (
    FinalBNResNet,
    LeViT,
    LeViTBlock,
    LinearBN,
    MixNet,
    RepVGG,
    RepVGGBlock,
    ResBlock,
    attend,
)
from torch import Tensor, nn


def affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """``(s, t)`` in float64 with ``bn(y) == s * y + t`` in eval mode."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    s = torch.rsqrt(var + bn.eps)
    t = -mean * s
    if bn.affine:
        s, t = s * bn.weight.detach().double(), t * bn.weight.detach().double()
        t = t + bn.bias.detach().double()
    return s, t


def _per_output(s: Tensor, weight: Tensor) -> Tensor:
    return s.reshape(-1, *([1] * (weight.dim() - 1)))


def layer_then_bn(layer: nn.Conv2d | nn.Linear, bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Weight and bias (float64) of ``bn(layer(x))`` as one layer (conv or Linear)."""
    s, t = affine(bn)
    w = layer.weight.detach().double()
    b = torch.zeros_like(s) if layer.bias is None else layer.bias.detach().double()
    return w * _per_output(s, w), b * s + t


def bn_then_linear(bn: nn.Module, linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """Weight and bias (float64) of ``linear(bn(x))`` (or of ``linear(mean(bn(x)))``)."""
    s, t = affine(bn)
    w = linear.weight.detach().double()
    return w * s, linear.bias.detach().double() + w @ t


def _set(layer: nn.Module, weight: Tensor, bias: Tensor) -> nn.Module:
    """Round the float64 ``weight`` and ``bias`` once into ``layer`` (a fresh, biased layer)."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _conv_like(conv: nn.Conv2d, **changes: int) -> nn.Conv2d:
    config = {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "groups": conv.groups,
    } | changes
    return nn.Conv2d(**config, bias=True, dtype=conv.weight.dtype)


def _linear_like(linear: nn.Linear) -> nn.Linear:
    return nn.Linear(linear.in_features, linear.out_features, dtype=linear.weight.dtype)


# ------------------------------------------------------------------------------------- RepVGG


class RepVGGBlockDeploy(nn.Module):
    """A block in its deploy form, as RepVGG's own converter leaves it: one conv, then ReLU."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


class RepVGGDeploy(nn.Module):
    """Each block one 3x3 conv + ReLU (still a module per block); the same pooling and head."""

    def __init__(self, convs: list[nn.Conv2d], fc: nn.Linear) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(RepVGGBlockDeploy(conv) for conv in convs))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


def merge_repvgg_block(block: RepVGGBlock) -> nn.Conv2d:
    weight, bias = layer_then_bn(block.conv3, block.bn3)
    w1, b1 = layer_then_bn(block.conv1, block.bn1)
    weight[:, :, 1, 1] += w1[:, :, 0, 0]
    bias = bias + b1
    if block.bn_id is not None:
        s, t = affine(block.bn_id)
        channels = torch.arange(s.numel())
        weight[channels, channels, 1, 1] += s
        bias = bias + t
    return _set(_conv_like(block.conv3), weight, bias)


def deploy_repvgg(model: RepVGG) -> RepVGGDeploy:
    convs = [merge_repvgg_block(block) for block in model.blocks]
    fc = _set(_linear_like(model.fc), model.fc.weight.detach(), model.fc.bias.detach())
    return RepVGGDeploy(convs, fc).eval()


# ------------------------------------------------------------------------------------- MixNet


class MixBlockDeploy(nn.Module):
    def __init__(
        self, expand: nn.Conv2d, mix: list[nn.Conv2d], project: nn.Conv2d, residual: bool
    ) -> None:
        super().__init__()
        self.expand, self.project = expand, project
        self.mix = nn.ModuleList(mix)
        self.splits = [conv.in_channels for conv in mix]
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.expand(x))
        parts = torch.split(y, self.splits, dim=1)
        y = self.act(torch.cat([conv(parts[i]) for i, conv in enumerate(self.mix)], dim=1))
        y = self.project(y)
        return x + y if self.residual else y


class MixNetDeploy(nn.Module):
    def __init__(
        self, stem: nn.Conv2d, blocks: list[MixBlockDeploy], head: nn.Conv2d, fc: nn.Linear
    ) -> None:
        super().__init__()
        self.stem, self.head, self.fc = stem, head, fc
        self.blocks = nn.Sequential(*blocks)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.head(self.blocks(self.act(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _folded_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    return _set(_conv_like(conv), *layer_then_bn(conv, bn))


def _mixed_convs(convs: nn.ModuleList, bn: nn.Module) -> list[nn.Conv2d]:
    s, t = affine(bn)
    out, start = [], 0
    for conv in convs:
        end = start + conv.out_channels
        w = conv.weight.detach().double()
        out.append(_set(_conv_like(conv), w * _per_output(s[start:end], w), t[start:end]))
        start = end
    return out


def deploy_mixnet(model: MixNet) -> MixNetDeploy:
    blocks = [
        MixBlockDeploy(
            _folded_conv(b.expand, b.bn_expand),
            _mixed_convs(b.mix.convs, b.bn_mix),
            _folded_conv(b.project, b.bn_project),
            b.residual,
        )
        for b in model.blocks
    ]
    stem = _folded_conv(model.stem, model.bn_stem)
    head = _folded_conv(model.head, model.bn_head)
    fc = _set(_linear_like(model.fc), model.fc.weight.detach(), model.fc.bias.detach())
    return MixNetDeploy(stem, blocks, head, fc).eval()


# -------------------------------------------------------------------------------------- LeViT


class LeViTBlockDeploy(nn.Module):
    def __init__(self, block: LeViTBlock, linears: list[nn.Linear]) -> None:
        super().__init__()
        self.heads, self.key_dim, self.value_dim = block.heads, block.key_dim, block.value_dim
        self.qkv, self.proj, self.mlp1, self.mlp2 = linears
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = attend(self.qkv(x), self.heads, self.key_dim, self.value_dim)
        x = x + self.proj(self.act(y))
        return x + self.mlp2(self.act(self.mlp1(x)))


class LeViTDeploy(nn.Module):
    def __init__(self, blocks: list[LeViTBlockDeploy], head: nn.Linear) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x).mean(dim=1))


def _linear_bn(module: LinearBN) -> nn.Linear:
    return _set(_linear_like(module.linear), *layer_then_bn(module.linear, module.bn))


def deploy_levit(model: LeViT) -> LeViTDeploy:
    blocks = [
        LeViTBlockDeploy(b, [_linear_bn(m) for m in (b.qkv, b.proj, b.mlp1, b.mlp2)])
        for b in model.blocks
    ]
    head = _set(_linear_like(model.head), *bn_then_linear(model.head_bn, model.head))
    return LeViTDeploy(blocks, head).eval()


# ---------------------------------------------------------------------- ResNet with final BN


class ResBlockDeploy(nn.Module):
    def __init__(
        self, conv1: nn.Conv2d, conv2: nn.Conv2d, down: nn.Conv2d | None, act: bool
    ) -> None:
        super().__init__()
        self.conv1, self.conv2, self.down = conv1, conv2, down
        self.relu = nn.ReLU()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        y = self.conv2(self.relu(self.conv1(x))) + identity
        return self.relu(y) if self.act else y


class FinalBNResNetDeploy(nn.Module):
    """The final BN lives in the head's weights: ``fc(mean(s*x + t)) = (W*s) mean(x) + b + W t``."""

    def __init__(self, stem: nn.Conv2d, blocks: list[ResBlockDeploy], fc: nn.Linear) -> None:
        super().__init__()
        self.stem, self.fc = stem, fc
        self.blocks = nn.Sequential(*blocks)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _res_block(block: ResBlock) -> ResBlockDeploy:
    down = None if block.down is None else _folded_conv(block.down, block.bn_down)
    return ResBlockDeploy(
        _folded_conv(block.conv1, block.bn1), _folded_conv(block.conv2, block.bn2), down, block.act
    )


def deploy_resnet_final_bn(model: FinalBNResNet) -> FinalBNResNetDeploy:
    blocks = [_res_block(block) for block in model.blocks]
    fc = _set(_linear_like(model.fc), *bn_then_linear(model.bn_final, model.fc))
    return FinalBNResNetDeploy(_folded_conv(model.stem, model.bn_stem), blocks, fc).eval()


#: name (as in ``blocks.MODELS``) -> converter from the original (eval mode) to its deploy form.
CONVERTERS = {
    "repvgg": deploy_repvgg,
    "mixnet": deploy_mixnet,
    "levit": deploy_levit,
    "resnet_final_bn": deploy_resnet_final_bn,
}


def deploy_error_fp64(name: str, model: nn.Module, x: torch.Tensor) -> float:
    """Max |deploy - original| / max |original| in float64, the deploy form converted from a
    float64 copy of ``model`` (eval mode, no grad)."""
    original = copy.deepcopy(model).double().eval()
    deployed = CONVERTERS[name](original)
    with torch.no_grad():
        a, b = original(x.double()), deployed(x.double())
    return float((a - b).abs().max() / a.abs().max())
