"""Zip archives (``.pt2`` programs, ``torch.save`` files) read with bounded memory.

``ZipArchive`` parses the central directory itself and checks every member (the limits and
rules in the README's "Model files and their security") before a byte of it is decompressed;
``read`` streams a member with a byte cap and checks its size and CRC. Every problem is a
``LoadError`` whose one-line message names the file and what is wrong.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bnfold.errors import LoadError

MIB = 1 << 20
MAX_MEMBERS = 10_000
MAX_DIRECTORY_BYTES = 16 * MIB
MAX_RATIO = 100
RATIO_ALLOWANCE = 1 * MIB
CHUNK = 1 * MIB

_STORED, _DEFLATED = 0, 8
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")
_LOCAL = struct.Struct("<4s5H3L2H")
_SATURATED_32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Member:
    """One member of an archive, as its headers declare it (checked, not yet read)."""

    name: str
    size: int  # uncompressed bytes
    compressed_size: int
    method: int  # 0 stored, 8 deflate
    crc: int
    data_offset: int  # where its compressed bytes start in the file


class ZipArchive:
    """A checked zip archive over an open binary file; ``read`` streams one member.

    ``label`` names the archive in error messages (a path, or "path: member" for a nested
    archive); ``open_zip`` opens a file as one.
    """

    def __init__(self, handle: BinaryIO, size: int, label: str) -> None:
        self._handle = handle
        self.label = label
        self.members: dict[str, Member] = _read_directory(handle, size, label)

    def read(self, name: str, *, limit: int | None = None, what: str = "member") -> bytearray:
        """The bytes of member ``name``, at most ``limit`` of them (else ``LoadError``)."""
        member = self.members.get(name)
        if member is None:
            raise LoadError(f"{self.label}: the archive has no {name}")
        if limit is not None and member.size > limit:
            raise LoadError(
                f"{self.label}: {what} {name} is {member.size} bytes, more than the "
                f"{limit} bytes bnfold allows for it; refusing the file"
            )
        self._handle.seek(member.data_offset)
        if member.method == _STORED:
            data, crc = _read_stored(self._handle, member.size)
        else:
            data, crc = _read_deflated(self._handle, member, self.label)
        if len(data) != member.size:
            raise _damaged(self.label, f"{name} ends after {len(data)} of {member.size} bytes")
        if crc != member.crc:
            raise _damaged(self.label, f"{name} fails its CRC check (its bytes were changed)")
        return data


@contextmanager
def open_zip(path: Path) -> Iterator[ZipArchive]:
    """Open ``path`` as a checked ``ZipArchive`` (``LoadError`` if it is not a sound one)."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise LoadError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    with handle:
        yield ZipArchive(handle, os.fstat(handle.fileno()).st_size, str(path))


def _damaged(label: str, what: str) -> LoadError:
    return LoadError(f"{label}: damaged zip archive: {what}")


def _read_stored(handle: BinaryIO, size: int) -> tuple[bytearray, int]:
    data = bytearray(size)
    got = handle.readinto(data)  # a buffered or in-memory file fills it unless it ends first
    return (data, zlib.crc32(data)) if got == size else (data[:got], 0)


def _read_deflated(handle: BinaryIO, member: Member, label: str) -> tuple[bytearray, int]:
    inflater = zlib.decompressobj(-15)
    out = bytearray()
    crc = 0
    left = member.compressed_size
    pending = b""
    while not inflater.eof:
        if not pending:
            if left <= 0:
                break
            pending = handle.read(min(CHUNK, left))
            if not pending:
                break
            left -= len(pending)
        try:
            piece = inflater.decompress(pending, member.size - len(out) + 1)
        except zlib.error as exc:
            raise _damaged(label, f"{member.name} does not inflate ({exc})") from None
        pending = inflater.unconsumed_tail
        if len(out) + len(piece) > member.size:
            what = f"{member.name} inflates past the {member.size} bytes its header declares"
            raise _damaged(label, what + "; refusing the file")
        crc = zlib.crc32(piece, crc)
        out += piece
    return out, crc


@dataclass(frozen=True)
class _Directory:
    offset: int
    size: int
    entries: int


