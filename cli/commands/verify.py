"""``bnfold verify``: compare an ONNX file (and optionally a folded model) with the original."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from bnfold_cli.console import run_job
from bnfold_cli.options import (
    ARCH,
    DEBUG,
    DTYPE,
    EXIT_CODES,
    SHAPES,
    TRUST_PICKLE,
    flag,
    json_option,
    verify_options,
)

EPILOG = (
    """\b
Every candidate is compared with the original model (--reference) in eval mode,
float32, on CPU: the ONNX file on ONNX Runtime CPU (default optimizations and
ORT_DISABLE_ALL) and on ORT CUDA, and with --folded a folded PyTorch model on CPU
(and CUDA when torch sees a GPU). TF32 is off. Inputs: the first --batches
batches of --data (or the example inputs), plus seeded random batches of other
sizes. A CUDA candidate that cannot run is reported "not run: <why>" unless
--providers names cuda, which makes it an error (exit 3).

\b
Examples:
  bnfold verify model.onnx --reference model.pt2
  bnfold verify model.onnx --reference mypkg.models:resnet50 --input-shape 1x3x224x224
  bnfold verify model.onnx --reference model.pt2 --data samples.pt --providers cpu,cuda
  bnfold verify model.onnx --reference model.pt2 --folded model.folded.pt2 --json v.json

"""
    + EXIT_CODES
)


@click.command("verify", epilog=EPILOG)
@click.argument("onnx_path", metavar="OUT.onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--reference",
    required=True,
    metavar="MODEL",
    help="The original, unfolded model (as MODEL in bnfold fold).",
)
@click.option(
    "--folded",
    metavar="MODEL",
    default=None,
    help="Also verify this folded PyTorch model (e.g. the .pt2 from bnfold fold).",
)
@SHAPES
@DTYPE
@ARCH
@TRUST_PICKLE
@verify_options
@json_option("replaces the text")
@flag("--force", help="Overwrite an existing --json file (never an input).")
@DEBUG
def verify(
    onnx_path: Path,
    reference: str,
    folded: str | None,
    shapes: tuple,
    dtype: str | None,
    arch: str | None,
    trust_pickle: bool,
    verify_request: Any,
    json_path: str | None,
    force: bool,
) -> None:
    """Verify that OUT.onnx computes what the original model computes, on each runtime."""
    from bnfold.export import external_data_path
    from bnfold.jobs import Job, ModelRequest

    candidates: tuple = (("onnx", onnx_path),)
    if folded:
        candidates = (("folded", ModelRequest(folded, trust_pickle=trust_pickle)), *candidates)
    job = Job(
        "verify",
        ModelRequest(reference, arch, trust_pickle, tuple(shapes), dtype),
        find=False,
        verify=verify_request,
        candidates=candidates,
        model_role="--reference",
        reads=(
            ("OUT.onnx", onnx_path),
            ("OUT.onnx (external data)", external_data_path(onnx_path)),
            ("--folded", folded),
            ("--data", verify_request.data),
        ),
        reports=(("--json", json_path),),
        force=force,
    )
    run_job(job)
