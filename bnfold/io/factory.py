"""Models built by the user's own code: a ``package.module:callable`` factory, alone or with a
state dict (``.pt``/``.pth`` or ``.safetensors``) loaded strictly into what it builds."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import LoadError, UsageError, first_line
from bnfold.io.formats import LoadedModel, ModelFormat
from bnfold.io.inputs import no_data_message, tensors_without_data

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
#: Checkpoint entries that may hold the state dict, tried in this order.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "ema")


def build_from_factory(spec: str) -> nn.Module:
    """Import ``package.module`` and call ``callable`` (an ``nn.Module`` instance is used as is).

    The current directory is searched first, as ``python -m`` would. Any exception from the
    user's code, ``sys.exit`` included, is raised as ``LoadError`` naming ``spec``.
    """
    attr_path = spec.partition(":")[2]
    target = import_target(spec)
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


def import_target(spec: str) -> Any:
    """The object ``package.module:name`` names (``name`` may be dotted), imported from the
    current directory first; ``LoadError`` naming ``spec`` when it cannot be."""
    module_name, _, attr_path = spec.partition(":")
    target: Any = _import(module_name, spec)
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise LoadError(f"{spec}: module '{module_name}' has no attribute '{attr_path}'")
        target = getattr(target, part)
    return target


def _import(module_name: str, spec: str) -> Any:
    with _cwd_on_path():
        try:
            return importlib.import_module(module_name)
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


def _require_data(model: nn.Module, what: str) -> None:
    empty = tensors_without_data(model)
    if empty:
        raise LoadError(no_data_message(what, empty))


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


def model_from_weights(obj: dict, path: Path, arch: str | None, fmt: ModelFormat) -> LoadedModel:
    """The model ``arch`` builds, with the state dict in ``obj`` (a checkpoint dict) loaded
    strictly: every key must fit. ``UsageError`` without ``arch``."""
    state, notes = _extract_state_dict(obj, path)
    if arch is None:
        raise UsageError(
            f"{path} is a state dict (weights only, no architecture): pass "
            "--arch package.module:callable that builds the model"
        )
    model = build_from_factory(arch)
    _load_strict(model, state, path, arch)
    return LoadedModel(model=model, format=fmt, source=str(path), arch=arch, notes=tuple(notes))


def read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(
            f"{path}: could not be read as safetensors ({first_line(exc)}); it may be truncated "
            "or not a safetensors file"
        ) from None


def _is_state(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _extract_state_dict(obj: dict, path: Path) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    state = obj
    if not _is_state(obj):
        key = next((k for k in STATE_DICT_KEYS if _is_state(obj.get(k))), None)
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
