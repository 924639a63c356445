"""``load_model``: a model file or factory, read without running code from the file.

A file is classified by its content, never by its name alone, and is never unpickled to find
out what it is (README, "Model files and their security").
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import (
    BnfoldError,
    LoadError,
    UnsafeFileError,
    UnsafePickleError,
    UsageError,
    first_line,
)
from bnfold.io.archive import open_zip
from bnfold.io.factory import FACTORY_SPEC, build_from_factory, model_from_weights, read_safetensors
from bnfold.io.formats import LoadedModel, ModelFormat
from bnfold.io.paths import describe_broken_link, refuse_special_file
from bnfold.io.program_checks import check_graph_targets
from bnfold.io.program_module import dynamic_dims, module_from_program
from bnfold.io.pt2 import read_program
from bnfold.io.unpickle import load_torch_file

# A legacy torch.save file written with pickle protocol 0 or 1 starts with its magic number.
_LEGACY_TEXT_MAGIC = b"L119547037146038801333356L"[:16]


def load_model(
    spec: str | os.PathLike[str], *, arch: str | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Load ``spec``: a model file path or a ``package.module:callable`` factory.

    ``arch`` is a factory building the architecture for a state-dict file. ``trust_pickle``
    allows a full pickled module, which runs code from the file. Raises ``LoadError`` (missing,
    damaged, not a model, keys that do not fit ``arch``), ``UnsafeFileError`` (would run code
    from the file) or ``UsageError`` (a state dict without ``arch``, ``arch`` with no state
    dict). The model is returned as loaded; nothing about it is changed.
    """
    text = os.fspath(spec)
    path = Path(text)
    try:
        exists = path.exists()
    except OSError as exc:
        raise LoadError(f"{text}: cannot read it ({exc.strerror or exc})") from None
    if exists:
        return _load_file(path, arch=arch, trust_pickle=trust_pickle)
    if os.path.islink(text):
        raise LoadError(describe_broken_link(text))
    if FACTORY_SPEC.match(text):
        if arch is not None:
            raise UsageError(f"arch ({arch}) is for state-dict files; {text} is a factory")
        return LoadedModel(model=build_from_factory(text), format=ModelFormat.FACTORY, source=text)
    raise LoadError(f"{text}: no such file (and not a factory spec 'package.module:callable')")


def _load_file(path: Path, *, arch: str | None, trust_pickle: bool) -> LoadedModel:
    if path.is_dir():
        raise LoadError(f"{path} is a directory, not a model file")
    refuse_special_file(path, "models")
    if path.stat().st_size == 0:
        raise LoadError(f"{path} is empty (0 bytes): not a model file")
    kind = _sniff(path)
    if kind == "pt2":
        if arch is not None:
            raise UsageError(f"--arch is for state-dict files; {path} is a torch.export program")
        return _load_program(path)
    if kind == "torchscript":
        raise LoadError(
            f"{path} is a TorchScript archive (torch.jit.save). bnfold cannot fold TorchScript: "
            "it rewrites Python module graphs. Pass the model as a torch.export program (.pt2), "
            "a state dict with --arch package.module:callable, or a factory instead."
        )
    if kind == "safetensors":
        return model_from_weights(read_safetensors(path), path, arch, ModelFormat.SAFETENSORS)
    if kind == "torch":
        return _load_checkpoint(path, arch=arch, trust_pickle=trust_pickle)
    raise LoadError(f"{path} is not a model file: {kind}")


def _sniff(path: Path) -> str:
    """Classify a file by content: pt2, torchscript, torch, safetensors, or why not.

    A zip archive's directory is read with ``bnfold.io.archive`` (bounded, checked): a damaged
    or hostile one is a ``LoadError`` here, before anything else reads it.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise LoadError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if head[:2] == b"PK":
        with open_zip(path) as archive:
            names = list(archive.members)
        if any(name.endswith("/archive_format") or "/models/" in name for name in names):
            return "pt2"
        if any("/code/__torch__/" in name or name.endswith("/constants.pkl") for name in names):
            return "torchscript"
        if any(name.endswith("/data.pkl") for name in names):
            return "torch"
        return "a zip archive holding no PyTorch model"
    if head[:1] == b"\x80" or head.startswith(_LEGACY_TEXT_MAGIC):
        return "torch"
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return "safetensors"
    return "expected a torch.export program (.pt2), a torch.save file (.pt/.pth) or .safetensors"


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 30


def _load_program(path: Path) -> LoadedModel:
    program = read_program(path)
    check_graph_targets(path, program)
    try:
        model, notes = module_from_program(program)
    except BnfoldError:
        raise
    except Exception as exc:
        raise LoadError(
            f"{path}: the program could not be rebuilt as a module ({first_line(exc)})"
        ) from exc
    args, kwargs = program.example_inputs or ((), {})
    if kwargs:
        notes.append("the program takes keyword inputs; give --input-shape for positional ones")
    return LoadedModel(
        model=model,
        format=ModelFormat.EXPORTED_PROGRAM,
        source=str(path),
        example_inputs=tuple(args) if args and not kwargs else None,
        dynamic_dims=dynamic_dims(program),
        notes=tuple(notes),
    )


def _load_checkpoint(path: Path, *, arch: str | None, trust_pickle: bool) -> LoadedModel:
    try:  # bnfold's restricted unpickler unless the file is trusted, never torch.load
        obj = _torch_load(path) if trust_pickle else load_torch_file(path)
    except UnsafePickleError as exc:
        raise _unsafe(path, list(exc.references)) from None
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise UsageError(f"--arch is for state-dict files; {path} is a full pickled model")
        return LoadedModel(
            model=obj,
            format=ModelFormat.PICKLED_MODULE,
            source=str(path),
            notes=("loaded with --trust-pickle: code in the file ran",),
        )
    if isinstance(obj, dict):
        return model_from_weights(obj, path, arch, ModelFormat.STATE_DICT)
    raise LoadError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=False)``: only for a file the user said they trust."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as exc:
        raise LoadError(
            f"{path}: the pickled model needs code that is not importable here "
            f"({first_line(exc)}). A pickled module only loads where its classes' source is on "
            "the path; save a .pt2 (torch.export) or a state dict instead"
        ) from None
    except Exception as exc:
        raise LoadError(
            f"{path}: could not be read as a PyTorch file ({first_line(exc)}); it may be "
            "truncated or damaged"
        ) from None


def _unsafe(path: Path, found: list[str]) -> UnsafeFileError:
    shown = ", ".join(found[:5]) + (" ..." if len(found) > 5 else "")
    if any(name.startswith("torch.nn.modules.") for name in found):
        what = "is a full pickled model (torch.save(model))"
    else:
        what = "holds pickled Python objects, not just tensors"
    return UnsafeFileError(
        f"{path} {what}: loading it runs code from the file (it references {shown}). "
        "If you trust its source, pass --trust-pickle (trust_pickle=True). Safer: re-save it "
        "as a torch.export program (torch.export.save(torch.export.export(model.eval(), "
        "example_inputs), 'model.pt2')) or as a state dict (torch.save(model.state_dict(), "
        "'weights.pt')) loaded with --arch package.module:callable."
    )
