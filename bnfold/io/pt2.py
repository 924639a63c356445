"""``.pt2`` archives (``torch.export.save``) read by bnfold itself: no code from the file runs.

``torch.export.load`` unpickles members with ``weights_only=False`` when a weights-only load
fails (a pickle of any protocol does, e.g. the text protocols 0 and 1), unpickles payloads
flagged ``use_pickle`` and "opaque" constants, and reads members whole, whatever their headers
claim. bnfold never calls it (nor ``load_pt2`` or ``torch.load``) on a user's file:
``read_program`` reads the archive with ``bnfold._archive`` (bounded memory), checks its layout
and every string torch would evaluate (``bnfold._program``), rebuilds the weights and constants
from their raw bytes, reads the sample inputs with bnfold's restricted unpickler, and hands the
built objects to torch's ``ExportedProgramDeserializer``, which has nothing left to unpickle.

The layout (torch 2.13), under one top-level folder:

- ``archive_format`` ("pt2"), ``archive_version`` ("0"), ``byteorder`` ("little"),
  ``.data/version``, ``.data/serialization_id``: small text files;
- ``models/model.json``: the program; ``data/sample_inputs/model.pt``: its example inputs (a
  ``torch.save`` archive);
- ``data/weights/model_weights_config.json`` + raw ``weight_N`` payloads and
  ``data/constants/model_constants_config.json`` + raw ``tensor_N`` payloads (or the legacy
  ``data/weights/model.pt`` / ``data/constants/model.pt`` state dicts);
- ``extra/*``: never read.

Anything else is refused: another program, pickled custom or opaque objects, payloads flagged
``use_pickle``, compiled AOTInductor code, unknown members. Limits on top of the archive's own:
each JSON member at most ``MAX_JSON_BYTES``; and every member bnfold reads together at most the
payload bytes the configs' tensor metadata declare plus ``ALLOWANCE`` (the program, the configs,
the sample inputs, unused payload bytes).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import BnfoldError, LoadError, UnsafeFileError, first_line
from bnfold.io import program_checks
from bnfold.io.archive import MIB, ZipArchive, open_zip
from bnfold.io.unpickle import load_torch_bytes

MAX_JSON_BYTES = 64 * MIB
MAX_SMALL_BYTES = 4096
ALLOWANCE = 256 * MIB
MODEL = "model"
_SMALL = (
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
)
_PAYLOAD = re.compile(r"^data/(weights/weight|constants/tensor)_[0-9]+$")
_OBJECT = re.compile(r"^data/constants/(custom_obj|opaque_obj)_[0-9]+$")


@dataclass(frozen=True)
class _Layout:
    """The members of a checked ``.pt2``, by role (full member names)."""

    root: str
    small: dict[str, str]  # relative name -> member
    program: str
    sample_inputs: str
    weights: str  # the config, or the legacy state dict
    constants: str
    payloads: frozenset[str]


@dataclass(frozen=True)
class _Entry:
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
        if not math.prod(self.sizes):
            return 0
        return (
            self.offset
            + 1
            + sum((n - 1) * s for n, s in zip(self.sizes, self.strides, strict=True))
        )


def read_program(path: Path) -> torch.export.ExportedProgram:
    """The ``ExportedProgram`` in ``path``, read without running anything from the file.

    Raises ``UnsafeFileError`` for anything torch's loader would unpickle or evaluate as code,
    ``LoadError`` for a damaged, oversized or unexpected archive.
    """
    with open_zip(path) as archive:
        layout = _layout(archive, path)
        _check_small_files(archive, layout, path)
        document = _read_json(archive, layout.program, path)

        program_checks.check_program_document(path, layout.program, document)
        weights, constants = (
            _read_config(archive, layout, name, path) for name in (layout.weights, layout.constants)
        )
        _check_budget(archive, layout, [*weights, *constants], path)
        state_dict = _tensors(archive, weights, path, layout.weights)
        constant_values = _tensors(archive, constants, path, layout.constants)
        example_inputs = _sample_inputs(archive, layout.sample_inputs, path)
    program = _deserialize(path, document, state_dict, constant_values, example_inputs)
    _check_tensors_fit_graph(path, program)
    return program


# ------------------------------------------------------------------ layout


def _layout(archive: ZipArchive, path: Path) -> _Layout:
    names = [name for name in archive.members if not name.endswith("/")]
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise LoadError(f"{path}: not a torch.export archive (its members are not in one folder)")
    root = roots.pop() + "/"
    relative = {name[len(root) :]: name for name in names}
    for name in relative:
        _check_member(path, name, archive.members[root + name].size)
    required = {
        "program": f"models/{MODEL}.json",
        "sample_inputs": f"data/sample_inputs/{MODEL}.pt",
    }
    missing = [name for name in required.values() if name not in relative]
    if missing or "archive_format" not in relative:
        raise LoadError(
            f"{path}: not a complete torch.export archive (missing "
            f"{', '.join(missing or ['archive_format'])})"
        )
    return _Layout(
        root=root,
        small={name: member for name, member in relative.items() if name in _SMALL},
        program=relative[required["program"]],
        sample_inputs=relative[required["sample_inputs"]],
        weights=_config_member(relative, "weights", path),
        constants=_config_member(relative, "constants", path),
        payloads=frozenset(member for name, member in relative.items() if _PAYLOAD.match(name)),
    )


def _check_member(path: Path, name: str, size: int) -> None:
    known = (
        name in _SMALL
        or _PAYLOAD.match(name)
        or name.startswith("extra/")
        or name in (f"models/{MODEL}.json", f"data/sample_inputs/{MODEL}.pt")
        or name in (f"data/{kind}/{MODEL}_{kind}_config.json" for kind in ("weights", "constants"))
        or name in (f"data/weights/{MODEL}.pt", f"data/constants/{MODEL}.pt")
    )
    if name.startswith("data/aotinductor/"):
        raise LoadError(
            f"{path} is an AOTInductor compiled package, not a torch.export program: it holds "
            "compiled code and no foldable graph. Pass the program instead "
            "(torch.export.save(torch.export.export(model.eval(), example_inputs), 'model.pt2'))."
        )
    if _OBJECT.match(name):
        raise UnsafeFileError(
            f"{path}: the member {name} is a pickled custom object; torch.export.load would "
            "unpickle it, which runs code from the file. Refusing it. bnfold folds programs "
            "whose constants are plain tensors."
        )
    if name.startswith("models/") and not known:
        raise LoadError(
            f"{path}: holds a program other than '{MODEL}' ({name}); bnfold reads archives of "
            "one program, as torch.export.save writes them"
        )
    if not known:
        raise LoadError(
            f"{path}: unexpected member {name} (not part of a torch.export program archive); "
            "refusing the file rather than guess what it is"
        )
    if name in _SMALL and size > MAX_SMALL_BYTES:
        raise LoadError(f"{path}: {name} is {size} bytes; it should be a few characters")


def _config_member(relative: dict[str, str], kind: str, path: Path) -> str:
    config = f"data/{kind}/{MODEL}_{kind}_config.json"
    legacy = f"data/{kind}/{MODEL}.pt"
    if (config in relative) == (legacy in relative):
        raise LoadError(
            f"{path}: not a torch.export archive (it needs exactly one of {config} and {legacy})"
        )
    return relative[config] if config in relative else relative[legacy]


def _check_small_files(archive: ZipArchive, layout: _Layout, path: Path) -> None:
    expected = {"archive_format": "pt2", "archive_version": "0", "byteorder": "little"}
    for name, value in expected.items():
        if name not in layout.small:
            continue
        found = bytes(archive.read(layout.small[name], limit=MAX_SMALL_BYTES)).decode(
            "utf-8", "replace"
        )
        if found.strip() != value:
            raise LoadError(
                f"{path}: {name} is {found.strip()[:20]!r}, not {value!r}; bnfold reads "
                "torch.export archives of format pt2, version 0, little-endian"
            )


def _read_json(archive: ZipArchive, member: str, path: Path) -> Any:
    raw = archive.read(member, limit=MAX_JSON_BYTES, what="JSON member")
    try:
        return json.loads(bytes(raw).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise LoadError(f"{path}: damaged torch.export archive ({member}: {exc})") from None


# ------------------------------------------------------------------ weights and constants


def _read_config(archive: ZipArchive, layout: _Layout, member: str, path: Path) -> list[_Entry]:
    """The entries of a payload config ([] for a legacy state dict, read later)."""
    if member.endswith(".pt"):
        return []
    document = _read_json(archive, member, path)
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        raise LoadError(f"{path}: damaged torch.export archive ({member} has no config)")
    folder = member.rsplit("/", 1)[0] + "/"
    prefix = "weight_" if folder.endswith("/weights/") else "tensor_"
    entries = [_entry(path, member, folder, prefix, fqn, meta) for fqn, meta in config.items()]
    for entry in entries:
        if entry.member not in layout.payloads:
            raise LoadError(f"{path}: {member} names {entry.member}, which the archive lacks")
    return entries


def _entry(path: Path, member: str, folder: str, prefix: str, fqn: str, meta: Any) -> _Entry:
    def bad(what: str) -> LoadError:
        return LoadError(f"{path}: damaged torch.export archive ({member}, '{fqn}': {what})")

    if not isinstance(meta, dict):
        raise bad("not an object")
    name = meta.get("path_name")
    if not isinstance(name, str) or not isinstance(meta.get("use_pickle"), bool):
        raise bad("no payload name or use_pickle flag")
    if meta["use_pickle"] or _OBJECT.match(f"data/constants/{name}"):
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
    return _Entry(
        fqn=fqn,
        member=folder + name,
        is_param=meta["is_param"],
        **_tensor_meta(tensor_meta, bad),
    )


def _tensor_meta(meta: dict, bad: Any) -> dict[str, Any]:
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta.get("dtype")) if _is_int(meta.get("dtype")) else None
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
    return dict(
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
        if not _is_int(number) or number < 0:
            raise bad(f"{str(value)[:40]} is not a plain non-negative integer")
        out.append(number)
    return tuple(out)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_budget(archive: ZipArchive, layout: _Layout, entries: list[_Entry], path: Path) -> None:
    """Refuse, before reading them, payloads smaller than their tensors and more bytes in all
    than the tensors declare plus ``ALLOWANCE``."""
    declared: dict[str, int] = {}
    dtypes: dict[str, torch.dtype] = {}
    for entry in entries:
        size = archive.members[entry.member].size
        if dtypes.setdefault(entry.member, entry.dtype) != entry.dtype:
            raise LoadError(
                f"{path}: tensors sharing {entry.member} declare different dtypes; refusing it"
            )
        need = entry.extent * entry.dtype.itemsize
        if need > size or size % entry.dtype.itemsize:
            raise LoadError(
                f"{path}: '{entry.fqn}' ({list(entry.sizes)}, {entry.dtype}) needs {need} bytes "
                f"of {entry.member}, which holds {size}; refusing the file"
            )
        declared[entry.member] = max(declared.get(entry.member, 0), need)
    unused = [name for name in layout.payloads if name not in declared]
    if unused:
        raise LoadError(f"{path}: {sorted(unused)[0]} is not used by any tensor; refusing it")
    reads = [
        layout.program,
        layout.sample_inputs,
        layout.weights,
        layout.constants,
        *layout.small.values(),
        *layout.payloads,
    ]
    total = sum(archive.members[name].size for name in set(reads))
    if total > sum(declared.values()) + ALLOWANCE:
        raise LoadError(
            f"{path}: its members hold {total} bytes, more than the {sum(declared.values())} "
            f"bytes of tensors the program declares plus {ALLOWANCE} bytes; refusing the file"
        )


def _tensors(
    archive: ZipArchive, entries: list[_Entry], path: Path, member: str
) -> dict[str, torch.Tensor]:
    """Weights or constants by fully-qualified name, as ``torch.export.load`` builds them."""
    if member.endswith(".pt"):
        return _legacy_state_dict(archive, member, path)
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


def _flat(raw: bytearray, entry: _Entry) -> torch.Tensor:
    if raw:
        flat = torch.frombuffer(raw, dtype=entry.dtype)
    else:
        flat = torch.empty(0, dtype=entry.dtype)
    if entry.requires_grad:
        flat.requires_grad_(True)
    return flat if entry.device.type == "cpu" else flat.to(entry.device)


def _legacy_state_dict(archive: ZipArchive, member: str, path: Path) -> dict[str, torch.Tensor]:
    value = load_torch_bytes(archive.read(member, limit=ALLOWANCE), f"{path}: {member}")
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise LoadError(f"{path}: {member} is not a dict of tensors")
    return dict(value)


def _sample_inputs(archive: ZipArchive, member: str, path: Path) -> tuple | None:
    raw = archive.read(member, limit=ALLOWANCE, what="sample inputs")
    if not raw:
        return None
    value = load_torch_bytes(raw, f"{path}: {member}")
    if not (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], tuple)
        and isinstance(value[1], dict)
    ):
        raise LoadError(f"{path}: {member} does not hold (args, kwargs) example inputs")
    return value


# ------------------------------------------------------------------ handing over to torch


def _deserialize(
    path: Path, document: Any, state_dict: dict, constants: dict, example_inputs: tuple | None
) -> torch.export.ExportedProgram:
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, document)
        return ExportedProgramDeserializer().deserialize(
            serialized, state_dict, constants, example_inputs
        )
    except BnfoldError:
        raise
    except Exception as exc:  # a well-formed archive of a program torch cannot rebuild
        raise LoadError(f"{path}: torch could not rebuild the program: {first_line(exc)}") from None


def _check_tensors_fit_graph(path: Path, program: torch.export.ExportedProgram) -> None:
    """Every weight, buffer and constant has the shape and dtype the graph declares for it."""
    signature = program.graph_signature
    owners = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **signature.inputs_to_lifted_tensor_constants,
    }
    for node in program.graph.nodes:
        fqn = owners.get(node.name) if node.op == "placeholder" else None
        declared = node.meta.get("val") if fqn else None
        value = program.state_dict.get(fqn, program.constants.get(fqn)) if fqn else None
        if not isinstance(declared, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        shape = tuple(declared.shape)
        if not all(isinstance(n, int) for n in shape):
            continue
        if shape != tuple(value.shape) or declared.dtype != value.dtype:
            raise LoadError(
                f"{path}: '{fqn}' is {list(value.shape)} {value.dtype} in the archive but "
                f"{list(shape)} {declared.dtype} in the program; refusing an inconsistent file"
            )
