"""A model with custom blocks, and what bnfold's plan says about each BatchNorm in it, and why.

    python examples/custom_blocks.py [--out DIR]

Five blocks that real networks use, each with a BatchNorm. A fold that pairs each conv with the
BatchNorm declared after it would silently break four of them (it would drop the fused ReLU,
change the residual path, change both uses of the shared conv, and scale a weight that is
standardised away). bnfold reads the dataflow, folds what it can prove exact, and keeps the
rest with a reason and advice; the folded model is then checked against the original in
float64. The plan is also written to DIR/plan.json (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bnfold
from bnfold import zoo


class BatchNormAct2d(nn.BatchNorm2d):
    """A BatchNorm subclass with a fused activation (as timm's BatchNormAct2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(super().forward(x))


class WSConv2d(nn.Conv2d):
    """Weight-standardised conv: the weight used is computed from ``self.weight`` each call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(
            x,
            (w - mean) / (std + 1e-5),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class Net(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        c = width
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.stem_bn = BatchNormAct2d(c)  # 1. BN subclass with an activation
        self.res_conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.res_bn = nn.BatchNorm2d(c)  # 2. the conv output also feeds the residual add
        self.shared = nn.Conv2d(c, c, 1, bias=False)  # 3. one conv called twice...
        self.shared_bn_a = nn.BatchNorm2d(c)  # ...each call with its own BN
        self.shared_bn_b = nn.BatchNorm2d(c)
        self.pre_bn = nn.BatchNorm2d(c)  # 4. pre-activation: BN -> ReLU -> Conv
        self.pre_conv = nn.Conv2d(c, c, 3, padding=1)
        self.ws_conv = WSConv2d(c, c, 3, padding=1, bias=False)  # 5. weight standardisation
        self.ws_bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_bn(self.stem(x))
        y = self.res_conv(x)
        x = F.relu(self.res_bn(y) + y)  # y feeds both res_bn and the add
        x = self.shared_bn_a(self.shared(x))
        x = self.shared_bn_b(self.shared(x))
        x = self.pre_conv(F.relu(self.pre_bn(x)))
        x = F.relu(self.ws_bn(self.ws_conv(x)))
        return self.head(x.mean(dim=(2, 3)))


# What each block is, in the words a reader of the model would use.
BLOCKS = {
    "stem_bn": "BatchNormAct2d (BN subclass + ReLU) after a conv",
    "res_bn": "conv -> BN, the conv output also feeds a residual add",
    "shared_bn_a": "a conv shared by two call sites, first call",
    "shared_bn_b": "a conv shared by two call sites, second call",
    "pre_bn": "pre-activation BN -> ReLU -> Conv",
    "ws_bn": "weight-standardised conv -> BN",
}


def explain(plan: bnfold.Plan) -> None:
    """Print, for every BatchNorm, what the plan decided and the plan's own reason."""
    pairs = {pair.bn: pair for pair in plan.pairs}
    skips = {skip.bn: skip for skip in plan.skipped}
    for name, block in BLOCKS.items():
        print(f"{name}: {block}")
        if name in pairs:
            pair = pairs[name]
            print(f"  FOLD into {pair.producer} ({pair.pattern}, {pair.bn_kind.value})")
        else:
            skip = skips[name]
            print(f"  KEEP: {skip.reason.value} ({skip.reason.label}): {skip.detail}")
            print(f"  why/what to do: {skip.reason.advice()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: temp)")
    args = parser.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="bnfold-custom-blocks-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = zoo.randomize_bn(Net()).eval()  # realistic running statistics
    x = torch.randn(2, 3, 16, 16)

    plan = bnfold.find_pairs(model, x)
    print(f"plan: {plan.summary()}")
    explain(plan)
    (out_dir / "plan.json").write_text(plan.to_json())

    # Fold in float64, where a correct fold is exact to rounding (~1e-16), so any real error
    # would stand out; the fp32 model folds the same way.
    model64, x64 = model.double(), x.double()
    result = bnfold.fold(model64, x64)
    print(f"fold: {result.summary()}")
    with torch.no_grad():
        expected, got = model64(x64), result.model(x64)
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    kernels = (bnfold.count_bn_kernels(model64, x64), bnfold.count_bn_kernels(result.model, x64))
    print(f"float64 relative difference folded vs original: {rel:.1e}")
    print(f"batch-norm kernels per forward: {kernels[0]} -> {kernels[1]}")

    # The fused activation survives the fold: the folded stem_bn still applies its ReLU.
    seen: list[torch.Tensor] = []
    hook = result.model.stem_bn.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        result.model(x64)
    hook.remove()
    print(f"folded stem_bn output min {seen[0].min().item():.3f} (its ReLU is kept)")
    print(f"plan written to {out_dir / 'plan.json'}")
    return 0 if rel < 1e-10 and seen[0].min() >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
