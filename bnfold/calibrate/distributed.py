"""Recalibration under ``torch.distributed``. No collective runs per batch (ranks may feed
different numbers of batches, or none); afterwards ``feed_everywhere`` tells every rank what every
other fed, refusing the run everywhere when one failed or two fed identical first batches, and
``all_reduce`` merges the statistics exactly in float64."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from bnfold.calibrate.sources import Batch, DataSource
from bnfold.calibrate.statistics import Layer, Moments
from bnfold.errors import CalibrationError, UsageError


@dataclass(frozen=True)
class Fed:
    """What one rank fed: batches, batch items, first batch's fingerprint (or 0); or failed."""

    batches: int = 0
    samples: int = 0
    first: int = 0
    failed: bool = False


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_split(data: object, world: int) -> None:
    """A ``DataSource`` that bnfold splits by batch must be split for this rank and world."""
    if world == 1 or not isinstance(data, DataSource) or data.split == "as_given":
        return
    rank = dist.get_rank()
    if (data.rank, data.world) != (rank, world):
        split = f"split for rank {data.rank} of {data.world}" if data.world > 1 else "not split"
        raise UsageError(
            f"{data.description}: the data is {split}, but this process is rank {rank} of "
            f"{world}; open it with load_data(..., shard=(rank, world_size)) so that each rank "
            "feeds its own batches and together they feed each batch once"
        )


def fingerprint(batch: Batch) -> int:
    """A positive 62-bit hash of a batch's tensors (dtype, shape and every byte); 0 when the
    batch holds no value (empty tensors) or no tensor it can read."""
    tensors = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if not any(t.numel() for t in tensors):
        return 0
    digest = hashlib.blake2b(digest_size=8)
    try:
        for tensor in tensors:
            flat = tensor.detach().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    except (RuntimeError, TypeError):  # a tensor kind without plain bytes (sparse, quantized)
        return 0
    return (int.from_bytes(digest.digest(), "little") >> 2) + 1


def feed_everywhere(
    feed: Callable[[bool], Fed], data: object, device: torch.device, world: int
) -> list[Fed]:
    """Run ``feed(fingerprint)`` on this rank (fingerprint the first batch unless bnfold split
    the data: its parts are disjoint by construction); every rank's ``Fed``, in rank order.

    A rank that fails still joins the gather (marked failed) before raising, so the other ranks
    raise too instead of waiting forever in the next collective."""
    if world == 1:
        return [feed(False)]
    failure: Exception | None = None
    split_here = isinstance(data, DataSource) and data.split == "by_batch"
    try:
        check_split(data, world)
        fed = feed(not split_here)
    except Exception as exc:
        failure, fed = exc, Fed(failed=True)
    shares = _gather(fed, device)
    if failure is not None:
        raise failure
    if failed := sum(share.failed for share in shares):
        raise CalibrationError(
            f"{failed} other rank(s) failed during recalibration (see their error); statistics "
            "restored on this rank too"
        )
    _check_distinct([share.first for share in shares])
    return shares


def _gather(fed: Fed, device: torch.device) -> list[Fed]:
    """Every rank's ``Fed``, in rank order (every rank calls it, also one that failed)."""
    values = [fed.batches, fed.samples, fed.first, int(fed.failed)]
    tensor = torch.tensor(values, dtype=torch.int64, device=_collective_device(device))
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [Fed(*row.tolist()[:3], failed=bool(row[3])) for row in gathered]


def _check_distinct(fingerprints: list[int]) -> None:
    """Refuse the same data on several ranks: two ranks with identical first batches."""
    seen: dict[int, int] = {}
    for rank, value in enumerate(fingerprints):
        if value and value in seen:
            raise CalibrationError(
                f"ranks {seen[value]} and {rank} fed identical first batches: the data looks "
                "the same on several ranks, and every sample would be counted once per rank. "
                "Under torch.distributed each rank must feed only its own part: a DataLoader "
                "with a DistributedSampler, a callable that reads the rank, or "
                "load_data(..., shard=(rank, world_size)). Statistics restored, model unchanged"
            )
        seen.setdefault(value, rank)


def _collective_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if "gloo" in str(dist.get_backend()).lower() else device


def all_reduce(layers: list[Layer], device: torch.device) -> None:
    """Every layer's statistics and calls over every rank, merged exactly (the global mean
    first, then M2 about it). ``layers`` are in the same order on every rank."""
    local = [layer.total or _nothing(layer.bn.num_features) for layer in layers]
    ends = np.cumsum([moments.mean.size for moments in local])[:-1]
    counts = [[moments.count, layer.calls] for moments, layer in zip(local, layers, strict=True)]
    head = np.array(counts, dtype=np.float64).ravel()
    first = _summed([head, *(moments.mean * moments.count for moments in local)], device)
    counts = first[: head.size].reshape(-1, 2).tolist()
    sums = np.split(first[head.size :], ends)
    means = [s / max(n, 1.0) for s, (n, _) in zip(sums, counts, strict=True)]
    m2 = [m.m2 + m.count * (m.mean - mean) ** 2 for m, mean in zip(local, means, strict=True)]
    second = np.split(_summed(m2, device), ends)
    parts = zip(layers, counts, means, second, strict=True)
    for layer, (count, calls), mean, deviations in parts:
        layer.calls = int(calls)
        layer.total = Moments(int(count), mean, deviations) if count else None


def _nothing(width: int) -> Moments:
    return Moments(0, np.zeros(width), np.zeros(width))


def _summed(arrays: list[np.ndarray], device: torch.device) -> np.ndarray:
    """``arrays``, concatenated, summed over every rank (float64)."""
    tensor = torch.from_numpy(np.concatenate(arrays)).to(_collective_device(device))
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()
