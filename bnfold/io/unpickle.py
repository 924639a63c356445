"""``torch.save`` files read by bnfold's own restricted unpickler, with weights-only semantics.

``torch.load(weights_only=True)`` is safe, but torch's other loaders retry a pickle that fails it
with ``weights_only=False`` (``torch.export.load`` does, for every pickled member of a ``.pt2``).
bnfold never calls them on bytes from a user's file: every pickle it reads (state dicts, the
sample inputs inside a ``.pt2``, ``--data`` files) goes through ``RestrictedUnpickler``, built on
the pure-Python ``pickle._Unpickler`` with its opcode table replaced, for every protocol (0-5):

- globals: only tensor and parameter rebuilders, storage types, dtypes, ``torch.device``,
  ``torch.Size``, ``collections.OrderedDict`` and the builtins pickle itself uses for bytes,
  sets and complex numbers. Each maps to a bnfold function that checks its arguments; nothing
  is imported and no other callable can reach the stack.
- ``REDUCE`` calls only those functions; ``BUILD`` only sets ``_metadata`` on an OrderedDict
  (a state dict's); ``SETITEM(S)``/``APPEND(S)``/``ADDITEMS`` only fill dicts, lists and sets;
  ``INST``, ``OBJ``, ``NEWOBJ(_EX)``, ``EXT1/2/4`` and out-of-band buffers are refused.
- storages come from the file itself (``persistent_load``): each must be exactly as long as its
  declared element count; each tensor's size, stride and offset must fit its storage.
- the result may hold at most ``MAX_VALUES`` values counted with repetition, so a shared or
  cyclic structure cannot make a later walk over it explode.

Legacy (non-zip) ``torch.save`` files are read by the same unpickler; their storages are
allocated only when the file holds enough bytes for them.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pickle
import pickletools
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bnfold.errors import LoadError, UnsafePickleError, first_line
from bnfold.io.archive import MIB, ZipArchive, open_zip

MAX_PICKLE_BYTES = 64 * MIB
MAX_VALUES = 1_000_000
MAX_DIMS = 64
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class _Refused(Exception):
    """The pickle asks for something a weights-only load refuses (what: a name or an opcode)."""

    def __init__(self, what: str, name: str | None = None) -> None:
        super().__init__(what)
        self.what = what
        self.name = name


# ------------------------------------------------------------------ public entry points


def load_torch_file(path: Path) -> Any:
    """Read a ``torch.save`` file (zip or legacy format) with weights-only semantics.

    Raises ``UnsafePickleError`` when a pickle in it calls anything but tensor rebuilders and
    plain containers (nothing from it ran), ``LoadError`` when it is unreadable, empty, damaged
    or not a ``torch.save`` file.
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                raise LoadError(f"{path} is empty (0 bytes): not a torch.save file")
            if handle.read(2) != b"PK":
                handle.seek(0)
                return _load_legacy(handle, size, str(path))
    except OSError as exc:
        raise LoadError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    with open_zip(path) as archive:
        return _load_zip(archive, str(path))


def load_torch_bytes(data: bytes | bytearray, label: str) -> Any:
    """``load_torch_file`` for a ``torch.save`` blob held in memory (``label`` names it)."""
    if bytes(data[:2]) == b"PK":
        return _load_zip(ZipArchive.from_bytes(data, label), label)
    return _load_legacy(io.BytesIO(data), len(data), label)


def refused_globals(data: bytes | bytearray) -> list[str]:
    """The globals a pickle stream references that ``RestrictedUnpickler`` refuses, read from
    its opcodes without running anything (several pickles in a row are all scanned)."""
    allowed = _allowed_globals()
    stream = io.BytesIO(data)
    found: list[str] = []
    while stream.tell() < len(data) and _scan_one_pickle(stream, found):
        pass
    return [name for name in dict.fromkeys(found) if name not in allowed]


# ------------------------------------------------------------------ the two file formats


