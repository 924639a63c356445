"""Options every model-reading command shares, and the plumbing behind them.

Parsing (``--input-shape``, ``--dtype``, the MODEL argument, ``--arch``, ``--trust-pickle``,
``--json``, ``--markdown``) needs only click. ``plan_paths`` (check every input and output path
before any work), ``prepare`` (load the model, build and check the example inputs) and ``emit``
(print the report, write the JSON/Markdown files) import bnfold and torch inside their bodies,
so ``bnfold --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from bnfold.io.models import LoadedModel
    from bnfold.io.paths import PathPlan
    from bnfold.report import Report

DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool")
_SHAPE = re.compile(r"^\d+(x\d+)*$")


@dataclass(frozen=True)
class ShapeSpec:
    """One ``--input-shape``: the dims and an optional per-input dtype (``2x16:int64``)."""

    shape: tuple[int, ...]
    dtype: str | None = None


class InputShape(click.ParamType):
    """``1x3x224x224`` or ``1x3x224x224:float16``."""

    name = "SHAPE"

    def convert(self, value: Any, param: Any, ctx: Any) -> ShapeSpec:
        if isinstance(value, ShapeSpec):
            return value
        text, _, dtype = str(value).strip().lower().partition(":")
        if not _SHAPE.match(text):
            self.fail(f"'{value}' is not a shape like 1x3x224x224 (optionally :dtype)", param, ctx)
        dims = tuple(int(size) for size in text.split("x"))
        if any(size == 0 for size in dims):
            self.fail(f"'{value}' has a zero dimension", param, ctx)
        if dtype and dtype not in DTYPE_NAMES:
            self.fail(
                f"unknown dtype '{dtype}' in '{value}'; use {', '.join(DTYPE_NAMES)}", param, ctx
            )
        return ShapeSpec(dims, dtype or None)


@dataclass(frozen=True)
class ModelRequest:
    """What the user asked to load, and with which inputs."""

    spec: str
    arch: str | None
    trust_pickle: bool
    shapes: tuple[ShapeSpec, ...]
    dtype: str | None


@dataclass
class Prepared:
    """A loaded model with example inputs that it accepts."""

    loaded: LoadedModel
    inputs: tuple[Any, ...]
    inputs_from: str

    @property
    def model(self) -> Any:
        return self.loaded.model


MODEL_HELP = """\b
MODEL is one of:
  model.pt2                a torch.export program (no code from the file runs)
  pkg.module:factory       a callable returning an nn.Module (your code)
  weights.pt / .safetensors  a state dict, with --arch pkg.module:factory
  model.pt                 a full pickled module: only with --trust-pickle
