"""Models built by the user's own code: a ``package.module:callable`` factory, imported and
called (the current directory first, as ``python -m`` would)."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

from bnfold.errors import LoadError, first_line
from bnfold.io.inputs import no_data_message, tensors_without_data

FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def build_from_factory(spec: str) -> nn.Module:
    """Import ``package.module`` and call ``callable`` (an ``nn.Module`` instance is used as is).

    The current directory is searched first, as ``python -m`` would. Any exception from the
    user's code, ``sys.exit`` included, is raised as ``LoadError`` naming ``spec``.
    """
    module_name, _, attr_path = spec.partition(":")
    target: Any = _import(module_name, spec)
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
