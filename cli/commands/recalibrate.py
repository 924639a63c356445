"""``bnfold recalibrate``: exact BatchNorm running statistics from sample data, saved as a model."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from bnfold_cli.console import run_job
from bnfold_cli.options import (
    ARCH,
    DATA_HELP,
    DEBUG,
    EXIT_CODES,
    FORCE,
    MODEL_HELP,
    TRUST_PICKLE,
    data_options,
    flag,
    json_option,
    model_request,
    path_option,
)

EPILOG = (
    MODEL_HELP
    + "\n"
    + DATA_HELP
    + """
\b
Output (-o; default MODEL's name + .recalibrated, beside MODEL):
  .pt2                a torch.export program
  .pt/.pth            a state dict (a pickled module when MODEL is one)
  .safetensors        a state dict
A state dict keeps MODEL's keys: load it into the same architecture, strictly.

\b
Several processes (torchrun): a DATA file or folder is split by batch (rank r of W
feeds batches r, r+W, ... of the batches one process makes), so the ranks feed
every batch once and get one process's statistics; a pkg.module:fn DATA is this
rank's part, fed whole. Statistics are all-reduced in float64. Only rank 0 writes
files and prints; a rank that fails stops every rank. More in the README.
  torchrun --standalone --nproc-per-node 4 --no-python bnfold recalibrate \\
      model.pt2 --data images/ -o model.recalibrated.pt2

\b
Examples:
  bnfold recalibrate model.pt2 --data samples.pt -o model.recalibrated.pt2
  bnfold recalibrate weights.pt --arch mypkg.models:resnet50 --data val_images/ \\
      --batch-size 64 --batches 50 --json recal.json --plot shifts.png
  bnfold recalibrate mypkg.models:net --data mypkg.data:calibration_loader

"""
    + EXIT_CODES
)


@click.command("recalibrate", epilog=EPILOG)
@path_option(
    "-o", "--output", help="Where to write the recalibrated model (.pt2, .pt/.pth, .safetensors)."
)
@FORCE
@model_request(click.argument("spec", metavar="MODEL"), ARCH, TRUST_PICKLE)
@click.option(
    "--device",
    default=None,
    help="Run on this device (e.g. cuda; under torchrun cuda means cuda:LOCAL_RANK).",
)
@json_option("replaces the table")
@click.option(
    "--plot",
    "plot_path",
    metavar="FILE.png",
    default=None,
    help="Also draw the per-layer shift of mean and variance (needs matplotlib).",
)
@flag("-q", "--quiet", help="No progress bar and no report table.")
@DEBUG
@data_options(required=True)
def recalibrate(
    request: Any,
    data_request: Any,
    output: Path | None,
    force: bool,
    device: str | None,
    json_path: str | None,
    plot_path: str | None,
    quiet: bool,
) -> None:
    """Recompute every BatchNorm's running statistics on DATA and save the model.

    The statistics are exact: the mean and unbiased variance of every value each BatchNorm
    sees, pooled in float64 over all batches (and all processes under torchrun), with every
    other layer in eval mode (Dropout off). Nothing else in the model changes.
    """
    from bnfold.jobs import Job

    with _process_group():
        job = Job(
            "recalibrate",
            request,
            data=data_request,
            find=False,
            fold=False,
            save=True,
            output=output,
            device=_device(device) if device is not None else None,
            reports=(("--json", json_path), ("--plot", plot_path)),
            force=force,
        )
        run_job(job, quiet=quiet)


@contextlib.contextmanager
def _process_group() -> Iterator[None]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), if not
    joined yet; leave it at the end if it was joined here."""
    import torch

    from bnfold.errors import UsageError

    dist = torch.distributed
    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise UsageError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        dist.init_process_group()
        joined = True
    try:
        yield
    finally:
        if joined:
            dist.destroy_process_group()


def _device(name: str) -> Any:
    """The device ``name`` means, made current for CUDA; plain ``cuda`` under torchrun is this
    process's ``cuda:LOCAL_RANK``."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
