"""Loading and saving model files, safely.

What ``load_model`` accepts, and what each costs in trust:

- ``.pt2`` (``torch.export`` program): no code from the file runs. bnfold reads the archive
  itself (``bnfold._pt2``, with bounded memory) because ``torch.export.load`` would unpickle
  some members with ``weights_only=False`` and evaluate shape expressions and guards as Python.
- ``package.module:callable`` (a factory): runs the user's own code, which they named.
- state dict (``.pt``/``.pth`` read by bnfold's weights-only unpickler, ``bnfold._unpickle``,
  or ``.safetensors``) plus ``arch`` (a factory): loaded with strict key checking; no code from
  the file runs.
- full pickled module (``torch.save(model)``): loading it runs code from the file, so it is
  refused unless ``trust_pickle=True``. The file is never unpickled to find that out: the
  weights-only unpickler refuses it, and its globals are listed by reading the pickle opcodes.
- TorchScript archives are refused with the alternatives: bnfold folds ``nn.Module`` graphs,
  and a scripted module has no Python graph to rewrite.

``save_model`` writes ``.pt2`` (``torch.export``; loads back with plain torch) or a pickled
module (only when the input was one). Every write goes to a file of the target's name in a
private temporary directory beside it and is moved into place at the end (exclusively unless
overwriting is allowed), so a failed or interrupted save leaves no partial file, never damages
an existing one, and never replaces a file that appeared meanwhile.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import importlib
import os
import re
import struct
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnfold.errors import (
    BnfoldError,
    LoadError,
    SaveError,
    UnsafeFileError,
    UnsafePickleError,
    UsageError,
    first_line,
)
from bnfold.io import pt2 as _pt2
from bnfold.io.archive import open_zip
from bnfold.io.inputs import no_data_message, tensors_without_data
from bnfold.io.paths import NamedPath, plan_paths, publish, staging
from bnfold.io.program_checks import check_graph_targets
from bnfold.io.program_module import dynamic_dims, module_from_program
from bnfold.io.unpickle import load_torch_file
from bnfold.records import Record, not_serialised

if TYPE_CHECKING:
    import torch
    from torch import nn

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "ema")


class ModelFormat(str, enum.Enum):
    """Where a model came from (and, for outputs, how it is written)."""

    EXPORTED_PROGRAM = "pt2"  # torch.export program
    FACTORY = "factory"  # package.module:callable
    STATE_DICT = "state_dict"  # .pt/.pth weights + arch factory
    SAFETENSORS = "safetensors"  # .safetensors weights + arch factory
    PICKLED_MODULE = "pickled_module"  # torch.save(model), loaded only when trusted

    @property
    def label(self) -> str:
        return _FORMAT_LABELS[self]


_FORMAT_LABELS = {
    ModelFormat.EXPORTED_PROGRAM: "torch.export program",
    ModelFormat.FACTORY: "factory",
    ModelFormat.STATE_DICT: "state dict",
    ModelFormat.SAFETENSORS: "safetensors state dict",
    ModelFormat.PICKLED_MODULE: "pickled module",
}


@dataclass(frozen=True)
class LoadedModel(Record):
    """A model read by ``load_model`` and what is known about where it came from."""

    model: nn.Module = field(metadata=not_serialised(), repr=False, compare=False)
    format: ModelFormat
    source: str  # the file path or factory spec as given
    arch: str | None = None  # the factory that built the architecture of a state dict
    # The example inputs a .pt2 carries (positional tensors), else None.
    example_inputs: tuple[torch.Tensor, ...] | None = field(
        default=None, metadata=not_serialised(), repr=False, compare=False
    )
    # For each positional input, the dims the source program kept dynamic (pt2 only).
    dynamic_dims: tuple[tuple[int, ...], ...] | None = None
    notes: tuple[str, ...] = ()

    @property
    def path(self) -> Path | None:
        """The input file, or None for a factory."""
        return None if self.format is ModelFormat.FACTORY else Path(self.source)


@dataclass(frozen=True)
class SavedModel(Record):
    """One file ``save_model`` wrote."""

    path: str
    format: ModelFormat
    bytes: int
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------ loading


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


def describe_broken_link(text: str) -> str:
    """Why the symbolic link ``text`` leads to no file: a loop, or a missing target."""
    try:
        os.stat(text)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return (
                f"{text}: symbolic link loop (following it leads back to itself); point the "
                "link at the file"
            )
    return f"{text}: a symbolic link to {os.readlink(text)}, which does not exist"


def build_from_factory(spec: str) -> nn.Module:
    """Import ``package.module`` and call ``callable`` (an ``nn.Module`` instance is used as is).

    The current directory is searched first, as ``python -m`` would. Any exception from the
    user's code, ``sys.exit`` included, is raised as ``LoadError`` naming ``spec``.
    """
    from torch import nn

    module_name, _, attr_path = spec.partition(":")
    with _cwd_on_path():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise LoadError(
                f"cannot import module '{module_name}' for {spec}: {exc}. The module must be "
                "importable: run from its directory, install it, or add it to PYTHONPATH"
            ) from exc
        except SystemExit as exc:
            raise LoadError(
                f"importing '{module_name}' for {spec} called sys.exit({exc.code!r}); a model "
                "module must not exit the process"
            ) from exc
        except Exception as exc:
            raise LoadError(
                f"importing '{module_name}' for {spec} raised {first_line(exc)}"
            ) from exc
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise LoadError(f"{spec}: module '{module_name}' has no attribute '{attr_path}'")
        target = getattr(target, part)
    if isinstance(target, nn.Module):
        _require_data(target, f"the module {spec}")
        return target
    if not callable(target):
        raise LoadError(f"{spec}: '{attr_path}' is a {type(target).__name__}, not callable")
    try:
        model = target()
    except SystemExit as exc:
        raise LoadError(
            f"{spec} called sys.exit({exc.code!r}) while building the model; a factory must "
            "return an nn.Module"
        ) from exc
    except Exception as exc:
        raise LoadError(f"calling {spec}() raised {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"{spec}() returned a {type(model).__name__}, not a torch.nn.Module")
    _require_data(model, f"the model {spec} built")
    return model


def _require_data(model: nn.Module, what: str) -> None:

    empty = tensors_without_data(model)
    if empty:
        raise LoadError(no_data_message(what, empty))


def _load_file(path: Path, *, arch: str | None, trust_pickle: bool) -> LoadedModel:
    if path.is_dir():
        raise LoadError(f"{path} is a directory, not a model file")
    if path.stat().st_size == 0:
        raise LoadError(f"{path} is empty (0 bytes): not a model file")
    kind = _sniff(path)
    if kind == "pt2":
        _no_arch(arch, path, "a torch.export program")
        return _load_program(path)
    if kind == "torchscript":
        raise LoadError(
            f"{path} is a TorchScript archive (torch.jit.save). bnfold cannot fold TorchScript: "
            "it rewrites Python module graphs. Pass the model as a torch.export program (.pt2), "
            "a state dict with --arch package.module:callable, or a factory instead."
        )
    if kind == "safetensors":
        return _from_weights(_read_safetensors(path), path, arch, ModelFormat.SAFETENSORS)
    if kind == "torch":
        return _load_checkpoint(path, arch=arch, trust_pickle=trust_pickle)
    raise LoadError(f"{path} is not a model file: {kind}")


def _sniff(path: Path) -> str:
    """Classify a file by content: pt2, torchscript, torch, safetensors, or why not.

    A zip archive's directory is read with ``bnfold._archive`` (bounded, checked): a damaged
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


