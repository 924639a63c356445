"""Model file formats, and the records of what was loaded and what was saved."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bnfold.records import Record, not_serialised

if TYPE_CHECKING:
    import torch
    from torch import nn


class ModelFormat(str, enum.Enum):
    """Where a model came from (and, for outputs, how it is written)."""

    EXPORTED_PROGRAM = "pt2"  # torch.export program
    FACTORY = "factory"  # package.module:callable
    STATE_DICT = "state_dict"  # .pt/.pth weights + arch factory
    SAFETENSORS = "safetensors"  # .safetensors weights + arch factory
    PICKLED_MODULE = "pickled_module"  # torch.save(model), loaded only when trusted

    @property
    def label(self) -> str:
        return _FORMAT_LABELS[self]


_FORMAT_LABELS = {
    ModelFormat.EXPORTED_PROGRAM: "torch.export program",
    ModelFormat.FACTORY: "factory",
    ModelFormat.STATE_DICT: "state dict",
    ModelFormat.SAFETENSORS: "safetensors state dict",
    ModelFormat.PICKLED_MODULE: "pickled module",
}


class _Source:
    format: ModelFormat
    source: str

    @property
    def path(self) -> Path | None:
        """The input file, or None for a factory."""
        return None if self.format is ModelFormat.FACTORY else Path(self.source)


@dataclass(frozen=True)
class ModelSource(_Source, Record):
    """What MODEL will load as, known from the arguments before loading: enough to name the
    default outputs (``default_output_path`` takes it like a ``LoadedModel``)."""

    format: ModelFormat  # STATE_DICT stands for both state-dict formats (.pt/.safetensors)
    source: str


@dataclass(frozen=True)
class LoadedModel(_Source, Record):
    """A model read by ``load_model`` and what is known about where it came from."""

    model: nn.Module = field(metadata=not_serialised(), repr=False, compare=False)
    format: ModelFormat
    source: str  # the file path or factory spec as given
    arch: str | None = None  # the factory that built the architecture of a state dict
    # The example inputs a .pt2 carries (positional tensors), else None.
    example_inputs: tuple[torch.Tensor, ...] | None = field(
        default=None, metadata=not_serialised(), repr=False, compare=False
    )
    # For each positional input, the dims the source program kept dynamic (pt2 only).
    dynamic_dims: tuple[tuple[int, ...], ...] | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class SavedModel(Record):
    """One file ``save_model`` wrote."""

    path: str
    format: ModelFormat
    bytes: int
    notes: tuple[str, ...] = ()
