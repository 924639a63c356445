"""``bnfold export``: fold MODEL (unless --no-fold) and write a checked ONNX file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from bnfold_cli.console import run_job
from bnfold_cli.options import (
    EXIT_CODES,
    FORCE,
    MODEL_HELP,
    NO_MERGE_BRANCHES,
    flag,
    model_options,
    verify_options,
)

EPILOG = (
    MODEL_HELP
    + """
\b
The ONNX file is exported in eval mode (dynamo exporter; the TorchScript exporter
only if dynamo fails, with a warning), checked with onnx.checker and shape
inference, refused if a BatchNormalization would run in training mode, and
written atomically. Dim 0 is a dynamic batch, proven by running ONNX Runtime at
batch sizes 1, 3 and the example's (--static-batch to fix it). Weights over
~1.75 GiB go to OUT.onnx.data. --verify compares the original model with the
folded model and the ONNX file (ORT CPU, and ORT CUDA where usable).

\b
Examples:
  bnfold export model.pt2 --onnx model.onnx
  bnfold export mypkg.models:resnet50 --input-shape 1x3x224x224 --onnx r50.onnx --verify
  bnfold export folded.pt2 --no-fold --onnx folded.onnx

"""
    + EXIT_CODES
)


@click.command("export", epilog=EPILOG)
@click.option(
    "--onnx",
    "onnx_path",
    required=True,
    metavar="OUT.onnx",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The ONNX file to write.",
)
@flag("--no-fold", help="Export MODEL as it is, without folding.")
@NO_MERGE_BRANCHES
@click.option(
    "--opset",
    type=click.IntRange(min=7),
    default=None,
    help="ONNX opset (default: the exporter's recommended one).",
)
@flag("--static-batch", help="Fix the batch size to the example's instead of a dynamic dim 0.")
@FORCE
@flag(
    "--verify",
    "do_verify",
    help="Verify the folded model and the ONNX file against the original model.",
)
@verify_options
@model_options
def export(
    request: Any,
    onnx_path: Path,
    no_fold: bool,
    no_merge_branches: bool,
    opset: int | None,
    static_batch: bool,
    force: bool,
    do_verify: bool,
    verify_request: Any,
    json_path: str | None,
    markdown_path: str | None,
) -> None:
    """Fold MODEL's BatchNorms and export it to ONNX, checked and with a proven dynamic batch."""
    from bnfold.jobs import Job

    job = Job(
        "export",
        request,
        fold=not no_fold,
        merge_branches=not no_merge_branches,
        onnx=onnx_path,
        opset=opset,
        dynamic_batch=not static_batch,
        verify=verify_request if do_verify else None,
        reports=(("--json", json_path), ("--markdown", markdown_path)),
        reads=(("--data", verify_request.data),),
        force=force,
    )
    run_job(job)
