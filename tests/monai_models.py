"""MONAI networks with BatchNorm, at small spatial sizes, with realistic statistics.

``MODELS`` maps a name to ``(builder, input shape)``; ``FAST`` is the subset the default test run
folds (one of each family, 2-D and 3-D, both the fx and the recorded path), the rest run under
``-m slow``. ``realistic`` gives a model random affine parameters and running statistics from a
few train-mode batches, as after training, so a wrong fold cannot hide behind identity BNs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks import nets
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: PLC2701 (torch has no public name for it)

Builder = Callable[[], nn.Module]


def _resnet(depth: int, dims: int) -> Builder:
    make = getattr(nets, f"resnet{depth}")
    return lambda: make(spatial_dims=dims, n_input_channels=1, num_classes=3)


def _unet(dims: int) -> nn.Module:
    return nets.UNet(
        spatial_dims=dims,
        in_channels=1,
        out_channels=2,
        channels=(8, 16, 32),
        strides=(2, 2),
        num_res_units=2,
        norm="batch",
    )


def _basic_unet(dims: int) -> nn.Module:
    return nets.BasicUNet(
        spatial_dims=dims, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4), norm="batch"
    )


def _dynunet(dims: int) -> nn.Module:
    return nets.DynUNet(
        spatial_dims=dims,
        in_channels=1,
        out_channels=2,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        norm_name="batch",
    )


def _attention_unet(dims: int) -> nn.Module:
    return nets.AttentionUnet(
        spatial_dims=dims, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2)
    )


def _efficientnet(name: str, dims: int) -> Builder:
    return lambda: nets.EfficientNetBN(
        name, pretrained=False, spatial_dims=dims, in_channels=1, num_classes=3
    )


S2, S3 = (2, 1, 32, 32), (2, 1, 16, 16, 16)

MODELS: dict[str, tuple[Builder, tuple[int, ...]]] = {
    "resnet10-3d": (_resnet(10, 3), S3),
    "resnet18-2d": (_resnet(18, 2), S2),
    "resnet34-3d": (_resnet(34, 3), (2, 1, 8, 8, 8)),
    "resnet50-2d": (_resnet(50, 2), S2),
    "seresnet50-2d": (lambda: nets.SEResNet50(spatial_dims=2, in_channels=1, num_classes=3), S2),
    "seresnet50-3d": (lambda: nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=3), S3),
    "densenet121-2d": (lambda: nets.DenseNet121(spatial_dims=2, in_channels=1, out_channels=3), S2),
    "densenet121-3d": (
        lambda: nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=3),
        (2, 1, 32, 32, 32),
    ),
    "efficientnet-b0-2d": (_efficientnet("efficientnet-b0", 2), S2),
    "efficientnet-b1-3d": (_efficientnet("efficientnet-b1", 3), S3),
    "unet-2d": (lambda: _unet(2), S2),
    "unet-3d": (lambda: _unet(3), S3),
    "basicunet-2d": (lambda: _basic_unet(2), S2),
    "basicunet-3d": (lambda: _basic_unet(3), S3),
    "dynunet-2d": (lambda: _dynunet(2), S2),
    "dynunet-3d": (lambda: _dynunet(3), S3),
    "attentionunet-2d": (lambda: _attention_unet(2), S2),
    "attentionunet-3d": (lambda: _attention_unet(3), S3),
    "vnet-3d": (lambda: nets.VNet(spatial_dims=3, in_channels=1, out_channels=2), S3),
    "highresnet-2d": (
        lambda: nets.HighResNet(spatial_dims=2, in_channels=1, out_channels=2, norm_type="batch"),
        (2, 1, 24, 24),
    ),
    "highresnet-3d": (
        lambda: nets.HighResNet(spatial_dims=3, in_channels=1, out_channels=2, norm_type="batch"),
        (2, 1, 12, 12, 12),
    ),
}

FAST = (
    "resnet18-2d",
    "densenet121-2d",
    "unet-2d",
    "basicunet-3d",
    "dynunet-2d",
    "attentionunet-2d",
    "highresnet-3d",
)

#: Models whose ONNX export and ORT CPU verification run by default (fx and recorded paths).
FAST_ONNX = ("unet-2d", "basicunet-3d")


def example(name: str, seed: int = 0) -> torch.Tensor:
    shape = MODELS[name][1]
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def realistic(
    model: nn.Module, shape: tuple[int, ...], seed: int = 0, batches: int = 3
) -> nn.Module:
    """Random gamma/beta, then running stats pooled over ``batches`` train-mode batches of
    random inputs (no autograd). Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    momenta = [m.momentum for m in norms]
    with torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the batches
            if norm.affine:
                norm.weight.copy_(torch.rand(norm.num_features, generator=gen) + 0.5)
                norm.bias.copy_(torch.randn(norm.num_features, generator=gen) * 0.2)
        model.train()
        for _ in range(batches):
            model(torch.randn(shape, generator=gen))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return model.eval()


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    builder, shape = MODELS[name]
    torch.manual_seed(seed)
    return realistic(builder(), shape, seed), example(name, seed)
