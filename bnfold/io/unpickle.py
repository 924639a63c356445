"""``torch.save`` files read by bnfold's own restricted unpickler, with weights-only semantics.

torch's loaders retry a pickle that a weights-only load refuses with ``weights_only=False``, so
every pickle bnfold reads (README, "Model files and their security") goes through
``RestrictedUnpickler``: the pure-Python ``pickle._Unpickler`` with its opcode table replaced.
Globals come only from ``bnfold.io.pickle_globals.ALLOWED_GLOBALS``; storages only from the file
itself, each exactly as long as declared; at most ``MAX_VALUES`` values counted with repetition.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bnfold.errors import LoadError, UnsafePickleError, first_line
from bnfold.io.archive import MIB, ZipArchive, open_zip
from bnfold.io.pickle_globals import (
    ALLOWED_GLOBALS,
    CONSTRUCTORS,
    DamagedPickle,
    Storage,
    StorageType,
    global_name,
    is_int,
    refused_globals,
)

MAX_PICKLE_BYTES = 64 * MIB
MAX_VALUES = 1_000_000
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

StorageSource = Callable[[str, int, int], torch.UntypedStorage]  # (key, numel, element size)


class _Refused(Exception):
    """The pickle asks for something a weights-only load refuses (``name``: the global, if one)."""

    def __init__(self, what: str, name: str | None = None) -> None:
        super().__init__(what)
        self.name = name


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
        return _load_zip(ZipArchive(io.BytesIO(data), len(data), label), label)
    return _load_legacy(io.BytesIO(data), len(data), label)


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
            raw = archive.read(f"{root}data/{key}")
            if len(raw) != nbytes:
                raise DamagedPickle(f"storage {key} holds {len(raw)} bytes, not {nbytes}")
            storages[key] = _untyped(raw)
        elif storages[key].nbytes() != nbytes:
            raise DamagedPickle(f"storage {key} is declared with two sizes")
        return storages[key]

    return _unpickle(data, storage, label)


def _load_legacy(handle: BinaryIO, size: int, label: str) -> Any:
    stream = _Capped(handle, size)
    header = [_unpickle(stream, _no_storage, label) for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
        raise LoadError(f"{label}: not a torch.save file")
    if not isinstance(header[2], dict) or header[2].get("little_endian") is not True:
        raise LoadError(f"{label}: not a little-endian torch.save file; bnfold cannot read it")
    storages = _LegacyStorages(size)
    result = _unpickle(stream, storages.get, label, legacy=True)
    keys = _unpickle(stream, _no_storage, label)
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
                raise DamagedPickle("its storages declare more bytes than the file holds")
            self._buffers[key] = bytearray(nbytes)
        if len(self._buffers[key]) != nbytes:
            raise DamagedPickle(f"storage {key} is declared with two sizes")
        return _untyped(self._buffers[key])

    def fill(self, stream: _Capped, keys: Any, label: str) -> None:
        def damaged(what: str) -> LoadError:
            return LoadError(f"{label}: damaged torch.save file ({what})")

        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(self._buffers):
            raise damaged("its storage list does not match")
        for key in map(str, keys):
            buffer = self._buffers[key]
            count = stream.read(8)
            if len(count) != 8:
                raise damaged(f"cut short at storage {key}")
            if struct.unpack("<q", count)[0] * self._sizes[key] != len(buffer):
                raise damaged(f"storage {key}: bad size")
            if stream.readinto(buffer) != len(buffer):
                raise damaged(f"storage {key} is cut short")


def _no_storage(key: str, numel: int, element_size: int) -> torch.UntypedStorage:
    raise DamagedPickle("a storage where none belongs")


class _Capped:
    """A read-only view of the first ``size`` bytes of ``handle`` that never reads past them."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self._handle = handle
        self._start = handle.tell()
        self._size = size
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
        got = self._handle.readinto(memoryview(buffer)[: self._left])
        self._left -= got
        return got

    def head(self) -> bytes:
        """The view's first ``MAX_PICKLE_BYTES`` bytes (to name what a refused pickle holds)."""
        self._handle.seek(self._start)
        return self._handle.read(min(self._size, MAX_PICKLE_BYTES))


