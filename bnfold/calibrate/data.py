"""Sample data for recalibration (``bnfold recalibrate --data``, ``bnfold fold --data``).

``load_data(spec, ...)`` turns a DATA argument into a ``DataSource``: a re-iterable sequence of
batches that ``bnfold.recalibrate`` can consume, plus ``example_inputs()`` (the first batch as
positional tensors, for tracing and for saving a ``.pt2``). What DATA may be:

- ``.pt`` / ``.pth``: read with bnfold's weights-only unpickler (no code from the file runs).
  A tensor holds samples along dim 0 (one positional input); a tuple of tensors is several
  positional inputs, samples along dim 0 of each; a dict ``{name: tensor}`` is keyword inputs,
  samples along dim 0 of each; a **list** is a list of ready-made batches (each a tensor, tuple
  or dict), used as they are.
- ``.npy``: one array, samples along dim 0. ``.npz``: an archive of one array is that array;
  ``FILE.npz:NAME`` picks the array ``NAME`` (only that member is read); arrays saved
  positionally (``np.savez(f, a, b)``: ``arr_0``, ``arr_1``, ...) are positional inputs, in
  that order. Several arrays with other names (``np.savez(f, images=a, labels=b)``) are refused
  with their names: pick one with ``FILE.npz:NAME`` (a dict of tensors in a ``.pt`` gives
  keyword inputs). Object arrays are refused (no pickle).
- a folder: every image in it and its subfolders (``.jpg .jpeg .png .bmp .gif .webp .tif
  .tiff``), read with Pillow, converted to RGB, resized so the shorter side is ``resize``
  (default ``image_size / 0.875``, i.e. 256 for 224), center-cropped to ``image_size`` and
  normalised as ``(pixel / 255 − mean) / std``; defaults are the ImageNet ones (224,
  mean 0.485, 0.456, 0.406, std 0.229, 0.224, 0.225). Images are read batch by batch.
- ``package.module:callable``: your code; called with no arguments, it returns an iterable of
  batches (a DataLoader, a list, a generator), used as it is.

Samples (arrays, tensors, images) are shuffled with a seeded permutation (``seed``; the same
seed gives the same batches) and cut into batches of ``batch_size``; a final batch of a single
sample is merged into the one before, because a BatchNorm needs two values per channel. Ready-
made batches and callables are not re-batched or shuffled. ``dtype`` casts floating-point
tensors (never integer ones) to the model's dtype.

Sharding (``shard=(rank, world_size)``, what ``torchrun`` needs): a file or folder is **split by
batch**: rank ``r`` of ``W`` feeds batches ``r, r + W, r + 2W, ...`` of the batches one process
would make with the same ``batch_size`` and ``seed``, so the ranks together feed every batch
(every sample) exactly once, in the same batches. By batch, not by sample: a BatchNorm
normalises with its batch's statistics, so the layers after it see what they would see in one
process. Ranks may get unequal numbers of batches, or none. A callable's iterable is **this
rank's part**, fed as it is and never split: the callable reads the rank itself, or returns a
DataLoader with a ``DistributedSampler`` (whose ``num_replicas`` and ``rank`` must match
``shard``; the samples it repeats or drops to give every rank the same count are stated in
``notes``).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import LoadError, UnsafeFileError, UnsafePickleError, UsageError
from bnfold.io.models import FACTORY_SPEC, describe_broken_link
from bnfold.io.unpickle import load_torch_file

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DataSource",
    "load_data",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_FILE_SUFFIXES = (".pt", ".pth", ".npy", ".npz")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Default resize: the shorter side becomes ``image_size / CROP_FRACTION`` before the crop.
CROP_FRACTION = 0.875

Batch = Any


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

    ``shard=(rank, world_size)`` splits a file or folder by batch and takes a callable's
    iterable as this rank's part (see the module docstring).

    Raises ``LoadError`` (missing, unreadable or empty data, mismatched sample counts, an
    ``.npz`` without the array ``NAME``, a ``DistributedSampler`` built for other ranks),
    ``UnsafeFileError`` (a ``.pt`` that needs unpickling arbitrary objects) and ``UsageError``
    (bad ``batch_size``, image options or ``shard``; an ``.npz`` of several named arrays without
    ``:NAME``). Nothing is fed to a model here.
    """
    _check_positive("batch_size", batch_size)
    rank, world = _check_shard(shard)
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        options = _ImageOptions.make(image_size, resize, mean, std)
        source: DataSource = _ImageFolder(path, options, batch_size=batch_size, seed=seed)
    elif path.exists():
        source = _load_file(path, batch_size=batch_size, seed=seed)
    elif (picked := _npz_member(text)) is not None:
        source = _load_file(picked[0], batch_size=batch_size, seed=seed, member=picked[1])
    elif _looks_like_callable(text):
        source = _IterableSource(_call(text), text)
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


