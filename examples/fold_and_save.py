"""Fold a model, read the plan, save it as .pt2, then load it back with plain torch and compare.

    python examples/fold_and_save.py [--out DIR]

The model is one of bnfold's built-in CNNs with an input-normalising BatchNorm in front: a common
way to standardise images inside the model. That first BatchNorm feeds a zero-padded conv, so it
cannot be folded exactly (the padded border would no longer be the BatchNorm's zero); the plan
says so, and it stays in the folded model. Outputs go to DIR (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

import bnfold
from bnfold import zoo


def build_model() -> nn.Module:
    """Stand-in for your trained model: realistic BatchNorm statistics, eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(input_norm=nn.BatchNorm2d(3), net=zoo.small_cnn(num_classes=10))
    )
    return zoo.randomize_bn(model, seed=0).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: temp)")
    args = parser.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="bnfold-fold-and-save-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    model = build_model()
    x = torch.randn(2, 3, 32, 32)  # example inputs: batch >= 2, the shape the model expects

    # 1. The plan: every BatchNorm is either a pair (BN + the layer it folds into) or a skip
    #    with a reason. find_pairs reads the model's dataflow; it never touches the weights.
    plan = bnfold.find_pairs(model, x)
    print(f"plan: {plan.summary()}")
    for pair in plan.pairs:
        print(f"  fold {pair.bn} into {pair.producer} ({pair.pattern})")
    for skip in plan.skipped:
        print(f"  keep {skip.bn}: {skip.reason.value} ({skip.reason.label}): {skip.detail}")
        print(f"       what to do: {skip.reason.advice()}")

    # 2. Fold. `model` is not changed; result.model is a new eval-mode model.
    result = bnfold.fold(model, x)
    before = bnfold.count_bn_kernels(model, x)
    after = bnfold.count_bn_kernels(result.model, x)
    print(f"fold: {result.summary()}")
    print(f"batch-norm kernels per forward: {before} -> {after}")

    # 3. Save as a torch.export program (.pt2): it carries its own structure, so it loads
    #    without bnfold and without your model's source code. The batch dim stays dynamic.
    saved = bnfold.save_model(
        result.model, out_dir / "model.folded.pt2", example_inputs=x, overwrite=True
    )
    print(f"saved {saved.path} ({saved.bytes / 1024:.0f} kB)")

    # 4. Load it back with plain torch and compare with the original, on a new batch size.
    reloaded = torch.export.load(saved.path).module()
    sample = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(sample), reloaded(sample)
    diff = (got - expected).abs().max().item()
    peak = expected.abs().max().item()
    print(f"reloaded with torch.export.load: max |diff| = {diff:.2e} (peak |output| {peak:.2f})")
    if diff > 1e-5 * peak + 1e-6:  # float32: a correct fold changes rounding only
        print("FAILED: the reloaded model does not match the original", file=sys.stderr)
        return 1
    print("OK: the saved folded model computes what the original computes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
