"""Random small networks for property-based fold tests (a recipe of steps, fx-traceable)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

from bnfold import zoo

CHANNELS = 4
SIZE = 6


@dataclass(frozen=True)
class Step:
    kind: str  # "module", "residual", "fanout", "shared", "cat", "sum", "split", "branches", ...
    names: tuple[str, ...]


class RandomNet(nn.Module):
    """Runs ``steps`` over a [N, 4, 6, 6] activation; an optional 2-D tail with Linear/BN1d."""

    def __init__(self, layers: dict[str, nn.Module], steps: list[Step], tail: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.steps = steps
        self.tail = (
            nn.Sequential(
                nn.Flatten(),
                nn.Linear(CHANNELS * SIZE * SIZE, 8),
                nn.BatchNorm1d(8),
                nn.ReLU(),
                nn.BatchNorm1d(8),
                nn.Linear(8, 5),
            )
            if tail
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            mods = [self.layers[name] for name in step.names]
            if step.kind == "module" or step.kind == "shared":
                x = mods[0](x)
            elif step.kind == "residual":
                x = x + mods[1](mods[0](x))
            elif step.kind == "cat":  # two convs of half the channels, concatenated, one BN
                x = mods[2](torch.cat([mods[0](x), mods[1](x)], 1))
            elif step.kind == "sum":  # two convs summed, one BN
                x = mods[2](mods[0](x) + mods[1](x))
            elif step.kind == "split":  # one BN, its halves into two convs
                left, right = mods[0](x).chunk(2, dim=1)
                x = torch.cat([mods[1](left), mods[2](right)], 1)
            elif step.kind == "branches":  # RepVGG-style: 3x3 + 1x1 + BN(x) (or x)
                out = mods[0](x) + mods[1](x)
                x = out + (mods[2](x) if len(mods) > 2 else x)
            elif step.kind == "tokens":  # LeViT-style: Linear on tokens, BN1d over (B*N, C)
                n, c, h, w = x.shape
                tokens = mods[0](x.flatten(2).transpose(1, 2))
                tokens = mods[1](tokens.flatten(0, 1)).reshape_as(tokens)
                x = tokens.transpose(1, 2).reshape(n, c, h, w)
            elif step.kind == "channels_last":  # ConvNeXt-style: BN, channels last, a Linear
                x = mods[1](mods[0](x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            else:  # fanout: the conv output feeds the BN and the add
                y = mods[0](x)
                x = mods[1](y) + y
        return self.tail(x)


def _conv(draw: st.DrawFn) -> nn.Module:
    groups = draw(st.sampled_from([1, 2, 4]))
    if draw(st.booleans()):
        return nn.ConvTranspose2d(
            CHANNELS, CHANNELS, 3, padding=1, groups=groups, bias=draw(st.booleans())
        )
    kernel = draw(st.sampled_from([1, 3]))
    padding = draw(st.sampled_from([0, kernel // 2])) if kernel == 3 else 0
    mode = draw(st.sampled_from(["zeros", "reflect"])) if padding else "zeros"
    conv = nn.Conv2d(
        CHANNELS,
        CHANNELS,
        kernel,
        padding=padding,
        groups=groups,
        padding_mode=mode,
        bias=draw(st.booleans()),
    )
    if padding < kernel // 2:  # pad the shrunk map back to 6x6
        return nn.Sequential(conv, nn.ZeroPad2d(1))
    return conv


def _channel_op(draw: st.DrawFn) -> nn.Module:
    """An op a BN's affine map passes through (max pooling only where its scale is >= 0),
    keeping the [N, 4, 6, 6] shape; the padded average pool counts its zeros or not."""
    return draw(
        st.sampled_from(
            [
                nn.Identity(),
                nn.Dropout(0.5),
                nn.MaxPool2d(3, 1, 1),
                nn.AvgPool2d(3, 1, 1, count_include_pad=True),
                nn.AvgPool2d(3, 1, 1, count_include_pad=False),
                nn.Sequential(nn.Upsample(scale_factor=2), nn.AvgPool2d(2)),
                nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.MaxPool2d(2)),
                nn.ChannelShuffle(2),
                nn.Sequential(nn.PixelUnshuffle(2), nn.PixelShuffle(2)),
            ]
        )
    )


def _half_conv(draw: st.DrawFn, c_in: int, c_out: int) -> nn.Module:
    kernel = draw(st.sampled_from([1, 3]))
    mode = draw(st.sampled_from(["zeros", "reflect"]))
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, padding_mode=mode)


def _flip_signs(net: nn.Module, seed: int) -> None:
    """Negate the scale of about half the channels of every BN (max pooling must refuse)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                signs = torch.randint(0, 2, module.weight.shape, generator=gen) * 2 - 1
                module.weight.mul_(signs)