def _load_zip(archive: ZipArchive, label: str) -> Any:
    pickles = [
        name for name in archive.members if name.count("/") == 1 and name.endswith("/data.pkl")
    ]
    if len(pickles) != 1:
        raise LoadError(f"{label}: not a torch.save archive (no single data.pkl in it)")
    root = pickles[0][: -len("data.pkl")]
    order = root + "byteorder"
    if order in archive.members:
        value = bytes(archive.read(order, limit=64)).decode("ascii", "replace").strip()
        if value != "little":
            raise LoadError(
                f"{label}: tensors are stored {value}-endian; bnfold reads little-endian files only"
            )
    data = archive.read(pickles[0], limit=MAX_PICKLE_BYTES, what="pickle")
    storages: dict[str, torch.UntypedStorage] = {}

    def storage(key: str, numel: int, element_size: int) -> torch.UntypedStorage:
        nbytes = numel * element_size
        if key not in storages:
            raw = archive.read(f"{root}data/{key}", what="storage")
            if len(raw) != nbytes:
                raise _Damaged(f"storage {key} holds {len(raw)} bytes, not {nbytes}")
            storages[key] = _untyped(raw)
        elif storages[key].nbytes() != nbytes:
            raise _Damaged(f"storage {key} is declared with two sizes")
        return storages[key]

    return _unpickle(data, storage, label)


def _load_legacy(handle: BinaryIO, size: int, label: str) -> Any:
    stream = _Capped(handle, size)
    try:
        header = [_unpickle(stream, _no_storage, label) for _ in range(3)]
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise LoadError(f"{label}: not a torch.save file")
        if not isinstance(header[2], dict) or header[2].get("little_endian") is not True:
            raise LoadError(f"{label}: not a little-endian torch.save file; bnfold cannot read it")
        storages = _LegacyStorages(size)
        result = _unpickle(stream, storages.get, label, legacy=True)
        keys = _unpickle(stream, _no_storage, label)
    except UnsafePickleError as exc:
        handle.seek(0)
        raise _unsafe_with(exc, label, handle.read(min(size, MAX_PICKLE_BYTES))) from None
    storages.fill(stream, keys, label)
    return result


class _LegacyStorages:
    """The storages of a legacy file: allocated as the pickle names them (never more bytes than
    the file holds), filled from the bytes after the pickles."""

    def __init__(self, file_size: int) -> None:
        self._file_size = file_size
        self._buffers: dict[str, bytearray] = {}
        self._sizes: dict[str, int] = {}
        self._total = 0

    def get(self, key: str, numel: int, element_size: int) -> torch.UntypedStorage:
        nbytes = numel * element_size
        if key not in self._buffers:
            self._sizes[key] = element_size
            self._total += nbytes
            if self._total > self._file_size:
                raise _Damaged("its storages declare more bytes than the file holds")
            self._buffers[key] = bytearray(nbytes)
        if len(self._buffers[key]) != nbytes:
            raise _Damaged(f"storage {key} is declared with two sizes")
        return _untyped(self._buffers[key])

    def fill(self, stream: _Capped, keys: Any, label: str) -> None:
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(self._buffers):
            raise LoadError(f"{label}: damaged torch.save file (its storage list does not match)")
        for key in map(str, keys):
            buffer = self._buffers[key]
            count = stream.read(8)
            if len(count) != 8:
                raise LoadError(f"{label}: damaged torch.save file (cut short at storage {key})")
            (numel,) = struct.unpack("<q", count)
            if numel * self._sizes[key] != len(buffer):
                raise LoadError(f"{label}: damaged torch.save file (storage {key}: bad size)")
            if stream.readinto(buffer) != len(buffer):
                raise LoadError(f"{label}: damaged torch.save file (storage {key} is cut short)")


def _no_storage(key: str, numel: int, element_size: int) -> torch.UntypedStorage:
    raise _Damaged("a storage where none belongs")


