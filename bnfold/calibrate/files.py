"""Sample data files as a ``DataSource``: ``.pt``/``.pth`` (bnfold's weights-only unpickler),
``.npy`` and ``.npz`` (numpy without pickle); the forms each may take are in the README,
"Recalibrate after fine-tuning". In a ``.pt`` a tensor is one positional input, a tuple several,
a dict keyword inputs (samples along dim 0 of each), a list ready-made batches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfold.calibrate.sources import DataSource, ListSource, TensorSource, describe
from bnfold.errors import LoadError, UnsafeFileError, UnsafePickleError, UsageError
from bnfold.io.unpickle import load_torch_file


def load_file(path: Path, *, batch_size: int, seed: int, member: str | None = None) -> DataSource:
    suffix = path.suffix.lower()
    if member is not None and suffix != ".npz":
        raise LoadError(
            f"{path}:{member}: ':NAME' picks one array from an .npz archive, and {path} is not "
            "an .npz file"
        )
    if suffix in (".pt", ".pth"):
        return _from_object(_torch_load(path), str(path), batch_size=batch_size, seed=seed)
    if suffix in (".npy", ".npz"):
        inputs = (_tensor(_numpy(path), path),) if suffix == ".npy" else _npz(path, member)
        description = str(path) if member is None else f"{path}:{member}"
        return TensorSource(inputs, description, batch_size=batch_size, seed=seed)
    raise LoadError(
        f"{path}: cannot tell what data this is from '{suffix or 'no extension'}'; use a .pt "
        "(tensors), .npy/.npz (arrays), a folder of images, or package.module:callable"
    )


def _npz(path: Path, member: str | None) -> tuple[torch.Tensor, ...]:
    """The positional inputs an .npz holds (reads only the arrays it returns)."""
    with _numpy(path) as archive:
        names = list(archive.files)
        if not names:
            raise LoadError(f"{path}: the .npz archive holds no array")
        chosen = _pick(path, names, member)  # numpy reads a member only when asked
        arrays = [_numpy(path, lambda n=n: archive[n], f"array {n!r} ") for n in chosen]
        return tuple(_tensor(array, path) for array in arrays)


def _pick(path: Path, names: list[str], member: str | None) -> list[str]:
    listed = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    if member is not None:
        if member not in names:
            raise LoadError(f"{path}: holds no array named {member!r}; its arrays: {listed}")
        return [member]
    positional = [f"arr_{i}" for i in range(len(names))]
    if len(names) == 1 or sorted(names) == sorted(positional):
        return names if len(names) == 1 else positional
    raise UsageError(
        f"{path}: holds {len(names)} arrays ({listed}); pick the input with {path}:NAME (e.g. "
        f"{path}:{names[0]}). For several positional inputs save them positionally "
        "(np.savez(f, a, b): arr_0, arr_1, ... in that order); for keyword inputs save a dict "
        "of tensors in a .pt"
    )


def _torch_load(path: Path) -> Any:
    try:
        return load_torch_file(path)
    except UnsafePickleError as exc:
        raise UnsafeFileError(
            f"{path}: holds Python objects other than tensors, tuples, lists and dicts (it "
            f"references {', '.join(exc.references[:5]) or 'other objects'}), and bnfold reads "
            "data with its own unpickler, which like torch.load(weights_only=True) allows only "
            "tensors and plain containers and runs no code from the file. Save plain tensors "
            "(torch.save(tensor or dict of tensors)) or use package.module:callable."
        ) from None


def _numpy(path: Path, read: Callable[[], Any] | None = None, what: str = "") -> Any:
    """``read()`` (default: ``numpy.load`` of ``path``), refusing object arrays (pickle)."""
    try:
        return read() if read is not None else np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise UnsafeFileError(
            f"{path}: {what}holds object arrays, which need pickle to load; bnfold refuses "
            f"that. Save numeric arrays instead ({exc})"
        ) from exc
    except Exception as exc:
        raise LoadError(f"{path}: cannot read {what or 'it '}with numpy.load: {exc}") from exc


def _tensor(array: Any, path: Path) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise LoadError(f"{path}: arrays of dtype {array.dtype} are not model inputs")
    return torch.from_numpy(array.copy())


def _from_object(obj: Any, description: str, *, batch_size: int, seed: int) -> DataSource:
    if isinstance(obj, torch.Tensor):
        obj = (obj,)
    if _inputs(obj):
        inputs = dict(obj) if isinstance(obj, dict) else obj
        return TensorSource(inputs, description, batch_size=batch_size, seed=seed)
    if isinstance(obj, list):
        if not obj:
            raise LoadError(f"{description}: the list of batches is empty")
        return ListSource(obj, description)
    raise LoadError(
        f"{description}: holds {describe(obj)}; expected a tensor (samples along dim 0), a "
        "tuple of tensors (positional inputs), a dict of tensors (keyword inputs) or a list of "
        "ready-made batches"
    )


def _inputs(obj: Any) -> bool:
    """A non-empty tuple of tensors, or a non-empty dict of tensors by name."""
    if isinstance(obj, tuple):
        return bool(obj) and all(isinstance(t, torch.Tensor) for t in obj)
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )
