"""Entry point of the ``bnfold`` command: the command group and the one place exit codes are chosen.

Exit codes: 0 success, 1 verification failed, 2 usage error, 3 bnfold could not do the job.
Nothing here imports torch: ``bnfold --help`` must stay fast.
"""

from __future__ import annotations

import sys
import traceback
import warnings

import click

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3

EPILOG = """\b
Exit codes:
  0  success
  1  verification failed (outputs differ beyond tolerance), and nothing else
  2  usage error (bad option, missing input shape)
  3  anything else: unloadable model, failed export, out of memory, an
     unexpected error, sys.exit called by your factory or forward, ...
Every failure but a bad option prints one 'error:' line; --debug prints the
traceback first.
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(package_name="bnfold")
@click.option("--debug", is_flag=True, help="Print the Python traceback before the error line.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
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
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register_commands() -> None:
    from bnfold_cli.commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


def exit_code_for(exc: BaseException) -> int:
    """Map a library error to the documented exit code."""
    from bnfold.errors import UsageError, VerificationFailed

    if isinstance(exc, VerificationFailed):
        return EXIT_VERIFY_FAILED
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and exits with) the exit code.

    Exit code 1 comes only from ``VerificationFailed``. Any other exception, expected or not,
    ends in one ``error:`` line on stderr and exit 3 (2 for usage errors); ``--debug`` prints
    the traceback first. ``sys.exit`` called by code bnfold runs (a model factory, a data
    callable, a forward) is an error too, never the command's own exit code.
    """
    _register_commands()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        with warnings.catch_warnings():
            if not debug:  # torch's own deprecation chatter is not the user's business
                warnings.filterwarnings("ignore", category=FutureWarning)
                warnings.filterwarnings("ignore", category=DeprecationWarning)
            result = cli.main(args=argv, prog_name="bnfold", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("Aborted; no partial output was left.", err=True)
        code = EXIT_FAILED
    except click.ClickException as exc:
        exc.show()
        code = EXIT_USAGE if exc.exit_code == EXIT_USAGE else EXIT_FAILED
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except (Exception, SystemExit) as exc:  # click never raises SystemExit here: user code did
        code = _report_error(exc, debug)
    else:
        code = result if isinstance(result, int) else EXIT_OK
    sys.exit(code)


def _report_error(exc: BaseException, debug: bool) -> int:
    """Print the traceback (with ``--debug``) and one ``error:`` line; return the exit code."""
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    if _is_bnfold_error(exc):
        click.echo(f"error: {_one_line(str(exc))}", err=True)
        return exit_code_for(exc)
    click.echo(f"error: {describe_unexpected(exc)}", err=True)
    return EXIT_FAILED


def describe_unexpected(exc: BaseException, during: str | None = None) -> str:
    """One line for an exception bnfold did not anticipate: what failed, and how to learn more."""
    if isinstance(exc, SystemExit):
        what = f"the code bnfold ran called sys.exit({exc.code!r})"
    else:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        if isinstance(exc, MemoryError) or "allocate memory" in first:
            what += " (out of memory: try a smaller --input-shape or --batch-size)"
    where = f"{during} failed: " if during else "unexpected failure: "
    hint = "" if isinstance(exc, SystemExit) else "; rerun with --debug for the traceback"
    return f"{where}{what}{hint}"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _is_bnfold_error(exc: BaseException) -> bool:
    module = sys.modules.get("bnfold.errors")
    return module is not None and isinstance(exc, module.BnfoldError)


if __name__ == "__main__":
    main()
