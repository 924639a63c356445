"""Hostile model files for the safe-loading tests, built from a real ``.pt2`` in the test.

``zip_bytes`` writes a zip archive member by member with every header field under the test's
control (sizes that lie, duplicate names, members inside other members), ``HOSTILE_PT2``
holds the table of crafted ``.pt2`` files (each a function of the clean archive's members and
a marker path), and ``pickles`` gives a payload that creates the marker in every container and
pickle protocol 0-5. A loader that runs code from a file leaves the marker behind.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from model_files import MarkerOnLoad

MIB = 1 << 20
PROTOCOLS = range(6)
CONTAINERS = ("raw", "torch.save", "legacy")


@dataclass(frozen=True)
class Entry:
    """One zip member: its name and bytes, and what the headers claim (defaults: the truth)."""

    name: str
    raw: bytes
    method: int = 0  # 0 stored, 8 deflate
    data: bytes | None = None  # the bytes written (default: raw, deflated if method 8)
    size: int | None = None  # declared uncompressed size
    compressed: int | None = None  # declared compressed size
    crc: int | None = None
    local_size: int | None = None  # uncompressed size in the local header

    def payload(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.method == 8:
            packer = zlib.compressobj(9, zlib.DEFLATED, -15)
            return packer.compress(self.raw) + packer.flush()
        return self.raw


def zip_bytes(entries: list[Entry]) -> bytes:
    """A zip archive of ``entries`` in order (no data descriptors, UTF-8 names)."""
    out = io.BytesIO()
    central = []
    for entry in entries:
        data = entry.payload()
        name = entry.name.encode()
        crc = zlib.crc32(entry.raw) if entry.crc is None else entry.crc
        size = len(entry.raw) if entry.size is None else entry.size
        compressed = len(data) if entry.compressed is None else entry.compressed
        local_size = size if entry.local_size is None else entry.local_size
        offset = out.tell()
        out.write(
            struct.pack(
                "<4s5H3L2H",
                b"PK\x03\x04",
                20,
                0x800,
                entry.method,
                0,
                0x21,
                crc,
                compressed,
                local_size,
                len(name),
                0,
            )
        )
        out.write(name + data)
        central.append(
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0x800,
                entry.method,
                0,
                0x21,
                crc,
                compressed,
                size,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
    start = out.tell()
    out.write(b"".join(central))
    out.write(
        struct.pack(
            "<4s4H2LH",
            b"PK\x05\x06",
            0,
            0,
            len(entries),
            len(entries),
            out.tell() - start,
            start,
            0,
        )
    )
    return out.getvalue()


def read_members(path: Path) -> list[Entry]:
    with zipfile.ZipFile(path) as archive:
        return [Entry(info.filename, archive.read(info)) for info in archive.infolist()]


def write(path: Path, entries: list[Entry]) -> Path:
    path.write_bytes(zip_bytes(entries))
    return path


# ------------------------------------------------------------------ pickled payloads


def pickles(marker: Path, container: str, protocol: int, value: object = None) -> bytes:
    """Bytes that create ``marker`` when unpickled: a bare pickle, a ``torch.save`` archive, or
    a legacy ``torch.save`` file, in pickle ``protocol``."""
    payload = {"x": MarkerOnLoad(marker)} if value is None else value
    if container == "raw":
        return pickle.dumps(payload, protocol=protocol)
    buffer = io.BytesIO()
    torch.save(
        payload,
        buffer,
        pickle_protocol=protocol,
        _use_new_zipfile_serialization=container == "torch.save",
    )
    return buffer.getvalue()


class InputsThatRunCode:
    """Unpickling this runs code and then returns valid ``(args, kwargs)`` example inputs."""

    def __init__(self, marker: Path, shape: tuple[int, ...]) -> None:
        self.code = (
            f"(open({str(marker)!r}, 'w').close(), "
            f"((__import__('torch').ones({shape!r}),), {{}}))[1]"
        )

    def __reduce__(self):
        return (eval, (self.code,))


# ------------------------------------------------------------------ editing a .pt2


def edit(entries: list[Entry], name_end: str, **changes) -> list[Entry]:
    """``entries`` with the member whose name ends with ``name_end`` changed."""
    hits = [e for e in entries if e.name.endswith(name_end)]
    assert len(hits) == 1, (name_end, [e.name for e in entries])
    return [replace(e, **changes) if e is hits[0] else e for e in entries]


def root(entries: list[Entry]) -> str:
    return entries[0].name.split("/", 1)[0] + "/"


def config(entries: list[Entry], kind: str) -> dict:
    (entry,) = [e for e in entries if e.name.endswith(f"{kind}_config.json")]
    return json.loads(entry.raw)


def set_config(entries: list[Entry], kind: str, document: dict) -> list[Entry]:
    return edit(entries, f"{kind}_config.json", raw=json.dumps(document).encode())


def flag_pickled(entries: list[Entry], kind: str, payload: bytes, path_name: str | None = None):
    """Mark the first ``kind`` (weights/constants) entry ``use_pickle`` (or point it at a
    ``path_name`` member) and put ``payload`` where torch would read it."""
    document = config(entries, kind)
    meta = next(iter(document["config"].values()))
    old = meta["path_name"]
    meta["use_pickle"] = path_name is None
    meta["path_name"] = path_name or old
    entries = set_config(entries, kind, document)
    folder = f"{root(entries)}data/{kind}/"
    entries = [e for e in entries if e.name != folder + (path_name or old)]
    return [*entries, Entry(folder + (path_name or old), payload)]


def legacy_state(entries: list[Entry], kind: str, payload: bytes) -> list[Entry]:
    """Replace the ``kind`` config and payloads by a legacy ``data/<kind>/model.pt``."""
    folder = f"{root(entries)}data/{kind}/"
    kept = [e for e in entries if not e.name.startswith(folder)]
    return [*kept, Entry(folder + "model.pt", payload)]


@lru_cache(maxsize=1)
def deflated_zeros(mib: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``mib`` MiB of zeros (about 1 KiB per MiB) and their CRC."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = packer.compress(bytes(MIB)) + packer.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    zeros = bytes(MIB)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return block * mib + packer.flush(), crc


def zeros_member(name: str, mib: int) -> Entry:
    data, crc = deflated_zeros(mib)
    return Entry(name, b"", method=8, data=data, size=mib * MIB, crc=crc)


def bomb_state_dict(mib: int) -> bytes:
    """A ``torch.save`` archive of one float tensor whose storage inflates to ``mib`` MiB."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1)}, buffer)
    entries = [
        Entry(info.filename, zipfile.ZipFile(buffer).read(info))
        for info in zipfile.ZipFile(buffer).infolist()
    ]
    pkl = next(e for e in entries if e.name.endswith("data.pkl"))
    numel = mib * MIB // 4
    # the pickle names storage '0' with 1 element (BININT1 1) and size (1,): make them numel
    raw = pkl.raw.replace(b"K\x01t", b"J" + struct.pack("<i", numel) + b"t", 1)
    raw = raw.replace(b"K\x01\x85", b"J" + struct.pack("<i", numel) + b"\x85", 1)
    entries = [replace(pkl, raw=raw) if e is pkl else e for e in entries]
    return zip_bytes(
        [zeros_member(e.name, mib) if e.name.endswith("/data/0") else e for e in entries]
    )