class _Capped:
    """A read-only view of the first ``size`` bytes of ``handle`` that never reads past them."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self._handle = handle
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._handle.read(n)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._handle.readline(self._left)
        self._left -= len(line)
        return line

    def readinto(self, buffer: bytearray) -> int:
        view = memoryview(buffer)[: self._left]
        got = self._handle.readinto(view)
        self._left -= got
        return got


def _untyped(raw: bytearray) -> torch.UntypedStorage:
    if not raw:
        return torch.UntypedStorage(0)
    return torch.frombuffer(raw, dtype=torch.uint8).untyped_storage()


# ------------------------------------------------------------------ running the unpickler


class _Damaged(Exception):
    """The stream is not a sound pickle of tensors (as opposed to one that asks for code)."""


def _unpickle(
    source: bytes | bytearray | _Capped,
    storage: Callable[[str, int, int], torch.UntypedStorage],
    label: str,
    *,
    legacy: bool = False,
) -> Any:
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        result = RestrictedUnpickler(stream, storage, legacy=legacy).load()
        _check_values(result)
        return result
    except _Refused as refused:
        raise _unsafe(label, refused, source) from None
    except _Damaged as exc:
        raise LoadError(f"{label}: damaged torch.save data ({exc})") from None
    except Exception as exc:  # any failure of a hostile or broken stream is a damaged file
        raise LoadError(f"{label}: damaged pickle ({first_line(exc)})") from None


def _unsafe(label: str, refused: _Refused, source: Any) -> UnsafePickleError:
    names = (refused.name,) if refused.name else ()
    error = UnsafePickleError(
        f"{label} holds pickled Python objects, not just tensors: loading it would run code "
        f"from the file ({refused.what}); nothing from it was run",
        references=names,
    )
    if isinstance(source, (bytes, bytearray)):
        return _unsafe_with(error, label, source)
    return error


def _unsafe_with(error: UnsafePickleError, label: str, data: bytes) -> UnsafePickleError:
    """``error`` naming every refused global of ``data`` (read from its opcodes)."""
    names = list(dict.fromkeys([*error.references, *refused_globals(data)]))
    if not names:
        return error
    shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return UnsafePickleError(
        f"{label} holds pickled Python objects, not just tensors: loading it would run code "
        f"from the file (it references {shown}); nothing from it was run",
        references=tuple(names),
    )


def _check_values(value: Any) -> None:
    """Refuse more than ``MAX_VALUES`` values counted with repetition (cycles never end)."""
    stack = [value]
    seen = 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise _Damaged(f"more than {MAX_VALUES} values, or a cyclic structure")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)


# ------------------------------------------------------------------ the unpickler


class _Dispatch(dict):
    def __missing__(self, code: int) -> Callable:
        raise _Refused(f"pickle opcode {bytes([code])!r}, which a weights-only load refuses")


_PLAIN_OPCODES = (
    "MARK",
    "STOP",
    "POP",
    "POP_MARK",
    "DUP",
    "FLOAT",
    "INT",
    "BININT",
    "BININT1",
    "LONG",
    "BININT2",
    "NONE",
    "PERSID",
    "BINPERSID",
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "DICT",
    "EMPTY_DICT",
    "GET",
    "BINGET",
    "LONG_BINGET",
    "LIST",
    "EMPTY_LIST",
    "PUT",
    "BINPUT",
    "LONG_BINPUT",
    "TUPLE",
    "EMPTY_TUPLE",
    "BINFLOAT",
    "PROTO",
    "TUPLE1",
    "TUPLE2",
    "TUPLE3",
    "NEWTRUE",
    "NEWFALSE",
    "LONG1",
    "LONG4",
    "BINBYTES",
    "SHORT_BINBYTES",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
    "BINBYTES8",
    "EMPTY_SET",
    "FROZENSET",
    "MEMOIZE",
    "FRAME",
    "BYTEARRAY8",
    "GLOBAL",
    "STACK_GLOBAL",
)


class RestrictedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Weights-only unpickling (see the module docstring) over a binary stream.

    ``storage(key, numel, element_size)`` returns a persistent storage of the file; ``legacy``
    selects the storage id layout of the legacy (non-zip) ``torch.save`` format.
    """

    dispatch = _Dispatch(
        {
            getattr(pickle, name)[0]: pickle._Unpickler.dispatch[getattr(pickle, name)[0]]
            for name in _PLAIN_OPCODES
        }
    )

    def __init__(
        self,
        stream: Any,
        storage: Callable[[str, int, int], torch.UntypedStorage],
        *,
        legacy: bool = False,
    ) -> None:
        super().__init__(stream, encoding="utf-8")
        self._storage = storage
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        allowed = _allowed_globals()
        if qualified not in allowed:
            raise _Refused(f"it references {qualified}", qualified)
        return allowed[qualified]

    def persistent_load(self, pid: Any) -> _Storage:
        size = 6 if self._legacy else 5
        if not isinstance(pid, tuple) or len(pid) != size or _text(pid[0]) != "storage":
            raise _Damaged(f"unexpected persistent id {str(pid)[:60]!r}")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType) or not isinstance(location, (str, bytes)):
            raise _Damaged("a storage of an unknown type")
        if not _is_int(numel) or numel < 0 or (self._legacy and pid[5] is not None):
            raise _Damaged("a storage with a bad size")
        untyped = self._storage(str(_text(key)), numel, _element_size(storage_type.dtype))
        return _Storage(untyped, storage_type.dtype)

    def load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        if not _is_callable_allowed(func) or not isinstance(args, tuple):
            raise _Refused(f"it calls {_describe(func)}, which a weights-only load refuses")
        stack[-1] = func(*args)

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if (
            type(inst) is not OrderedDict
            or not isinstance(state, dict)
            or set(state) - {"_metadata"}
            or not isinstance(state.get("_metadata", {}), dict)
        ):
            raise _Refused(
                f"it sets the state of {_describe(inst)}, which a weights-only load refuses"
            )
        if "_metadata" in state:
            inst._metadata = state["_metadata"]  # type: ignore[attr-defined]

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        _target(self.stack[-1], dict)[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = _target(self.stack[-1], dict)
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def load_append(self) -> None:
        value = self.stack.pop()
        _target(self.stack[-1], list).append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        _target(self.stack[-1], list).extend(items)

    def load_additems(self) -> None:
        items = self.pop_mark()
        _target(self.stack[-1], set).update(items)

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.ADDITEMS[0]] = load_additems


