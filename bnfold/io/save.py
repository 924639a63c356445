"""``save_model`` and the paths it writes: output formats, default names, atomic writes."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from bnfold.errors import BnfoldError, SaveError, UsageError, first_line
from bnfold.io.factory import FACTORY_SPEC
from bnfold.io.formats import LoadedModel, ModelFormat, ModelSource, SavedModel
from bnfold.io.inputs import as_args
from bnfold.io.paths import NamedPath, plan_paths, publish, staging
from bnfold.io.program_export import export_program

#: The formats that hold only a state dict (``save_model`` writes the others).
STATE_DICT_FORMATS = (ModelFormat.STATE_DICT, ModelFormat.SAFETENSORS)


def output_format(
    path: str | os.PathLike[str], *, folded: bool = True, pickled_input: bool = True
) -> ModelFormat:
    """The format ``path``'s extension asks for: ``.pt2``; ``.pt``/``.pth`` a pickled module
    when the input was one, else a state dict; ``.safetensors`` a state dict. A ``folded`` model
    is never a bare state dict: it no longer fits the input's architecture (BatchNorms gone,
    biases added)."""
    suffix = Path(path).suffix
    module = ModelFormat.PICKLED_MODULE if pickled_input else ModelFormat.STATE_DICT
    formats = {
        ".pt2": ModelFormat.EXPORTED_PROGRAM,
        ".pt": module,
        ".pth": module,
        ".safetensors": ModelFormat.SAFETENSORS,
    }
    fmt = formats.get(suffix.lower())
    if fmt is not None and (not folded or fmt not in STATE_DICT_FORMATS):
        return fmt
    kinds = ".pt2 (or .pt/.pth when MODEL is a pickled module, loaded with --trust-pickle)"
    raise UsageError(
        f"{path}: '{suffix or 'no extension'}' is not an output format for the "
        f"{'folded' if folded else 'recalibrated'} model; use "
        + (kinds if folded else ".pt2, .pt/.pth or .safetensors")
    )


def expected_source(
    spec: str | os.PathLike[str], *, arch: str | None = None, trust_pickle: bool = False
) -> ModelSource | None:
    """What ``load_model(spec, arch=arch, trust_pickle=trust_pickle)`` returns when it succeeds,
    from the arguments alone (nothing is read): a factory; a state dict (``arch`` given); a
    torch.export program (a ``.pt2`` file, no ``arch``, no ``trust_pickle``: the only kind that
    then loads). None when only the file's content can tell (``trust_pickle`` without ``arch``:
    a program or a pickled module; another extension: the load's own error comes first) or
    ``spec`` names nothing loadable."""
    text = os.fspath(spec)
    path = Path(text)
    if not path.exists():
        return ModelSource(ModelFormat.FACTORY, text) if FACTORY_SPEC.match(text) else None
    if arch is not None:
        return ModelSource(ModelFormat.STATE_DICT, text)
    if trust_pickle or path.suffix.lower() != ".pt2":
        return None
    return ModelSource(ModelFormat.EXPORTED_PROGRAM, text)


def default_output_path(
    loaded: LoadedModel | ModelSource, *, cwd: Path | None = None, folded: bool = True
) -> Path:
    """``<name>.folded.<ext>`` (``.recalibrated`` when not ``folded``) beside the input file
    (in ``cwd`` for a factory).

    The extension is ``.pt2``, but a pickled module stays one and, when not ``folded``, a state
    dict keeps its own.
    """
    tag = "folded" if folded else "recalibrated"
    if loaded.path is None:
        name = loaded.source.rpartition(":")[2].rpartition(".")[2]
        return (cwd or Path.cwd()) / f"{name}.{tag}.pt2"
    source = loaded.path
    keep = loaded.format is ModelFormat.PICKLED_MODULE or (
        not folded and loaded.format is not ModelFormat.EXPORTED_PROGRAM
    )
    ext = (source.suffix or ".pt") if keep else ".pt2"
    return source.with_name(f"{source.stem}.{tag}{ext}")


def check_output_path(
    path: str | os.PathLike[str],
    *,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
) -> Path:
    """Raise ``UsageError`` unless ``path`` can be written: its directory exists, it is none of
    ``inputs`` (nor inside an input folder), and it does not exist yet (unless ``overwrite``).
    See ``bnfold.io.paths`` for what counts as the same file."""
    out = Path(path)
    sources = [NamedPath("input", Path(source)) for source in inputs if source is not None]
    plan_paths(sources, [NamedPath("output", out)], overwrite=overwrite)
    return out


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    format: ModelFormat | None = None,
    overwrite: bool = False,
    dynamic_dims: Sequence[Sequence[int]] | None = None,
) -> SavedModel:
    """Write ``model`` to ``path`` atomically, in a form that loads back without bnfold.

        ``format`` defaults to the extension's (``output_format``). ``.pt2``: ``torch.export`` with
        ``example_inputs``, the batch (dim 0) and ``dynamic_dims`` kept dynamic where the model
        allows it (``export_program``; ``SavedModel.notes`` say which); load it back with
        ``torch.export.load(path).module()``. Pickled module: ``torch.save(model)``. A state dict
    format (only when asked for by ``format``): the model's state dict. Raises
        ``UsageError`` for a path that may not be written and ``SaveError`` when exporting or
        writing fails (nothing is left behind, an existing file is untouched).
    """
    out = check_output_path(path, overwrite=overwrite)
    fmt = format or output_format(out)
    notes: list[str] = []
    if fmt is ModelFormat.EXPORTED_PROGRAM:
        program, notes = export_program(model, as_args(example_inputs), dynamic_dims)

        def write(tmp: str) -> None:
            with warnings.catch_warnings():
                # Raised for weights that are not contiguous (channels_last): they are saved
                # with their strides and load back exactly; the warning is about GPU weights.
                warnings.filterwarnings("ignore", message="No complete tensor found in the group")
                torch.export.save(program, tmp)

    elif fmt is ModelFormat.PICKLED_MODULE:

        def write(tmp: str) -> None:
            torch.save(model, tmp)

    else:  # a state dict: the weights alone
        state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        notes = ["state dict: load it into MODEL's architecture, strictly"]

        def write(tmp: str) -> None:
            if fmt is ModelFormat.SAFETENSORS:
                from safetensors.torch import save_file

                save_file(state, tmp)
            else:
                torch.save(state, tmp)

    atomic_write(out, write, overwrite=overwrite)
    return SavedModel(path=str(out), format=fmt, bytes=out.stat().st_size, notes=tuple(notes))


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[str], None], *, overwrite: bool = False
) -> None:
    """Call ``write(tmp)`` on a file of ``path``'s own name in a private temporary directory
    beside it (``bnfold.io.paths.staging``), then move it onto ``path`` (``publish``).

    Without ``overwrite`` an existing ``path`` is refused before ``write`` runs and one that
    appeared meanwhile is kept (``UsageError`` for both). On any failure, including
    KeyboardInterrupt, ``path`` is left as it was; library errors are raised as ``SaveError``.
    """
    out = Path(path)
    if not overwrite and os.path.lexists(out):
        raise UsageError(f"{out} already exists; pass --force (overwrite=True) to replace it")
    try:
        with staging(out) as tmp:
            write(str(tmp))
            publish(tmp, out, overwrite=overwrite)
    except BaseException as exc:
        if isinstance(exc, (BnfoldError, KeyboardInterrupt)) or not isinstance(exc, Exception):
            raise
        raise SaveError(
            f"writing {out} failed: {first_line(exc)}; nothing was written to {out}"
        ) from exc


def write_text_atomic(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> None:
    """Write a text file (a report) atomically; see ``atomic_write``."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(path, write, overwrite=overwrite)
