"""The weights and constants of a ``.pt2``: config entries checked, tensors rebuilt from raw
payload bytes (``data/weights/weight_N``, ``data/constants/tensor_N``), never unpickled."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import BnfoldError, LoadError, UnsafeFileError
from bnfold.io.archive import ZipArchive
from bnfold.io.pickle_globals import is_int, view_extent

PAYLOAD_MEMBER = re.compile(r"^data/(weights/weight|constants/tensor)_[0-9]+$")
OBJECT_MEMBER = re.compile(r"^data/constants/(custom_obj|opaque_obj)_[0-9]+$")


@dataclass(frozen=True)
class Entry:
    """One config entry: a tensor ``fqn`` viewing raw payload ``member`` as its metadata says."""

    fqn: str
    member: str
    is_param: bool
    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int
    requires_grad: bool
    device: torch.device

    @property
    def extent(self) -> int:
        """Elements of the payload this view reaches (0 for an empty tensor)."""
        return view_extent(self.sizes, self.strides, self.offset)


def config_entries(document: Any, member: str, payloads: frozenset[str], path: Path) -> list[Entry]:
    """The checked entries of a payload config (``member``, parsed); ``payloads`` are the
    archive's payload members. ``UnsafeFileError`` for a pickled entry."""
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        raise LoadError(f"{path}: damaged torch.export archive ({member} has no config)")
    folder = member.rsplit("/", 1)[0] + "/"
    prefix = "weight_" if folder.endswith("/weights/") else "tensor_"
    entries = [_entry(path, member, folder, prefix, fqn, meta) for fqn, meta in config.items()]
    for entry in entries:
        if entry.member not in payloads:
            raise LoadError(f"{path}: {member} names {entry.member}, which the archive lacks")
    return entries


def _entry(path: Path, member: str, folder: str, prefix: str, fqn: str, meta: Any) -> Entry:
    def bad(what: str) -> LoadError:
        return LoadError(f"{path}: damaged torch.export archive ({member}, '{fqn}': {what})")

    if not isinstance(meta, dict):
        raise bad("not an object")
    name = meta.get("path_name")
    if not isinstance(name, str) or not isinstance(meta.get("use_pickle"), bool):
        raise bad("no payload name or use_pickle flag")
    if meta["use_pickle"] or OBJECT_MEMBER.match(f"data/constants/{name}"):
        raise UnsafeFileError(
            f"{path}: the entry '{fqn}' is stored as a pickled Python object; "
            "torch.export.load would unpickle it, which runs code from the file. "
            "Refusing it. If you trust the file, load it yourself and re-save the program "
            "with plain tensor weights and constants."
        )
    if not re.fullmatch(re.escape(prefix) + "[0-9]+", name):
        raise bad(f"payload name {name[:40]!r}")
    tensor_meta = meta.get("tensor_meta")
    if not isinstance(tensor_meta, dict) or not isinstance(meta.get("is_param"), bool):
        raise bad("no tensor metadata")
    return _tensor_entry(fqn, folder + name, meta["is_param"], tensor_meta, bad)


def _tensor_entry(fqn: str, member: str, is_param: bool, meta: dict, bad: Any) -> Entry:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta.get("dtype")) if is_int(meta.get("dtype")) else None
    if dtype is None or meta.get("layout") != 7:  # schema.Layout.Strided
        raise bad("an unknown dtype or a layout other than strided")
    sizes, strides = _ints(meta.get("sizes"), bad), _ints(meta.get("strides"), bad)
    (offset,) = _ints([meta.get("storage_offset")], bad)
    if len(sizes) != len(strides) or len(sizes) > 64:
        raise bad("sizes and strides do not match")
    device = meta.get("device")
    if not isinstance(device, dict) or not isinstance(device.get("type"), str):
        raise bad("no device")
    if not isinstance(meta.get("requires_grad"), bool):
        raise bad("requires_grad is not a boolean")
    try:
        where = torch.device(device["type"], device.get("index"))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise bad(f"device {device!r} ({exc})") from None
    return Entry(
        fqn=fqn,
        member=member,
        is_param=is_param,
        dtype=dtype,
        sizes=sizes,
        strides=strides,
        offset=offset,
        requires_grad=meta["requires_grad"],
        device=where,
    )


def _ints(values: Any, bad: Any) -> tuple[int, ...]:
    if not isinstance(values, list):
        raise bad("sizes are not a list")
    out = []
    for value in values:
        number = value.get("as_int") if isinstance(value, dict) and len(value) == 1 else None
        if not is_int(number) or number < 0:
            raise bad(f"{str(value)[:40]} is not a plain non-negative integer")
        out.append(number)
    return tuple(out)


def payload_tensors(
    archive: ZipArchive, entries: list[Entry], path: Path, member: str
) -> dict[str, torch.Tensor]:
    """The tensors of ``entries`` (from config ``member``) by fully-qualified name, viewing
    their raw payloads as ``torch.export.load`` builds them."""
    flats: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    try:
        for entry in entries:
            if entry.member not in flats:
                flats[entry.member] = _flat(archive.read(entry.member), entry)
            view = torch.as_strided(flats[entry.member], entry.sizes, entry.strides, entry.offset)
            if entry.is_param:
                view = torch.nn.Parameter(view, requires_grad=entry.requires_grad)
            tensors[entry.fqn] = view
    except BnfoldError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        raise LoadError(f"{path}: cannot rebuild the tensors of {member}: {exc}") from None
    return tensors


def _flat(raw: bytearray, entry: Entry) -> torch.Tensor:
    if raw:
        flat = torch.frombuffer(raw, dtype=entry.dtype)
    else:
        flat = torch.empty(0, dtype=entry.dtype)
    if entry.requires_grad:
        flat.requires_grad_(True)
    return flat if entry.device.type == "cpu" else flat.to(entry.device)