# A legacy torch.save file written with pickle protocol 0 or 1 starts with its magic number.
_LEGACY_TEXT_MAGIC = b"L119547037146038801333356L"[:16]


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 30


def _no_arch(arch: str | None, path: Path, what: str) -> None:
    if arch is not None:
        raise UsageError(f"--arch is for state-dict files; {path} is {what}")


def _load_program(path: Path) -> LoadedModel:

    program = _pt2.read_program(path)
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
    example = tuple(args) if args and not kwargs else None
    if kwargs:
        notes.append("the program takes keyword inputs; give --input-shape for positional ones")
    return LoadedModel(
        model=model,
        format=ModelFormat.EXPORTED_PROGRAM,
        source=str(path),
        example_inputs=example,
        dynamic_dims=dynamic_dims(program),
        notes=tuple(notes),
    )


def _load_checkpoint(path: Path, *, arch: str | None, trust_pickle: bool) -> LoadedModel:
    import torch
    from torch import nn

    obj = _torch_load(path) if trust_pickle else _weights_only_load(path)
    if isinstance(obj, nn.Module):
        _no_arch(arch, path, "a full pickled model")
        return LoadedModel(
            model=obj,
            format=ModelFormat.PICKLED_MODULE,
            source=str(path),
            notes=("loaded with --trust-pickle: code in the file ran",),
        )
    if isinstance(obj, dict):
        return _from_weights(obj, path, arch, ModelFormat.STATE_DICT)
    if isinstance(obj, torch.jit.ScriptModule):  # only reachable when trusted
        raise LoadError(f"{path} holds a TorchScript module, which bnfold cannot fold")
    raise LoadError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