# ------------------------------------------------------------------ the table of .pt2 attacks

Attack = Callable[[list[Entry], Path], list[Entry] | bytes]


def _pickled_member_attacks() -> dict[str, Attack]:
    attacks: dict[str, Attack] = {}
    for protocol in PROTOCOLS:
        for container in CONTAINERS:
            tag = f"{container} p{protocol}"
            attacks[f"sample inputs, {tag}"] = lambda e, m, c=container, p=protocol: edit(
                e, "sample_inputs/model.pt", raw=pickles(m, c, p)
            )
            attacks[f"legacy weights model.pt, {tag}"] = lambda e, m, c=container, p=protocol: (
                legacy_state(e, "weights", pickles(m, c, p))
            )
            attacks[f"legacy constants model.pt, {tag}"] = lambda e, m, c=container, p=protocol: (
                legacy_state(e, "constants", pickles(m, c, p))
            )
            attacks[f"unknown member, {tag}"] = lambda e, m, c=container, p=protocol: [
                *e,
                Entry(root(e) + "data/evil.pkl", pickles(m, c, p)),
            ]
        tag = f"torch.save p{protocol}"
        attacks[f"weight flagged use_pickle, {tag}"] = lambda e, m, p=protocol: flag_pickled(
            e, "weights", pickles(m, "torch.save", p)
        )
        attacks[f"constant flagged use_pickle, {tag}"] = lambda e, m, p=protocol: flag_pickled(
            e, "constants", pickles(m, "torch.save", p)
        )
        attacks[f"custom object, raw p{protocol}"] = lambda e, m, p=protocol: flag_pickled(
            e, "constants", pickles(m, "raw", p), "custom_obj_0"
        )
        attacks[f"opaque object, raw p{protocol}"] = lambda e, m, p=protocol: flag_pickled(
            e, "constants", pickles(m, "raw", p), "opaque_obj_0"
        )
    return attacks