def _branch_block(draw: st.DrawFn) -> list[nn.Module]:
    """A 3x3 Conv+BN, a 1x1 Conv+BN (or Conv) and an identity BN (or none: the input itself),
    aligned or with one misalignment that keeps the 6x6 shape."""
    groups = draw(st.sampled_from([1, 2, 4]))
    flaw = draw(st.sampled_from(["none", "none", "groups", "dilation", "reflect"]))
    dilation = 2 if flaw == "dilation" else 1
    dense = nn.Conv2d(
        CHANNELS,
        CHANNELS,
        3,
        padding=dilation,
        dilation=dilation,
        groups=groups,
        padding_mode="reflect" if flaw == "reflect" else "zeros",
        bias=draw(st.booleans()),
    )
    one_groups = 1 if flaw == "groups" and groups > 1 else groups
    one = nn.Conv2d(CHANNELS, CHANNELS, 1, groups=one_groups, bias=draw(st.booleans()))
    branches = [nn.Sequential(dense, nn.BatchNorm2d(CHANNELS))]
    branches.append(nn.Sequential(one, nn.BatchNorm2d(CHANNELS)) if draw(st.booleans()) else one)
    return branches + ([nn.BatchNorm2d(CHANNELS)] if draw(st.booleans()) else [])


@st.composite
def random_nets(draw: st.DrawFn) -> RandomNet:
    layers: dict[str, nn.Module] = {}
    convs: list[str] = []
    steps: list[Step] = []

    def add(prefix: str, module: nn.Module) -> str:
        name = f"{prefix}{len(layers)}"
        layers[name] = module
        return name

    for _ in range(draw(st.integers(2, 7))):
        kind = draw(
            st.sampled_from(
                [
                    "conv",
                    "bn",
                    "relu",
                    "residual",
                    "fanout",
                    "shared",
                    "through",
                    "cat",
                    "sum",
                    "split",
                    "branches",
                    "tokens",
                    "channels_last",
                ]
            )
        )
        if kind == "conv":
            name = add("conv", _conv(draw))
            convs.append(name)
            steps.append(Step("module", (name,)))
        elif kind == "bn":
            steps.append(Step("module", (add("bn", nn.BatchNorm2d(CHANNELS)),)))
        elif kind == "relu":
            steps.append(Step("module", (add("relu", nn.ReLU()),)))
        elif kind == "residual":
            first, second = _conv(draw), nn.BatchNorm2d(CHANNELS)
            if draw(st.booleans()):
                first, second = second, first  # BN before the conv
            steps.append(Step("residual", (add("res", first), add("res", second))))
        elif kind == "fanout":
            steps.append(
                Step("fanout", (add("fan", _conv(draw)), add("fan", nn.BatchNorm2d(CHANNELS))))
            )
        elif kind == "through":  # conv -> op -> BN, or BN -> op -> conv
            pair = [_conv(draw), _channel_op(draw), nn.BatchNorm2d(CHANNELS)]
            if draw(st.booleans()):
                pair.reverse()
            steps.append(Step("module", (add("thr", nn.Sequential(*pair)),)))
        elif kind in ("cat", "sum"):
            width = CHANNELS // 2 if kind == "cat" else CHANNELS
            convs_ = (_half_conv(draw, CHANNELS, width), _half_conv(draw, CHANNELS, width))
            names = (
                add(kind, convs_[0]),
                add(kind, convs_[1]),
                add(kind, nn.BatchNorm2d(CHANNELS)),
            )
            steps.append(Step(kind, names))
        elif kind == "split":
            half = CHANNELS // 2
            modules = (
                nn.BatchNorm2d(CHANNELS),
                _half_conv(draw, half, half),
                _half_conv(draw, half, half),
            )
            steps.append(Step("split", tuple(add("split", m) for m in modules)))
        elif kind == "branches":
            names = tuple(add("branch", module) for module in _branch_block(draw))
            steps.append(Step("branches", names))
        elif kind == "tokens":
            modules = (nn.Linear(CHANNELS, CHANNELS, bias=draw(st.booleans())), nn.BatchNorm1d(4))
            steps.append(Step("tokens", tuple(add("tok", m) for m in modules)))
        elif kind == "channels_last":
            modules = (nn.BatchNorm2d(CHANNELS), nn.Linear(CHANNELS, CHANNELS))
            steps.append(Step("channels_last", tuple(add("last", m) for m in modules)))
        elif convs:
            steps.append(Step("shared", (draw(st.sampled_from(convs)),)))
    net = RandomNet(layers, steps, tail=draw(st.booleans()))
    seed = draw(st.integers(0, 1000))
    zoo.randomize_bn(net.eval(), seed=seed)
    if draw(st.booleans()):
        _flip_signs(net, seed)
    return net


def example(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