def _weights_only_load(path: Path) -> Any:
    """The file read by bnfold's restricted unpickler (never ``torch.load``)."""

    try:
        return load_torch_file(path)
    except UnsafePickleError as exc:
        raise _unsafe(path, list(exc.references)) from None


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=False)``: only for a file the user said they trust."""
    import torch

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


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(
            f"{path}: could not be read as safetensors ({first_line(exc)}); it may be truncated "
            "or not a safetensors file"
        ) from None


def _from_weights(obj: dict, path: Path, arch: str | None, fmt: ModelFormat) -> LoadedModel:
    state, notes = _extract_state_dict(obj, path)
    if arch is None:
        raise UsageError(
            f"{path} is a state dict (weights only, no architecture): pass "
            "--arch package.module:callable that builds the model"
        )
    model = build_from_factory(arch)
    _load_strict(model, state, path, arch)
    return LoadedModel(model=model, format=fmt, source=str(path), arch=arch, notes=tuple(notes))


def _extract_state_dict(obj: dict, path: Path) -> tuple[dict[str, Any], list[str]]:
    import torch

    def is_state(value: Any) -> bool:
        return (
            isinstance(value, dict)
            and bool(value)
            and all(
                isinstance(key, str) and isinstance(item, torch.Tensor)
                for key, item in value.items()
            )
        )

    notes: list[str] = []
    state = obj
    if not is_state(obj):
        key = next((k for k in STATE_DICT_KEYS if is_state(obj.get(k))), None)
        if key is None:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise LoadError(f"{path} holds a dict (keys: {keys}) that is not a state dict")
        state = obj[key]
        notes.append(f"weights taken from the checkpoint's '{key}' entry")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
        notes.append("removed the 'module.' prefix (a DataParallel/DDP checkpoint)")
    return dict(state), notes


def _load_strict(model: nn.Module, state: dict[str, Any], path: Path, arch: str) -> None:
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
        raise LoadError(
            f"{path} does not fit --arch {arch}: " + "; ".join(parts) + ". A folded state dict "
            "(BatchNorms removed, conv biases added) never fits the original architecture: "
            "save folded models as .pt2"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LoadError(f"{path} does not fit --arch {arch}: {first_line(exc, lines=3)}") from None


def _key_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ------------------------------------------------------------------ saving


def output_format(path: str | os.PathLike[str]) -> ModelFormat:
    """The format a path's extension asks for: ``.pt2`` or ``.pt``/``.pth`` (pickled module)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".pt2":
        return ModelFormat.EXPORTED_PROGRAM
    if suffix in (".pt", ".pth"):
        return ModelFormat.PICKLED_MODULE
    raise UsageError(
        f"{path}: cannot tell the output format from '{suffix or 'no extension'}'; use .pt2 "
        "(torch.export program) or .pt/.pth (pickled module, only for pickled inputs)"
    )


@dataclass(frozen=True)
class ModelSource(Record):
    """What MODEL will load as, known from the arguments before loading: enough to name the
    default outputs (``default_output_path`` takes it like a ``LoadedModel``)."""

    format: ModelFormat  # STATE_DICT stands for both state-dict formats (.pt/.safetensors)
    source: str

    @property
    def path(self) -> Path | None:
        return None if self.format is ModelFormat.FACTORY else Path(self.source)


