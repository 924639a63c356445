"""Small, pure-PyTorch model builders for tests, benchmarks, the CLI and demos.

Every builder is ``name(**kwargs) -> nn.Module``: it builds the model in code (no torchvision, no
downloaded weights), returns it in eval mode, and is deterministic given ``torch.manual_seed``.
Defaults are small enough that one CPU forward at ``example_input(name)`` is fast.
``randomize_bn`` gives every BatchNorm non-trivial statistics: fresh BNs are the identity in eval
and would hide a fold that gets the math wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from bnfold.errors import UsageError


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv→bn, ReLU, residual add."""

    expansion = 1

    def __init__(
        self, in_ch: int, ch: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, ch, stride)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(ch, ch)
        self.bn2 = nn.BatchNorm2d(ch)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet Bottleneck (stride on the 3x3 conv): 1x1 → 3x3 → 1x1, residual add."""

    expansion = 4

    def __init__(
        self, in_ch: int, ch: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, ch)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = _conv3x3(ch, ch, stride)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = _conv1x1(ch, ch * self.expansion)
        self.bn3 = nn.BatchNorm2d(ch * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-shaped ResNet: stem, four stages, global average pool, ``fc``, with
    torchvision's module names (``conv1``, ``bn1``, ``layer1.0.conv1``,
    ``layer1.0.downsample.0``/``.1``, ``fc``) so fold reports read familiar."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.in_ch = width
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], ch: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_ch != ch * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.in_ch, ch * block.expansion, stride),
                nn.BatchNorm2d(ch * block.expansion),
            )
        layers = [block(self.in_ch, ch, stride, downsample)]
        self.in_ch = ch * block.expansion
        layers += [block(self.in_ch, ch) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64) -> nn.Module:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); ``width`` is the stem's channel count (64 = real)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width).eval()


def resnet50(num_classes: int = 1000, width: int = 64) -> nn.Module:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); ``width`` is the stem's channel count (64 = real)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, width).eval()


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going more than 10 % below it."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_act(
    in_ch: int,
    out_ch: int,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] = nn.ReLU6,
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        act(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand → 3x3 depthwise → 1x1 linear project (+ residual)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(in_ch * expand_ratio)
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(in_ch, hidden, kernel=1))
        layers += [
            _conv_bn_act(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision-shaped MobileNetV2: ``features`` then ``classifier`` (dropout + linear)."""

    # (expand ratio t, channels c, repeats n, first stride s)
    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        in_ch = _make_divisible(32 * width_mult)
        last_ch = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_act(3, in_ch, stride=2)]
        for t, c, n, s in self.SETTINGS:
            out_ch = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(_conv_bn_act(in_ch, last_ch, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_ch, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 with depthwise convs and ReLU6; ``width_mult`` scales every channel count."""
    return MobileNetV2(num_classes, width_mult).eval()


def _double_conv3d(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm3d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm3d(out_ch),
        nn.ReLU(inplace=True),
    )


def _up3d(in_ch: int, out_ch: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose3d(in_ch, out_ch, 2, stride=2, groups=groups, bias=True),
        nn.BatchNorm3d(out_ch),
        nn.ReLU(inplace=True),
    )


class UNet3D(nn.Module):
    """3-D UNet: double conv3d blocks, max-pool down, ConvTranspose3d → BN3d up, skip concat.

    Level ``l`` has ``base * 2**l`` channels. The deepest up-sampler is a grouped transpose
    (``groups=2``, channels halved); every other up-sampler keeps its channel count
    (``C_in == C_out``), the two cases where a wrong ConvTranspose fold axis shows.
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 2, base: int = 8, depth: int = 3
    ) -> None:
        super().__init__()
        if depth < 2:
            raise UsageError(f"unet3d needs depth >= 2 (one down and one up step), got {depth}")
        chans = [base * 2**level for level in range(depth)]
        self.encoders = nn.ModuleList()
        prev = in_channels
        for ch in chans:
            self.encoders.append(_double_conv3d(prev, ch))
            prev = ch
        self.pool = nn.MaxPool3d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth - 1)):
            deepest = level == depth - 2
            up_out = chans[level] if deepest else prev
            self.ups.append(_up3d(prev, up_out, groups=2 if deepest else 1))
            self.decoders.append(_double_conv3d(up_out + chans[level], chans[level]))
            prev = chans[level]
        self.head = nn.Conv3d(prev, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            skips.append(x)
        skips.pop()
        for up, decoder in zip(self.ups, self.decoders, strict=True):
            x = decoder(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def unet3d(in_channels: int = 1, out_channels: int = 2, base: int = 8, depth: int = 3) -> nn.Module:
    """3-D UNet (``depth`` levels, ``base`` channels at the top); spatial size must divide by
    ``2**(depth-1)``. ``base`` must be even (the grouped transpose uses ``groups=2``)."""
    if base % 2:
        raise UsageError(f"unet3d base must be even (a ConvTranspose3d uses groups=2), got {base}")
    return UNet3D(in_channels, out_channels, base, depth).eval()


class MLP(nn.Module):
    """Linear → BatchNorm1d → ReLU stacks, dropout, then BatchNorm1d → Linear classifier."""

    def __init__(
        self, in_features: int = 64, hidden: Sequence[int] = (256, 128), num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for width in hidden:
            layers += [nn.Linear(prev, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            prev = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.1)
        self.norm = nn.BatchNorm1d(prev)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.dropout(self.features(x))))


def mlp(
    in_features: int = 64, hidden: Sequence[int] = (256, 128), num_classes: int = 10
) -> nn.Module:
    """MLP on 2-D ``(N, in_features)`` input; has Linear → BN1d and BN1d → Linear pairs."""
    return MLP(in_features, tuple(hidden), num_classes).eval()


class SmallCNN(nn.Module):
    """Four conv blocks for 32x32 images; ``block3`` is BN → 1x1 conv (padding 0) → BN → ReLU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.block1 = _conv_bn_act(in_channels, width, act=nn.ReLU)
        self.block2 = _conv_bn_act(width, width * 2, stride=2, act=nn.ReLU)
        self.block3 = nn.Sequential(
            nn.BatchNorm2d(width * 2),
            nn.Conv2d(width * 2, width * 2, 1, padding=0, bias=True),
            nn.BatchNorm2d(width * 2),
            nn.ReLU(inplace=True),
        )
        self.block4 = _conv_bn_act(width * 2, width * 4, stride=2, act=nn.ReLU)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


def small_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    """Small CNN for ``(N, in_channels, 32, 32)`` input, quick to train on synthetic data."""
    return SmallCNN(num_classes, in_channels, width).eval()


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "unet3d": unet3d,
    "mlp": mlp,
    "small_cnn": small_cnn,
}

#: Default example input shape of each builder at its default kwargs (batch 2).
DEFAULT_INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "resnet18": (2, 3, 64, 64),
    "resnet50": (2, 3, 64, 64),
    "mobilenet_v2": (2, 3, 64, 64),
    "unet3d": (2, 1, 16, 16, 16),
    "mlp": (2, 64),
    "small_cnn": (2, 3, 32, 32),
}


def example_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Seeded standard-normal float32 input of ``DEFAULT_INPUT_SHAPES[name]`` with ``batch`` rows,
    drawn from a local generator (the global RNG is left untouched)."""
    if name not in DEFAULT_INPUT_SHAPES:
        names = ", ".join(sorted(DEFAULT_INPUT_SHAPES))
        raise UsageError(f"unknown zoo model {name!r}; choose one of: {names}")
    if batch < 1:
        raise UsageError(f"batch must be >= 1, got {batch}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *DEFAULT_INPUT_SHAPES[name][1:]), generator=gen)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm in ``model`` (in place) realistic non-trivial statistics and params.

    For each ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, subclasses), in ``modules()``
    order: running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5),
    bias ~ N(0, 0.2). Absent tensors (``affine=False``, ``track_running_stats=False``) are
    skipped, and so is a lazy BatchNorm not yet run. Draws from a local ``torch.Generator``
    seeded with ``seed`` (the global RNG is not used), so the result depends only on the
    architecture and ``seed``. Returns ``model``.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin)
            if not isinstance(module, nn.modules.batchnorm._BatchNorm) or (
                lazy and module.has_uninitialized_params()  # no shape until its first forward
            ):
                continue
            n = module.num_features
            if module.running_mean is not None:
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            if module.running_var is not None:
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            if module.weight is not None:
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            if module.bias is not None:
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model