def _read_directory(handle: BinaryIO, file_size: int, label: str) -> dict[str, Member]:
    directory = _find_directory(handle, file_size, label)
    handle.seek(directory.offset)
    raw = handle.read(directory.size)
    if len(raw) != directory.size:
        raise _damaged(label, "the central directory is cut short")
    members: dict[str, Member] = {}
    spans: list[tuple[int, int, str]] = []
    position = 0
    for _ in range(directory.entries):
        central, position = _central_entry(raw, position, label)
        member = _check_local(handle, central, directory.offset, label)
        name = member.name
        if name in members:
            raise LoadError(
                f"{label}: the archive holds two members named {name}; a reader could pick "
                "either, so bnfold refuses it"
            )
        members[name] = member
        spans.append((central.offset, member.data_offset + member.compressed_size, name))
    if position != directory.size:
        raise _damaged(label, "the central directory does not match its count")
    _check_spans(spans, directory.offset, label)
    _check_inflation(members, label)
    return members


def _find_directory(handle: BinaryIO, file_size: int, label: str) -> _Directory:
    tail_size = min(file_size, _EOCD.size + 0xFFFF)
    handle.seek(file_size - tail_size)
    tail = handle.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    while at >= 0 and at + _EOCD.size + _comment_length(tail, at) != len(tail):
        at = tail.rfind(b"PK\x05\x06", 0, at)
    if at < 0:
        raise LoadError(
            f"{label}: not a complete zip archive (no end-of-directory record; the file may be "
            "truncated)"
        )
    _, disk, cd_disk, _, entries, size, offset, _ = _EOCD.unpack_from(tail, at)
    end = file_size - tail_size + at
    locator_at = end - _ZIP64_LOCATOR.size
    if locator_at >= 0:
        handle.seek(locator_at)
        locator = handle.read(_ZIP64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":
            entries, size, offset, end = _zip64_directory(handle, locator, locator_at, label)
    if disk or cd_disk:
        raise LoadError(f"{label}: multi-disk zip archives are not supported")
    if entries > MAX_MEMBERS:
        raise LoadError(
            f"{label}: the archive declares {entries} members, more than the {MAX_MEMBERS} "
            "bnfold reads; refusing it"
        )
    if size > MAX_DIRECTORY_BYTES:
        raise LoadError(
            f"{label}: the archive's central directory is {size} bytes, more than the "
            f"{MAX_DIRECTORY_BYTES} bnfold reads; refusing it"
        )
    if offset + size != end:
        what = "the central directory's size and offset do not match where it ends"
        raise _damaged(label, what + " (the file may be truncated or have bytes inserted)")
    return _Directory(offset=offset, size=size, entries=entries)


def _comment_length(tail: bytes, at: int) -> int:
    if at + _EOCD.size > len(tail):
        return 1 << 30  # no room for the record: not it
    return _EOCD.unpack_from(tail, at)[-1]


def _zip64_directory(
    handle: BinaryIO, locator: bytes, locator_at: int, label: str
) -> tuple[int, int, int, int]:
    _, _, record_at, _ = _ZIP64_LOCATOR.unpack(locator)
    if record_at + _ZIP64_EOCD.size > locator_at:
        raise _damaged(label, "bad zip64 end-of-directory locator")
    handle.seek(record_at)
    record = handle.read(_ZIP64_EOCD.size)
    fields = _ZIP64_EOCD.unpack(record)
    if fields[0] != b"PK\x06\x06" or fields[4] or fields[5] or fields[6] != fields[7]:
        raise _damaged(label, "bad zip64 end-of-directory record")
    return fields[7], fields[8], fields[9], record_at


@dataclass(frozen=True)
class _Central:
    name_bytes: bytes
    name: str
    flags: int
    method: int
    crc: int
    compressed_size: int
    size: int
    offset: int


def _central_entry(raw: bytes, position: int, label: str) -> tuple[_Central, int]:
    if position + _CENTRAL.size > len(raw) or raw[position : position + 4] != b"PK\x01\x02":
        raise _damaged(label, "bad central directory entry")
    fields = _CENTRAL.unpack_from(raw, position)
    flags, method, crc, compressed, size = fields[3], fields[4], fields[7], fields[8], fields[9]
    name_len, extra_len, comment_len, disk = fields[10:14]
    offset = fields[16]
    start = position + _CENTRAL.size
    end = start + name_len + extra_len + comment_len
    if end > len(raw) or disk not in (0, 0xFFFF):
        raise _damaged(label, "bad central directory entry")
    name_bytes = raw[start : start + name_len]
    extra = raw[start + name_len : start + name_len + extra_len]
    size, compressed, offset = _zip64_sizes(extra, size, compressed, offset, label)
    try:
        name = name_bytes.decode("utf-8" if flags & 0x800 else "cp437")
    except UnicodeDecodeError:
        raise _damaged(label, "a member name is not text") from None
    return _Central(name_bytes, name, flags, method, crc, compressed, size, offset), end


def _zip64_sizes(
    extra: bytes, size: int, compressed: int, offset: int, label: str
) -> tuple[int, int, int]:
    wanted = [value == _SATURATED_32 for value in (size, compressed, offset)]
    if not any(wanted):
        return size, compressed, offset
    position = 0
    while position + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, position)
        body = extra[position + 4 : position + 4 + length]
        if tag == 1:
            values = iter(struct.unpack_from(f"<{len(body) // 8}Q", body))
            try:
                size = next(values) if wanted[0] else size
                compressed = next(values) if wanted[1] else compressed
                offset = next(values) if wanted[2] else offset
            except StopIteration:
                break
            return size, compressed, offset
        position += 4 + length
    raise _damaged(label, "a zip64 member lacks its sizes")


