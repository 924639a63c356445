"""``bnfold verify``: compare an ONNX file (and optionally a folded model) with the original.

Also the shared pieces other commands use for their ``--verify`` step: ``verify_options`` and
``providers_option`` (click options), ``parse_providers`` and ``run_verification``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from bnfold_cli.main import EPILOG as EXIT_CODES
from bnfold_cli.options import (
    DTYPE_NAMES,
    InputShape,
    ModelRequest,
    echo_stdout,
    json_stdout,
    prepare,
    status,
    versions,
)

PROVIDERS = ("cpu", "cuda")

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


def verify_options(command: Callable) -> Callable:
    """``--data``, ``--batches``, ``--batch-size``, ``--seed``, ``--random-batches``."""
    decorators = [
        click.option(
            "--data",
            metavar="DATA",
            default=None,
            help="Sample data to verify on (as for recalibration: .pt, .npy/.npz, an "
            "image folder or pkg.module:callable).",
        ),
        click.option(
            "--batches",
            type=click.IntRange(min=1),
            default=4,
            show_default=True,
            help="How many batches of DATA to use.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=8,
            show_default=True,
            help="Batch size when DATA is split into batches (a file or folder).",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed of the random input batches.",
        ),
        click.option(
            "--random-batches",
            metavar="SIZES",
            default="1,3",
            show_default=True,
            help="Batch sizes of the seeded random batches ('none' for none).",
        ),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def providers_option(command: Callable) -> Callable:
    return click.option(
        "--providers",
        metavar="LIST",
        default=None,
        help="Devices to verify on: cpu, cuda or cpu,cuda. Default: cpu, plus CUDA where it is "
        "usable. Naming cuda makes an unusable CUDA an error (exit 3).",
    )(command)


def parse_providers(text: str | None) -> tuple[str, ...] | None:
    """``"cpu,cuda"`` -> ("cpu", "cuda"); None stays None (the library's optional-CUDA default)."""
    from bnfold.errors import UsageError

    if text is None:
        return None
    chosen = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [p for p in chosen if p not in PROVIDERS]
    if unknown or not chosen:
        raise UsageError(
            f"--providers {text!r}: choose from {', '.join(PROVIDERS)}, comma-separated"
        )
    return chosen


def parse_sizes(text: str) -> tuple[int, ...]:
    from bnfold.errors import UsageError

    if text.strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(size < 1 for size in sizes):
        raise UsageError(f"--random-batches {text!r}: give batch sizes like 1,3 (or 'none')")
    return sizes


def data_batches(spec: str, limit: int, batch_size: int = 8, seed: int = 0) -> list[Any]:
    """The first ``limit`` batches of DATA, each a tensor or a tuple of positional tensors."""
    from bnfold.calibrate.data import load_data
    from bnfold.errors import UsageError

    batches: list[Any] = []
    for batch in load_data(spec, batch_size=batch_size, seed=seed):
        if isinstance(batch, dict):
            raise UsageError(f"{spec} yields dict batches; verify feeds positional inputs only")
        batches.append(tuple(batch) if isinstance(batch, (list, tuple)) else batch)
        if len(batches) == limit:
            break
    if not batches:
        raise UsageError(f"{spec} holds no batch to verify on")
    return batches


def run_verification(
    reference: Any,
    candidates: Any,
    inputs: Any,
    *,
    data: str | None = None,
    batches: int = 4,
    batch_size: int = 8,
    seed: int = 0,
    providers: tuple[str, ...] | None = None,
    random_batches: str = "1,3",
) -> Any:
    """``bnfold.verify`` on DATA's first batches (or ``inputs``) plus seeded random batches.

    Returns the VerificationReport; the caller prints it and then calls
    ``bnfold.require_passed`` so a failure exits with code 1.
    """
    import bnfold

    samples = data_batches(data, batches, batch_size, seed) if data else [inputs]
    return bnfold.verify(
        reference,
        candidates,
        samples,
        providers=providers,
        seed=seed,
        random_batch_sizes=parse_sizes(random_batches),
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
@click.option(
    "--input-shape",
    "shapes",
    type=InputShape(),
    multiple=True,
    help="Example input shape when there is no --data and MODEL has no example "
    "inputs, e.g. 1x3x224x224 (repeat per positional input).",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES, case_sensitive=False),
    default=None,
    help="Dtype of the example inputs.",
)
@click.option(
    "--arch",
    metavar="PKG.MODULE:FACTORY",
    default=None,
    help="Factory building the architecture for a state-dict MODEL.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow full pickled modules. Loading one RUNS CODE FROM THE FILE.",
)
@verify_options
@providers_option
@click.option(
    "--json",
    "json_path",
    metavar="FILE",
    default=None,
    help="Also write the report as JSON to FILE ('-' for stdout instead of the text; "
    "anything else printed meanwhile goes to stderr).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing --json file (never an input).")
@click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    help="Print the Python traceback before the error line.",
)
@json_stdout
def verify(
    onnx_path: Path,
    reference: str,
    folded: str | None,
    shapes: tuple,
    dtype: str | None,
    arch: str | None,
    trust_pickle: bool,
    data: str | None,
    batches: int,
    batch_size: int,
    seed: int,
    random_batches: str,
    providers: str | None,
    json_path: str | None,
    force: bool,
) -> None:
    """Verify that OUT.onnx computes what the original model computes, on each runtime."""
    import json

    from bnfold_cli.options import plan_paths

    import bnfold
    from bnfold.errors import UsageError
    from bnfold.export import external_data_path
    from bnfold.io.models import load_model, write_text_atomic

    plan_paths(
        {
            "OUT.onnx": onnx_path,
            "OUT.onnx (external data)": external_data_path(onnx_path),
            "--reference": reference,
            "--folded": folded,
            "--data": data,
        },
        {"--json": json_path},
        force=force,
    )
    chosen = parse_providers(providers)
    parse_sizes(random_batches)
    if not onnx_path.is_file():
        raise UsageError(f"no ONNX file at {onnx_path}")
    request = ModelRequest(reference, arch, trust_pickle, tuple(shapes), dtype)
    if data is None:
        prepared = prepare(request)
        model, inputs, loaded = prepared.model, prepared.inputs, prepared.loaded
    else:
        with status(f"Loading {reference}"):
            loaded = load_model(reference, arch=arch, trust_pickle=trust_pickle)
        model, inputs = loaded.model, None
    candidates: dict[str, Any] = {"onnx": onnx_path}
    if folded:
        with status(f"Loading {folded}"):
            folded_model = load_model(folded, trust_pickle=trust_pickle).model
        candidates = {"folded": folded_model, **candidates}
    with status("Verifying"):
        report = run_verification(
            model,
            candidates,
            inputs,
            data=data,
            batches=batches,
            batch_size=batch_size,
            seed=seed,
            providers=chosen,
            random_batches=random_batches,
        )
    document = {
        "command": "verify",
        "versions": versions(),
        "onnx": str(onnx_path),
        "reference": loaded.to_dict(),
        "verification": report.to_dict(),
    }
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if json_path == "-":
        echo_stdout(text)
    else:
        click.echo(report.format_text())
        if json_path:
            write_text_atomic(json_path, text, overwrite=force)
            click.echo(f"JSON report: {json_path}", err=True)
    bnfold.require_passed(report)
