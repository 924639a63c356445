"""Tests for the model zoo: every builder builds and runs, randomize_bn is deterministic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnfold import zoo
from bnfold.errors import UsageError

EXPECTED_OUTPUT_SHAPES = {
    "resnet18": (2, 1000),
    "resnet50": (2, 1000),
    "mobilenet_v2": (2, 1000),
    "unet3d": (2, 2, 16, 16, 16),
    "mlp": (2, 10),
    "small_cnn": (2, 10),
}


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.clone()
        for bn in _bn_layers(model)
        for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)
        if t is not None
    ]


def test_registry_is_complete() -> None:
    assert set(zoo.BUILDERS) == set(zoo.DEFAULT_INPUT_SHAPES) == set(EXPECTED_OUTPUT_SHAPES)
    for shape in zoo.DEFAULT_INPUT_SHAPES.values():
        assert shape[0] == 2


@pytest.mark.parametrize("name", sorted(zoo.BUILDERS))
def test_builder_runs_in_eval_at_default_input(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.BUILDERS[name]()
    assert not model.training
    assert all(not m.training for m in model.modules())
    assert _bn_layers(model), f"{name} has no BatchNorm"
    x = zoo.example_input(name)
    assert tuple(x.shape) == zoo.DEFAULT_INPUT_SHAPES[name]
    with torch.no_grad():
        out = zoo.randomize_bn(model)(x)
    assert tuple(out.shape) == EXPECTED_OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["small_cnn", "mlp", "unet3d"])
def test_builders_are_deterministic_under_manual_seed(name: str) -> None:
    torch.manual_seed(3)
    a = zoo.BUILDERS[name]().state_dict()
    torch.manual_seed(3)
    b = zoo.BUILDERS[name]().state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_small_kwargs() -> None:
    with torch.no_grad():
        assert zoo.resnet18(num_classes=7, width=8)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        assert zoo.resnet50(num_classes=5, width=8)(torch.randn(2, 3, 32, 32)).shape == (2, 5)
        out = zoo.mobilenet_v2(num_classes=3, width_mult=0.25)(torch.randn(2, 3, 32, 32))
        assert out.shape == (2, 3)
        out = zoo.unet3d(in_channels=2, out_channels=3, base=4, depth=2)(torch.randn(2, 2, 8, 8, 8))
        assert out.shape == (2, 3, 8, 8, 8)
        assert zoo.mlp(in_features=5, hidden=(6,), num_classes=4)(torch.randn(3, 5)).shape == (3, 4)
        out = zoo.small_cnn(num_classes=4, in_channels=1, width=4)(torch.randn(2, 1, 32, 32))
        assert out.shape == (2, 4)


def test_resnet_uses_torchvision_names() -> None:
    names = dict(zoo.resnet18(width=8).named_modules())
    for key in ("conv1", "bn1", "layer1.0.conv1", "layer1.0.bn2", "layer2.0.downsample.0", "fc"):
        assert key in names
    assert isinstance(names["layer2.0.downsample.1"], nn.BatchNorm2d)
    assert "layer4.2.conv3" in dict(zoo.resnet50(width=8).named_modules())


def test_mobilenet_has_depthwise_and_relu6() -> None:
    model = zoo.mobilenet_v2(width_mult=0.25)
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in model.modules())
    assert any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert isinstance(model.classifier[0], nn.Dropout)


def test_unet3d_has_grouped_and_square_conv_transpose_followed_by_bn() -> None:
    pairs = [(up[0], up[1]) for up in zoo.unet3d().ups]
    assert all(isinstance(c, nn.ConvTranspose3d) for c, _ in pairs)
    assert all(isinstance(bn, nn.BatchNorm3d) for _, bn in pairs)
    assert any(c.groups > 1 for c, _ in pairs)
    assert any(c.groups == 1 and c.in_channels == c.out_channels for c, _ in pairs)


def test_unet3d_rejects_bad_config() -> None:
    with pytest.raises(UsageError, match="depth"):
        zoo.unet3d(depth=1)
    with pytest.raises(UsageError, match="even"):
        zoo.unet3d(base=5)


def test_mlp_and_small_cnn_have_bn_before_layer() -> None:
    model = zoo.mlp()
    assert isinstance(model.norm, nn.BatchNorm1d) and isinstance(model.classifier, nn.Linear)
    cnn = zoo.small_cnn()
    assert isinstance(cnn.block3[0], nn.BatchNorm2d)
    assert isinstance(cnn.block3[1], nn.Conv2d) and cnn.block3[1].padding == (0, 0)


def test_example_input_is_seeded_and_leaves_global_rng() -> None:
    state = torch.get_rng_state()
    a = zoo.example_input("small_cnn", batch=3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (3, 3, 32, 32)
    assert torch.equal(a, zoo.example_input("small_cnn", batch=3, seed=1))
    assert not torch.equal(a, zoo.example_input("small_cnn", batch=3, seed=2))
    with pytest.raises(UsageError, match="unknown zoo model"):
        zoo.example_input("vgg16")


def test_randomize_bn_is_deterministic_and_changes_stats() -> None:
    fresh = _bn_state(zoo.small_cnn())
    a = zoo.small_cnn()
    state = torch.get_rng_state()
    assert zoo.randomize_bn(a, seed=5) is a
    assert torch.equal(torch.get_rng_state(), state)
    b = zoo.randomize_bn(zoo.small_cnn(), seed=5)
    c = zoo.randomize_bn(zoo.small_cnn(), seed=6)
    sa, sb, sc = _bn_state(a), _bn_state(b), _bn_state(c)
    assert all(torch.equal(x, y) for x, y in zip(sa, sb, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(sa, sc, strict=True))
    assert all(not torch.equal(x, y) for x, y in zip(sa, fresh, strict=True))
    for bn in _bn_layers(a):
        assert bn.running_var.min() >= 0.5 and bn.running_var.max() <= 2.0
        assert bn.weight.min() >= 0.5 and bn.weight.max() <= 1.5
        assert bn.running_mean.abs().max() > 0


def test_randomize_bn_handles_variants() -> None:
    model = nn.Sequential(
        nn.BatchNorm1d(4, affine=False),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.BatchNorm3d(4).double(),
        nn.LazyBatchNorm2d(),  # no shape yet: left alone, no error
    )
    zoo.randomize_bn(model)
    assert model[0].weight is None and model[0].running_var.min() >= 0.5
    assert model[1].running_mean is None and model[1].weight.min() >= 0.5
    assert model[2].running_mean.dtype == torch.float64
    assert not torch.equal(model[2].running_mean, torch.zeros(4, dtype=torch.float64))
