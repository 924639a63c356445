"""Sample data for recalibration (``bnfold recalibrate --data``, ``bnfold fold --data``).

``load_data(spec, ...)`` turns a DATA argument into a ``DataSource`` (``bnfold.calibrate.sources``):
a ``.pt``/``.pth``, ``.npy`` or ``.npz`` file (``bnfold.calibrate.files``), a folder of images
(``bnfold.calibrate.images``), or ``package.module:callable``, your code: called with no
arguments, it returns an iterable of batches (a DataLoader, a list, a generator), this rank's
part under ``torch.distributed``, used as it is.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bnfold.calibrate.files import load_file, npz_member
from bnfold.calibrate.images import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageOptions
from bnfold.calibrate.sources import DataSource, IterableSource, check_positive, describe
from bnfold.errors import LoadError, UsageError
from bnfold.io.models import FACTORY_SPEC, describe_broken_link


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
    rank, world = _check_shard(shard)
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        options = ImageOptions.make(image_size, resize, mean, std)
        source: DataSource = ImageFolder(path, options, batch_size=batch_size, seed=seed)
    elif path.exists():
        source = load_file(path, batch_size=batch_size, seed=seed)
    elif (picked := npz_member(text)) is not None:
        source = load_file(picked[0], batch_size=batch_size, seed=seed, member=picked[1])
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


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"shard must be (rank, world_size) with 0 <= rank < world_size: {shard}")
    return rank, world


def _call(spec: str) -> Iterable:
    """Import ``package.module:callable`` (from the current directory first) and call it."""
    module_name, _, attr_path = spec.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise LoadError(
            f"cannot import module '{module_name}' for {spec}: {type(exc).__name__}: {exc}. The "
            "module must be importable: run from its directory, install it, or add it to "
            "PYTHONPATH"
        ) from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise LoadError(f"{spec}: module '{module_name}' has no attribute '{attr_path}'")
        target = getattr(target, part)
    if callable(target):
        try:
            target = target()
        except Exception as exc:
            raise LoadError(f"calling {spec}() raised {type(exc).__name__}: {exc}") from exc
    if isinstance(target, (torch.Tensor, str, bytes, Mapping)) or not isinstance(target, Iterable):
        raise LoadError(
            f"{spec} gave {describe(target)}; it must return an iterable of batches (a "
            "DataLoader, a list, a generator)"
        )
    return target
