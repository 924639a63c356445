"""The options the commands share, their help texts and their parsing.

The options are gathered into ``bnfold.jobs`` requests only when a command runs, so
``bnfold --help`` imports neither bnfold nor torch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
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


EXIT_CODES = """\b
Exit codes:
  0    success
  1    verification failed (outputs differ beyond tolerance, or a candidate
       cannot run an input the original runs), and nothing else
  2    usage error (bad option, missing input shape, an output that
       exists without --force or would replace an input)
  3    anything else: unloadable model, failed export, out of memory, an
       unexpected error, sys.exit called by your factory or forward, ...
  130  interrupted (Ctrl-C, SIGINT); 143 SIGTERM; 129 SIGHUP. No
       temporary or partial file is left; the file being written is
       not put in place (an existing file of its name is unchanged);
       the Aborted line names the files already written
Every failure but a bad option or a stop prints one 'error:' line; --debug
prints the traceback first.
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


def _request(kind: str) -> Callable[..., Any]:
    """A builder of the ``bnfold.jobs`` request class ``kind``, imported when it is called."""

    def build(**values: Any) -> Any:
        from bnfold import jobs

        return getattr(jobs, kind)(**values)

    return build


def _data_request(data_spec: str | None, mean: Any, std: Any, **values: Any) -> Any:
    from bnfold.jobs import DataRequest

    normalisation = {"mean": mean, "std": std}  # None: the default (ImageNet's)
    defaults = {k: v for k, v in normalisation.items() if v}
    return None if data_spec is None else DataRequest(data_spec, **values, **defaults)


ARCH = click.option(
    "--arch",
    metavar="PKG.MODULE:FACTORY",
    default=None,
    help="Factory building the architecture for a state-dict MODEL.",
)


def flag(*names: str, help: str) -> Callable:
    """An on/off option (off by default)."""
    return click.option(*names, is_flag=True, help=help)


NO_MERGE_BRANCHES = flag(
    "--no-merge-branches",
    help="Keep parallel branches summed on one input (RepVGG/MobileOne/ACNet-style blocks) "
    "as they are instead of merging each block into one conv; Conv+BN branches still fold.",
)
TRUST_PICKLE = flag(
    "--trust-pickle",
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
FORCE = flag("--force", help="Replace existing output files, reports included (never an input).")
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


def model_request(*decorators: Callable) -> Callable:
    """MODEL (``spec``) and the options on how to load it, as ``request: ModelRequest``."""
    return request_options("request", _request("ModelRequest"), *decorators)


def model_options(command: Callable) -> Callable:
    """MODEL and how to load it and build its example inputs, as ``request: ModelRequest``;
    ``--json``/``--markdown`` report files; ``--debug``."""
    return options(
        model_request(click.argument("spec", metavar="MODEL"), SHAPES, DTYPE, ARCH, TRUST_PICKLE),
        json_option("replaces the table"),
        click.option(
            "--markdown",
            "markdown_path",
            metavar="FILE",
            default=None,
            help="Also write the report as Markdown to FILE ('-' for stdout, instead of the text).",
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
    _request("VerifyRequest"),
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