# --------------------------------------------------------------------------------- the source


class DataSource:
    """A re-iterable sequence of batches (tensor, tuple of tensors, or dict of tensors).

    ``split`` says how the source is shared among the ranks of ``torch.distributed``: a file or
    folder is ``"by_batch"`` (bnfold feeds this rank batches ``rank, rank + world, ...`` of the
    whole source) or ``"none"`` (not split: one process); a callable's iterable is always
    ``"as_given"`` (this rank's part, fed whole). ``notes``
    state what a reader of the statistics should know about the data (samples a
    ``DistributedSampler`` repeats or drops); ``bnfold.recalibrate`` copies them into its report.
    """

    description = "data"
    dtype: torch.dtype | None = None
    rank, world = 0, 1
    split = "none"
    notes: tuple[str, ...] = ()

    def _batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    def _count(self) -> int | None:
        """Batches before sharding, when known."""
        return None

    def _sizes(self) -> list[int] | None:
        """Samples in each batch before sharding, when known."""
        return None

    def shard(self, rank: int, world: int) -> None:
        """Feed only batches ``rank, rank + world, ...`` (a file source, split by bnfold)."""
        self.rank, self.world, self.split = rank, world, "by_batch"

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in enumerate(self._batches()):
            if index % self.world == self.rank:
                yield _cast(batch, self.dtype)

    def __len__(self) -> int:
        count = self._count()
        if count is None:
            raise TypeError(f"{self.description}: the number of batches is not known")
        return len(range(self.rank, count, self.world))

    @property
    def num_batches(self) -> int | None:
        """Batches this rank will feed, or None when the data does not say."""
        return None if self._count() is None else len(self)

    def num_samples(self, batches: int | None = None) -> int | None:
        """Samples in this rank's first ``batches`` batches (all if None), when known."""
        sizes = self._sizes()
        if sizes is None:
            return None
        return sum(sizes[self.rank :: self.world][:batches])

    def total_samples(self) -> int | None:
        """Samples in the whole source, every rank's part together, when bnfold knows them
        (a file or folder); None for a callable's iterable."""
        sizes = self._sizes()
        return None if sizes is None else sum(sizes)

    def first_batch(self) -> Batch:
        """The first batch of the data (of the whole data, whatever the shard)."""
        for batch in self._batches():
            return _cast(batch, self.dtype)
        raise LoadError(f"{self.description}: the data holds no batch")

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """The first batch as positional example inputs (for tracing, or saving a ``.pt2``)."""
        batch = self.first_batch()
        if isinstance(batch, torch.Tensor):
            return (batch,)
        if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
            return tuple(batch)
        raise UsageError(
            f"{self.description}: the batches are {_kind(batch)}, not positional tensors, so "
            "they cannot serve as example inputs; pass --input-shape"
        )


class _TensorSource(DataSource):
    """Samples along dim 0 of positional or keyword tensors, batched with a seeded shuffle."""

    def __init__(
        self, inputs: tuple | dict, description: str, *, batch_size: int, seed: int
    ) -> None:
        tensors = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        self.count = _common_length(tensors, description)
        self.inputs = inputs
        self.description = description
        self.batch_size = batch_size
        self.seed = seed

    def _count(self) -> int:
        return len(_batch_bounds(self.count, self.batch_size))

    def _sizes(self) -> list[int]:
        return [stop - start for start, stop in _batch_bounds(self.count, self.batch_size)]

    def _batches(self) -> Iterator[Batch]:
        order = _permutation(self.count, self.seed)
        for start, stop in _batch_bounds(self.count, self.batch_size):
            index = order[start:stop]
            if isinstance(self.inputs, dict):
                yield {name: tensor[index] for name, tensor in self.inputs.items()}
            elif len(self.inputs) == 1:
                yield self.inputs[0][index]
            else:
                yield tuple(tensor[index] for tensor in self.inputs)


