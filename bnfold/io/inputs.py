"""Example inputs: built from shapes, described, and checked against the model."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bnfold.errors import ModelInputError, UsageError, first_line
from bnfold.records import format_bytes

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool")
}
_SMALLER = "use a smaller input shape (a batch of 2 is enough)"


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"`` → ``torch.float32``; ``UsageError`` for a name not in ``DTYPES``."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}") from None


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 if none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def make_example_inputs(
    shapes: Sequence[tuple[Sequence[int], str | None]],
    *,
    default_dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """One tensor per ``(shape, dtype name or None)``: standard normal values for floating
    dtypes (seeded, so reports are reproducible), zeros for integer and bool dtypes.

    ``ModelInputError`` when an input is larger than the machine's physical memory or cannot be
    allocated (nothing is allocated in the first case)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for shape, dtype_name in shapes:
        dtype = parse_dtype(dtype_name) if dtype_name else default_dtype
        if any(int(size) <= 0 for size in shape):
            raise UsageError(f"input shape {format_shape(shape)} has a dimension that is not > 0")
        what = f"the example input {format_shape(shape)} {str(dtype).removeprefix('torch.')}"
        # randn draws float32 values first, then converts
        need = math.prod(int(n) for n in shape) * max(dtype.itemsize, 4 * dtype.is_floating_point)
        total = _physical_memory()
        if total and need > total:  # an overcommitted allocation would end in the OOM killer
            raise ModelInputError(
                f"{what} needs {format_bytes(need)}, more than this machine's "
                f"{format_bytes(total)} of memory; {_SMALLER}"
            )
        try:
            if dtype.is_floating_point:
                tensors.append(torch.randn(tuple(shape), generator=generator).to(dtype))
            else:
                tensors.append(torch.zeros(tuple(shape), dtype=dtype))
        except (MemoryError, RuntimeError) as exc:
            raise ModelInputError(
                f"cannot allocate {what} ({format_bytes(need)}): {type(exc).__name__}; {_SMALLER}"
            ) from exc
    return tuple(tensors)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def describe_inputs(example_inputs: Any) -> list[dict[str, Any]]:
    """``[{"shape": [...], "dtype": "float32"}, ...]`` for a tensor or tuple of tensors."""
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return [
        {"shape": list(item.shape), "dtype": str(item.dtype).removeprefix("torch.")}
        if isinstance(item, torch.Tensor)
        else {"shape": None, "dtype": type(item).__name__}
        for item in items
    ]


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(size)) for size in shape)


def check_inputs(model: nn.Module, example_inputs: Any) -> None:
    """Run one eval-mode, no-grad forward with hooks on every submodule; when the model rejects
    the inputs, raise ``ModelInputError`` naming the layer that raised (or the last one that
    ran). Training flags are restored afterwards and no hook is left behind."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    empty = tensors_without_data(model)
    if empty:
        raise ModelInputError(no_data_message("the model", empty))
    names = {module: name for name, module in model.named_modules() if name}
    running: list[nn.Module] = []  # the layers whose forward is under way, innermost last
    finished: list[str] = []

    def enter(module: nn.Module, _args: Any) -> None:
        running.append(module)

    def leave(module: nn.Module, _args: Any, _output: Any) -> None:
        if running and running[-1] is module:
            running.pop()
        finished.append(names[module])

    handles = [module.register_forward_pre_hook(enter) for module in names]
    handles += [module.register_forward_hook(leave) for module in names]
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception as exc:
        if running:
            where = f"layer '{names[running[-1]]}' ({type(running[-1]).__name__})"
        elif finished:
            where = f"the model's forward (after layer '{finished[-1]}' ran)"
        else:
            where = "the model's forward (before any layer ran)"
        raise ModelInputError(_rejection(where, exc, args)) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training


def _rejection(where: str, exc: Exception, args: tuple) -> str:
    given = ", ".join(
        f"{format_shape(a.shape)} {str(a.dtype).removeprefix('torch.')}"
        if isinstance(a, torch.Tensor)
        else type(a).__name__
        for a in args
    )
    return (
        f"{where} rejected the example inputs ({given}): {first_line(exc, lines=2)}. "
        "Check the input shape and dtype (--input-shape, --dtype)"
    )


def tensors_without_data(model: nn.Module) -> list[str]:
    """Names of the parameters and buffers that have no data (on the ``meta`` device)."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [name for name, tensor in named if tensor.is_meta]


def no_data_message(what: str, names: Sequence[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f"{what} has no data: its parameters/buffers ({shown}) are on the meta device, which "
        "holds shapes only. Build it on a real device, or materialise it with "
        "model.to_empty(device='cpu') and load its weights, before folding"
    )


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    """Normalise example inputs: a tensor becomes a 1-tuple, a list a tuple."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)
