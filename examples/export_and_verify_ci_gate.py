"""A CI gate: fold, export ONNX, verify on every available runtime; exit non-zero on failure.

    python examples/export_and_verify_ci_gate.py [--out DIR]
    python examples/export_and_verify_ci_gate.py --model mypkg.models:resnet50 \\
        --input-shape 2x3x224x224 --out build/onnx
    python examples/export_and_verify_ci_gate.py --require-cuda      # on a GPU runner
    python examples/export_and_verify_ci_gate.py --simulate-bug      # see the gate fail

Exit codes (as the bnfold CLI's): 0 every candidate matched the original model; 1 a candidate's
outputs differ beyond tolerance; 3 bnfold could not do the job (load, fold, export, or CUDA
required but not usable). The ONNX file and a JSON report go to DIR (default: a temporary
folder), so a CI job can keep them as artifacts.

Every candidate (the folded PyTorch model; the ONNX file on ONNX Runtime CPU with default
optimizations and with ORT_DISABLE_ALL; ORT CUDA and PyTorch CUDA where usable) is compared with
the *original* eager model, so a failure names the stage that broke it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import bnfold
from bnfold import zoo


def load(spec: str | None, arch: str | None) -> nn.Module:
    """The model to gate: MODEL as ``bnfold.load_model`` reads it (a .pt2, a factory, or a
    state dict with ``arch``); by default a built-in CNN with realistic BatchNorm statistics."""
    if spec is None:
        torch.manual_seed(0)
        return zoo.randomize_bn(zoo.small_cnn()).eval()
    return bnfold.load_model(spec, arch=arch).model


def simulate_bug(model: nn.Module) -> None:
    """Scale one output channel of the first conv by 1.05: a fold bug of the kind the gate
    exists to catch (a wrong scale on one channel)."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight[0] *= 1.05


def gate(args: argparse.Namespace, out_dir: Path) -> bnfold.VerificationReport:
    model = load(args.model, args.arch)
    shape = tuple(int(size) for size in args.input_shape.split("x"))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    result = bnfold.fold(model, x)
    print(f"fold: {result.summary()}")
    if args.simulate_bug:
        simulate_bug(result.model)
        print("simulated a fold bug: conv channel 0 scaled by 1.05")

    exported = bnfold.export_onnx(result, x, out_dir / "model.onnx", overwrite=True)
    print(f"export: {exported.summary()}")

    # providers=None: CPU, plus CUDA wherever it is usable ("not run: <why>" elsewhere).
    # Naming ("cpu", "cuda") makes an unusable CUDA an error, which a GPU runner wants.
    providers = ("cpu", "cuda") if args.require_cuda else None
    report = bnfold.verify(model, {"folded": result, "onnx": exported}, x, providers=providers)
    print(report.format_text())
    (out_dir / "verification.json").write_text(report.to_json())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="a .pt2 file, pkg.module:factory, or a state dict with --arch (default: built-in)",
    )
    parser.add_argument("--arch", default=None, help="factory for a state-dict --model")
    parser.add_argument("--input-shape", default="2x3x32x32", help="example input, batch >= 2")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: temp)")
    parser.add_argument(
        "--require-cuda",
        action="store_true",
        help="fail (exit 3) unless ONNX Runtime CUDA is usable",
    )
    parser.add_argument(
        "--simulate-bug",
        action="store_true",
        help="perturb one folded weight to show the gate failing (exit 1)",
    )
    args = parser.parse_args(argv)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="bnfold-ci-gate-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    try:
        report = gate(args, out_dir)
        bnfold.require_passed(report)  # raises VerificationFailed unless every candidate passed
    except bnfold.VerificationFailed as exc:
        print(f"GATE FAILED: {exc}", file=sys.stderr)
        return 1
    except bnfold.BnfoldError as exc:  # could not load, fold, export, or run a required runtime
        print(f"GATE ERROR: {exc}", file=sys.stderr)
        return 3
    print(f"GATE PASSED: {report.summary()}; files in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
