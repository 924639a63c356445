"""bnfold.fold vs torch.fx.experimental.optimization.fuse, side by side in one process.

For each model: fold time (median of interleaved repetitions, ratio bnfold/fuse), BN kernels
left by each, fp32 error ratio of each (RMS error of the folded fp32 model vs the fp64 reference
over the same for the original fp32 model), whether each result is correct (fp64 relative error
of folded vs original), and eager CPU latency of the original vs bnfold's folded model.

The models of ``benchmarks/blocks.py`` (RepVGG branches, MixConv concat, LeViT Linear-BN on
tokens, a final BN before pooling and the head) also have a hand-written deploy form
(``benchmarks/deploy_forms.py``): every foldable BN folded, each RepVGG block one conv module
(as RepVGG's own converter leaves it). A second table gives, for those, the BN kernels left by
bnfold and by the deploy form, the deploy form's fp64 error against the original (it must be
exact, or the deploy form is wrong), and the eager latency of original, folded and deploy form
timed together; folded/deploy is the gap left.

    python benchmarks/fold_bench.py [--repeat 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/timing.py
from blocks import MODELS as BLOCK_MODELS
from deploy_forms import CONVERTERS, deploy_error_fp64
from timing import median_times

import bnfold
from bnfold import zoo

WRONG = 1e-6  # fp64 relative error above this means the folded model computes something else
EXACT = 1e-10  # a hand-written deploy form must match its original this closely in fp64


class Traps(nn.Module):
    """Two patterns fuse folds wrongly: Linear on a 3-D input before BatchNorm1d of the same
    size, and one conv called twice under two different BNs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.bn_seq = nn.BatchNorm1d(16)
        self.conv = nn.Conv2d(16, 16, 1)
        self.bn_a = nn.BatchNorm2d(16)
        self.bn_b = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_seq(self.fc(x))  # (N, 16, 16): BN normalises dim 1, Linear the last dim
        y = y.unsqueeze(-1)
        return self.bn_a(self.conv(y)) + self.bn_b(self.conv(y * 0.5))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (zoo.resnet18, zoo.DEFAULT_INPUT_SHAPES["resnet18"]),
    "resnet50": (zoo.resnet50, zoo.DEFAULT_INPUT_SHAPES["resnet50"]),
    "mobilenet_v2": (zoo.mobilenet_v2, zoo.DEFAULT_INPUT_SHAPES["mobilenet_v2"]),
    "unet3d": (zoo.unet3d, zoo.DEFAULT_INPUT_SHAPES["unet3d"]),
    "mlp": (zoo.mlp, zoo.DEFAULT_INPUT_SHAPES["mlp"]),
    "traps": (Traps, (2, 16, 16)),
    **BLOCK_MODELS,
}


def _fold(model: nn.Module, x: torch.Tensor) -> bnfold.FoldResult:
    return bnfold.fold(model, x)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _infer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def _fp64_rel_error(original: nn.Module, folded: nn.Module, x: torch.Tensor) -> float:
    a = _run(copy.deepcopy(original).double(), x.double())
    b = _run(copy.deepcopy(folded).double(), x.double())
    return float((a - b).abs().max() / a.abs().max())


def _precision_ratio(original: nn.Module, folded: nn.Module, x: torch.Tensor) -> float:
    reference = _run(copy.deepcopy(original).double(), x.double())
    err_orig = (_run(original, x).double() - reference).pow(2).mean().sqrt()
    err_fold = (_run(folded, x).double() - reference).pow(2).mean().sqrt()
    return float(err_fold / err_orig.clamp_min(1e-30))


def _fuse(model: nn.Module) -> nn.Module | str:
    try:
        return fuse(model)
    except Exception as exc:  # report fuse's failure, do not hide it
        return f"{type(exc).__name__}"


def bench_model(name: str, repeat: int, deploy_batch: int = 32) -> dict[str, Any]:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = zoo.randomize_bn(build().eval())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = _fold(model, x).model
    theirs = _fuse(model)
    row: dict[str, Any] = {"model": name, "bn_total": bnfold.count_bn_kernels(model, x)}
    fns: dict[str, Callable[[], Any]] = {"bnfold": lambda: _fold(model, x)}
    if isinstance(theirs, nn.Module):
        fns["fuse"] = lambda: fuse(model)
    times = median_times(fns, repeat)
    row["bnfold_ms"] = times["bnfold"] * 1e3
    row["bn_left_bnfold"] = bnfold.count_bn_kernels(ours, x)
    row["bnfold_error_fp64"] = _fp64_rel_error(model, ours, x)
    row["bnfold_precision_ratio"] = _precision_ratio(model, ours, x)
    if isinstance(theirs, nn.Module):
        row["fuse_ms"] = times["fuse"] * 1e3
        row["time_ratio"] = times["bnfold"] / times["fuse"]
        row["bn_left_fuse"] = bnfold.count_bn_kernels(theirs, x)
        row["fuse_error_fp64"] = _fp64_rel_error(model, theirs, x)
        row["fuse_precision_ratio"] = _precision_ratio(model, theirs, x)
    else:
        row["fuse_failed"] = theirs
    candidates = {"original": lambda: _infer(model, x), "folded": lambda: _infer(ours, x)}
    deployed = CONVERTERS[name](model) if name in CONVERTERS else None
    if deployed is not None:
        candidates["deploy"] = lambda: _infer(deployed, x)
    latency = median_times(candidates, repeat * 3, warmup=1)
    row["latency_original_ms"] = latency["original"] * 1e3
    row["latency_folded_ms"] = latency["folded"] * 1e3
    row["latency_ratio"] = latency["folded"] / latency["original"]
    if deployed is not None:
        row["bn_left_deploy"] = bnfold.count_bn_kernels(deployed, x)
        row["deploy_error_fp64"] = deploy_error_fp64(name, model, x)
        row["deploy_precision_ratio"] = _precision_ratio(model, deployed, x)
        row["latency_deploy_ms"] = latency["deploy"] * 1e3
        row["folded_deploy_ratio"] = latency["folded"] / latency["deploy"]
        row.update(_deployment_batch(model, ours, deployed, shape, deploy_batch, repeat))
    return row


