"""The model files a run writes (their default names and formats: ``bnfold.io.save``),
atomically: programs and pickled modules by ``bnfold.io.models.save_model``, a recalibrated
state dict here. When a later stage fails, ``written_before_failure`` names the files already
written (they are complete).
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

from bnfold.errors import BnfoldError
from bnfold.io.models import ModelFormat, SavedModel, atomic_write, save_model
from bnfold.io.save import STATE_DICT_FORMATS


@dataclass(frozen=True)
class Target:
    """One model file to write."""

    path: Path
    format: ModelFormat


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
    if target.format not in STATE_DICT_FORMATS:
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