def expected_source(
    spec: str | os.PathLike[str], *, arch: str | None = None, trust_pickle: bool = False
) -> ModelSource | None:
    """What ``load_model(spec, arch=arch, trust_pickle=trust_pickle)`` returns when it succeeds,
    from the arguments alone (nothing is read): a factory; a state dict (``arch`` given); a
    torch.export program (a ``.pt2`` file, no ``arch``, no ``trust_pickle``: the only kind that
    then loads). None when only the file's content can tell (``trust_pickle`` without ``arch``:
    a program or a pickled module; another extension: the load's own error comes first) or
    ``spec`` names nothing loadable."""
    text = os.fspath(spec)
    path = Path(text)
    if not path.exists():
        return ModelSource(ModelFormat.FACTORY, text) if FACTORY_SPEC.match(text) else None
    if arch is not None:
        return ModelSource(ModelFormat.STATE_DICT, text)
    if trust_pickle or path.suffix.lower() != ".pt2":
        return None
    return ModelSource(ModelFormat.EXPORTED_PROGRAM, text)


def default_output_path(loaded: LoadedModel | ModelSource, *, cwd: Path | None = None) -> Path:
    """``<name>.folded.<ext>`` beside the input file (in ``cwd`` for a factory).

    The extension is the input's own for a pickled module, ``.pt2`` otherwise.
    """
    if loaded.path is None:
        name = loaded.source.rpartition(":")[2].rpartition(".")[2]
        return (cwd or Path.cwd()) / f"{name}.folded.pt2"
    source = loaded.path
    ext = source.suffix if loaded.format is ModelFormat.PICKLED_MODULE else ".pt2"
    stem = source.name[: -len(source.suffix)] if source.suffix else source.name
    return source.with_name(f"{stem}.folded{ext}")


def check_output_path(
    path: str | os.PathLike[str],
    *,
    inputs: Sequence[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
) -> Path:
    """Raise ``UsageError`` unless ``path`` can be written: its directory exists, it is none of
    ``inputs`` (nor inside an input folder), and it does not exist yet (unless ``overwrite``).
    See ``bnfold.paths`` for what counts as the same file."""

    out = Path(path)
    sources = [NamedPath("input", Path(source)) for source in inputs if source is not None]
    plan_paths(sources, [NamedPath("output", out)], overwrite=overwrite)
    return out


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    format: ModelFormat | None = None,
    overwrite: bool = False,
    dynamic_dims: Sequence[Sequence[int]] | None = None,
) -> SavedModel:
    """Write ``model`` to ``path`` atomically, in a form that loads back without bnfold.

    ``format`` defaults to the extension's (``output_format``). ``.pt2``: ``torch.export``
    with ``example_inputs``; dim 0 (the batch) of every input tensor, and the dims in
    ``dynamic_dims`` (per input tensor, flattened), stay dynamic when the model allows it (a
    batch-1 example is exported at batch 2 so the batch is not specialised to 1); the saved
    program's input shapes are checked, and ``SavedModel.notes`` say which dims are dynamic or
    why the shapes are static. Load back with ``torch.export.load(path).module()``. Pickled
    module: ``torch.save(model)``; loading it needs ``weights_only=False`` and the model
    classes' source. Raises ``UsageError`` for a path that may not be written and ``SaveError``
    when exporting or writing fails (nothing is left behind, an existing file is untouched).
    """
    import torch

    out = check_output_path(path, overwrite=overwrite)
    fmt = format or output_format(out)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    notes: list[str] = []
    if fmt is ModelFormat.EXPORTED_PROGRAM:
        program, notes = _export(model, inputs, dynamic_dims)

        def write(tmp: str) -> None:
            with warnings.catch_warnings():
                # Raised for weights that are not contiguous (channels_last): they are saved
                # with their strides and load back exactly; the warning is about GPU weights.
                warnings.filterwarnings("ignore", message="No complete tensor found in the group")
                torch.export.save(program, tmp)

    elif fmt is ModelFormat.PICKLED_MODULE:

        def write(tmp: str) -> None:
            torch.save(model, tmp)

    else:
        raise UsageError(f"cannot save a model as {fmt.label}; use .pt2")
    atomic_write(out, write, overwrite=overwrite)
    return SavedModel(path=str(out), format=fmt, bytes=out.stat().st_size, notes=tuple(notes))


