"""``bnfold export``: fold MODEL (unless --no-fold) and write a checked ONNX file."""

from __future__ import annotations

from pathlib import Path

import click
from bnfold_cli.commands.verify import providers_option, verify_options
from bnfold_cli.main import EPILOG as EXIT_CODES
from bnfold_cli.options import (
    MODEL_HELP,
    count_bn_kernels,
    emit,
    model_options,
    plan_paths,
    prepare,
    stage,
    status,
    versions,
    written_before_failure,
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
@click.option("--no-fold", is_flag=True, help="Export MODEL as it is, without folding.")
@click.option(
    "--opset",
    type=click.IntRange(min=7),
    default=None,
    help="ONNX opset (default: the exporter's recommended one).",
)
@click.option(
    "--static-batch",
    is_flag=True,
    help="Fix the batch size to the example's instead of a dynamic dim 0.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Overwrite existing output files (OUT.onnx, reports; never an input).",
)
@click.option(
    "--verify",
    "do_verify",
    is_flag=True,
    help="Verify the folded model and the ONNX file against the original model.",
)
@verify_options
@providers_option
@model_options
def export(
    request,
    onnx_path: Path,
    no_fold: bool,
    opset: int | None,
    static_batch: bool,
    force: bool,
    do_verify: bool,
    data: str | None,
    batches: int,
    batch_size: int,
    seed: int,
    random_batches: str,
    providers: str | None,
    json_path: str | None,
    markdown_path: str | None,
) -> None:
    """Fold MODEL's BatchNorms and export it to ONNX, checked and with a proven dynamic batch."""
    from bnfold_cli.commands.verify import parse_providers, run_verification

    import bnfold
    from bnfold.export import external_data_path
    from bnfold.io.inputs import describe_inputs
    from bnfold.report import Report

    plan_paths(
        {"MODEL": request.spec, "--data": data},
        {
            "--onnx": onnx_path,
            "--onnx (external data)": external_data_path(onnx_path),
            "--json": json_path,
            "--markdown": markdown_path,
        },
        force=force,
    )
    chosen = parse_providers(providers)
    run = prepare(request)
    with status("Folding" if not no_fold else "Reading the model's dataflow"):
        before = count_bn_kernels(run.model, run.inputs)
        result = None if no_fold else bnfold.fold(run.model, run.inputs)
        plan = bnfold.find_pairs(run.model, run.inputs) if no_fold else result.plan
        after = bnfold.count_bn_kernels(result.model, run.inputs) if result else before
    with status(f"Exporting {onnx_path}"):
        exported = bnfold.export_onnx(
            result if result is not None else run.model,
            run.inputs,
            onnx_path,
            opset=opset,
            dynamic_batch=not static_batch,
            overwrite=force,
        )
    with written_before_failure([exported]):  # the ONNX file is complete
        sections = [("export", exported)]
        if do_verify:
            candidates = {"folded": result, "onnx": exported} if result else {"onnx": exported}
            with status("Verifying"):
                verification = run_verification(
                    run.model,
                    candidates,
                    run.inputs,
                    data=data,
                    batches=batches,
                    batch_size=batch_size,
                    seed=seed,
                    providers=chosen,
                    random_batches=random_batches,
                )
            sections.append(("verification", verification))
        report = Report(
            command="export",
            versions=versions(),
            model=run.loaded.to_dict(),
            inputs=describe_inputs(run.inputs),
            inputs_from=run.inputs_from,
            plan=plan,
            result=result,
            bn_kernels_before=before,
            bn_kernels_after=after,
            sections=tuple(sections),
        )
        with stage("writing the report"):
            emit(report, json_path=json_path, markdown_path=markdown_path, force=force)
    if do_verify:
        bnfold.require_passed(verification)
