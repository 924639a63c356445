"""``load_data``: a DATA argument (``bnfold recalibrate --data``, ``bnfold fold --data``) as a
``DataSource``: a ``.pt``/``.pth`` file (bnfold's weights-only unpickler: a tensor is one
positional input, a tuple several, a dict keyword inputs, a list ready-made batches), an ``.npy``
or ``.npz`` file (numpy without pickle), a folder of images (``bnfold.calibrate.images``), or
``package.module:callable``: called with no arguments, it returns an iterable of batches (a
DataLoader, a list, a generator), this rank's part under ``torch.distributed``, used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfold.calibrate.images import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageOptions
from bnfold.calibrate.sources import (
    DataSource,
    IterableSource,
    ListSource,
    TensorSource,
    check_positive,
    describe,
)
from bnfold.errors import LoadError, UnsafeFileError, UnsafePickleError, UsageError, first_line
from bnfold.io.factory import import_target
from bnfold.io.models import FACTORY_SPEC, describe_broken_link
from bnfold.io.paths import refuse_special_file, spec_path
from bnfold.io.unpickle import load_torch_file


def load_data(
    spec: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    image_size: int = 224,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    shard: tuple[int, int] | None = None,
) -> DataSource:
    """Open DATA (see the module docstring for the forms) as a re-iterable ``DataSource``.

    Samples (arrays, tensors, images) are shuffled with a seeded permutation (``seed``: the same
    seed gives the same batches) and cut into batches of ``batch_size``; ready-made batches and
    callables are used as they are. ``dtype`` casts floating-point tensors (never integer ones).
    ``shard=(rank, world_size)`` splits a file or folder **by batch**: rank ``r`` of ``W`` feeds
    batches ``r, r + W, ...`` of the batches one process makes, so the ranks together feed each
    batch once (a callable's iterable is this rank's part, never split).

    Raises ``LoadError`` (missing, unreadable or empty data, mismatched sample counts, an
    ``.npz`` without the array ``NAME``, a ``DistributedSampler`` built for other ranks),
    ``UnsafeFileError`` (a ``.pt`` that needs unpickling arbitrary objects) and ``UsageError``
    (bad ``batch_size``, image options or ``shard``; an ``.npz`` of several named arrays without
    ``:NAME``). Nothing is fed to a model here.
    """
    check_positive("batch_size", batch_size)
    rank, world = shard or (0, 1)
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"shard must be (rank, world_size) with 0 <= rank < world_size: {shard}")
    text = os.fspath(spec)
    path = spec_path(text)  # FILE for FILE:NAME
    named, _, member = text.rpartition(":")
    if path is not None and path.is_dir():
        options = ImageOptions.make(image_size, resize, mean, std)
        source: DataSource = ImageFolder(path, options, batch_size=batch_size, seed=seed)
    elif path is not None and path.exists():
        refuse_special_file(path, "data")
        name = None if path == Path(text) else member
        source = _load_file(path, batch_size=batch_size, seed=seed, member=name)
    elif Path(named).suffix.lower() in _FILE_SUFFIXES:
        raise LoadError(f"{named}: no such file (named by {text})")
    elif FACTORY_SPEC.match(text):
        source = IterableSource(_call(text), text)
    elif os.path.islink(text):
        raise LoadError(describe_broken_link(text))
    else:
        raise LoadError(
            f"{text}: no such file or folder (and not a 'package.module:callable' spec)"
        )
    source.dtype = dtype
    if world > 1:
        source.shard(rank, world)
    return source


#: Data files a ``FILE:NAME`` spec may name (a module path has no such suffix).
_FILE_SUFFIXES = {".npz", ".npy", ".pt", ".pth"}


def _call(spec: str) -> Iterable:
    """Import ``package.module:callable`` (from the current directory first) and call it."""
    target = import_target(spec)
    if callable(target):
        try:
            target = target()
        except Exception as exc:
            raise LoadError(f"calling {spec}() raised {first_line(exc)}") from exc
    if isinstance(target, (torch.Tensor, str, bytes, Mapping)) or not isinstance(target, Iterable):
        raise LoadError(
            f"{spec} gave {describe(target)}; it must return an iterable of batches (a "
            "DataLoader, a list, a generator)"
        )
    return target


def _load_file(path: Path, *, batch_size: int, seed: int, member: str | None = None) -> DataSource:
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