def _export(
    model: nn.Module, inputs: tuple, dynamic_dims: Sequence[Sequence[int]] | None
) -> tuple[Any, list[str]]:
    """``torch.export`` ``model`` with the requested dims dynamic where the model allows it.

    ``dynamic_dims`` lists, per tensor in ``inputs`` (flattened), the dims to keep dynamic;
    default: dim 0 (the batch) of each. A batch-1 example is exported at batch 2 (rows
    repeated): at size 1 the exporter would specialise the batch. The program's own input
    shapes are then checked; when a requested dim could not stay dynamic the program is
    exported with the given example's fixed shapes and a note says why.
    """
    import torch

    leaves, spec = _tensor_leaves(inputs)
    wanted = _wanted_dims(leaves, dynamic_dims)
    example = _batch_of_two(inputs, leaves, spec, wanted)
    try:
        with _quiet_export() as notes:
            program = torch.export.export(model, example, dynamic_shapes=_shapes(inputs, wanted))
        problem = _lost_dims(program, leaves, wanted)
    except Exception as exc:
        problem = (
            f"exporting with a free batch failed ({first_line(exc)}): the forward probably fixes "
            "the batch size (e.g. x.view(1, -1)); x.flatten(1) keeps it free"
        )
    if problem is None:
        return program, [_kept_note(wanted, leaves, example is not inputs), *notes]
    try:
        with _quiet_export() as notes:
            program = torch.export.export(model, inputs)
    except Exception as exc:
        raise SaveError(
            f"torch.export could not export the folded model: {first_line(exc, lines=3)}. "
            "A .pt2 needs a model torch.export can trace; for a pickled input, write a .pt "
            "output instead"
        ) from exc
    shapes = ", ".join(_shape_text(leaf) for leaf in leaves if leaf is not None)
    static = f"the saved program has static shapes (it runs only at {shapes}): {problem}"
    return program, [static, *notes]


def _tensor_leaves(inputs: tuple) -> tuple[list[Any], Any]:
    """The flattened inputs, with None in place of anything that is not a tensor."""
    import torch
    from torch.utils import _pytree as pytree

    leaves, spec = pytree.tree_flatten(inputs)
    return [leaf if isinstance(leaf, torch.Tensor) else None for leaf in leaves], spec


def _wanted_dims(
    leaves: list[Any], dynamic_dims: Sequence[Sequence[int]] | None
) -> list[tuple[int, ...]]:
    """Per leaf, the dims to keep dynamic: dim 0 of every tensor that has one, plus the dims
    ``dynamic_dims`` gives (per tensor leaf) when it has one entry per tensor."""
    count = sum(leaf is not None for leaf in leaves)
    given = iter(dynamic_dims if dynamic_dims is not None and len(dynamic_dims) == count else ())
    wanted = []
    for leaf in leaves:
        if leaf is None:
            wanted.append(())
            continue
        extra = tuple(d for d in next(given, ()) if 0 < d < leaf.dim())
        wanted.append(((0,) if leaf.dim() >= 1 else ()) + tuple(sorted(set(extra))))
    return wanted


def _batch_of_two(inputs: tuple, leaves: list[Any], spec: Any, wanted: list) -> tuple:
    """``inputs`` with every dynamic dim 0 of size 1 repeated to 2, else ``inputs`` itself."""
    import torch
    from torch.utils import _pytree as pytree

    batch = [leaf for leaf, dims in zip(leaves, wanted, strict=True) if 0 in dims]
    if not batch or any(leaf.shape[0] != 1 for leaf in batch):
        return inputs
    flat, _ = pytree.tree_flatten(inputs)
    doubled = [
        torch.cat([value, value]) if 0 in dims else value
        for value, dims in zip(flat, wanted, strict=True)
    ]
    return pytree.tree_unflatten(doubled, spec)


def _shapes(inputs: tuple, wanted: list[tuple[int, ...]]) -> Any:
    """``dynamic_shapes`` for ``torch.export``: the inputs' structure, ``{dim: Dim.AUTO}`` per
    tensor with dynamic dims."""
    from torch.export import Dim
    from torch.utils import _pytree as pytree

    _, spec = pytree.tree_flatten(inputs)
    specs = [{dim: Dim.AUTO for dim in dims} or None for dims in wanted]
    return pytree.tree_unflatten(specs, spec)