def _check_local(handle: BinaryIO, central: _Central, directory_offset: int, label: str) -> Member:
    name = central.name
    if central.flags & 0x1:
        raise LoadError(f"{label}: member {name} is encrypted; bnfold reads plain archives only")
    if central.method not in (_STORED, _DEFLATED):
        raise LoadError(
            f"{label}: member {name} uses compression method {central.method}; bnfold reads "
            "stored or deflated members only (torch.export.save and torch.save store them)"
        )
    if central.method == _STORED and central.size != central.compressed_size:
        what = f"stored member {name} declares {central.size} bytes"
        raise _damaged(label, f"{what} but occupies {central.compressed_size}")
    if central.offset + _LOCAL.size > directory_offset:
        raise _damaged(label, f"member {name} starts past its data area")
    handle.seek(central.offset)
    header = handle.read(_LOCAL.size)
    fields = _LOCAL.unpack(header)
    local_name = handle.read(fields[9])
    if fields[0] != b"PK\x03\x04" or local_name != central.name_bytes:
        raise _damaged(label, f"the local header of {name} does not match the central directory")
    if fields[3] != central.method or not _local_sizes_agree(fields, central):
        what = f"the headers of {name} disagree about its sizes or compression"
        raise _damaged(label, what + " (a lying header); refusing the file")
    data_offset = central.offset + _LOCAL.size + fields[9] + fields[10]
    if data_offset + central.compressed_size > directory_offset:
        raise _damaged(
            label,
            f"member {name} claims {central.compressed_size} bytes, past the end of the "
            "archive's data (the file is truncated or its header lies); refusing it",
        )
    return Member(
        name=name,
        size=central.size,
        compressed_size=central.compressed_size,
        method=central.method,
        crc=central.crc,
        data_offset=data_offset,
    )


def _local_sizes_agree(fields: tuple, central: _Central) -> bool:
    if fields[2] & 0x8:  # sizes follow the data (a data descriptor): the central ones rule
        return True
    crc, compressed, size = fields[6], fields[7], fields[8]
    if _SATURATED_32 in (compressed, size):  # zip64: the sizes live in the local extra field
        return crc == central.crc
    return (crc, compressed, size) == (central.crc, central.compressed_size, central.size)


def _check_spans(spans: list[tuple[int, int, str]], directory_offset: int, label: str) -> None:
    previous_end, previous = 0, None
    for start, end, name in sorted(spans):
        if start < previous_end:
            raise LoadError(
                f"{label}: members {previous} and {name} overlap in the file (a zip bomb "
                "shape); refusing it"
            )
        previous_end, previous = end, name
    if previous_end > directory_offset:
        raise _damaged(label, "member data runs into the directory")


def _check_inflation(members: dict[str, Member], label: str) -> None:
    deflated = [m for m in members.values() if m.method == _DEFLATED]
    inflated = sum(m.size for m in deflated)
    allowed = MAX_RATIO * sum(m.compressed_size for m in deflated) + RATIO_ALLOWANCE
    if inflated > allowed:
        largest = max(deflated, key=lambda m: m.size)
        raise LoadError(
            f"{label}: compressed members would inflate to {inflated} bytes (e.g. "
            f"{largest.name}: {largest.compressed_size} -> {largest.size}), more than "
            f"{MAX_RATIO} times their compressed size; refusing a possible zip bomb"
        )