def _target(value: Any, kind: type) -> Any:
    if type(value) is kind or (kind is dict and type(value) is OrderedDict):
        return value
    raise _Damaged(f"a pickle opcode fills a {type(value).__name__}, not a {kind.__name__}")


def _text(value: Any) -> Any:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _describe(value: Any) -> str:
    if isinstance(value, (_StorageType, torch.dtype)):
        return str(value)
    return getattr(value, "__qualname__", type(value).__name__)


# ------------------------------------------------------------------ what a pickle may build


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"storage type {self.dtype}"


@dataclass(frozen=True)
class _Storage:
    untyped: torch.UntypedStorage
    dtype: torch.dtype


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    metadata: Any = None,
) -> torch.Tensor:
    dtype = storage.dtype if isinstance(storage, _Storage) else None
    return _tensor(storage, dtype, offset, size, stride, requires_grad, hooks, metadata)


def _rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> torch.Tensor:
    return _tensor(storage, dtype, offset, size, stride, requires_grad, hooks, metadata)


def _tensor(
    storage: Any,
    dtype: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    metadata: Any,
) -> torch.Tensor:
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise _Damaged("a tensor without a storage of the file")
    if not isinstance(requires_grad, bool) or not _no_hooks(hooks) or not _metadata_ok(metadata):
        raise _Damaged("a tensor with hooks or unknown metadata")
    size, stride = _dims(size), _dims(stride)
    if not _is_int(offset) or offset < 0 or len(size) != len(stride):
        raise _Damaged("a tensor with a bad offset or shape")
    capacity = storage.untyped.nbytes() // _element_size(dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if math.prod(size) and last >= capacity:
        raise _Damaged(f"a tensor of size {list(size)} reaches past its storage")
    tensor = torch.empty((0,), dtype=dtype)
    tensor.set_(storage.untyped, offset, size, stride)
    if requires_grad:
        tensor.requires_grad_(True)
    if metadata:
        torch._utils.set_tensor_metadata(tensor, metadata)
    return tensor


