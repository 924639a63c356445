"""The files a run writes: their default names and formats, the check of every path before any
work, and the writing of model files.

Every path is checked by ``bnfold.io.paths.plan_paths`` under the option that named it, so an
error says which option to change. Model files are written atomically: programs and pickled
modules by ``bnfold.io.models.save_model``, a recalibrated state dict here. When a later stage
fails, ``written_before_failure`` names the files already written (they are complete).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import BnfoldError, UsageError
from bnfold.io.models import (
    LoadedModel,
    ModelFormat,
    ModelSource,
    SavedModel,
    atomic_write,
    save_model,
)
from bnfold.io.paths import NamedPath, plan_paths, spec_path

#: The formats ``save_model`` writes from the module itself (the rest are state dicts).
MODULE_FORMATS = (ModelFormat.EXPORTED_PROGRAM, ModelFormat.PICKLED_MODULE)


@dataclass(frozen=True)
class Target:
    """One model file to write."""

    path: Path
    format: ModelFormat


def check_roles(
    reads: dict[str, Any], writes: dict[str, Any], *, force: bool, named_only: Sequence[str] = ()
) -> None:
    """``plan_paths`` for paths by the option that named them (None: not given; ``--json -`` is
    stdout). Outputs in ``named_only`` are not written (a dry run's model), so they may exist."""
    sources = [NamedPath(role, path) for role, spec in reads.items() if (path := spec_path(spec))]
    targets = [
        NamedPath(role, Path(path), written=role not in named_only)
        for role, path in writes.items()
        if path is not None and not (role == "--json" and str(path) == "-")
    ]
    plan_paths(sources, targets, overwrite=force)


def default_output(source: LoadedModel | ModelSource, *, folded: bool) -> Path:
    """``<name>.folded.<ext>`` (``.recalibrated`` when not folded) beside MODEL, or in the
    current directory for a factory: a ``.pt2``, but a pickled module stays one and, when not
    folded, a state dict keeps its format."""
    tag = "folded" if folded else "recalibrated"
    if source.path is None:
        return Path.cwd() / f"{source.source.rpartition(':')[2].rpartition('.')[2]}.{tag}.pt2"
    path = source.path
    keep = source.format is ModelFormat.PICKLED_MODULE or (
        not folded and source.format is not ModelFormat.EXPORTED_PROGRAM
    )
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.{tag}{(path.suffix or '.pt') if keep else '.pt2'}")


def output_format(path: Path, *, folded: bool, pickled_input: bool = True) -> ModelFormat:
    """The format ``path``'s extension asks for: ``.pt2``; ``.pt``/``.pth`` a pickled module
    when MODEL is one, else a state dict; ``.safetensors`` a state dict. A folded model is never
    a bare state dict: it no longer fits MODEL's architecture (BatchNorms gone, biases added)."""
    module = ModelFormat.PICKLED_MODULE if pickled_input else ModelFormat.STATE_DICT
    formats = {".pt2": ModelFormat.EXPORTED_PROGRAM, ".pt": module, ".pth": module}
    formats[".safetensors"] = ModelFormat.SAFETENSORS
    fmt = formats.get(path.suffix.lower())
    if fmt is not None and (fmt in MODULE_FORMATS or not folded):
        return fmt
    kinds = ".pt2 (or .pt/.pth when MODEL is a pickled module, loaded with --trust-pickle)"
    raise UsageError(
        f"{path}: '{path.suffix or 'no extension'}' is not an output format for the "
        f"{'folded' if folded else 'recalibrated'} model; use "
        + (kinds if folded else ".pt2, .pt/.pth or .safetensors")
    )


def save(
    model: nn.Module,
    target: Target,
    inputs: tuple[Any, ...],
    dynamic_dims: tuple[tuple[int, ...], ...] | None,
    *,
    overwrite: bool,
) -> SavedModel:
    """Write ``model`` as ``target`` says, atomically: a program or a pickled module
    (``save_model``, with ``inputs`` and ``dynamic_dims`` for a program), or its state dict."""
    if target.format in MODULE_FORMATS:
        return save_model(
            model,
            target.path,
            example_inputs=inputs,
            format=target.format,
            overwrite=overwrite,
            dynamic_dims=dynamic_dims,
        )
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}

    def write(tmp: str) -> None:
        if target.format is ModelFormat.SAFETENSORS:
            from safetensors.torch import save_file

            save_file(state, tmp)
        else:
            torch.save(state, tmp)

    atomic_write(target.path, write, overwrite=overwrite)
    notes = ("state dict: load it into MODEL's architecture, strictly",)
    return SavedModel(str(target.path), target.format, target.path.stat().st_size, notes)


@contextlib.contextmanager
def written_before_failure(paths: Sequence[str]) -> Iterator[None]:
    """A ``BnfoldError`` leaving the block after files were written (``paths``, appended as
    they are) names them: the same class, with ``(already written, complete: ...)``."""
    try:
        yield
    except BnfoldError as exc:
        if not paths:
            raise
        raise type(exc)(f"{exc} (already written, complete: {', '.join(paths)})") from exc


def would_write(path: Path, force: bool) -> str:
    """The dry run's note for an output it names."""
    exists = os.path.lexists(path) and not force
    return f"would write {path}" + (" (exists: a real run needs --force)" if exists else "")