def _archive_attacks() -> dict[str, Attack]:
    def duplicate(e, m):
        weight = next(x for x in e if x.name.endswith("weights/weight_0"))
        return [*e, replace(weight, raw=bytes(len(weight.raw)))]

    def overlap(e, m):
        weight = next(x for x in e if x.name.endswith("weights/weight_0"))
        inner = zip_bytes([weight])[: 30 + len(weight.name) + len(weight.raw)]
        outer = Entry(root(e) + "extra/outer", inner)
        first = zip_bytes([outer, *[x for x in e if x is not weight]])
        # point weight_0's central record into the outer member's data
        offset = 30 + len(outer.name)
        central = (
            struct.pack(
                "<4s6H3L5H2L",
                b"PK\x01\x02",
                20,
                20,
                0x800,
                0,
                0,
                0x21,
                zlib.crc32(weight.raw),
                len(weight.raw),
                len(weight.raw),
                len(weight.name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + weight.name.encode()
        )
        end = first.rindex(b"PK\x05\x06")
        entries, size, start = struct.unpack_from("<H2L", first, end + 10)
        return (
            first[:end]
            + central
            + struct.pack(
                "<4s4H2LH",
                b"PK\x05\x06",
                0,
                0,
                entries + 1,
                entries + 1,
                size + len(central),
                start,
                0,
            )
        )

    def payload_of(e, suffix):
        return next(x for x in e if x.name.endswith(suffix))

    return {
        "duplicate member name": duplicate,
        "members overlap": overlap,
        "stored size lies (central > real)": lambda e, m: edit(
            e, "weights/weight_0", size=len(payload_of(e, "weights/weight_0").raw) + 4096
        ),
        "sizes lie past end of file": lambda e, m: edit(
            e, "weights/weight_0", size=3_000_000_000, compressed=3_000_000_000
        ),
        "local header disagrees with central": lambda e, m: edit(
            e, "weights/weight_0", local_size=len(payload_of(e, "weights/weight_0").raw) + 1
        ),
        "deflated member inflates past its size": lambda e, m: edit(
            e, "models/model.json", method=8, size=len(payload_of(e, "models/model.json").raw) // 2
        ),
        "deflated member declares 3 GB": lambda e, m: edit(
            e, "models/model.json", method=8, size=3_000_000_000, crc=0
        ),
        "bomb: weight payload inflates to 1 GiB": lambda e, m: [
            zeros_member(x.name, 1025) if x.name.endswith("weights/weight_0") else x for x in e
        ],
        "bomb: nested, a few KB to > 1 GiB": lambda e, m: edit(
            e, "sample_inputs/model.pt", raw=bomb_state_dict(1025), method=8
        ),
        "bomb: 1 GiB sample inputs stored in a deflated member": lambda e, m: [
            zeros_member(x.name, 1025) if x.name.endswith("sample_inputs/model.pt") else x
            for x in e
        ],
        "CRC mismatch": lambda e, m: edit(e, "models/model.json", crc=12345),
        "broken program JSON": lambda e, m: edit(
            e, "models/model.json", raw=payload_of(e, "models/model.json").raw[:-7]
        ),
        "broken weights config JSON": lambda e, m: edit(
            e, "weights_config.json", raw=b'{"config": {"w": '
        ),
        "program JSON nested 100000 deep": lambda e, m: edit(
            e, "models/model.json", raw=b"[" * 100_000 + b"]" * 100_000
        ),
        "absurd tensor_meta sizes": lambda e, m: _meta(e, sizes=lambda n: [1 << 40] * n),
        "tensor reaching past its payload": lambda e, m: _meta(e, storage_offset=10**6),
        "negative stride": lambda e, m: _meta(e, strides=lambda n: [-1] * n),
        "sizes and strides of different lengths": lambda e, m: _meta(e, sizes=lambda n: [1]),
        "a weight's shape differs from the program's": lambda e, m: _meta(
            e, sizes=lambda n: [2, 3, 3, 3][:n]
        ),
        "unknown dtype": lambda e, m: _meta(e, dtype=999),
        "empty payload with declared elements": lambda e, m: edit(e, "weights/weight_0", raw=b""),
        "archive version 9": lambda e, m: edit(e, "/archive_version", raw=b"9"),
        "big-endian byteorder": lambda e, m: edit(e, "/byteorder", raw=b"big"),
        "encrypted member": lambda e, m: _flags(zip_bytes(e), "weights/weight_0", 0x801),
        "bzip2 member": lambda e, m: _method(zip_bytes(e), "weights/weight_0", 12),
        "second program": lambda e, m: [
            *e,
            Entry(root(e) + "models/other.json", payload_of(e, "models/model.json").raw),
        ],
        "members outside the archive folder": lambda e, m: [*e, Entry("elsewhere/x", b"1")],
        "unused payload": lambda e, m: [*e, Entry(root(e) + "data/weights/weight_99", b"1234")],
        "missing payload": lambda e, m: [x for x in e if not x.name.endswith("weights/weight_0")],
        "missing program": lambda e, m: [x for x in e if not x.name.endswith("models/model.json")],
    }


def _meta(entries: list[Entry], **changes) -> list[Entry]:
    document = config(entries, "weights")
    meta = next(iter(document["config"].values()))["tensor_meta"]
    for key, value in changes.items():
        if key in ("sizes", "strides"):
            value = [{"as_int": v} for v in value(len(meta["sizes"]))]
        elif key == "storage_offset":
            value = {"as_int": value}
        meta[key] = value
    return set_config(entries, "weights", document)


def _central_field(data: bytes, name_end: str, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        length = struct.unpack_from("<H", out, at + 28)[0]
        if out[at + 46 : at + 46 + length].decode().endswith(name_end):
            struct.pack_into(fmt, out, at + offset, value)
            local = struct.unpack_from("<L", out, at + 42)[0]
            struct.pack_into(fmt, out, local + offset - 2, value)
        at = out.find(b"PK\x01\x02", at + 4)
    return bytes(out)


def _flags(data: bytes, name_end: str, flags: int) -> bytes:
    return _central_field(data, name_end, 8, "<H", flags)


def _method(data: bytes, name_end: str, method: int) -> bytes:
    return _central_field(data, name_end, 10, "<H", method)


HOSTILE_PT2: dict[str, Attack] = {**_pickled_member_attacks(), **_archive_attacks()}