def _lost_dims(program: Any, leaves: list[Any], wanted: list[tuple[int, ...]]) -> str | None:
    """Why the program's inputs are not dynamic where ``wanted``, or None when they are."""

    kept = list(dynamic_dims(program))
    requested = [dims for leaf, dims in zip(leaves, wanted, strict=True) if leaf is not None]
    if len(kept) != len(requested):
        return None if any(kept) or not any(requested) else "no input dim stayed dynamic"
    lost = [
        f"input {index} dim {dim}"
        for index, (dims, have) in enumerate(zip(requested, kept, strict=True))
        for dim in dims
        if dim not in have
    ]
    if not lost:
        return None
    return (
        f"the forward fixes {', '.join(lost)} (e.g. a reshape to a constant size, or a branch "
        "on the batch size); x.flatten(1) or x.view(x.shape[0], -1) keeps the batch free"
    )


def _kept_note(wanted: list[tuple[int, ...]], leaves: list[Any], doubled: bool) -> str:
    tensors = [dims for leaf, dims in zip(leaves, wanted, strict=True) if leaf is not None]
    kept = [f"input {i} dim {d}" for i, dims in enumerate(tensors) for d in dims]
    if not kept:
        return "the saved program has static shapes (no input has a batch dimension)"
    note = "dynamic dims kept: " + ", ".join(kept)
    return note + (" (exported at batch 2: a batch-1 example fixes the batch)" if doubled else "")


def _shape_text(tensor: Any) -> str:
    return "x".join(str(size) for size in tensor.shape) or "scalar"


@contextlib.contextmanager
def _quiet_export() -> Iterator[list[str]]:
    """Keep torch.export's log lines (e.g. "dimension ... specialized": the program's shapes
    are checked instead) and warnings off the console while it runs; yields a list that
    receives the warnings that say something (not deprecations) as notes."""
    import logging

    names = (
        "torch._export",
        "torch.export",
        "torch.fx.experimental.symbolic_shapes",
        "torch._subclasses.fake_tensor",
        "torch._dynamo",
    )
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for logger in loggers:  # failures are raised, and reported from the exception
            logger.setLevel(logging.CRITICAL)
        try:
            yield notes
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)
    for item in caught:
        text = str(item.message).strip().splitlines()[0] if str(item.message).strip() else ""
        quiet = issubclass(item.category, (DeprecationWarning, FutureWarning))
        if text and not quiet and f"torch.export: {text}" not in notes:
            notes.append(f"torch.export: {text}")


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[str], None], *, overwrite: bool = False
) -> None:
    """Call ``write(tmp)``, then move ``tmp`` onto ``path``.

    ``tmp`` has ``path``'s own name, inside a private temporary directory beside ``path``
    (``bnfold.io.paths.staging``): formats that record their file name record the final one.
    Without ``overwrite`` an existing ``path`` is refused before ``write`` runs, and the move is
    exclusive: a file that appeared at ``path`` meanwhile is kept (``UsageError`` for both);
    with it, ``path`` is replaced (a link is replaced, not followed).
    On any failure, including KeyboardInterrupt, the temporary directory is removed and
    ``path`` is left as it was. Library errors are raised as ``SaveError``; an interrupt is
    re-raised.
    """

    out = Path(path)
    if not overwrite and os.path.lexists(out):
        raise UsageError(f"{out} already exists; pass --force (overwrite=True) to replace it")
    try:
        with staging(out) as tmp:
            write(str(tmp))
            _fsync(tmp)
            publish(tmp, out, overwrite=overwrite)
    except BaseException as exc:
        if isinstance(exc, (BnfoldError, KeyboardInterrupt)) or not isinstance(exc, Exception):
            raise
        raise SaveError(
            f"writing {out} failed: {first_line(exc)}; nothing was written to {out}"
        ) from exc


def write_text_atomic(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> None:
    """Write a text file (a report) atomically; see ``atomic_write``."""

    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="utf-8")

    atomic_write(path, write, overwrite=overwrite)


def _fsync(path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
