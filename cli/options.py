"""What the commands share: their options, how a run shows on the terminal, and the output.

The options are gathered into ``bnfold.jobs`` requests only when a command runs, so
``bnfold --help`` imports neither bnfold nor torch. ``hooks`` shows each stage of a run (a
spinner, a progress bar) and names it in an unexpected error; ``emit`` prints the rendered
report and writes the report files.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool")
PROVIDERS = ("cpu", "cuda")
_SHAPE = re.compile(r"^\d+(x\d+)*(:\w+)?$")

MODEL_HELP = """\b
MODEL is one of:
  model.pt2                a torch.export program (no code from the file runs)
  pkg.module:factory       a callable returning an nn.Module (your code)
  weights.pt / .safetensors  a state dict, with --arch pkg.module:factory
  model.pt                 a full pickled module: only with --trust-pickle
"""

DATA_HELP = """\b
DATA is one of:
  samples.pt          a tensor (samples on dim 0), a tuple of tensors (positional
                      inputs), a dict of tensors (keyword inputs) or a list of
                      ready-made batches; read with a weights-only unpickler
  samples.npy         a numpy array (samples on dim 0)
  samples.npz         its one array, or arrays saved positionally (arr_0, arr_1...:
                      positional inputs); samples.npz:NAME picks the array NAME (an
                      .npz of several named arrays needs it)
  images/             a folder of images (and subfolders): RGB, shorter side resized to
                      --resize (default image size / 0.875), center crop --image-size
                      (default 224), normalised with --mean/--std (default ImageNet's)
  pkg.module:fn       your callable returning an iterable of batches (a DataLoader...)
Samples are shuffled with --seed and cut into batches of --batch-size (ready-made
batches and callables are used as they are); --batches N uses the first N.
"""


class InputShape(click.ParamType):
    """``1x3x224x224`` or ``1x3x224x224:float16``: (dims, dtype or None); the dims and the
    dtype name are checked when the inputs are built."""

    name = "SHAPE"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[tuple[int, ...], str | None]:
        if isinstance(value, tuple):
            return value
        if not _SHAPE.match(str(value).strip().lower()):
            self.fail(f"'{value}' is not a shape like 1x3x224x224 (optionally :dtype)", param, ctx)
        text, _, dtype = str(value).strip().lower().partition(":")
        return tuple(int(size) for size in text.split("x")), dtype or None


def _numbers(convert: Callable[[str], Any], what: str) -> Callable[..., Any]:
    """A callback parsing ``a,b,c``: None stays None; for whole numbers (sizes, at least 1),
    ``none`` is none."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        if convert is int and value.strip().lower() in ("", "none"):
            return ()
        try:
            values = tuple(convert(part) for part in value.split(","))
        except ValueError:
            values = ()
        if not values or (convert is int and min(values) < 1):
            raise click.BadParameter(f"'{value}' is not {what}")
        return values

    return parse


def _providers(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    chosen = tuple(part.strip().lower() for part in (value or "").split(",") if part.strip())
    if value is not None and (not chosen or any(p not in PROVIDERS for p in chosen)):
        raise click.BadParameter(f"{value!r}: choose from {', '.join(PROVIDERS)}, comma-separated")
    return chosen or None


def _count(name: str, default: int | None, help: str) -> Callable:
    """An option taking a whole number of at least 1."""
    shown = default is not None
    return click.option(
        name, type=click.IntRange(min=1), default=default, show_default=shown, help=help
    )


def options(*decorators: Callable) -> Callable[[Callable], Callable]:
    """Apply click ``decorators`` in the order they are listed (first is outermost)."""

    def apply(command: Callable) -> Callable:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def request_options(name: str, build: Callable[..., Any], *decorators: Callable) -> Callable:
    """Options gathered into one argument ``name`` of the command: ``build(**their values)``,
    called when the command runs."""
    probe = options(*decorators)(lambda: None)  # the parameters these decorators declare
    params = [param.name for param in probe.__click_params__]

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {param: kwargs.pop(param) for param in params}
            return command(*args, **{name: build(**values)}, **kwargs)

        return options(*decorators)(wrapper)

    return decorate


def _model_request(model: str, **values: Any) -> Any:
    from bnfold.jobs import ModelRequest

    return ModelRequest(model, **values)


def _data_request(data_spec: str | None, mean: Any, std: Any, **values: Any) -> Any:
    from bnfold.jobs import DataRequest

    normalisation = {"mean": mean, "std": std}  # None: the default (ImageNet's)
    defaults = {k: v for k, v in normalisation.items() if v}
    return None if data_spec is None else DataRequest(data_spec, **values, **defaults)


def _verify_request(**values: Any) -> Any:
    from bnfold.jobs import VerifyRequest

    return VerifyRequest(**values)


ARCH = click.option(
    "--arch",
    metavar="PKG.MODULE:FACTORY",
    default=None,
    help="Factory building the architecture for a state-dict MODEL.",
)
TRUST_PICKLE = click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow a full pickled module. Loading it RUNS CODE FROM THE FILE: "
    "only for files whose source you trust.",
)
SHAPES = click.option(
    "--input-shape",
    "shapes",
    type=InputShape(),
    multiple=True,
    help="Example input shape, e.g. 1x3x224x224 (optionally :DTYPE, e.g. 2x16:int64). Repeat "
    "for each positional input. Default: the .pt2 program's own example inputs.",
)
DTYPE = click.option(
    "--dtype",
    type=click.Choice(DTYPE_NAMES, case_sensitive=False),
    default=None,
    help="Dtype of the example inputs (default: the model's parameter dtype).",
)
FORCE = click.option(
    "--force",
    is_flag=True,
    help="Replace existing output files, reports included (never an input).",
)
DEBUG = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    help="Print the Python traceback before the error line.",
)