class _ListSource(DataSource):
    """Ready-made batches, used in order."""

    def __init__(self, batches: list, description: str) -> None:
        for index, batch in enumerate(batches):
            if not _is_batch(batch):
                raise LoadError(
                    f"{description}: item {index} of the list is {_kind(batch)}; a list holds "
                    "ready-made batches (tensors, tuples of tensors or dicts of tensors)"
                )
        self.batches = batches
        self.description = description

    def _count(self) -> int:
        return len(self.batches)

    def _sizes(self) -> list[int]:

        return [batch_items(batch) for batch in self.batches]

    def _batches(self) -> Iterator[Batch]:
        yield from self.batches


class _IterableSource(DataSource):
    """Whatever a ``package.module:callable`` returned: used as it is."""

    split = "as_given"

    def __init__(self, iterable: Iterable, description: str) -> None:
        self.iterable = iterable
        self.description = description
        self.one_shot = iter(iterable) is iterable  # a generator or iterator
        self.peeked: list = []
        self.consumed = False

    def _count(self) -> int | None:
        try:
            return len(self.iterable)  # type: ignore[arg-type]
        except TypeError:
            return None

    def shard(self, rank: int, world: int) -> None:
        """Take the iterable as this rank's part (never split it); check the rank and world
        size of its ``DistributedSampler``, if any, and note the samples it repeats or drops."""
        self.notes = _sampler_notes(self.iterable, self.description, rank, world)

    def _batches(self) -> Iterator[Batch]:
        if not self.one_shot:
            yield from self.iterable
            return
        if self.consumed:
            raise LoadError(
                f"{self.description} returned a one-shot iterator (a generator) that was "
                "already used up; return a list or a DataLoader so the data can be read twice"
            )
        yield from self.peeked
        self.consumed = True
        yield from self.iterable

    def first_batch(self) -> Batch:
        if self.one_shot and not self.peeked and not self.consumed:
            self.peeked = [next(iter(self.iterable), _NOTHING)]
            if self.peeked[0] is _NOTHING:
                self.peeked = []
        if self.one_shot and self.peeked:
            return _cast(self.peeked[0], self.dtype)
        return super().first_batch()


_NOTHING = object()


def _sampler_notes(iterable: Iterable, description: str, rank: int, world: int) -> tuple[str, ...]:
    from torch.utils.data import DataLoader, DistributedSampler

    if not isinstance(iterable, DataLoader):
        return ()
    samplers = (iterable.sampler, getattr(iterable.batch_sampler, "sampler", None))
    sampler = next((s for s in samplers if isinstance(s, DistributedSampler)), None)
    if sampler is None:
        return (
            f"{description} is a DataLoader without a DistributedSampler: bnfold feeds it whole "
            f"as this rank's part. If every rank loads the whole dataset, each sample is counted "
            f"{world} times (bnfold refuses it only when two ranks' first batches are identical)",
        )
    if (sampler.num_replicas, sampler.rank) != (world, rank):
        raise LoadError(
            f"{description}: its DistributedSampler splits the data for rank {sampler.rank} of "
            f"{sampler.num_replicas}, but this process is rank {rank} of {world}; build it with "
            "DistributedSampler(dataset) inside the process group (or num_replicas=world size, "
            "rank=rank)"
        )
    return _padding_notes(sampler, description, world)


def _padding_notes(sampler: Any, description: str, world: int) -> tuple[str, ...]:
    """What a DistributedSampler does to give every rank the same number of samples."""
    size = len(sampler.dataset)
    if sampler.total_size > size:
        return (
            f"{description}: its DistributedSampler repeats {sampler.total_size - size} of the "
            f"{size} samples so that each of the {world} ranks gets {sampler.num_samples}; "
            "those samples are counted twice. A dataset size divisible by the world size avoids "
            "it",
        )
    if sampler.total_size < size:
        return (
            f"{description}: its DistributedSampler (drop_last=True) leaves out "
            f"{size - sampler.total_size} of the {size} samples so that each of the {world} "
            f"ranks gets {sampler.num_samples}; they are not fed",
        )
    return ()


# ------------------------------------------------------------------------------------- images