"""


def model_options(command: Callable) -> Callable:
    """Add MODEL and the shared options; the command receives ``request: ModelRequest`` plus
    ``json_path`` and ``markdown_path``."""
    decorators = [
        click.argument("model", metavar="MODEL"),
        click.option(
            "--input-shape",
            "shapes",
            type=InputShape(),
            multiple=True,
            help="Example input shape, e.g. 1x3x224x224 (optionally :DTYPE, e.g. "
            "2x16:int64). Repeat for each positional input. Default: the .pt2 "
            "program's own example inputs.",
        ),
        click.option(
            "--dtype",
            type=click.Choice(DTYPE_NAMES, case_sensitive=False),
            default=None,
            help="Dtype of the example inputs (default: the model's parameter dtype).",
        ),
        click.option(
            "--arch",
            metavar="PKG.MODULE:FACTORY",
            default=None,
            help="Factory building the architecture for a state-dict MODEL.",
        ),
        click.option(
            "--trust-pickle",
            is_flag=True,
            help="Allow a full pickled module. Loading it RUNS CODE FROM THE FILE: "
            "only for files whose source you trust.",
        ),
        click.option(
            "--json",
            "json_path",
            metavar="FILE",
            default=None,
            help="Also write the report as JSON to FILE ('-' for stdout, which "
            "replaces the table; anything else printed meanwhile goes to "
            "stderr).",
        ),
        click.option(
            "--markdown",
            "markdown_path",
            metavar="FILE",
            default=None,
            help="Also write the report as Markdown to FILE.",
        ),
        click.option(
            "--debug",
            is_flag=True,
            expose_value=False,
            help="Print the Python traceback before the error line.",
        ),
    ]

    def wrapper(
        model: str,
        shapes: tuple,
        dtype: str | None,
        arch: str | None,
        trust_pickle: bool,
        **kwargs: Any,
    ) -> Any:
        request = ModelRequest(model, arch, trust_pickle, tuple(shapes), dtype)
        return json_stdout(command)(request=request, **kwargs)

    wrapper.__name__ = command.__name__
    wrapper.__doc__ = command.__doc__
    for decorator in reversed(decorators):
        wrapper = decorator(wrapper)
    return wrapper


# ------------------------------------------------------------------ loading


def load(request: ModelRequest) -> LoadedModel:
    """Load MODEL as requested (a spinner on a terminal)."""
    from bnfold.io.models import load_model

    with status(f"Loading {request.spec}"):
        return load_model(request.spec, arch=request.arch, trust_pickle=request.trust_pickle)


def prepare(
    request: ModelRequest,
    inputs_from_data: Callable[[Any], tuple[Any, ...]] | None = None,
    loaded: LoadedModel | None = None,
) -> Prepared:
    """Load MODEL (unless ``loaded`` is given) and build its example inputs
    (``count_bn_kernels`` checks them): from ``--input-shape``, else the program's own example
    inputs, else ``inputs_from_data(model)`` (the first batch of ``--data``) when given."""
    from bnfold.errors import UsageError
    from bnfold.io.inputs import make_example_inputs, model_dtype, parse_dtype

    if loaded is None:
        loaded = load(request)
    if request.shapes:
        default = parse_dtype(request.dtype) if request.dtype else model_dtype(loaded.model)
        specs = [(spec.shape, spec.dtype) for spec in request.shapes]
        with stage("building the --input-shape example inputs"):
            inputs = make_example_inputs(specs, default_dtype=default)
        source = "--input-shape"
    elif loaded.example_inputs is not None:
        inputs = loaded.example_inputs
        if request.dtype:
            inputs = tuple(t.to(parse_dtype(request.dtype)) for t in inputs)
        source = "the program's example inputs"
    elif inputs_from_data is not None:
        with stage("reading the first batch of --data"):
            inputs = inputs_from_data(loaded.model)
        source = "the first batch of --data"
    else:
        raise UsageError(
            f"{request.spec} carries no example inputs: pass --input-shape, e.g. "
            "--input-shape 1x3x224x224 (repeat it for each positional input), or --data"
        )
    return Prepared(loaded, inputs, source)


def count_bn_kernels(model: Any, inputs: tuple[Any, ...]) -> int:
    """``bnfold.count_bn_kernels``, the first forward a command runs: when the model rejects
    the inputs, rerun it with layer hooks so the error names the layer (``ModelInputError``)."""
    import bnfold
    from bnfold.io.inputs import check_inputs

    try:
        return bnfold.count_bn_kernels(model, inputs)
    except bnfold.BnfoldError:
        raise
    except Exception:
        check_inputs(model, inputs)
        raise


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """One stage of a command (see ``stage``), with a spinner on stderr showing ``message``
    while it runs, only when stderr is a terminal."""
    with stage(message[:1].lower() + message[1:]):
        if not sys.stderr.isatty():
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(message):
            yield


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Name a stage of a command for its error message: an exception that is not a
    ``BnfoldError`` (a bug, torch out of memory, an exception or ``sys.exit`` in the user's
    code) leaves as ``UnexpectedError("<name> failed: <type>: <message>")``, the original as
    its cause. ``KeyboardInterrupt`` passes through untouched."""
    try:
        yield
    except (Exception, SystemExit) as exc:
        from bnfold_cli.main import describe_unexpected

        from bnfold.errors import BnfoldError, UnexpectedError

        if isinstance(exc, BnfoldError):
            raise
        raise UnexpectedError(describe_unexpected(exc, during=name)) from exc


