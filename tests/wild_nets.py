"""Random small networks with the patterns of real code: frozen and custom norms, BN subclasses,
control flow fx cannot trace (shape checks, isinstance checks, branches on values), tensors
escaping the forward, keyword calls, in-place ops, value reads, shared layers.

``wild_net(rng)`` builds one from a ``random.Random``, so the property test (hypothesis feeds the
generator) and the long fuzz campaign (``tests/fuzz_campaign.py``, one seed per model) share it.
``check_wild`` is the property: exact in float64 on every recorded input (and on a fresh input
when the forward reads no tensor values), the caller untouched, every norm with a verdict.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from fold_checks import FP64_REL_TOL, assert_same_snapshot, snapshot
from torch import nn
from wild_checks import counted_kinds, max_rel_error
from wild_models import (
    BatchNormAct2d,
    ChannelScale,
    D2FrozenBatchNorm2d,
    FrozenBatchNorm2d,
    NotAffineFrozen,
    randomise,
)

import bnfold

C, SIZE = 4, 6
KINDS = (
    "conv",
    "norm",
    "relu",
    "residual",
    "fanout",
    "shared",
    "branch",
    "gate",
    "trap",
    "escape",
    "kwarg",
    "read",
    "inplace",
)


def random_conv(rng: random.Random) -> nn.Module:
    """A layer keeping (N, 4, 6, 6): grouped/transposed/padded convs with or without bias."""
    groups = rng.choice([1, 2, 4])
    bias = rng.random() < 0.5
    if rng.random() < 0.25:
        return nn.ConvTranspose2d(C, C, 3, padding=1, groups=groups, bias=bias)
    kernel = rng.choice([1, 3])
    if kernel == 1:
        return nn.Conv2d(C, C, 1, groups=groups, bias=bias)
    padding = rng.choice([0, 1])
    mode = rng.choice(["zeros", "reflect"]) if padding else "zeros"
    conv = nn.Conv2d(C, C, 3, padding=padding, padding_mode=mode, groups=groups, bias=bias)
    return conv if padding else nn.Sequential(conv, nn.ZeroPad2d(1))


def random_norm(rng: random.Random) -> nn.Module:
    choice = rng.choice(["bn", "bn", "bnact", "frozen", "d2frozen", "notaffine", "scale"])
    return {
        "bn": lambda: nn.BatchNorm2d(C),
        "bnact": lambda: BatchNormAct2d(C, act=rng.random() < 0.5),
        "frozen": lambda: FrozenBatchNorm2d(C),
        "d2frozen": lambda: D2FrozenBatchNorm2d(C),
        "notaffine": lambda: NotAffineFrozen(C),
        "scale": lambda: ChannelScale(C),
    }[choice]()


@dataclass(frozen=True)
class Step:
    kind: str
    names: tuple[str, ...]


class WildNet(nn.Module):
    def __init__(self, layers: dict[str, nn.Module], steps: list[Step]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.steps = steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = self._step(step, [self.layers[n] for n in step.names], x)
        return x

    def _step(self, step: Step, mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        kind = step.kind
        if kind in ("conv", "norm", "relu", "shared"):
            return mods[0](x)
        if kind == "residual":
            return x + mods[1](mods[0](x))
        if kind == "fanout":
            y = mods[0](x)
            return mods[1](y) + y
        if kind == "branch":  # on values: fx cannot trace it, routing depends on the input
            return mods[0](x) if float(x.mean()) > 0 else mods[1](x)
        if kind == "gate":  # on shapes only: fx cannot trace it, nothing depends on values
            if x.dim() < 2:
                raise ValueError("expects a batch")
            return x
        if kind == "trap":  # fx traces the wrong branch (its proxy is not a Tensor)
            return mods[0](x) if isinstance(x, torch.Tensor) else x
        if kind == "escape":
            y = mods[0](x)
            self.cache = y  # the layer's output outlives the forward
            return mods[1](y)
        if kind == "kwarg":
            return mods[1](mods[0](input=x))
        if kind == "read":
            return x * (1.0 if float(x.abs().max()) < 1e9 else 0.5)
        y = mods[0](x)  # inplace
        y.add_(0.25)
        return mods[1](y)


def wild_net(rng: random.Random, max_steps: int = 7) -> WildNet:
    layers: dict[str, nn.Module] = {}
    convs: list[str] = []
    steps: list[Step] = []

    def add(prefix: str, module: nn.Module) -> str:
        name = f"{prefix}{len(layers)}"
        layers[name] = module
        if prefix == "conv":
            convs.append(name)
        return name

    def pair() -> tuple[str, str]:
        first, second = add("conv", random_conv(rng)), add("norm", random_norm(rng))
        return (second, first) if rng.random() < 0.3 else (first, second)

    for _ in range(rng.randint(2, max_steps)):
        kind = rng.choice(KINDS)
        if kind == "conv":
            steps.append(Step(kind, (add("conv", random_conv(rng)),)))
        elif kind == "norm":
            steps.append(Step(kind, (add("norm", random_norm(rng)),)))
        elif kind == "relu":
            steps.append(Step(kind, (add("relu", nn.ReLU()),)))
        elif kind in ("residual", "escape", "inplace"):
            steps.append(Step(kind, pair()))
        elif kind == "fanout":
            steps.append(Step(kind, (add("conv", random_conv(rng)), add("norm", random_norm(rng)))))
        elif kind == "branch":
            first, second = pair()
            steps.append(Step(kind, (first, second)))
        elif kind == "trap":
            steps.append(Step(kind, (add("norm", random_norm(rng)),)))
        elif kind == "kwarg":
            conv = nn.Conv2d(C, C, 1, bias=rng.random() < 0.5)
            steps.append(Step(kind, (add("conv", conv), add("norm", random_norm(rng)))))
        elif kind == "shared":
            if convs:
                steps.append(Step(kind, (rng.choice(convs),)))
        else:  # gate, read
            steps.append(Step(kind, ()))
    return randomise(WildNet(layers, steps), seed=rng.randint(0, 10_000))


def example(seed: int, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, C, SIZE, SIZE, generator=gen, dtype=torch.float64)


def check_wild(net: WildNet, rng: random.Random) -> bnfold.FoldResult:
    """The property (see the module doc). Returns the fold result."""
    net = copy.deepcopy(net).double().eval()
    x = example(rng.randint(0, 10_000))
    extras = [example(rng.randint(0, 10_000)) for _ in range(rng.choice([0, 0, 1, 2]))]
    before = snapshot(net)
    result = bnfold.fold(net, x, extra_inputs=extras)
    assert_same_snapshot(before, net)
    for inputs in (x, *extras):
        error = max_rel_error(net, result.model, inputs)
        assert error < FP64_REL_TOL, (error, result.summary(), result.plan.method)
    reads_values = any("reads tensor values" in note for note in result.plan.notes)
    if not reads_values:  # nothing depends on values: exact on any input of that shape
        assert max_rel_error(net, result.model, example(99_999)) < FP64_REL_TOL
    if not any(step.kind == "branch" for step in net.steps):  # every norm ran on x
        kernels_before = bnfold.count_bn_kernels(net, x)
        kernels_after = bnfold.count_bn_kernels(result.model, x)
        assert kernels_after == counted_kinds(result.skipped), result.skipped
        assert kernels_before - kernels_after == counted_kinds(result.folded)
    for skip in result.skipped:
        assert skip.detail and skip.reason.advice()
    return result