class _ImageOptions:
    def __init__(self, size: int, resize: int, mean: tuple, std: tuple) -> None:
        self.size, self.resize, self.mean, self.std = size, resize, mean, std

    @classmethod
    def make(
        cls, size: int, resize: int | None, mean: Sequence[float], std: Sequence[float]
    ) -> _ImageOptions:
        _check_positive("image_size", size)
        resize = round(size / CROP_FRACTION) if resize is None else resize
        _check_positive("resize", resize)
        if resize < size:
            raise UsageError(f"resize ({resize}) must be at least image_size ({size})")
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) not in (1, 3) or len(std) not in (1, 3):
            raise UsageError("mean and std take 1 or 3 values (one per RGB channel)")
        if any(v <= 0 for v in std):
            raise UsageError(f"std values must be > 0, got {std}")
        return cls(size, resize, mean, std)


class _ImageFolder(DataSource):
    def __init__(self, root: Path, options: _ImageOptions, *, batch_size: int, seed: int) -> None:
        self.files = sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.files:
            raise LoadError(
                f"{root}: no images found (looked for {' '.join(IMAGE_EXTENSIONS)} in the "
                "folder and its subfolders)"
            )
        self.options = options
        self.description = f"{root} ({len(self.files)} images)"
        self.batch_size = batch_size
        self.seed = seed

    def _count(self) -> int:
        return len(_batch_bounds(len(self.files), self.batch_size))

    def _sizes(self) -> list[int]:
        return [stop - start for start, stop in _batch_bounds(len(self.files), self.batch_size)]

    def _batches(self) -> Iterator[torch.Tensor]:
        order = _permutation(len(self.files), self.seed).tolist()
        for start, stop in _batch_bounds(len(self.files), self.batch_size):
            yield torch.stack([_read_image(self.files[i], self.options) for i in order[start:stop]])