def versions() -> dict[str, str]:
    import platform

    import torch

    import bnfold

    return {
        "bnfold": bnfold.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@contextlib.contextmanager
def written_before_failure(outputs: list[Any]) -> Iterator[None]:
    """When the block fails after files were written (``outputs``: ``SavedModel`` records,
    appended as they are written), the error says which: a ``BnfoldError`` leaves as the same
    class with the complete files named, the original as its cause."""
    try:
        yield
    except Exception as exc:
        from bnfold.errors import BnfoldError

        if not outputs or not isinstance(exc, BnfoldError):
            raise
        paths = ", ".join(str(getattr(output, "path", output)) for output in outputs)
        raise type(exc)(f"{exc} (already written, complete: {paths})") from exc


# ------------------------------------------------------------------ stdout for --json -

# (saved fd 1, saved sys.stdout) of each active ``stdout_to_stderr``, innermost last.
_REAL_STDOUT: list[tuple[int, Any]] = []


def json_stdout(command: Callable) -> Callable:
    """Decorate a command taking ``json_path``: with ``--json -`` the command runs under
    ``stdout_to_stderr``, so stdout carries the JSON (written with ``echo_stdout``) alone."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stdout_to_stderr(active=kwargs.get("json_path") == "-"):
            return command(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """While the block runs, file descriptor 1 and ``sys.stdout`` point at stderr, so whatever
    the user's factory, the model's forward, torch or a C extension prints goes to stderr.
    Both are restored when the block ends, however it ends; ``echo_stdout`` writes to the real
    stdout meanwhile. A no-op when not ``active`` or when fd 1 is closed."""
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
    _REAL_STDOUT.append((saved, stream))
    try:
        yield
    finally:
        _REAL_STDOUT.pop()
        _flush_all()
        os.dup2(saved, 1)
        os.close(saved)
        sys.stdout = stream


def echo_stdout(text: str) -> None:
    """Write ``text`` to the real stdout, also while ``stdout_to_stderr`` is active."""
    if not _REAL_STDOUT:
        click.echo(text, nl=False)
        return
    saved, stream = _REAL_STDOUT[-1]
    _flush_all()
    current = os.dup(1)
    os.dup2(saved, 1)
    redirected, sys.stdout = sys.stdout, stream
    try:
        click.echo(text, nl=False)
        stream.flush()
    finally:
        sys.stdout = redirected
        os.dup2(current, 1)
        os.close(current)


def _flush_all() -> None:
    """Flush Python's streams and C stdio, so buffered bytes go where fd 1 points now."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


# ------------------------------------------------------------------ output


def emit(
    report: Report, *, json_path: str | None, markdown_path: str | None, force: bool = False
) -> None:
    """Print the human report (unless the JSON goes to stdout) and write the report files
    (an existing file only with ``force``; ``plan_paths`` checked them before any work)."""
    from bnfold.io.models import write_text_atomic
    from bnfold.report import render_json, render_markdown, render_text

    if json_path == "-":
        echo_stdout(render_json(report))
    else:
        tty = sys.stdout.isatty()
        click.echo(render_text(report, width=text_width(tty), color=tty), nl=False)
    if json_path and json_path != "-":
        write_text_atomic(json_path, render_json(report), overwrite=force)
        _note(f"JSON report: {json_path}")
    if markdown_path:
        write_text_atomic(markdown_path, render_markdown(report), overwrite=force)
        _note(f"Markdown report: {markdown_path}")


def text_width(tty: bool) -> int | None:
    """The width the text report fits: the terminal's (``COLUMNS`` first); when stdout is not
    a terminal, ``COLUMNS`` if set, else None (no limit: full names, nothing wrapped)."""
    columns = os.environ.get("COLUMNS", "")
    if not tty:
        return int(columns) if columns.isdigit() and int(columns) > 0 else None
    return shutil.get_terminal_size((100, 24)).columns


def plan_paths(
    inputs: dict[str, Any],
    outputs: dict[str, Any],
    *,
    force: bool,
    named_only: Collection[str] = (),
) -> PathPlan:
    """Check every path a command reads (``inputs``: option -> MODEL/DATA spec or file) and
    writes (``outputs``: option -> path; None when not given; '-' after --json is stdout)
    before any work: ``bnfold.io.paths.plan_paths``. Outputs whose option is in ``named_only`` are
    not written (a dry run's model): they may exist."""
    from bnfold.io.paths import NamedPath, spec_path
    from bnfold.io.paths import plan_paths as check

    sources = [
        NamedPath(role, path)
        for role, spec in inputs.items()
        if (path := spec_path(spec)) is not None
    ]
    targets = [
        NamedPath(role, Path(path), written=role not in named_only)
        for role, path in outputs.items()
        if path is not None and not (role == "--json" and str(path) == "-")
    ]
    return check(sources, targets, overwrite=force)


def _note(message: str) -> None:
    click.echo(message, err=True)
