"""Small models imitating patterns common in real code (timm, torchvision, detectron2, RepVGG),
and models torch.fx cannot trace. Each builder returns ``(model, example_args)`` with random
but realistic BatchNorm statistics; ``WILD`` lists them for tests and benchmarks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bnfold import zoo

C = 8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN stats and affine params, and the same for frozen norms' buffers."""
    zoo.randomize_bn(model, seed=seed)
    gen = _gen(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                n = module.weight.numel()
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            elif isinstance(module, ChannelScale):
                module.scale.copy_(torch.rand(module.scale.numel(), generator=gen) + 0.5)
                module.shift.copy_(torch.randn(module.shift.numel(), generator=gen))
    return model.eval()


# ----------------------------------------------------------------------------- norm classes


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN with a fused activation and an empty-batch guard."""

    def __init__(self, num_features: int, act: bool = True) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > 0:
            x = F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                self.training,
                self.momentum,
                self.eps,
            )
        return self.act(x)


class FrozenBatchNorm2d(nn.Module):
    """torchvision's FrozenBatchNorm2d: buffers only, an elementwise forward."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class D2FrozenBatchNorm2d(FrozenBatchNorm2d):
    """detectron2's variant: ``F.batch_norm`` without grad, elementwise with grad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            bias = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + bias.reshape(1, -1, 1, 1).to(
                x.dtype
            )
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=False,
            eps=self.eps,
        )


class NotAffineFrozen(FrozenBatchNorm2d):
    """Looks like a frozen norm, but clamps: not a per-channel affine map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).clamp(min=-3.0)


class ChannelScale(nn.Module):
    """A learnt per-channel scale and shift (a LayerScale-like layer on NCHW)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))
        self.shift = nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[:, None, None] + self.shift[:, None, None]


# ----------------------------------------------------------------------------- fixtures


def _conv(i: int = C, o: int = C, k: int = 3, **kw) -> nn.Conv2d:
    return nn.Conv2d(i, o, k, padding=k // 2, bias=False, **kw)


class FusedActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, C)
        self.bn1 = BatchNormAct2d(C)
        self.conv2 = _conv()
        self.bn2 = BatchNormAct2d(C, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.bn1(self.stem(x))))


class SEResidual(nn.Module):
    """Residual SE block; the final BN normalises the sum (after an add: not foldable)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, C)
        self.bn0 = nn.BatchNorm2d(C)
        self.conv1 = _conv()
        self.bn1 = nn.BatchNorm2d(C)
        self.fc1 = nn.Conv2d(C, 2, 1)
        self.fc2 = nn.Conv2d(2, C, 1)
        self.bn_sum = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn1(self.conv1(x))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return F.relu(self.bn_sum(x + y * w))


class PreActDense(nn.Module):
    """DenseNet layer: BN → ReLU → Conv (pre-activation: BN is not next to a layer) and cat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = _conv(3, C)
        self.norm1 = nn.BatchNorm2d(C)
        self.conv1 = _conv(C, C, 1)
        self.norm2 = nn.BatchNorm2d(C)
        self.conv2 = _conv(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return torch.cat([x, y], 1)


class RepVGGBlock(nn.Module):
    """Three parallel branches, each with its own BN: 3x3 conv, 1x1 conv, identity."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, C)
        self.dense = nn.Sequential(OrderedDict(conv=_conv(), bn=nn.BatchNorm2d(C)))
        self.one = nn.Sequential(OrderedDict(conv=_conv(k=1), bn=nn.BatchNorm2d(C)))
        self.identity = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        return F.relu(self.dense(x) + self.one(x) + self.identity(x))