def _read_image(path: Path, options: _ImageOptions) -> torch.Tensor:
    """One image as a normalised float32 ``(3, size, size)`` tensor."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise LoadError("reading an image folder needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            width, height = image.size
            scale = options.resize / min(width, height)
            size = (
                max(options.size, round(width * scale)),
                max(options.size, round(height * scale)),
            )
            image = image.resize(size, Image.Resampling.BILINEAR)
            left = (size[0] - options.size) // 2
            top = (size[1] - options.size) // 2
            image = image.crop((left, top, left + options.size, top + options.size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: cannot read the image: {exc}") from exc
    tensor = pixels.view(options.size, options.size, 3).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(options.mean).view(-1, 1, 1)
    std = torch.tensor(options.std).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


# -------------------------------------------------------------------------------- data files


def _load_file(path: Path, *, batch_size: int, seed: int, member: str | None = None) -> DataSource:
    suffix = path.suffix.lower()
    if member is not None and suffix != ".npz":
        raise LoadError(
            f"{path}:{member}: ':NAME' picks one array from an .npz archive, and {path} is not "
            "an .npz file"
        )
    if suffix in (".pt", ".pth"):
        return _from_object(_torch_load(path), str(path), batch_size=batch_size, seed=seed)
    if suffix == ".npy":
        array = _numpy_load(path)
        return _TensorSource(
            (_from_numpy(array, path),), str(path), batch_size=batch_size, seed=seed
        )
    if suffix == ".npz":
        inputs = _npz_inputs(path, member)
        description = str(path) if member is None else f"{path}:{member}"
        return _TensorSource(inputs, description, batch_size=batch_size, seed=seed)
    raise LoadError(
        f"{path}: cannot tell what data this is from '{suffix or 'no extension'}'; use a .pt "
        "(tensors), .npy/.npz (arrays), a folder of images, or package.module:callable"
    )


def _npz_member(text: str) -> tuple[Path, str] | None:
    """``(FILE, NAME)`` when ``text`` is ``FILE:NAME`` and FILE is an existing data file."""
    head, colon, name = text.rpartition(":")
    path = Path(head)
    if not colon or path.suffix.lower() not in DATA_FILE_SUFFIXES or not path.is_file():
        return None
    return path, name


def _npz_inputs(path: Path, member: str | None) -> tuple[torch.Tensor, ...]:
    """The positional inputs an .npz holds: the array ``member``, the only array, or
    ``arr_0, arr_1, ...`` (saved positionally) in order. Reads only the arrays it returns."""
    with _numpy_load(path) as archive:
        names = list(archive.files)
        if not names:
            raise LoadError(f"{path}: the .npz archive holds no array")
        chosen = _npz_choice(path, names, member)
        return tuple(_from_numpy(_npz_array(archive, name, path), path) for name in chosen)


def _npz_array(archive: Any, name: str, path: Path) -> Any:
    """One member of an open .npz (numpy reads members only when asked)."""
    try:
        return archive[name]
    except ValueError as exc:
        raise UnsafeFileError(
            f"{path}: array {name!r} holds object arrays, which need pickle to load; bnfold "
            f"refuses that. Save numeric arrays instead ({exc})"
        ) from exc
    except Exception as exc:
        raise LoadError(f"{path}: cannot read array {name!r} with numpy.load: {exc}") from exc


def _npz_choice(path: Path, names: list[str], member: str | None) -> list[str]:
    listed = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    if member is not None:
        if member not in names:
            raise LoadError(f"{path}: holds no array named {member!r}; its arrays: {listed}")
        return [member]
    if len(names) == 1:
        return names
    positional = [f"arr_{i}" for i in range(len(names))]
    if sorted(names) == sorted(positional):
        return positional
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


def _numpy_load(path: Path) -> Any:
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise UnsafeFileError(
            f"{path}: holds object arrays, which need pickle to load; bnfold refuses that. "
            f"Save numeric arrays instead ({exc})"
        ) from exc
    except Exception as exc:
        raise LoadError(f"{path}: cannot read it with numpy.load: {exc}") from exc


def _from_numpy(array: Any, path: Path) -> torch.Tensor:
    if array.dtype.kind not in "biuf":
        raise LoadError(f"{path}: arrays of dtype {array.dtype} are not model inputs")
    return torch.from_numpy(array.copy())


def _from_object(obj: Any, description: str, *, batch_size: int, seed: int) -> DataSource:
    if isinstance(obj, torch.Tensor):
        return _TensorSource((obj,), description, batch_size=batch_size, seed=seed)
    if isinstance(obj, tuple) and obj and all(isinstance(t, torch.Tensor) for t in obj):
        return _TensorSource(obj, description, batch_size=batch_size, seed=seed)
    if (
        isinstance(obj, dict)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return _TensorSource(dict(obj), description, batch_size=batch_size, seed=seed)
    if isinstance(obj, list):
        if not obj:
            raise LoadError(f"{description}: the list of batches is empty")
        return _ListSource(obj, description)
    raise LoadError(
        f"{description}: holds {_kind(obj)}; expected a tensor (samples along dim 0), a tuple "
        "of tensors (positional inputs), a dict of tensors (keyword inputs) or a list of "
        "ready-made batches"
    )


# --------------------------------------------------------------------------------- callables


def _looks_like_callable(text: str) -> bool:
    return bool(FACTORY_SPEC.match(text))


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
            f"{spec} gave {_kind(target)}; it must return an iterable of batches (a DataLoader, "
            "a list, a generator)"
        )
    return target


# ------------------------------------------------------------------------------------ helpers


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _check_shard(shard: tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"shard must be (rank, world_size) with 0 <= rank < world_size: {shard}")
    return rank, world


def _common_length(tensors: list[torch.Tensor], description: str) -> int:
    lengths = []
    for tensor in tensors:
        if tensor.dim() == 0:
            raise LoadError(f"{description}: holds a 0-d tensor; samples go along dim 0")
        lengths.append(int(tensor.shape[0]))
    if len(set(lengths)) > 1:
        raise LoadError(
            f"{description}: the inputs hold different numbers of samples along dim 0 "
            f"({', '.join(map(str, lengths))}); they must match"
        )
    if lengths[0] == 0:
        raise LoadError(f"{description}: holds no samples (dim 0 has size 0)")
    return lengths[0]


def _batch_bounds(count: int, batch_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each batch; a last batch of one sample joins the one before."""
    bounds = [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], count)]
    return bounds


def _permutation(count: int, seed: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def _cast(batch: Batch, dtype: torch.dtype | None) -> Batch:
    if dtype is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {key: _cast(value, dtype) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_cast(value, dtype) for value in batch)
    return batch


def _is_batch(value: Any) -> bool:
    """A tensor, a tuple/list holding a tensor, or a dict holding a tensor."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, Mapping):
        value = list(value.values())
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return "a dict" + (" (not all values tensors)" if value else " (empty)")
    return f"a {type(value).__name__}"


def batch_items(batch: Any) -> int:
    """Batch items in ``batch``: dim 0 of its first tensor (0 when it holds none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else 1
    if isinstance(batch, Mapping):
        values = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        values = list(batch)
    else:
        return 0
    for value in values:
        items = batch_items(value)
        if items:
            return items
    return 0
