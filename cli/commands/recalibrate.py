"""``bnfold recalibrate``: exact BatchNorm running statistics from sample data, saved as a model.

Also the data plumbing other commands share: ``data_options`` (``--data`` and its batching and
image options), ``open_data`` (DATA → ``bnfold.DataSource`` in the model's dtype, this rank's
part under ``torchrun``) and ``recalibrate_with_progress`` (``bnfold.recalibrate`` with a
progress bar on a terminal). ``bnfold fold --data`` calls these three.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from bnfold_cli.main import EPILOG as EXIT_CODES
from bnfold_cli.options import (
    MODEL_HELP,
    echo_stdout,
    json_stdout,
    plan_paths,
    stage,
    status,
    versions,
    written_before_failure,
)

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
Several processes (torchrun): a DATA file or folder is split by batch: rank r of
W feeds batches r, r+W, r+2W... of the batches one process makes (same
--batch-size and --seed; --batches N caps each rank), so the ranks feed every
batch once and get one process's statistics. A pkg.module:fn DATA is this
rank's part, fed whole, never split: read the rank in it, or return a
DataLoader with a DistributedSampler (samples it repeats or drops are noted).
Two ranks with identical first batches of data bnfold did not split are
refused. Statistics are all-reduced in float64, so every rank holds the same;
the report gives each rank's batches and samples. Only rank 0 writes files and
prints; a rank that fails stops every rank.
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


# ---------------------------------------------------------------------------------- data options


@dataclass(frozen=True)
class DataRequest:
    """What ``--data`` and its options asked for."""

    spec: str
    batches: int | None
    batch_size: int
    seed: int
    image_size: int
    resize: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _floats(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return tuple(float(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of numbers") from None


def data_options(required: bool) -> Callable[[Callable], Callable]:
    """Add ``--data`` and its options; the command receives ``data_request: DataRequest | None``
    (None when ``--data`` was not given)."""
    decorators = [
        click.option(
            "--data",
            "data_spec",
            metavar="DATA",
            required=required,
            help="Sample data to recalibrate BatchNorm statistics on (see DATA below).",
        ),
        click.option(
            "--batches",
            type=click.IntRange(min=1),
            default=None,
            help="Use at most N batches (per process under torchrun). Default: all.",
        ),
        click.option(
            "--batch-size",
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="Samples per batch (tensor, array and image DATA).",
        ),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Seed of the sample shuffle."
        ),
        click.option(
            "--image-size",
            type=click.IntRange(min=1),
            default=224,
            show_default=True,
            help="Center-crop side for an image folder.",
        ),
        click.option(
            "--resize",
            type=click.IntRange(min=1),
            default=None,
            help="Shorter side before the crop (default: image size / 0.875).",
        ),
        click.option(
            "--mean",
            callback=_floats,
            default=None,
            metavar="R,G,B",
            help="Normalisation mean for images (default 0.485,0.456,0.406).",
        ),
        click.option(
            "--std",
            callback=_floats,
            default=None,
            metavar="R,G,B",
            help="Normalisation std for images (default 0.229,0.224,0.225).",
        ),
    ]

    def decorate(command: Callable) -> Callable:
        def wrapper(
            data_spec: str | None,
            batches: int | None,
            batch_size: int,
            seed: int,
            image_size: int,
            resize: int | None,
            mean: tuple | None,
            std: tuple | None,
            **kwargs: Any,
        ) -> Any:
            from bnfold.calibrate.data import IMAGENET_MEAN, IMAGENET_STD

            request = (
                None
                if data_spec is None
                else DataRequest(
                    data_spec,
                    batches,
                    batch_size,
                    seed,
                    image_size,
                    resize,
                    mean or IMAGENET_MEAN,
                    std or IMAGENET_STD,
                )
            )
            return command(data_request=request, **kwargs)

        wrapper.__name__ = command.__name__
        wrapper.__doc__ = command.__doc__
        # keep the options declared below this decorator
        wrapper.__click_params__ = list(getattr(command, "__click_params__", []))
        for decorator in reversed(decorators):
            wrapper = decorator(wrapper)
        return wrapper

    return decorate


def open_data(request: DataRequest, model: Any) -> Any:
    """``bnfold.load_data`` for ``request``: floating tensors cast to the model's dtype; under
    ``torch.distributed``, this process's part (a file split by batch, a callable as given)."""
    import torch

    from bnfold.calibrate.data import load_data
    from bnfold.io.inputs import model_dtype

    shard = None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shard = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    return load_data(
        request.spec,
        batch_size=request.batch_size,
        seed=request.seed,
        dtype=model_dtype(model),
        image_size=request.image_size,
        resize=request.resize,
        mean=request.mean,
        std=request.std,
        shard=shard,
    )


