"""Small models for the export/verify/runtime tests: every foldable pattern, one BN that must
stay, tuple inputs and outputs, and models that break export on purpose."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnfold import zoo


class ConvNet(nn.Module):
    """Conv→BN, grouped ConvTranspose→BN, a BN after an add (not foldable), Linear→BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2, bias=False)
        self.up_bn = nn.BatchNorm2d(8)
        self.post = nn.BatchNorm2d(8)  # after an add, before a ReLU: stays, in PyTorch and in ONNX
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 64)  # 2 kB of weights: large enough for external data
        self.fc_bn = nn.BatchNorm1d(64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        z = self.up_bn(self.up(y))
        s = F.relu(self.post(self.pool(z) + self.pool(y)))
        return self.head(F.relu(self.fc_bn(self.fc(s.flatten(1)))))


def mlp_bn_first() -> nn.Module:
    """BN1d before a Linear (folds into the Linear's input side), then Linear→BN1d."""
    return nn.Sequential(
        nn.BatchNorm1d(12),
        nn.Linear(12, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 4),
    )


def bn_before_conv() -> nn.Module:
    """BN2d before an unpadded conv (exact to fold), then Conv→BN."""
    return nn.Sequential(
        nn.BatchNorm2d(3),
        nn.Conv2d(3, 6, 3, padding=0),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=1),
    )


class TwoInTwoOut(nn.Module):
    """Two positional inputs, a tuple of two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.a_bn = nn.BatchNorm2d(4)
        self.b = nn.Linear(6, 4)
        self.b_bn = nn.BatchNorm1d(4)

    def forward(self, image: torch.Tensor, vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat = self.a_bn(self.a(image))
        vec = self.b_bn(self.b(vector))
        return feat, feat.mean((2, 3)) + vec


class HardCodedBatch(nn.Module):
    """Reshapes with a hard-coded batch size: any export specialises the batch to 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).view(2, -1)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: the dynamo exporter refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


class TrainingBatchNorm(nn.Module):
    """Calls F.batch_norm with training=True: a training-mode BatchNormalization in ONNX."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, training=True)


def ready(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights, realistic BN statistics, eval mode."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters") and not isinstance(
            module, nn.modules.batchnorm._BatchNorm
        ):
            module.reset_parameters()
    return zoo.randomize_bn(model, seed=seed).eval()


def image(batch: int = 2, size: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen)


def vector(batch: int = 2, features: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, features, generator=gen)
