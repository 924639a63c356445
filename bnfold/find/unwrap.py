"""Models as users hand them: wrappers around the real module, and the state it is in.

Wrappers are taken off before analysis: ``torch.compile`` results (``OptimizedModule``, the
module is ``_orig_mod``), ``nn.DataParallel`` and ``DistributedDataParallel`` (``.module``),
nested in any order; a ``torch.export.ExportedProgram`` is taken as its module, layers rebuilt.
``fold`` returns the folded *inner* module: an inference model needs no data-parallel wrapper,
re-wrapping a ``DistributedDataParallel`` would run a collective on every rank, and a compiled
module must be compiled again after its weights and modules change. With
``inplace=True`` the wrapper still holds the (now folded) inner module; a compiled wrapper then
recompiles on its next call.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from bnfold.errors import UsageError
from bnfold.io.program_module import module_from_program


def unwrap(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """The module inside any wrappers, and one note per wrapper taken off. A torch.export
    program becomes a module with its layers rebuilt, as a loaded ``.pt2`` file does. Raises
    ``UsageError`` for anything that is not a module."""
    notes = []
    if isinstance(model, torch.export.ExportedProgram):
        model, rebuilt = module_from_program(model)
        notes += ["took the program's module: the folded model is a new module", *rebuilt]
    # OptimizedModule if torch.compile was used in this process (importing dynamo costs seconds)
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    while True:
        if compiled is not None and isinstance(model, compiled):
            notes.append(
                "took the module out of its torch.compile wrapper (OptimizedModule): "
                "the folded model is the eager module; compile it again"
            )
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            notes.append(
                f"took the module out of {type(model).__name__}: the folded model is "
                "the inner module; wrap it again if you need to"
            )
            model = model.module
        elif isinstance(model, nn.Module):
            return model, tuple(notes)
        else:
            raise UsageError(
                f"the model must be a torch.nn.Module or a torch.export program, got "
                f"{type(model).__name__}; load a model file with bnfold.load_model(path).model"
            )


def state_notes(model: nn.Module) -> tuple[str, ...]:
    """The model's state that the fold sets or keeps: train mode anywhere (the fold computes eval
    mode), and the device and dtype of its weights (said only when they are not the default
    float32 on CPU)."""
    mode = _mode_note(model)
    return ((mode,) if mode else ()) + _placement_notes(model)


def _placement_notes(model: nn.Module) -> tuple[str, ...]:
    tensors = (*model.parameters(), *model.buffers())
    kinds = {(t.dtype, t.device) for t in tensors if t.is_floating_point()}
    dtypes = sorted({str(dtype).removeprefix("torch.") for dtype, _ in kinds})
    devices = sorted({str(device) for _, device in kinds})
    if not dtypes or (dtypes == ["float32"] and devices == ["cpu"]):
        return ()
    rounded = [dtype for dtype in dtypes if dtype != "float64"]
    rounding = f"rounded once to {', '.join(rounded)}" if rounded else "kept in float64"
    return (
        f"weights are {', '.join(dtypes)} on {', '.join(devices)}: folds are computed in "
        f"float64 and {rounding}; the folded model keeps each layer's dtype and device",
    )


def _mode_note(model: nn.Module) -> str | None:
    """Which part of the model is in train mode, if any: the fold computes eval mode."""
    if model.training:
        return "model was in train mode: the fold computes the eval-mode function"
    training = [name for name, module in model.named_modules() if name and module.training]
    if not training:
        return None
    more = f" and {len(training) - 3} more" if len(training) > 3 else ""
    return (
        f"{', '.join(training[:3])}{more} in train mode inside an eval-mode model: the fold "
        "computes the eval-mode function (every module in eval mode)"
    )
