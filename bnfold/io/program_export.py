"""``torch.export`` of a (folded) model for a ``.pt2`` file, with its batch dimension kept free;
and ``quiet_torch``, which keeps torch's log lines and warnings off the console meanwhile."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree  # torch has no public pytree module

from bnfold.errors import SaveError, first_line
from bnfold.io.inputs import format_shape
from bnfold.io.program_module import dynamic_dims as program_dims

#: torch loggers that narrate an export on stderr.
_EXPORT_LOGGERS = (
    "torch._export",
    "torch.export",
    "torch.fx.experimental.symbolic_shapes",
    "torch._subclasses.fake_tensor",
    "torch._dynamo",
)


def export_program(
    model: nn.Module, inputs: tuple, dynamic_dims: Sequence[Sequence[int]] | None
) -> tuple[torch.export.ExportedProgram, list[str]]:
    """``torch.export`` ``model`` with the requested dims dynamic where the model allows it.

    ``dynamic_dims`` lists, per tensor in ``inputs`` (flattened), the dims to keep dynamic;
    default: dim 0 (the batch) of each. A batch-1 example is exported at batch 2 (rows
    repeated): at size 1 the exporter would specialise the batch. The program's own input
    shapes are then checked; when a requested dim could not stay dynamic the program is
    exported with the given example's fixed shapes and a note says why. Returns the program
    and notes for the user; ``SaveError`` when even the fixed-shape export fails.
    """
    leaves, spec = pytree.tree_flatten(inputs)
    leaves = [leaf if isinstance(leaf, torch.Tensor) else None for leaf in leaves]
    wanted = _wanted_dims(leaves, dynamic_dims)
    example = _batch_of_two(inputs, leaves, wanted)
    shapes = pytree.tree_unflatten([{d: Dim.AUTO for d in dims} or None for dims in wanted], spec)
    try:
        with quiet_torch(_EXPORT_LOGGERS, level=logging.CRITICAL, prefix="torch.export") as notes:
            program = torch.export.export(model, example, dynamic_shapes=shapes)
        problem = _lost_dims(program, leaves, wanted)
    except Exception as exc:
        problem = (
            f"exporting with a free batch failed ({first_line(exc)}): the forward probably fixes "
            "the batch size (e.g. x.view(1, -1)); x.flatten(1) keeps it free"
        )
    if problem is None:
        return program, [_kept_note(wanted, leaves, example is not inputs), *notes]
    try:
        with quiet_torch(_EXPORT_LOGGERS, level=logging.CRITICAL, prefix="torch.export") as notes:
            program = torch.export.export(model, inputs)
    except Exception as exc:
        raise SaveError(
            f"torch.export could not export the folded model: {first_line(exc, lines=3)}. "
            "A .pt2 needs a model torch.export can trace; for a pickled input, write a .pt "
            "output instead"
        ) from exc
    sizes = ", ".join(format_shape(leaf.shape) or "scalar" for leaf in leaves if leaf is not None)
    static = f"the saved program has static shapes (it runs only at {sizes}): {problem}"
    return program, [static, *notes]


def _wanted_dims(
    leaves: list[Any], dynamic_dims: Sequence[Sequence[int]] | None
) -> list[tuple[int, ...]]:
    """Per leaf, the dims to keep dynamic: dim 0 of every tensor that has one, plus the dims
    ``dynamic_dims`` gives (per tensor leaf) when it has one entry per tensor."""
    count = sum(leaf is not None for leaf in leaves)
    given = iter(dynamic_dims if dynamic_dims is not None and len(dynamic_dims) == count else ())
    wanted = []
    for leaf in leaves:
        if leaf is None:
            wanted.append(())
            continue
        extra = tuple(d for d in next(given, ()) if 0 < d < leaf.dim())
        wanted.append(((0,) if leaf.dim() >= 1 else ()) + tuple(sorted(set(extra))))
    return wanted


def _batch_of_two(inputs: tuple, leaves: list[Any], wanted: list) -> tuple:
    """``inputs`` with every dynamic dim 0 of size 1 repeated to 2, else ``inputs`` itself."""
    batch = [leaf for leaf, dims in zip(leaves, wanted, strict=True) if 0 in dims]
    if not batch or any(leaf.shape[0] != 1 for leaf in batch):
        return inputs
    flat, spec = pytree.tree_flatten(inputs)
    doubled = [
        torch.cat([value, value]) if 0 in dims else value
        for value, dims in zip(flat, wanted, strict=True)
    ]
    return pytree.tree_unflatten(doubled, spec)


def _lost_dims(program: Any, leaves: list[Any], wanted: list[tuple[int, ...]]) -> str | None:
    """Why the program's inputs are not dynamic where ``wanted``, or None when they are."""
    kept = list(program_dims(program))
    requested = [dims for leaf, dims in zip(leaves, wanted, strict=True) if leaf is not None]
    if len(kept) != len(requested):
        return None if any(kept) or not any(requested) else "no input dim stayed dynamic"
    lost = [
        f"input {index} dim {dim}"
        for index, (dims, have) in enumerate(zip(requested, kept, strict=True))
        for dim in dims
        if dim not in have
    ]
    if not lost:
        return None
    return (
        f"the forward fixes {', '.join(lost)} (e.g. a reshape to a constant size, or a branch "
        "on the batch size); x.flatten(1) or x.view(x.shape[0], -1) keeps the batch free"
    )


def _kept_note(wanted: list[tuple[int, ...]], leaves: list[Any], doubled: bool) -> str:
    tensors = [dims for leaf, dims in zip(leaves, wanted, strict=True) if leaf is not None]
    kept = [f"input {i} dim {d}" for i, dims in enumerate(tensors) for d in dims]
    if not kept:
        return "the saved program has static shapes (no input has a batch dimension)"
    note = "dynamic dims kept: " + ", ".join(kept)
    return note + (" (exported at batch 2: a batch-1 example fixes the batch)" if doubled else "")


@contextlib.contextmanager
def quiet_torch(
    loggers: Sequence[str], *, level: int, prefix: str | None = None
) -> Iterator[list[str]]:
    """Raise ``loggers`` to ``level`` and record warnings while the block runs; yields a list
    that receives, at the end, each warning that says something (not a deprecation) as a note
    ``"<prefix or category>: <first line>"``. Failures are raised, and reported from the
    exception; the loggers' levels and the warning filters are restored."""
    handles = [logging.getLogger(name) for name in loggers]
    levels = [handle.level for handle in handles]
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for handle in handles:
            handle.setLevel(level)
        try:
            yield notes
        finally:
            for handle, before in zip(handles, levels, strict=True):
                handle.setLevel(before)
    for item in caught:
        lines = str(item.message).strip().splitlines()
        note = f"{prefix or item.category.__name__}: {lines[0] if lines else ''}"
        quiet = issubclass(item.category, (DeprecationWarning, FutureWarning))
        if lines and not quiet and note not in notes:
            notes.append(note)
