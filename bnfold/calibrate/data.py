"""``load_data``: a DATA argument (``bnfold recalibrate --data``, ``bnfold fold --data``) as a
``DataSource``: a data file (``bnfold.calibrate.files``), a folder of images
(``bnfold.calibrate.images``), or ``package.module:callable``, your code: called with no
arguments, it returns an iterable of batches (a DataLoader, a list, a generator), this rank's
part under ``torch.distributed``, used as it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from bnfold.calibrate.files import load_file
from bnfold.calibrate.images import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ImageOptions
from bnfold.calibrate.sources import DataSource, IterableSource, check_positive, describe
from bnfold.errors import LoadError, UsageError, first_line
from bnfold.io.factory import import_target
from bnfold.io.models import FACTORY_SPEC, describe_broken_link
from bnfold.io.paths import spec_path


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
    if path is not None and path.is_dir():
        options = ImageOptions.make(image_size, resize, mean, std)
        source: DataSource = ImageFolder(path, options, batch_size=batch_size, seed=seed)
    elif path is not None and path.exists():
        member = None if path == Path(text) else text.rpartition(":")[2]
        source = load_file(path, batch_size=batch_size, seed=seed, member=member)
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
