"""Models, data and an independent float64 reference for the recalibration tests."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

BN_TYPES = nn.modules.batchnorm._BatchNorm


class BatchNormAct2d(nn.BatchNorm2d):
    """A BN subclass with extra behaviour (as timm's): BN, then dropout, then ReLU."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.drop = nn.Dropout(0.5)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class Mixed(nn.Module):
    """BN2d, a BN2d called twice per forward, Dropout, a BN subclass, BN1d on (N, C, L) and on
    (N, C), and a branch that runs only when asked (its BN sees no data otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_act = BatchNormAct2d(8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.seq_bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(32, 16)
        self.bn1d = nn.BatchNorm1d(16, momentum=None)
        self.head = nn.Linear(16, 4)
        self.unused = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, *, extra: bool = False) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.shared(x)
        x = self.shared(self.bn_act(self.conv2(self.drop(x))))
        x = self.seq_bn(self.pool(x).flatten(2))  # (N, 8, 4)
        x = self.head(F.relu(self.bn1d(self.fc(x.flatten(1)))))
        return self.unused(x) if extra else x


class TwoInputs(nn.Module):
    """Images, and optionally a second positional (or keyword) input ``y`` of 5 features; BNs
    in a chain, so each one's statistics depend on how the samples were batched."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc_y = nn.Linear(5, 4)
        self.bn_y = nn.BatchNorm1d(4)
        self.bn_out = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        h = F.relu(self.bn2(self.conv2(h))).mean((2, 3))
        if y is not None:
            h = h + self.bn_y(self.fc_y(y))
        return self.bn_out(h)


def two_inputs(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_stats(TwoInputs().to(dtype).eval(), seed)


def mixed(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    model = Mixed().to(dtype).eval()
    randomize_stats(model, seed)
    return model


def randomize_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BN_TYPES) and module.running_mean is not None:
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen))
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model


def uneven_batches(
    sizes: Iterable[int] = (3, 8, 5, 2, 11),
    shape: tuple[int, ...] = (3, 8, 8),
    *,
    seed: int = 0,
    offset: float = 4.0,
    scale: float = 3.0,
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Batches of different sizes, data far from zero mean (so a naive variance would cancel)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn((n, *shape), generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
        for n in sizes
    ]


def reference_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Independent float64 statistics of every BN's input: a copy of the model with its BNs in
    torch's own train mode (everything else in eval), hooks concatenating every input.

    Returns ``{name: (mean, unbiased var, elements per channel)}`` for the BNs that saw data.
    """
    twin = copy.deepcopy(model)
    seen: dict[str, list[torch.Tensor]] = {}
    for module in twin.modules():
        module.training = False
    for name, module in twin.named_modules():
        if isinstance(module, BN_TYPES):
            module.training = True

            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0].detach().to(torch.float64)
                seen.setdefault(name, []).append(x.transpose(0, 1).reshape(x.shape[1], -1))

            module.register_forward_pre_hook(hook)
    feed = forward or (lambda m, b: m(*b) if isinstance(b, (tuple, list)) else m(b))
    with torch.no_grad():
        for batch in batches:
            feed(twin, batch)
    result = {}
    for name, parts in seen.items():
        values = torch.cat(parts, dim=1)
        result[name] = (values.mean(dim=1), values.var(dim=1), values.shape[1])
    return result


def statistics_error(
    model: nn.Module, reference: dict[str, tuple[torch.Tensor, torch.Tensor, int]]
) -> dict[str, tuple[float, float]]:
    """Per BN: (max |mean − ref| / ref std, max |var − ref| / ref var)."""
    modules = dict(model.named_modules())
    errors = {}
    for name, (mean, var, _) in reference.items():
        bn = modules[name]
        got_mean = bn.running_mean.to(torch.float64)
        got_var = bn.running_var.to(torch.float64)
        errors[name] = (
            float(((got_mean - mean).abs() / var.sqrt()).max()),
            float(((got_var - var).abs() / var).max()),
        )
    return errors


def frozen_state(model: nn.Module) -> dict[str, Any]:
    """Everything recalibration must not change: params, other buffers, flags, momentum."""
    stats = {"running_mean", "running_var", "num_batches_tracked"}
    state: dict[str, Any] = {}
    for name, module in model.named_modules():
        state[f"{name}.training"] = module.training
        if isinstance(module, BN_TYPES):
            state[f"{name}.momentum"] = module.momentum
            state[f"{name}.eps"] = module.eps
        state[f"{name}.hooks"] = (
            len(module._forward_pre_hooks),
            len(module._forward_hooks),
        )
        state[f"{name}.own forward"] = module.__dict__.get("forward")  # recalibration swaps it
        for pname, param in module.named_parameters(recurse=False):
            state[f"{name}.{pname}"] = (param.detach().clone(), param.requires_grad, param.grad)
        for bname, buf in module.named_buffers(recurse=False):
            if not (isinstance(module, BN_TYPES) and bname in stats):
                state[f"{name}.{bname}"] = buf.clone()
    return state


def all_state(model: nn.Module) -> dict[str, Any]:
    """``frozen_state`` plus the BN statistics themselves."""
    state = frozen_state(model)
    for name, buf in model.named_buffers():
        state[f"buffer:{name}"] = buf.clone()
    return state


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        other = after[key]
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            assert torch.equal(value[0], other[0]), key
            assert value[1:] == other[1:], key
        elif isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), key
        else:
            assert value == other, key
