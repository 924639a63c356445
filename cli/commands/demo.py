"""``bnfold demo``: the whole value of bnfold in one command, on a model built in code."""

from __future__ import annotations

import click
from bnfold_cli.console import emit
from bnfold_cli.options import EXIT_CODES

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
    from bnfold.demo import run_demo

    steps = iter(range(1, 6))
    result = run_demo(
        out_dir,
        seed=seed,
        overwrite=force,
        report=json_path,
        step=lambda message: click.echo(f"[{next(steps)}/5] {message}", err=True),
    )
    emit(result, {"--json": json_path}, force=force)
    return 0 if result.verification.passed else 1
