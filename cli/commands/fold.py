"""``bnfold fold``: fold every foldable BatchNorm and save a model that loads without bnfold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from bnfold_cli.console import run_job
from bnfold_cli.options import (
    DATA_HELP,
    EXIT_CODES,
    FORCE,
    MODEL_HELP,
    NO_MERGE_BRANCHES,
    data_options,
    flag,
    model_options,
    path_option,
)

EPILOG = (
    MODEL_HELP
    + "\n"
    + DATA_HELP
    + """
\b
Output (-o, default MODEL's name + .folded + extension, beside MODEL):
  .pt2      a torch.export program: load with torch.export.load(path).module()
  .pt/.pth  a pickled module, only when MODEL is one (--trust-pickle); add --pt2
            for a .pt2 beside it
No output may be an input (also through a link, a hard link or ..), lie in the
--data folder or be another output; an existing one needs --force (a link is then
replaced, never written through). Every path is checked before any work. Files are
written in a temporary folder beside the output and moved into place at the end,
exclusively unless --force, so a failed or stopped run leaves nothing behind and a
file that appeared meanwhile is never replaced.

\b
Examples:
  bnfold fold model.pt2                       # writes model.folded.pt2
  bnfold fold mypkg.models:resnet50 --input-shape 1x3x224x224 -o resnet50.pt2
  bnfold fold weights.pt --arch mypkg.models:resnet50 --input-shape 1x3x224x224
  bnfold fold model.pt --trust-pickle --pt2   # model.folded.pt + model.folded.pt2
  bnfold fold model.pt2 --dry-run --json report.json
  bnfold fold model.pt2 --onnx model.onnx --verify   # exit 1 if outputs differ
  bnfold fold model.pt2 --data samples.pt     # recalibrate statistics, then fold

"""
    + EXIT_CODES
)


@click.command("fold", epilog=EPILOG)
@path_option(
    "-o",
    "--output",
    help="Where to write the folded model (.pt2, or .pt/.pth for a pickled MODEL).",
)
@flag("--pt2", "also_pt2", help="With a pickled-module output, also write a .pt2 beside it.")
@FORCE
@NO_MERGE_BRANCHES
@flag(
    "--dry-run",
    help="Fold in memory and report what would be written; write no file but the reports.",
)
@path_option(
    "--onnx",
    "onnx_path",
    help="Also export the folded model to ONNX at this path (checked: "
    "dynamic batch, no training-mode BatchNormalization).",
)
@flag(
    "--verify",
    "verify_outputs",
    help="Compare the folded model (and the --onnx file under ONNX Runtime) with the "
    "original; exit 1 if any output differs beyond tolerance.",
)
@data_options(required=False)
@model_options
def fold(
    request: Any,
    data_request: Any,
    output: Path | None,
    also_pt2: bool,
    force: bool,
    no_merge_branches: bool,
    dry_run: bool,
    onnx_path: Path | None,
    verify_outputs: bool,
    json_path: str | None,
    markdown_path: str | None,
) -> None:
    """Fold every foldable BatchNorm into its Conv/ConvTranspose/Linear and save the model.

    Prints the table of BatchNorms (folded or kept, and why), the BN kernels one forward runs
    before and after, and where the output was written. With --data, the statistics are
    recalibrated first, and --verify compares with the recalibrated model.
    """
    from bnfold.jobs import Job, VerifyRequest

    job = Job(
        "fold",
        request,
        data=data_request,
        merge_branches=not no_merge_branches,
        save=True,
        output=output,
        also_pt2=also_pt2,
        onnx=onnx_path,
        verify=VerifyRequest() if verify_outputs else None,
        verify_label="folded (torch)",
        reports=(("--json", json_path), ("--markdown", markdown_path)),
        dry_run=dry_run,
        force=force,
    )
    run_job(job)