def recalibrate_with_progress(
    model: Any, data: Any, request: DataRequest, *, quiet: bool = False
) -> Any:
    """``bnfold.recalibrate(model, data)`` (in place), with a progress bar (samples/s, ETA) on
    stderr when it is a terminal, unless ``quiet``, and only on rank 0."""
    import bnfold

    show = not quiet and sys.stderr.isatty() and _rank() == 0
    if not show:
        return bnfold.recalibrate(model, data, batches=request.batches)
    from tqdm import tqdm

    total = data.num_samples(request.batches)
    with tqdm(
        total=total,
        unit="sample",
        desc="Recalibrating",
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
    ) as bar:
        return bnfold.recalibrate(
            model, data, batches=request.batches, progress=lambda index, items: bar.update(items)
        )


# ------------------------------------------------------------------------------------ command


@click.command("recalibrate", epilog=EPILOG)
@click.argument("model_spec", metavar="MODEL")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the recalibrated model (.pt2, .pt/.pth, .safetensors).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace existing output files, reports included (never an input).",
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
    help="Allow a full pickled module. Loading it RUNS CODE FROM THE FILE.",
)
@click.option(
    "--device",
    default=None,
    help="Run on this device (e.g. cuda; under torchrun cuda means cuda:LOCAL_RANK).",
)
@click.option(
    "--json",
    "json_path",
    metavar="FILE",
    default=None,
    help="Also write the report as JSON to FILE ('-' for stdout; anything else "
    "printed meanwhile goes to stderr).",
)
@click.option(
    "--plot",
    "plot_path",
    metavar="FILE.png",
    default=None,
    help="Also draw the per-layer shift of mean and variance (needs matplotlib).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no report table.")