def path_option(*names: str, help: str, **kwargs: Any) -> Callable:
    """An option naming a file (never a folder), as a ``Path``."""
    path = click.Path(dir_okay=False, path_type=Path)
    return click.option(*names, type=path, default=None, help=help, **kwargs)


def json_option(stdout: str) -> Callable:
    return click.option(
        "--json",
        "json_path",
        metavar="FILE",
        default=None,
        help=f"Also write the report as JSON to FILE ('-' for stdout, which {stdout}; anything "
        "else printed meanwhile goes to stderr).",
    )


def model_options(command: Callable) -> Callable:
    """MODEL and how to load it and build its example inputs, as ``request: ModelRequest``;
    ``--json``/``--markdown`` report files; ``--debug``."""
    model = click.argument("model", metavar="MODEL")
    return options(
        request_options("request", _model_request, model, SHAPES, DTYPE, ARCH, TRUST_PICKLE),
        json_option("replaces the table"),
        click.option(
            "--markdown",
            "markdown_path",
            metavar="FILE",
            default=None,
            help="Also write the report as Markdown to FILE.",
        ),
        DEBUG,
    )(command)


def data_options(required: bool) -> Callable[[Callable], Callable]:
    """``--data`` and its options, as ``data_request: DataRequest | None``."""
    numbers = _numbers(float, "a comma-separated list of numbers")
    return request_options(
        "data_request",
        _data_request,
        click.option(
            "--data",
            "data_spec",
            metavar="DATA",
            required=required,
            help="Sample data to recalibrate BatchNorm statistics on (see DATA below).",
        ),
        _count(
            "--batches", None, "Use at most N batches (per process under torchrun). Default: all."
        ),
        _count("--batch-size", 32, "Samples per batch (tensor, array and image DATA)."),
        click.option("--seed", default=0, show_default=True, help="Seed of the sample shuffle."),
        _count("--image-size", 224, "Center-crop side for an image folder."),
        _count("--resize", None, "Shorter side before the crop (default: image size / 0.875)."),
        click.option(
            "--mean",
            callback=numbers,
            metavar="R,G,B",
            help="Normalisation mean for images (default 0.485,0.456,0.406).",
        ),
        click.option(
            "--std",
            callback=numbers,
            metavar="R,G,B",
            help="Normalisation std for images (default 0.229,0.224,0.225).",
        ),
    )


verify_options = request_options(
    "verify_request",
    _verify_request,
    click.option(
        "--data",
        metavar="DATA",
        help="Sample data to verify on (as for recalibration: .pt, .npy/.npz, an image folder "
        "or pkg.module:callable).",
    ),
    _count("--batches", 4, "How many batches of DATA to use."),
    _count("--batch-size", 8, "Batch size when DATA is split into batches (a file or folder)."),
    click.option("--seed", default=0, show_default=True, help="Seed of the random input batches."),
    click.option(
        "--random-batches",
        "random_batch_sizes",
        metavar="SIZES",
        default="1,3",
        show_default=True,
        callback=_numbers(int, "a list of batch sizes like 1,3 (or 'none')"),
        help="Batch sizes of the seeded random batches ('none' for none).",
    ),
    click.option(
        "--providers",
        metavar="LIST",
        callback=_providers,
        help="Devices to verify on: cpu, cuda or cpu,cuda. Default: cpu, plus CUDA where it is "
        "usable. Naming cuda makes an unusable CUDA an error (exit 3).",
    ),
)


# ------------------------------------------------------------------ running and output


def run_job(
    job: Any,
    *,
    json_path: str | None,
    markdown_path: str | None = None,
    plot_path: str | None = None,
    quiet: bool = False,
) -> None:
    """Run ``job`` (with ``--json -``, whatever it prints goes to stderr), then ``emit`` its
    report; a failed verification raises ``VerificationFailed`` (exit 1) after the report."""
    from bnfold import require_passed
    from bnfold.pipeline import run

    with stdout_to_stderr(json_path == "-"):
        report = run(job, hooks(quiet=quiet or json_path == "-"))
    reports = {"markdown_path": markdown_path, "plot_path": plot_path}
    emit(report, json_path=json_path, **reports, quiet=quiet, force=job.force)
    if report.verification is not None:
        require_passed(report.verification)


