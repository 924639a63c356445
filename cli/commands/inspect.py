"""``bnfold inspect``: the plan for every BatchNorm, folded or not, and why."""

from __future__ import annotations

import click
from bnfold_cli.main import EPILOG as EXIT_CODES
from bnfold_cli.options import (
    MODEL_HELP,
    count_bn_kernels,
    emit,
    model_options,
    plan_paths,
    prepare,
    status,
    versions,
)

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
@click.option("--force", is_flag=True, help="Overwrite existing report files (never MODEL).")
@model_options
def inspect(request, force: bool, json_path: str | None, markdown_path: str | None) -> None:
    """Show every BatchNorm: foldable or kept, into which layer, and why.

    Nothing is written except the optional --json/--markdown reports.
    """
    import bnfold
    from bnfold.io.inputs import describe_inputs
    from bnfold.report import Report

    plan_paths(
        {"MODEL": request.spec}, {"--json": json_path, "--markdown": markdown_path}, force=force
    )
    run = prepare(request)
    with status("Reading the model's dataflow"):
        before = count_bn_kernels(run.model, run.inputs)
        plan = bnfold.find_pairs(run.model, run.inputs)
    report = Report(
        command="inspect",
        versions=versions(),
        model=run.loaded.to_dict(),
        inputs=describe_inputs(run.inputs),
        inputs_from=run.inputs_from,
        plan=plan,
        bn_kernels_before=before,
    )
    emit(report, json_path=json_path, markdown_path=markdown_path, force=force)
