"""``.pt2`` archives (``torch.export.save``) read by bnfold itself: no code from the file runs.

``torch.export.load`` can run code from a crafted file, so bnfold never calls it (nor
``load_pt2`` or ``torch.load``) on a user's file; the README ("Model files and their security")
lists the layout accepted and the limits. Torch's ``ExportedProgramDeserializer`` gets the
weights, constants and sample inputs already built, and has nothing left to unpickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import BnfoldError, LoadError, UnsafeFileError, first_line
from bnfold.io import program_checks
from bnfold.io.archive import MIB, ZipArchive, open_zip
from bnfold.io.pt2_tensors import (
    OBJECT_MEMBER,
    PAYLOAD_MEMBER,
    Entry,
    config_entries,
    payload_tensors,
)
from bnfold.io.unpickle import load_torch_bytes

MAX_JSON_BYTES = 64 * MIB
MAX_SMALL_BYTES = 4096
ALLOWANCE = 256 * MIB
MODEL = "model"
_SMALL = "archive_format archive_version byteorder .data/version .data/serialization_id".split()
_PROGRAM = f"models/{MODEL}.json"
_SAMPLE_INPUTS = f"data/sample_inputs/{MODEL}.pt"
_CONFIGS = {kind: f"data/{kind}/{MODEL}_{kind}_config.json" for kind in ("weights", "constants")}
_LEGACY = {kind: f"data/{kind}/{MODEL}.pt" for kind in ("weights", "constants")}
_KNOWN = {*_SMALL, _PROGRAM, _SAMPLE_INPUTS, *_CONFIGS.values(), *_LEGACY.values()}


@dataclass(frozen=True)
class _Layout:
    """The members of a checked ``.pt2``, by role (full member names)."""

    small: dict[str, str]  # relative name -> member
    program: str
    sample_inputs: str
    weights: str  # the config, or the legacy state dict
    constants: str
    payloads: frozenset[str]


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
            _entries(archive, layout, name, path) for name in (layout.weights, layout.constants)
        )
        _check_budget(archive, layout, [*weights, *constants], path)
        state_dict = _tensors(archive, weights, path, layout.weights)
        constant_values = _tensors(archive, constants, path, layout.constants)
        example_inputs = _sample_inputs(archive, layout.sample_inputs, path)
    program = _deserialize(path, document, state_dict, constant_values, example_inputs)
    _check_tensors_fit_graph(path, program)
    return program


def _layout(archive: ZipArchive, path: Path) -> _Layout:
    names = [name for name in archive.members if not name.endswith("/")]
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        raise LoadError(f"{path}: not a torch.export archive (its members are not in one folder)")
    root = roots.pop() + "/"
    relative = {name[len(root) :]: name for name in names}
    for name in relative:
        _check_member(path, name, archive.members[root + name].size)
    missing = [name for name in (_PROGRAM, _SAMPLE_INPUTS) if name not in relative]
    if missing or "archive_format" not in relative:
        raise LoadError(
            f"{path}: not a complete torch.export archive (missing "
            f"{', '.join(missing or ['archive_format'])})"
        )
    return _Layout(
        small={name: member for name, member in relative.items() if name in _SMALL},
        program=relative[_PROGRAM],
        sample_inputs=relative[_SAMPLE_INPUTS],
        weights=_config_member(relative, "weights", path),
        constants=_config_member(relative, "constants", path),
        payloads=frozenset(
            member for name, member in relative.items() if PAYLOAD_MEMBER.match(name)
        ),
    )


def _check_member(path: Path, name: str, size: int) -> None:
    known = name in _KNOWN or PAYLOAD_MEMBER.match(name) or name.startswith("extra/")
    if name.startswith("data/aotinductor/"):
        raise LoadError(
            f"{path} is an AOTInductor compiled package, not a torch.export program: it holds "
            "compiled code and no foldable graph. Pass the program instead "
            "(torch.export.save(torch.export.export(model.eval(), example_inputs), 'model.pt2'))."
        )
    if OBJECT_MEMBER.match(name):
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
    config, legacy = _CONFIGS[kind], _LEGACY[kind]
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
        raw = archive.read(layout.small[name], limit=MAX_SMALL_BYTES)
        found = bytes(raw).decode("utf-8", "replace")
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


def _entries(archive: ZipArchive, layout: _Layout, member: str, path: Path) -> list[Entry]:
    """The entries of a payload config ([] for a legacy state dict, read later)."""
    if member.endswith(".pt"):
        return []
    return config_entries(_read_json(archive, member, path), member, layout.payloads, path)


def _tensors(
    archive: ZipArchive, entries: list[Entry], path: Path, member: str
) -> dict[str, torch.Tensor]:
    """Weights or constants by fully-qualified name, as ``torch.export.load`` builds them (from
    raw payloads, or from a legacy state dict read with the restricted unpickler)."""
    if not member.endswith(".pt"):
        return payload_tensors(archive, entries, path, member)
    value = load_torch_bytes(archive.read(member, limit=ALLOWANCE), f"{path}: {member}")
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise LoadError(f"{path}: {member} is not a dict of tensors")
    return dict(value)


def _check_budget(archive: ZipArchive, layout: _Layout, entries: list[Entry], path: Path) -> None:
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
