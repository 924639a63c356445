"""Batches for recalibration: the ``DataSource`` kinds (samples cut into seeded batches, ready-made
batches, the iterable a user's callable returns), sharding by batch, and the helpers that walk
a batch's tensors."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.data import DataLoader, DistributedSampler

from bnfold.errors import LoadError, UsageError
from bnfold.io.inputs import as_args

Batch = Any


def map_tensors(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """``batch`` with ``fn`` applied to every tensor in it (tuples, lists and dicts kept; a
    tensor batch without a walk of the tree, which would cost a small model's batch 5 %)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    return tree_map(lambda value: fn(value) if isinstance(value, torch.Tensor) else value, batch)


def batch_items(batch: Batch) -> int:
    """Batch items in ``batch``: dim 0 of its first tensor (0 when it holds none)."""
    leaves = [batch] if isinstance(batch, torch.Tensor) else tree_leaves(batch)
    first = next((value for value in leaves if isinstance(value, torch.Tensor)), None)
    if first is None:
        return 0
    return int(first.shape[0]) if first.dim() > 0 else 1


def check_positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return "a dict" + (" (not all values tensors)" if value else " (empty)")
    return f"a {type(value).__name__}"


class DataSource:
    """A re-iterable sequence of batches (tensor, tuple of tensors, or dict of tensors).

    ``split``: ``"by_batch"`` (a file or folder sharded by bnfold: this rank feeds batches
    ``rank, rank + world, ...`` of the whole source), ``"none"`` (one process) or ``"as_given"``
    (a callable's iterable: this rank's part, fed whole). ``notes`` (samples a
    ``DistributedSampler`` repeats or drops) go into the recalibration report.
    """

    description = "data"
    dtype: torch.dtype | None = None
    rank, world = 0, 1
    split = "none"
    notes: tuple[str, ...] = ()

    def _batches(self) -> Iterator[Batch]:
        raise NotImplementedError

    def _sizes(self) -> list[int] | None:
        """Samples in each batch before sharding, when known."""
        return None

    def shard(self, rank: int, world: int) -> None:
        """Feed only batches ``rank, rank + world, ...`` (a file source, split by bnfold)."""
        self.rank, self.world, self.split = rank, world, "by_batch"

    def _cast(self, batch: Batch) -> Batch:
        """Floating-point tensors in ``dtype`` (integer ones are never cast)."""
        if self.dtype is None:
            return batch
        return map_tensors(batch, lambda t: t.to(self.dtype) if t.is_floating_point() else t)

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in enumerate(self._batches()):
            if index % self.world == self.rank:
                yield self._cast(batch)

    def __len__(self) -> int:
        sizes = self._sizes()
        if sizes is None:
            raise TypeError(f"{self.description}: the number of batches is not known")
        return len(range(self.rank, len(sizes), self.world))

    def num_samples(self, batches: int | None = None) -> int | None:
        """Samples in this rank's first ``batches`` batches (all if None), when known."""
        sizes = self._sizes()
        return None if sizes is None else sum(sizes[self.rank :: self.world][:batches])

    def total_samples(self) -> int | None:
        """Samples in the whole source (every rank's part), when known: a file or folder."""
        sizes = self._sizes()
        return None if sizes is None else sum(sizes)

    def first_batch(self) -> Batch:
        """The first batch of the data (of the whole data, whatever the shard)."""
        for batch in self._batches():
            return self._cast(batch)
        raise LoadError(f"{self.description}: the data holds no batch")

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        """The first batch as positional example inputs (for tracing, or saving a ``.pt2``)."""
        batch = self.first_batch()
        inputs = as_args(batch)
        if all(isinstance(value, torch.Tensor) for value in inputs):
            return inputs
        raise UsageError(
            f"{self.description}: the batches are {describe(batch)}, not positional tensors, so "
            "they cannot serve as example inputs; pass --input-shape"
        )


class SampleSource(DataSource):
    """``samples`` samples, shuffled with a seeded permutation and cut into batches; a last
    batch of one sample joins the one before (a BatchNorm needs two values per channel)."""

    def __init__(self, samples: int, description: str, batch_size: int, seed: int) -> None:
        self.samples, self.description = samples, description
        self.batch_size, self.seed = batch_size, seed

    def _sizes(self) -> list[int]:
        full, rest = divmod(self.samples, self.batch_size)
        sizes = [self.batch_size] * full + ([rest] if rest else [])
        if len(sizes) > 1 and sizes[-1] == 1:
            sizes[-2:] = [sizes[-2] + 1]
        return sizes

    def _batches(self) -> Iterator[Batch]:
        order = torch.randperm(self.samples, generator=torch.Generator().manual_seed(self.seed))
        for index in order.split(self._sizes()):
            yield self._take(index)

    def _take(self, index: torch.Tensor) -> Batch:
        raise NotImplementedError


class TensorSource(SampleSource):
    """Samples along dim 0 of positional (a tuple) or keyword (a dict) tensors."""

    def __init__(
        self, inputs: tuple | dict, description: str, *, batch_size: int, seed: int
    ) -> None:
        tensors = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        super().__init__(_common_length(tensors, description), description, batch_size, seed)
        self.inputs = inputs[0] if isinstance(inputs, tuple) and len(inputs) == 1 else inputs

    def _take(self, index: torch.Tensor) -> Batch:
        return map_tensors(self.inputs, lambda tensor: tensor[index])


def _common_length(tensors: list[torch.Tensor], description: str) -> int:
    if any(tensor.dim() == 0 for tensor in tensors):
        raise LoadError(f"{description}: holds a 0-d tensor; samples go along dim 0")
    lengths = [int(tensor.shape[0]) for tensor in tensors]
    if len(set(lengths)) > 1:
        raise LoadError(
            f"{description}: the inputs hold different numbers of samples along dim 0 "
            f"({', '.join(map(str, lengths))}); they must match"
        )
    if lengths[0] == 0:
        raise LoadError(f"{description}: holds no samples (dim 0 has size 0)")
    return lengths[0]


class ListSource(DataSource):
    """Ready-made batches, used in order."""

    def __init__(self, batches: list, description: str) -> None:
        for index, batch in enumerate(batches):
            if not any(isinstance(value, torch.Tensor) for value in tree_leaves(batch)):
                raise LoadError(
                    f"{description}: item {index} of the list is {describe(batch)}; a list "
                    "holds ready-made batches (tensors, tuples of tensors or dicts of tensors)"
                )
        self.batches, self.description = batches, description

    def _sizes(self) -> list[int]:
        return [batch_items(batch) for batch in self.batches]

    def _batches(self) -> Iterator[Batch]:
        yield from self.batches


class IterableSource(DataSource):
    """Whatever a ``package.module:callable`` returned: this rank's part, used as it is."""

    split = "as_given"

    def __init__(self, iterable: Iterable, description: str) -> None:
        self.iterable, self.description = iterable, description
        self.one_shot = iter(iterable) is iterable  # a generator or iterator
        self.consumed = False

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def shard(self, rank: int, world: int) -> None:
        """Take the iterable as this rank's part (never split it); check the rank and world
        size of its ``DistributedSampler``, if any, and note the samples it repeats or drops."""
        self.notes = _sampler_notes(self.iterable, self.description, rank, world)

    def _batches(self) -> Iterator[Batch]:
        if self.one_shot:
            if self.consumed:
                raise LoadError(
                    f"{self.description} returned a one-shot iterator (a generator) that was "
                    "already used up; return a list or a DataLoader so the data can be read twice"
                )
            self.consumed = True
        yield from self.iterable

    def first_batch(self) -> Batch:
        """The first batch; a one-shot iterator keeps it for the run that follows."""
        if self.one_shot and not self.consumed:
            head = list(itertools.islice(self.iterable, 1))
            self.iterable = itertools.chain(head, self.iterable)
            if head:
                return self._cast(head[0])
        return super().first_batch()


def _sampler_notes(iterable: Iterable, description: str, rank: int, world: int) -> tuple[str, ...]:
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
    size, total = len(sampler.dataset), sampler.total_size
    each = f"so that each of the {world} ranks gets {sampler.num_samples}"
    if total > size:
        return (
            f"{description}: its DistributedSampler repeats {total - size} of the {size} "
            f"samples {each}; those samples are counted twice. A dataset size divisible by the "
            "world size avoids it",
        )
    if total < size:
        return (
            f"{description}: its DistributedSampler (drop_last=True) leaves out {size - total} "
            f"of the {size} samples {each}; they are not fed",
        )
    return ()
