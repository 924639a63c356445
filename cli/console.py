"""How a command's run shows on the terminal: a spinner per stage, the recalibration progress
bar, the rendered report and the report files; with ``--json -``, stdout kept for the JSON.

``run_job`` runs a ``bnfold.jobs.Job`` through ``bnfold.pipeline`` with these ``hooks`` and then
``emit``s its report. bnfold and torch are imported only when a command runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import click


def run_job(job: Any, quiet: bool = False) -> None:
    """Run ``job`` (with ``--json -``, whatever it prints goes to stderr), then ``emit`` its
    report and ``job.reports``; a failed verification raises ``VerificationFailed`` (exit 1)
    after the report."""
    from bnfold import require_passed
    from bnfold.pipeline import run

    files = dict(job.reports)
    piped = stdout_report(files) is not None
    with stdout_to_stderr(piped):
        report = run(job, hooks(quiet=quiet or piped))
    emit(report, files, quiet=quiet, force=job.force)
    if report.verification is not None:
        require_passed(report.verification)


def stdout_report(files: dict[str, str | None]) -> str | None:
    """The report option given ``-`` (stdout), if any: ``--json`` or ``--markdown``; both at
    once is a usage error."""
    piped = [option for option in ("--json", "--markdown") if files.get(option) == "-"]
    if len(piped) > 1:
        raise click.UsageError("--json - and --markdown - both write to stdout; give one a file")
    return piped[0] if piped else None


def hooks(quiet: bool = False) -> Any:
    """The pipeline's hooks for a terminal: each stage named in unexpected errors, with a
    spinner on stderr when it is a terminal; a progress bar while recalibrating (not when
    ``quiet``, and only on rank 0)."""
    from bnfold.jobs import Hooks

    return Hooks(stage=stage, recalibrating=functools.partial(_progress_bar, quiet=quiet))


#: The running command's check for a stop signal whose exception was caught and dropped on
#: the way (``bnfold_cli.main``): it raises that exception again. ``stage`` hands it to
#: ``bnfold.io.paths.stop_check``: main cannot import bnfold itself (``--help`` skips torch).
STOP_CHECK: ContextVar[Callable[[], None] | None] = ContextVar("bnfold_cli_stop", default=None)


@contextlib.contextmanager
def stage(message: str, spinner: bool = True) -> Iterator[None]:
    """One stage of a command, with a spinner showing ``message`` on stderr when it is a
    terminal. An exception that is not a ``BnfoldError`` (a bug, torch out of memory, an
    exception or ``sys.exit`` in the user's code) leaves as ``UnexpectedError("<stage> failed:
    <type>: <message>")``, the original as its cause; ``KeyboardInterrupt`` passes untouched.
    A stop signal the stage's code dropped (``STOP_CHECK``) stops the run before the stage puts
    an output in place, or when it ends."""
    from bnfold.io.paths import stop_check

    check = STOP_CHECK.get() or (lambda: None)
    try:
        with stop_check(check):
            if spinner and sys.stderr.isatty():
                from rich.console import Console

                with Console(stderr=True).status(message):
                    yield
            else:
                yield
        check()
    except (Exception, SystemExit) as exc:
        from bnfold.errors import BnfoldError, UnexpectedError

        if isinstance(exc, BnfoldError):
            raise
        name = message[:1].lower() + message[1:]
        raise UnexpectedError(describe_unexpected(exc, during=name)) from exc


def describe_unexpected(exc: BaseException, during: str | None = None) -> str:
    """One line for an exception bnfold did not anticipate: what failed, and how to learn more."""
    from bnfold.errors import first_line

    if isinstance(exc, SystemExit):
        what = f"the code bnfold ran called sys.exit({exc.code!r})"
    else:
        what = first_line(exc)
        if isinstance(exc, MemoryError) or "allocate memory" in what:
            what += " (out of memory: try a smaller --input-shape or --batch-size)"
    where = f"{during} failed: " if during else "unexpected failure: "
    hint = "" if isinstance(exc, SystemExit) else "; rerun with --debug for the traceback"
    return f"{where}{what}{hint}"


@contextlib.contextmanager
def _progress_bar(total: int | None, quiet: bool) -> Iterator[Any]:
    """The recalibration stage, with a tqdm bar (samples/s, ETA) on stderr when it is a
    terminal, unless ``quiet``, and only on rank 0."""
    from bnfold.pipeline import rank

    with stage("Recalibrating", spinner=False):
        if quiet or not sys.stderr.isatty() or rank() != 0:
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
    report: Any, files: dict[str, str | None], *, quiet: bool = False, force: bool = False
) -> None:
    """Print the text report (unless ``quiet`` or the JSON goes to stdout) and write the report
    ``files`` (path by option: ``--json``, ``--markdown``, ``--plot``; checked before any work;
    replacing one only with ``force``), on rank 0 only. A failure names the files the run
    already wrote."""
    from bnfold.io.models import write_text_atomic
    from bnfold.outputs import written_before_failure
    from bnfold.pipeline import rank
    from bnfold.report import render_json, render_markdown, render_text

    if rank() != 0:
        return
    renderers = {"--json": ("JSON", render_json), "--markdown": ("Markdown", render_markdown)}
    with written_before_failure(report.written), stage("Writing the report", spinner=False):
        piped = stdout_report(files)
        if piped is not None:
            click.echo(renderers[piped][1](report), nl=False)
        elif not quiet:
            tty = sys.stdout.isatty()
            click.echo(render_text(report, width=text_width(tty), color=tty), nl=False)
        for option, (kind, render) in renderers.items():
            path = files.get(option)
            if path and path != "-":
                write_text_atomic(path, render(report), overwrite=force)
                _note(quiet, f"{kind} report: {path}")
        if files.get("--plot"):
            from bnfold.calibrate.plot import plot_shifts

            plot_shifts(report.calibration, files["--plot"], overwrite=force)
            _note(quiet, f"plot: {files['--plot']}")


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