def _dims(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_DIMS:
        raise _Damaged("a tensor with a bad shape")
    if not all(_is_int(n) and n >= 0 for n in value):
        raise _Damaged("a tensor with a bad shape")
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
        raise _Damaged("a parameter without a tensor")
    if not _no_hooks(hooks):
        raise _Damaged("a parameter with hooks")
    return torch.nn.Parameter(data, requires_grad)


def _ordered_dict(*args: Any) -> OrderedDict:
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, dict))):
        raise _Damaged("a bad OrderedDict")
    return OrderedDict(*args)


def _device(*args: Any) -> torch.device:
    if (
        not args
        or len(args) > 2
        or not isinstance(args[0], str)
        or (len(args) == 2 and not _is_int(args[1]))
    ):
        raise _Damaged("a bad device")
    return torch.device(*args)


def _size(*args: Any) -> torch.Size:
    if len(args) > 1 or (args and not all(_is_int(n) for n in args[0])):
        raise _Damaged("a bad torch.Size")
    return torch.Size(*args)


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
        raise _Damaged("bad bytes")
    return text.encode(encoding)


def _set(items: Any = ()) -> set:
    return set(_plain_items(items))


def _frozenset(items: Any = ()) -> frozenset:
    return frozenset(_plain_items(items))


def _bytearray(data: Any = b"") -> bytearray:
    if not isinstance(data, bytes):
        raise _Damaged("a bad bytearray")
    return bytearray(data)


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (real, imag)):
        raise _Damaged("a bad complex number")
    return complex(real, imag)


def _plain_items(items: Any) -> Any:
    if not isinstance(items, (list, tuple)):
        raise _Damaged("a set of something other than a list")
    return items


_CALLABLES = (
    _rebuild_tensor_v2,
    _rebuild_tensor_v3,
    _rebuild_parameter,
    _ordered_dict,
    _device,
    _size,
    _encode,
    _set,
    _frozenset,
    _bytearray,
    _complex,
)


def _is_callable_allowed(func: Any) -> bool:
    return any(func is allowed for allowed in _CALLABLES)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _element_size(dtype: torch.dtype) -> int:
    return torch._utils._element_size(dtype)


@lru_cache(maxsize=1)
def _allowed_globals() -> dict[str, Any]:
    """``module.name`` -> the object a pickle gets for it (checked functions, types, dtypes)."""
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
        "torch.storage.UntypedStorage": _StorageType(torch.uint8),
        "torch.UntypedStorage": _StorageType(torch.uint8),
    }
    for dtype, storage_name in torch.storage._dtype_to_storage_type_map().items():
        table[f"torch.{storage_name}"] = _StorageType(dtype)
    for name, value in vars(torch).items():
        if isinstance(value, torch.dtype):
            table[f"torch.{name}"] = value
    return table


# ------------------------------------------------------------------ scanning opcodes


def _scan_one_pickle(stream: io.BytesIO, found: list[str]) -> bool:
    """Append the globals of the next pickle in ``stream``; False when none could be read."""
    strings: list[str] = []
    memo: dict[int, str] = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):
                found.append(_global_name(*str(arg).split(" ", 1)))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(_global_name(strings[-2], strings[-1]))
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


def _global_name(module: str, name: str) -> str:
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"
