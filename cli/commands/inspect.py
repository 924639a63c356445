"""``bnfold inspect``: the plan for every BatchNorm, folded or not, and why."""

from __future__ import annotations

from typing import Any

import click
from bnfold_cli.console import run_job
from bnfold_cli.options import EXIT_CODES, MODEL_HELP, NO_MERGE_BRANCHES, flag, model_options

EPILOG = (
    MODEL_HELP
    + """
\b
Examples:
  bnfold inspect model.pt2
  bnfold inspect mypkg.models:resnet50 --input-shape 1x3x224x224
  bnfold inspect weights.safetensors --arch mypkg.models:resnet50 --input-shape 1x3x224x224
  bnfold inspect model.pt2 --json plan.json

"""
    + EXIT_CODES
)


@click.command("inspect", epilog=EPILOG)
@flag("--force", help="Overwrite existing report files (never MODEL).")
@NO_MERGE_BRANCHES
@model_options
def inspect(
    request: Any,
    force: bool,
    no_merge_branches: bool,
    json_path: str | None,
    markdown_path: str | None,
) -> None:
    """Show every BatchNorm: foldable or kept, into which layer, and why.

    Nothing is written except the optional --json/--markdown reports.
    """
    from bnfold.jobs import Job

    reports = (("--json", json_path), ("--markdown", markdown_path))
    job = Job(
        "inspect",
        request,
        fold=False,
        merge_branches=not no_merge_branches,
        reports=reports,
        force=force,
    )
    run_job(job)
