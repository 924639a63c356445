"""The globals a weights-only pickle may use, each a checked constructor; and those it names.

Each callable in ``ALLOWED_GLOBALS`` checks its arguments and raises ``DamagedPickle`` for
anything a ``torch.save`` of tensors never writes. ``refused_globals`` lists the other globals a
pickle names, read from its opcodes (to say what a refused file holds without running it).
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickletools
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

MAX_DIMS = 64


class DamagedPickle(Exception):
    """The stream is not a sound pickle of tensors (as opposed to one that asks for code)."""


@dataclass(frozen=True)
class StorageType:
    """A storage class a pickle names (``torch.FloatStorage``...): only its dtype is kept."""

    dtype: torch.dtype

    def __str__(self) -> str:
        return f"storage type {self.dtype}"


@dataclass(frozen=True)
class Storage:
    """A storage read from the file itself, with the dtype the pickle declared for it."""

    untyped: torch.UntypedStorage
    dtype: torch.dtype


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def view_extent(sizes: tuple[int, ...], strides: tuple[int, ...], offset: int) -> int:
    """Elements of its storage a strided view reaches (0 for an empty view)."""
    if not math.prod(sizes):
        return 0
    return offset + 1 + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True))


def _rebuild_tensor_v2(storage: Any, *args: Any) -> torch.Tensor:
    """``(storage, offset, size, stride, requires_grad, hooks[, metadata])``"""
    dtype = storage.dtype if isinstance(storage, Storage) else None
    return _tensor(storage, dtype, *args)


def _rebuild_tensor_v3(
    storage: Any, offset: Any, size: Any, stride: Any, grad: Any, hooks: Any, dtype: Any, *meta: Any
) -> torch.Tensor:
    """``(storage, offset, size, stride, requires_grad, hooks, dtype[, metadata])``"""
    return _tensor(storage, dtype, offset, size, stride, grad, hooks, *meta)


def _tensor(
    storage: Any,
    dtype: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    if not isinstance(storage, Storage) or not isinstance(dtype, torch.dtype):
        raise DamagedPickle("a tensor without a storage of the file")
    if not isinstance(requires_grad, bool) or not _no_hooks(hooks) or not _metadata_ok(metadata):
        raise DamagedPickle("a tensor with hooks or unknown metadata")
    size, stride = _dims(size), _dims(stride)
    if not is_int(offset) or offset < 0 or len(size) != len(stride):
        raise DamagedPickle("a tensor with a bad offset or shape")
    if view_extent(size, stride, offset) > storage.untyped.nbytes() // dtype.itemsize:
        raise DamagedPickle(f"a tensor of size {list(size)} reaches past its storage")
    tensor = torch.empty((0,), dtype=dtype)
    tensor.set_(storage.untyped, offset, size, stride)
    if requires_grad:
        tensor.requires_grad_(True)
    if metadata:  # the conj/neg bits; torch has no public setter for them
        torch._utils.set_tensor_metadata(tensor, metadata)
    return tensor


def _dims(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_DIMS:
        raise DamagedPickle("a tensor with a bad shape")
    if not all(is_int(n) and n >= 0 for n in value):
        raise DamagedPickle("a tensor with a bad shape")
    return value


def _no_hooks(hooks: Any) -> bool:
    return hooks is None or (isinstance(hooks, dict) and not hooks)


def _metadata_ok(metadata: Any) -> bool:
    if metadata is None:
        return True
    return isinstance(metadata, dict) and all(
        key in ("conj", "neg") and isinstance(flag, bool) for key, flag in metadata.items()
    )


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any) -> torch.nn.Parameter:
    if not isinstance(data, torch.Tensor) or not isinstance(requires_grad, bool):
        raise DamagedPickle("a parameter without a tensor")
    if not _no_hooks(hooks):
        raise DamagedPickle("a parameter with hooks")
    return torch.nn.Parameter(data, requires_grad)


def _ordered_dict(*args: Any) -> OrderedDict:
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
        raise DamagedPickle("a bad OrderedDict")
    return OrderedDict(*args)


def _device(*args: Any) -> torch.device:
    index_ok = len(args) == 1 or (len(args) == 2 and is_int(args[1]))
    if not args or not isinstance(args[0], str) or not index_ok:
        raise DamagedPickle("a bad device")
    return torch.device(*args)


def _size(*args: Any) -> torch.Size:
    if len(args) > 1 or (args and not all(is_int(n) for n in args[0])):
        raise DamagedPickle("a bad torch.Size")
    return torch.Size(*args)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
        raise DamagedPickle("bad bytes")
    return text.encode(encoding)


def _set(items: Any = ()) -> set:
    if not isinstance(items, (list, tuple)):
        raise DamagedPickle("a set of something other than a list")
    return set(items)


def _frozenset(items: Any = ()) -> frozenset:
    return frozenset(_set(items))


def _bytearray(data: Any = b"") -> bytearray:
    if not isinstance(data, bytes):
        raise DamagedPickle("a bad bytearray")
    return bytearray(data)


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (real, imag)):
        raise DamagedPickle("a bad complex number")
    return complex(real, imag)


def _allowed_globals() -> dict[str, Any]:
    table: dict[str, Any] = {
        "collections.OrderedDict": _ordered_dict,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch.device": _device,
        "torch.Size": _size,
        "_codecs.encode": _encode,
        "builtins.set": _set,
        "builtins.frozenset": _frozenset,
        "builtins.bytearray": _bytearray,
        "builtins.complex": _complex,
        "torch.storage.UntypedStorage": StorageType(torch.uint8),
        "torch.UntypedStorage": StorageType(torch.uint8),
    }
    # The legacy typed storages (torch.FloatStorage...): torch lists them only privately.
    for dtype, storage_name in torch.storage._dtype_to_storage_type_map().items():
        table[f"torch.{storage_name}"] = StorageType(dtype)
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            table[f"torch.{name}"] = value
    return table


#: ``module.name`` -> the object a pickle gets for it.
ALLOWED_GLOBALS: dict[str, Any] = _allowed_globals()
#: The only callables ``REDUCE`` may call (compare by identity: the stack may hold anything).
CONSTRUCTORS = tuple(value for value in ALLOWED_GLOBALS.values() if callable(value))


def refused_globals(data: bytes | bytearray) -> list[str]:
    """The globals a pickle stream references that ``RestrictedUnpickler`` refuses, read from
    its opcodes without running anything (several pickles in a row are all scanned)."""
    stream = io.BytesIO(data)
    found: list[str] = []
    while stream.tell() < len(data) and _scan_one_pickle(stream, found):
        pass
    return [name for name in dict.fromkeys(found) if name not in ALLOWED_GLOBALS]


def _scan_one_pickle(stream: io.BytesIO, found: list[str]) -> bool:
    """Append the globals of the next pickle in ``stream``; False when none could be read."""
    strings: list[str] = []
    memo: dict[int, str] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(global_name(*str(arg).split(" ", 1)))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(global_name(strings[-2], strings[-1]))
            elif isinstance(arg, str) and ("UNICODE" in opcode.name or "STRING" in opcode.name):
                strings.append(arg)
            elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[int(arg)] = strings[-1]
            elif opcode.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                strings.append(memo[int(arg)])
    except (ValueError, EOFError, struct.error, UnicodeDecodeError):
        return False  # truncated, or raw bytes after the last pickle
    return True


def global_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 names it (pickles of protocol < 3 use Python 2 names)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"
