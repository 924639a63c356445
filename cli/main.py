"""Entry point of the ``bnfold`` command: the command group and the one place exit codes are
chosen (``bnfold_cli.options.EXIT_CODES`` documents them). While a command runs, SIGTERM and
SIGHUP raise an exception where the program is, like SIGINT, so the same cleanup runs. Nothing
here imports torch: ``bnfold --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator

import click
from bnfold_cli.console import STOP_CHECK, describe_unexpected
from bnfold_cli.options import DEBUG, EXIT_CODES

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_SIGNAL_BASE = 128  # stopped by signal N: 128 + N, as a shell reports it


_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program was: a KeyboardInterrupt, so every cleanup
    an interrupt runs (temporary files removed, model flags restored) runs for it too."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="bnfold")
@DEBUG
def cli() -> None:
    """Fold BatchNorms into Conv/Linear weights, recalibrate their statistics, export to ONNX
    and verify the result.

    \b
    Examples:
      bnfold inspect model.pt2
      bnfold inspect mypkg.models:resnet --input-shape 1x3x224x224
      bnfold fold model.pt2                  # writes model.folded.pt2
      bnfold fold weights.pt --arch mypkg.models:resnet --input-shape 1x3x224x224

    Run 'bnfold COMMAND --help' for what MODEL can be and each command's options.
    """


def register_commands() -> None:
    from bnfold_cli.commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and exits with) the exit code.

    Exit code 1 comes only from ``VerificationFailed``. Any other exception, expected or not,
    ends in one ``error:`` line on stderr and exit 3 (2 for usage errors); ``--debug`` prints
    the traceback first. ``sys.exit`` called by code bnfold runs (a model factory, a data
    callable, a forward) is an error too, never the command's own exit code.
    """
    register_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    received: list[int] = []  # the stop signal, once one came
    try:
        with warnings.catch_warnings(), _stop_signals_raise(received):
            if not debug:  # torch's own deprecation chatter is not the user's business
                warnings.filterwarnings("ignore", category=FutureWarning)
                warnings.filterwarnings("ignore", category=DeprecationWarning)
            result = cli.main(args=argv, prog_name="bnfold", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        code = _aborted(received[0] if received else _signal_of(exc), _written(exc))
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USAGE if exc.exit_code == EXIT_USAGE else EXIT_FAILED
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except (Exception, SystemExit) as exc:  # click never raises SystemExit here: user code did
        # a stop whose exception code on the way turned into another error: the stop wins
        code = _aborted(received[0]) if received else _report_error(exc, debug)
    else:
        code = result if isinstance(result, int) else EXIT_OK
    if received and argv is None:  # the program is ending: a second Ctrl-C cannot cut it short
        for number in filter(None, (getattr(signal, name, None) for name in _STOP_SIGNALS)):
            signal.signal(number, signal.SIG_IGN)
    sys.exit(code)


def _aborted(signum: int, written: str | None = None) -> int:
    done = f" ({written})" if written else ""
    click.echo(
        f"Aborted ({signal.Signals(signum).name}); no temporary or partial file was left{done}.",
        err=True,
    )
    return EXIT_SIGNAL_BASE + signum


def _written(exc: BaseException) -> str | None:
    """The interrupt's note naming the files already written, if any (click wraps it)."""
    for cause in (exc, exc.__cause__, exc.__context__):
        for note in getattr(cause, "__notes__", ()):
            if note.startswith("already written"):
                return note
    return None


@contextlib.contextmanager
def _stop_signals_raise(received: list[int]) -> Iterator[None]:
    """While the command runs: SIGINT raises KeyboardInterrupt, SIGTERM and SIGHUP raise
    ``Stopped``; a second stop signal is ignored so it cannot cut the cleanup short. Code on the
    way that catches and drops that exception (torch's ONNX exporter may) does not win: it is
    raised again before any output is put in place and when a stage ends (``STOP_CHECK``). Only
    signals left at their default are taken (one ignored under nohup stays ignored, a handler
    of an embedding program stays), only in the main thread; the previous handlers are
    restored on exit. The signal that came is appended to ``received``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int) -> BaseException:
        return KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)

    def stop(signum: int, frame: object) -> None:
        if received:
            return
        received.append(signum)
        raise interrupt(signum)

    def check() -> None:  # the exception was caught and dropped on the way (torch's exporter)
        if received:
            raise interrupt(received[0])

    previous = {}
    for name in _STOP_SIGNALS:
        number = getattr(signal, name, None)
        default = signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL
        if number is not None and signal.getsignal(number) is default:
            previous[number] = signal.signal(number, stop)
    token = STOP_CHECK.set(check)
    try:
        yield
    finally:
        STOP_CHECK.reset(token)
        for number, handler in previous.items():
            signal.signal(number, handler)


def _signal_of(exc: BaseException) -> int:
    """The signal that stopped the run (click wraps a KeyboardInterrupt in Abort)."""
    for cause in (exc, exc.__cause__, exc.__context__):
        if isinstance(cause, Stopped):
            return cause.signum
    return signal.SIGINT


def _report_error(exc: BaseException, debug: bool) -> int:
    """Print the traceback (with ``--debug``) and one ``error:`` line; return the exit code."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    errors = sys.modules.get("bnfold.errors")
    if errors is not None and isinstance(exc, errors.BnfoldError):
        message = errors.first_line(exc, with_type=False, lines=sys.maxsize)
        click.echo(f"error: {message}", err=True)
        if isinstance(exc, errors.VerificationFailed):
            return EXIT_VERIFY_FAILED
        return EXIT_USAGE if isinstance(exc, errors.UsageError) else EXIT_FAILED
    click.echo(f"error: {describe_unexpected(exc)}", err=True)
    return EXIT_FAILED


if __name__ == "__main__":
    main()