def _untyped(raw: bytearray) -> torch.UntypedStorage:
    if not raw:
        return torch.UntypedStorage(0)
    return torch.frombuffer(raw, dtype=torch.uint8).untyped_storage()


def _unpickle(
    source: bytes | bytearray | _Capped, storage: StorageSource, label: str, *, legacy: bool = False
) -> Any:
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        result = RestrictedUnpickler(stream, storage, legacy=legacy).load()
        _check_values(result)
        return result
    except _Refused as refused:
        data = source.head() if isinstance(source, _Capped) else source
        raise _unsafe(label, refused, data) from None
    except DamagedPickle as exc:
        raise LoadError(f"{label}: damaged torch.save data ({exc})") from None
    except Exception as exc:  # any failure of a hostile or broken stream is a damaged file
        raise LoadError(f"{label}: damaged pickle ({first_line(exc)})") from None


def _unsafe(label: str, refused: _Refused, data: bytes | bytearray) -> UnsafePickleError:
    """The error for a refused pickle, naming every refused global ``data`` references."""
    names = list(dict.fromkeys([*([refused.name] if refused.name else []), *refused_globals(data)]))
    what = str(refused)
    if names:
        what = "it references " + ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
    return UnsafePickleError(
        f"{label} holds pickled Python objects, not just tensors: loading it would run code "
        f"from the file ({what}); nothing from it was run",
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
            raise DamagedPickle(f"more than {MAX_VALUES} values, or a cyclic structure")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)


class _Dispatch(dict):
    def __missing__(self, code: int) -> Callable:
        raise _Refused(f"pickle opcode {bytes([code])!r}, which a weights-only load refuses")


#: Opcodes run as pickle runs them: they push plain values, build tuples and containers from
#: the stack, use the memo, or look up a global (through ``find_class``). Any other is refused.
_PLAIN_OPCODES = """
    MARK STOP POP POP_MARK DUP FLOAT INT BININT BININT1 LONG BININT2 NONE PERSID BINPERSID
    STRING BINSTRING SHORT_BINSTRING UNICODE BINUNICODE DICT EMPTY_DICT GET BINGET LONG_BINGET
    LIST EMPTY_LIST PUT BINPUT LONG_BINPUT TUPLE EMPTY_TUPLE BINFLOAT PROTO TUPLE1 TUPLE2 TUPLE3
    NEWTRUE NEWFALSE LONG1 LONG4 BINBYTES SHORT_BINBYTES SHORT_BINUNICODE BINUNICODE8 BINBYTES8
    EMPTY_SET FROZENSET MEMOIZE FRAME BYTEARRAY8 GLOBAL STACK_GLOBAL
""".split()


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

    def __init__(self, stream: Any, storage: StorageSource, *, legacy: bool = False) -> None:
        super().__init__(stream, encoding="utf-8")
        self._storage = storage
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        qualified = global_name(module, name)
        if qualified not in ALLOWED_GLOBALS:
            raise _Refused(f"it references {qualified}", qualified)
        return ALLOWED_GLOBALS[qualified]

    def persistent_load(self, pid: Any) -> Storage:
        size = 6 if self._legacy else 5
        if not isinstance(pid, tuple) or len(pid) != size or _text(pid[0]) != "storage":
            raise DamagedPickle(f"unexpected persistent id {str(pid)[:60]!r}")
        storage_type, key, location, numel = pid[1:5]
        if not isinstance(storage_type, StorageType) or not isinstance(location, (str, bytes)):
            raise DamagedPickle("a storage of an unknown type")
        if not is_int(numel) or numel < 0 or (self._legacy and pid[5] is not None):
            raise DamagedPickle("a storage with a bad size")
        untyped = self._storage(str(_text(key)), numel, storage_type.dtype.itemsize)
        return Storage(untyped, storage_type.dtype)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is allowed for allowed in CONSTRUCTORS) or not isinstance(args, tuple):
            raise _Refused(f"it calls {_describe(func)}, which a weights-only load refuses")
        self.stack[-1] = func(*args)

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
    raise DamagedPickle(f"a pickle opcode fills a {type(value).__name__}, not a {kind.__name__}")


def _text(value: Any) -> Any:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _describe(value: Any) -> str:
    if isinstance(value, (StorageType, torch.dtype)):
        return str(value)
    return getattr(value, "__qualname__", type(value).__name__)