class SharedConv(nn.Module):
    """One conv called in two places, each call under its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, C)
        self.conv = _conv()
        self.bn_a = nn.BatchNorm2d(C)
        self.bn_b = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x.flip(-1)))


class FrozenBackbone(nn.Module):
    """A detection-style backbone: FrozenBN everywhere, multi-scale dict output, an FPN
    lateral conv, and one frozen norm in each style (torchvision, detectron2, not affine)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(3, C, stride=2)
        self.bn_stem = FrozenBatchNorm2d(C)
        self.c2 = _conv(C, C)
        self.bn_c2 = D2FrozenBatchNorm2d(C)
        self.c3 = _conv(C, 2 * C, stride=2)
        self.bn_c3 = FrozenBatchNorm2d(2 * C)
        self.c3b = _conv(2 * C, 2 * C)
        self.bn_c3b = NotAffineFrozen(2 * C)
        self.scale = ChannelScale(2 * C)
        self.lateral = nn.Conv2d(2 * C, C, 1)
        self.lateral_scale = ChannelScale(C)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.relu(self.bn_stem(self.stem(x)))
        c2 = F.relu(self.bn_c2(self.c2(x)) + x)
        c3 = F.relu(self.bn_c3(self.c3(c2)))
        c3 = self.scale(F.relu(self.bn_c3b(self.c3b(c3))))
        p3 = self.lateral_scale(self.lateral(c3))
        p2 = c2 + F.interpolate(p3, scale_factor=2.0)
        return OrderedDict(p2=p2, p3=p3)


class DictInput(nn.Module):
    """forward takes a dict (image and a mask), as many detection/segmentation models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv(3, C)
        self.bn = nn.BatchNorm2d(C)
        self.head = nn.Conv2d(C, 2, 1)
        self.bn_head = nn.BatchNorm2d(2)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(batch["image"])))
        return self.bn_head(self.head(x)) * batch["mask"]


# ----------------------------------------------------------------------------- not traceable


class DataDependentBranch(nn.Module):
    """Python ``if`` on a tensor value; the same pairs on both branches, plus a branch-only
    BN that folds only when every recorded input pairs it the same way."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv(3, C)
        self.bn1 = nn.BatchNorm2d(C)
        self.conv2 = _conv()
        self.bn2 = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        if y.mean() > 0.5:  # data-dependent: fx cannot trace this
            y = y * 2
        return self.bn2(self.conv2(y))


class ShapeAssertsAndLoops(nn.Module):
    """Asserts on shapes, ``len(tensor)``, a loop over tensor values, ``.tolist()``."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_conv(3 if i == 0 else C, C) for i in range(3))
        self.bns = nn.ModuleList(nn.BatchNorm2d(C) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3, "expects RGB"
        for i in range(len(self.convs)):
            x = F.relu(self.bns[i](self.convs[i](x)))
        weights = torch.linspace(0.5, 1.5, len(x)).tolist()  # len(tensor), then values
        return torch.stack([x[i] * w for i, w in enumerate(weights)])


class IsinstanceTrap(nn.Module):
    """fx traces this without error but takes the wrong branch (a proxy is not a Tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv(3, C)
        self.bn = nn.BatchNorm2d(C)
        self.skip_conv = _conv(3, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return self.bn(self.conv(x))
        return self.skip_conv(x)


class HeadReadsValues(nn.Module):
    """A backbone, then a head that reads values (like NMS) and routes with them: backbone
    pairs are static, the head's pair follows the read."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            _conv(3, C), nn.BatchNorm2d(C), nn.ReLU(), _conv(), nn.BatchNorm2d(C), nn.ReLU()
        )
        self.head_conv = _conv()
        self.head_bn = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        keep = int((features.mean(dim=(1, 2, 3)) > 0).sum())
        return self.head_bn(self.head_conv(features[: max(keep, 1)]))


def _image(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=_gen(seed))


def _dict_input() -> tuple:
    mask = (torch.rand(2, 1, 16, 16, generator=_gen(3)) > 0.5).float()
    return ({"image": _image(), "mask": mask},)


WILD: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "fused_act_bn": lambda: (randomise(FusedActNet()), (_image(),)),
    "se_residual": lambda: (randomise(SEResidual()), (_image(),)),
    "preact_dense": lambda: (randomise(PreActDense()), (_image(),)),
    "repvgg": lambda: (randomise(RepVGGBlock()), (_image(),)),
    "shared_conv": lambda: (randomise(SharedConv()), (_image(),)),
    "frozen_backbone": lambda: (randomise(FrozenBackbone()), (_image(size=32),)),
    "dict_input": lambda: (randomise(DictInput()), _dict_input()),
    "data_dependent": lambda: (randomise(DataDependentBranch()), (_image(),)),
    "asserts_and_loops": lambda: (randomise(ShapeAssertsAndLoops()), (_image(),)),
    "isinstance_trap": lambda: (randomise(IsinstanceTrap()), (_image(),)),
    "head_reads_values": lambda: (randomise(HeadReadsValues()), (_image(),)),
}
