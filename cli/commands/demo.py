"""``bnfold demo``: the whole value of bnfold in one command, on a model built in code."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click
from bnfold_cli.main import EPILOG as EXIT_CODES

if TYPE_CHECKING:  # no torch import when the CLI starts
    from bnfold.demo import DemoResult
    from bnfold.verification.records import VerificationReport

EPILOG = (
    """
\b
Steps (about 5 s on 2 CPU cores):
  1. train a small CNN on synthetic images
  2. fine-tune it with batch size 2 on a new camera's images: running
     statistics go stale and eval accuracy drops
  3. bnfold recalibrate: exact statistics from 256 sample images
  4. bnfold fold: N of M BatchNorms folded, the rest with reasons
  5. export ONNX and verify on every available runtime (CPU, CUDA)

\b
Examples:
  bnfold demo
  bnfold demo --out demo-files --json demo.json

"""
    + EXIT_CODES
)


@click.command(epilog=EPILOG)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Directory for demo.onnx (created if missing). Default: a new temporary "
    "directory, printed at the end.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for data and init.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    help="Also write every step's record as JSON to this file.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite an existing demo.onnx in --out and an existing --json file.",
)
def demo(out_dir: str | None, seed: int, json_path: str | None, force: bool) -> int:
    """Train, go stale, recalibrate, fold, export and verify a small CNN, with the numbers at
    each step. Needs no model file and no data."""
    import tempfile
    from pathlib import Path

    from bnfold.demo import run_demo
    from bnfold.io.paths import NamedPath, plan_paths

    outputs = [NamedPath("--json", Path(json_path))] if json_path else []
    if out_dir is not None:  # the default is a new directory: nothing can be in the way
        outputs.insert(0, NamedPath("--out", Path(out_dir) / "demo.onnx", makes_parent=True))
    plan_paths([], outputs, overwrite=force)
    target = out_dir or tempfile.mkdtemp(prefix="bnfold-demo-")
    steps = iter(range(1, 6))
    result = run_demo(
        target,
        seed=seed,
        overwrite=force,
        step=lambda message: click.echo(f"[{next(steps)}/5] {message}", err=True),
    )
    click.echo(_summary(result))
    if json_path:
        from bnfold.io.models import write_text_atomic

        write_text_atomic(json_path, result.to_json(indent=2), overwrite=force)
        click.echo(f"JSON report: {json_path}", err=True)
    return 0 if result.verification.passed else 1


def _summary(result: DemoResult) -> str:
    fold = result.fold
    lines = [
        "",
        "Accuracy",
        f"  trained (original camera)                  {_pct(result.accuracy_trained)}",
        f"  new camera, stale running statistics       {_pct(result.accuracy_stale)}"
        "   <- eval accuracy dropped",
        f"  new camera, BatchNorms on batch statistics {_pct(result.accuracy_train_mode)}",
        f"  after bnfold recalibrate                   {_pct(result.accuracy_recalibrated)}",
        f"  after bnfold fold                          {_pct(result.accuracy_folded)}",
        "",
        f"Recalibrate: {result.calibration.summary()}",
        f"Fold: {fold.summary()}",
    ]
    lines += [f"  kept {skip.bn}: {skip.reason.label} ({skip.detail})" for skip in fold.skipped]
    lines += [
        f"  BatchNorm kernels per forward: {result.bn_kernels_before} -> {result.bn_kernels_after}",
        f"Export: {result.export.path} ({result.export.node_count} ONNX nodes, "
        f"{'dynamic' if result.export.dynamic_batch.proven else 'fixed'} batch)",
        f"Verify: {result.verification.summary()}",
    ]
    lines += [f"  {line}" for line in _candidate_lines(result.verification)]
    lines += ["", f"Files in {result.out_dir}", f"Done in {result.seconds:.1f} s"]
    return "\n".join(lines)


def _candidate_lines(report: VerificationReport) -> list[str]:
    return [
        f"{c.name}: {c.status.value}" + (f" ({c.reason})" if c.reason else "")
        for c in report.candidates
    ]


def _pct(value: float) -> str:
    return f"{100 * value:5.1f} %"
