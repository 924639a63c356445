"""A deep copy of a model, with a faster path for its plain parameters and buffers.

``copy.deepcopy`` copies each tensor through Python-level storage bookkeeping that costs more
than the copy itself on models with many small tensors, and rebuilds each of the dozen empty
hook registries every module carries through ``__reduce_ex__``. ``clone_model`` gives
``deepcopy`` those copies up front (through its memo): plain tensors copied the way
``Parameter.__deepcopy__`` and ``Tensor.__deepcopy__`` copy them, and a new empty dict of the
same type for each empty ``dict``/``OrderedDict`` a module holds. Anything unusual is left to
``deepcopy`` itself: tensor subclasses, views sharing a storage, tensors with a ``grad`` or
attributes of their own, non-strided, quantized, conjugated or negated tensors, devices other
than CPU and CUDA, dict subclasses and dicts with attributes of their own.
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from typing import TypeVar

import torch
from torch import nn

from bnfold.errors import UsageError, first_line

M = TypeVar("M", bound=nn.Module)


def clone_model(model: M) -> M:
    """``copy.deepcopy(model)``, faster: same structure, same aliasing, same tensor values.
    Raises ``UsageError`` when the model cannot be copied (an attribute holding a lock, a file,
    a C handle)."""
    try:
        return copy.deepcopy(model, plain_copies(model))
    except Exception as exc:
        raise UsageError(
            f"cannot copy {type(model).__name__} to leave your model untouched: deepcopy "
            f"failed ({first_line(exc)}); make that attribute copyable (or drop it), or pass "
            "inplace=True to work on the model itself"
        ) from exc


def plain_copies(model: nn.Module) -> dict[int, object]:
    """``deepcopy``'s memo for ``model``, filled with what it would make more slowly itself."""
    copies: dict[int, object] = {
        id(value): type(value)()
        for module in model.modules()
        for value in vars(module).values()
        if _empty_dict(value)
    }
    tensors = {
        id(t): t
        for _, t in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        )
    }
    storages = Counter(_storage_key(t) for t in tensors.values())
    for key, tensor in tensors.items():
        if storages[_storage_key(tensor)] == 1 and _is_plain(tensor):
            copies[key] = _copy(tensor)
    return copies


def _empty_dict(value: object) -> bool:
    """An empty dict or OrderedDict without attributes: its deep copy is a new empty one."""
    return type(value) in (dict, OrderedDict) and not value and not getattr(value, "__dict__", 0)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _is_plain(tensor: torch.Tensor) -> bool:
    return (
        type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.is_leaf
        and tensor.grad is None
        and not tensor.__dict__
        and tensor.layout == torch.strided
        and tensor.device.type in ("cpu", "cuda")
        and not (tensor.is_quantized or tensor.is_conj() or tensor.is_neg())
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.nbytes
        and _dense(tensor)
    )


def _dense(tensor: torch.Tensor) -> bool:
    """Laid out so that ``clone(memory_format=preserve_format)`` keeps the strides."""
    if tensor.is_contiguous():
        return True
    if tensor.dim() == 4:
        return tensor.is_contiguous(memory_format=torch.channels_last)
    return tensor.dim() == 5 and tensor.is_contiguous(memory_format=torch.channels_last_3d)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    data = tensor.detach().clone(memory_format=torch.preserve_format)
    if type(tensor) is nn.Parameter:
        return nn.Parameter(data, tensor.requires_grad)  # as Parameter.__deepcopy__
    return data.requires_grad_(tensor.requires_grad)