@click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    help="Print the Python traceback before the error line.",
)
@data_options(required=True)
@json_stdout
def recalibrate(
    model_spec: str,
    data_request: DataRequest,
    output: Path | None,
    force: bool,
    arch: str | None,
    trust_pickle: bool,
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
    planned = _plan(
        model_spec,
        data_request,
        output or _default_before_loading(model_spec, arch, trust_pickle),
        json_path,
        plot_path,
        force=force,
    )
    with _distributed() as rank:
        from bnfold.io.models import load_model

        with status(f"Loading {model_spec}"):
            loaded = load_model(model_spec, arch=arch, trust_pickle=trust_pickle)
        target = output or default_output_path(loaded)
        if target != planned:  # the default name needed the model's format
            _plan(model_spec, data_request, target, json_path, plot_path, force=force)
        model = loaded.model
        if device is not None:
            model = model.to(_device(device))
        with stage("reading --data"):
            data = open_data(data_request, model)
        with stage("recalibrating"):
            report = recalibrate_with_progress(model, data, data_request, quiet=quiet)
        if rank != 0:
            return
        saved = _save(model, target, loaded, data, force=force)
        with written_before_failure([saved]), stage("writing the report"):
            document = _document(loaded, data, data_request, report, saved)
            _emit(
                report,
                document,
                saved,
                json_path=json_path,
                plot_path=plot_path,
                quiet=quiet,
                force=force,
            )


# --------------------------------------------------------------------------------- processes


def _rank() -> int:
    import torch

    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _distributed() -> Iterator[int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment), if not
    joined yet; yield this process's rank; leave the group at the end if it was joined here."""
    import torch

    dist = torch.distributed
    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if not dist.is_available():
            from bnfold.errors import UsageError

            raise UsageError("WORLD_SIZE > 1 but this torch has no torch.distributed")
        dist.init_process_group()
        joined = True
    try:
        yield _rank()
    finally:
        if joined:
            dist.destroy_process_group()


def _device(name: str) -> Any:
    import torch

    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# ------------------------------------------------------------------------------------ outputs


def _plan(
    model_spec: str,
    data_request: DataRequest,
    output: Path | None,
    json_path: str | None,
    plot_path: str | None,
    *,
    force: bool,
) -> Path | None:
    """Check every input and output path before any work (``output``: the model output, when
    known); returns ``output``."""
    if output is not None:
        _output_kind(output, pickled_input=True)
    plan_paths(
        {"MODEL": model_spec, "--data": data_request.spec},
        {"-o": output, "--json": json_path, "--plot": plot_path},
        force=force,
    )
    return output


def _default_before_loading(model_spec: str, arch: str | None, trust_pickle: bool) -> Any:
    """The default output when the arguments tell MODEL's format, else None."""
    from bnfold.io.models import expected_source

    guess = expected_source(model_spec, arch=arch, trust_pickle=trust_pickle)
    return default_output_path(guess) if guess is not None else None


def default_output_path(loaded: Any) -> Path:
    """``<name>.recalibrated.<ext>`` beside MODEL (in the current directory for a factory):
    ``.pt2`` for a program or a factory, MODEL's own extension for a state dict or a pickle.
    ``loaded`` is a ``LoadedModel`` or a ``ModelSource``."""
    from bnfold.io.models import ModelFormat

    if loaded.path is None:
        name = loaded.source.rpartition(":")[2].rpartition(".")[2]
        return Path.cwd() / f"{name}.recalibrated.pt2"
    source = loaded.path
    ext = ".pt2" if loaded.format is ModelFormat.EXPORTED_PROGRAM else source.suffix or ".pt"
    stem = source.name[: -len(source.suffix)] if source.suffix else source.name
    return source.with_name(f"{stem}.recalibrated{ext}")


def _output_kind(path: Path, *, pickled_input: bool) -> Any:
    from bnfold.errors import UsageError
    from bnfold.io.models import ModelFormat

    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return ModelFormat.EXPORTED_PROGRAM
    if suffix == ".safetensors":
        return ModelFormat.SAFETENSORS
    if suffix in (".pt", ".pth"):
        return ModelFormat.PICKLED_MODULE if pickled_input else ModelFormat.STATE_DICT
    raise UsageError(
        f"{path}: cannot tell the output format from '{suffix or 'no extension'}'; use .pt2, "
        ".pt/.pth or .safetensors"
    )


def _save(model: Any, path: Path, loaded: Any, data: Any, *, force: bool) -> Any:
    from bnfold.io.models import ModelFormat, SavedModel, atomic_write, save_model

    fmt = _output_kind(path, pickled_input=loaded.format is ModelFormat.PICKLED_MODULE)
    with status(f"Writing {path}"):
        if fmt in (ModelFormat.EXPORTED_PROGRAM, ModelFormat.PICKLED_MODULE):
            inputs = loaded.example_inputs or data.example_inputs()
            dims = loaded.dynamic_dims if loaded.example_inputs else None
            return save_model(
                model.eval(),
                path,
                example_inputs=inputs,
                format=fmt,
                overwrite=force,
                dynamic_dims=dims,
            )
        state = {
            key: value.detach().cpu().contiguous().clone()
            for key, value in model.state_dict().items()
        }
        atomic_write(path, lambda tmp: _write_state(state, tmp, fmt), overwrite=force)
    return SavedModel(
        path=str(path),
        format=fmt,
        bytes=path.stat().st_size,
        notes=("state dict: load it into MODEL's architecture, strictly",),
    )


def _write_state(state: dict, tmp: str, fmt: Any) -> None:
    from bnfold.io.models import ModelFormat

    if fmt is ModelFormat.SAFETENSORS:
        from safetensors.torch import save_file

        save_file(state, tmp)
    else:
        import torch

        torch.save(state, tmp)


def _document(loaded: Any, data: Any, request: DataRequest, report: Any, saved: Any) -> dict:
    return {
        "command": "recalibrate",
        "versions": versions(),
        "model": loaded.to_dict(),
        "data": {
            "source": data.description,
            "batch_size": request.batch_size,
            "seed": request.seed,
            "batches_limit": request.batches,
            "split": data.split,
            "samples": data.total_samples(),
        },
        "recalibration": report.to_dict(),
        "outputs": [saved.to_dict()],
    }


def _emit(
    report: Any,
    document: dict,
    saved: Any,
    *,
    json_path: str | None,
    plot_path: str | None,
    quiet: bool,
    force: bool,
) -> None:
    import json

    from bnfold.io.models import write_text_atomic

    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if json_path == "-":
        echo_stdout(text)
    elif not quiet:
        click.echo(report.format_text())
        click.echo(f"wrote {saved.path}")
    if json_path and json_path != "-":
        write_text_atomic(json_path, text, overwrite=force)
        if not quiet:
            click.echo(f"JSON report: {json_path}", err=True)
    if plot_path:
        from bnfold.calibrate.plot import plot_shifts

        plot_shifts(report, plot_path, overwrite=force)
        if not quiet:
            click.echo(f"plot: {plot_path}", err=True)