def hooks(quiet: bool = False) -> Any:
    """The pipeline's hooks for a terminal: each stage named in unexpected errors, with a
    spinner on stderr when it is a terminal; a progress bar while recalibrating (not when
    ``quiet``, and only on rank 0)."""
    from bnfold.jobs import Hooks

    return Hooks(stage=stage, recalibrating=functools.partial(_progress_bar, quiet=quiet))


@contextlib.contextmanager
def stage(message: str, spinner: bool = True) -> Iterator[None]:
    """One stage of a command, with a spinner showing ``message`` on stderr when it is a
    terminal. An exception that is not a ``BnfoldError`` (a bug, torch out of memory, an
    exception or ``sys.exit`` in the user's code) leaves as ``UnexpectedError("<stage> failed:
    <type>: <message>")``, the original as its cause; ``KeyboardInterrupt`` passes untouched."""
    try:
        if spinner and sys.stderr.isatty():
            from rich.console import Console

            with Console(stderr=True).status(message):
                yield
        else:
            yield
    except (Exception, SystemExit) as exc:
        from bnfold_cli.main import describe_unexpected

        from bnfold.errors import BnfoldError, UnexpectedError

        if isinstance(exc, BnfoldError):
            raise
        name = message[:1].lower() + message[1:]
        raise UnexpectedError(describe_unexpected(exc, during=name)) from exc


@contextlib.contextmanager
def _progress_bar(total: int | None, quiet: bool) -> Iterator[Any]:
    """The recalibration stage, with a tqdm bar (samples/s, ETA) on stderr when it is a
    terminal, unless ``quiet``, and only on rank 0."""
    with stage("Recalibrating", spinner=False):
        if quiet or not sys.stderr.isatty() or _rank() != 0:
            yield None
            return
        from tqdm import tqdm

        with tqdm(
            total=total,
            unit="sample",
            desc="Recalibrating",
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        ) as bar:
            yield lambda index, items: bar.update(items)


def emit(
    report: Any,
    *,
    json_path: str | None,
    markdown_path: str | None = None,
    plot_path: str | None = None,
    quiet: bool = False,
    force: bool = False,
) -> None:
    """Print the text report (unless ``quiet`` or the JSON goes to stdout) and write the report
    files (checked before any work; replacing one only with ``force``), on rank 0 only. A
    failure names the files the run already wrote."""
    from bnfold.io.models import write_text_atomic
    from bnfold.outputs import written_before_failure
    from bnfold.report import render_json, render_markdown, render_text

    if _rank() != 0:
        return
    with written_before_failure(report.written), stage("Writing the report", spinner=False):
        if json_path == "-":
            click.echo(render_json(report), nl=False)
        elif not quiet:
            tty = sys.stdout.isatty()
            click.echo(render_text(report, width=text_width(tty), color=tty), nl=False)
        files = [("JSON", json_path, render_json), ("Markdown", markdown_path, render_markdown)]
        for kind, path, render in files:
            if path and path != "-":
                write_text_atomic(path, render(report), overwrite=force)
                _note(quiet, f"{kind} report: {path}")
        if plot_path:
            from bnfold.calibrate.plot import plot_shifts

            plot_shifts(report.calibration, plot_path, overwrite=force)
            _note(quiet, f"plot: {plot_path}")


def text_width(tty: bool) -> int | None:
    """The width the text report fits: the terminal's (``COLUMNS`` first); when stdout is not
    a terminal, ``COLUMNS`` if set, else None (no limit: full names, nothing wrapped)."""
    columns = os.environ.get("COLUMNS", "")
    if not tty:
        return int(columns) if columns.isdigit() and int(columns) > 0 else None
    return shutil.get_terminal_size((100, 24)).columns


def _note(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


def _rank() -> int:
    """This process's rank under torch.distributed (0 outside it; no torch import if unused)."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    return dist.get_rank() if dist and dist.is_available() and dist.is_initialized() else 0


# ------------------------------------------------------------------ stdout for --json -


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """While the block runs, file descriptor 1 and ``sys.stdout`` point at stderr, so whatever
    the user's factory, the model's forward, torch or a C extension prints goes to stderr and
    stdout carries the JSON alone (``--json -``). Both are restored when the block ends,
    however it ends. A no-op when not ``active`` or when fd 1 is closed."""
    if not active:
        yield
        return
    _flush_all()
    try:
        saved = os.dup(1)
    except OSError:  # stdout closed: nothing to protect
        yield
        return
    stream = sys.stdout
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        _flush_all()
        os.dup2(saved, 1)
        os.close(saved)
        sys.stdout = stream


def _flush_all() -> None:
    """Flush Python's streams and C stdio, so buffered bytes go where fd 1 points now."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)