def _deployment_batch(
    model: nn.Module, ours: nn.Module, deployed: nn.Module, shape: tuple, batch: int, repeat: int
) -> dict[str, Any]:
    """Folded vs deploy form at a deployment batch size: at the bench's batch of 2 a fixed
    Python cost per call (the generated forward of a rewritten model, the views and the
    ``Identity`` a module-level fold leaves in the model's own forward) weighs in."""
    x = torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(1))
    fns = {"folded": lambda: _infer(ours, x), "deploy": lambda: _infer(deployed, x)}
    latency = median_times(fns, max(3, repeat), warmup=1)
    return {
        "deploy_batch": batch,
        "latency_folded_batch_ms": latency["folded"] * 1e3,
        "latency_deploy_batch_ms": latency["deploy"] * 1e3,
        "folded_deploy_ratio_batch": latency["folded"] / latency["deploy"],
    }


def _verdict(error: float) -> str:
    return "exact" if error < WRONG else f"WRONG ({error:.1e})"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | BNs | BN left: bnfold / fuse | fold ms: bnfold / fuse (ratio) | "
        "result: bnfold / fuse | fp32 error ratio: bnfold / fuse | eager latency folded/orig |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "fuse_failed" in r:
            fuse_left, fuse_time, fuse_ok, fuse_prec = (
                "-",
                f"fuse failed: {r['fuse_failed']}",
                "-",
                "-",
            )
        else:
            fuse_left = str(r["bn_left_fuse"])
            fuse_time = f"{r['fuse_ms']:.1f} ({r['time_ratio']:.2f}×)"
            fuse_ok = _verdict(r["fuse_error_fp64"])
            fuse_prec = f"{r['fuse_precision_ratio']:.2f}"
        lines.append(
            f"| {r['model']} | {r['bn_total']} | {r['bn_left_bnfold']} / {fuse_left} | "
            f"{r['bnfold_ms']:.1f} / {fuse_time} | {_verdict(r['bnfold_error_fp64'])} / "
            f"{fuse_ok} | {r['bnfold_precision_ratio']:.2f} / {fuse_prec} | "
            f"{r['latency_ratio']:.2f} ({r['latency_folded_ms']:.2f} / "
            f"{r['latency_original_ms']:.2f} ms) |"
        )
    return "\n".join(lines)


def deploy_markdown(rows: list[dict[str, Any]]) -> str:
    """The models with a hand-written deploy form: how far bnfold's fold is from it."""
    lines = [
        "| model | BN kernels: original / bnfold / deploy form | deploy form vs original (fp64) | "
        "fp32 error ratio: bnfold / deploy form | "
        "eager ms: original / folded / deploy | folded/deploy (target ≤ 1.05) | "
        "batch: folded / deploy ms | folded/deploy at that batch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "bn_left_deploy" not in r:
            continue
        deploy_ok = "exact" if r["deploy_error_fp64"] < EXACT else "DEPLOY FORM WRONG"
        lines.append(
            f"| {r['model']} | {r['bn_total']} / {r['bn_left_bnfold']} / {r['bn_left_deploy']} | "
            f"{deploy_ok} ({r['deploy_error_fp64']:.1e}) | "
            f"{r['bnfold_precision_ratio']:.2f} / {r['deploy_precision_ratio']:.2f} | "
            f"{r['latency_original_ms']:.2f} / "
            f"{r['latency_folded_ms']:.2f} / {r['latency_deploy_ms']:.2f} | "
            f"{r['folded_deploy_ratio']:.2f} | {r['deploy_batch']}: "
            f"{r['latency_folded_batch_ms']:.1f} / {r['latency_deploy_batch_ms']:.1f} | "
            f"{r['folded_deploy_ratio_batch']:.2f} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--json", help="also write the rows as JSON to this file")
    parser.add_argument(
        "--deploy-batch",
        type=int,
        default=32,
        help="batch size of the second folded-vs-deploy-form timing (default 32)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    rows = [bench_model(name, args.repeat, args.deploy_batch) for name in args.models]
    print(markdown(rows))
    deploy_table = deploy_markdown(rows)
    if deploy_table:
        print(
            "\nAgainst the hand-written deploy form (every foldable BN folded by hand, each RepVGG "
            "block one conv module with its ReLU, as RepVGG's converter leaves it; bnfold with its "
            "defaults). Latency: median of "
            "interleaved repetitions of original, folded and deploy form, same input.\n"
        )
        print(deploy_table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
