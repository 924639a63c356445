"""The report of a recalibration: per BatchNorm, old against new statistics, built for every
layer at once (a few tensor operations in all, not per layer)."""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bnfold.calibrate.batchstats import NUMPY_DTYPES
from bnfold.records import Record

#: A channel whose recalibrated variance is below ``NEAR_ZERO_VAR_FACTOR * eps`` is reported:
#: its normaliser is dominated by ``eps`` (a dead channel, or a constant input) and a fold will
#: scale it by about ``gamma / sqrt(eps)``.
NEAR_ZERO_VAR_FACTOR = 1.0


# ------------------------------------------------------------------------------------- records


class LayerStatus(str, enum.Enum):
    """What recalibration did with one BatchNorm."""

    RECALIBRATED = "recalibrated"  # running stats replaced by the pooled statistics
    NO_DATA = "no_data"  # never called on any batch: its (stale) stats were left as they were
    NO_RUNNING_STATS = "no_running_stats"  # track_running_stats=False: eval uses batch stats


@dataclass(frozen=True)
class ChannelSummary(Record):
    """Minimum, mean and maximum of a per-channel quantity."""

    min: float
    mean: float
    max: float


@dataclass(frozen=True)
class LayerCalibration(Record):
    """One BatchNorm's recalibration: what it saw and how far its statistics moved.

    ``samples`` counts elements per channel pooled (batch items × spatial positions, over every
    call and every rank). ``mean_shift`` is ``|new_mean − old_mean| / sqrt(old_var + eps)`` per
    channel: the shift in units of the old standard deviation. ``std_ratio`` is
    ``sqrt((new_var + eps) / (old_var + eps))``: how much the layer's normaliser changed.
    ``near_zero_var_channels`` lists channels whose new variance is below ``eps``.
    """

    name: str
    type: str
    status: LayerStatus
    num_features: int
    calls: int = 0
    samples: int = 0
    old_mean: ChannelSummary | None = None
    new_mean: ChannelSummary | None = None
    old_var: ChannelSummary | None = None
    new_var: ChannelSummary | None = None
    mean_shift: ChannelSummary | None = None
    std_ratio: ChannelSummary | None = None
    near_zero_var_channels: tuple[int, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class RankShare(Record):
    """What one rank fed: its batches and samples (batch items)."""

    rank: int
    batches: int
    samples: int


@dataclass(frozen=True)
class CalibrationReport(Record):
    """What ``recalibrate`` did: one entry per BatchNorm (in ``named_modules`` order).

    ``batches`` and ``samples`` (batch items, from dim 0 of each batch's first tensor) are totals
    over every rank; ``per_rank`` gives each rank's own (gathered from every rank, in rank order;
    one entry outside ``torch.distributed``), and they sum to the totals. ``world_size`` is 1
    outside ``torch.distributed``. Statistics are pooled in ``accumulation_dtype``.
    """

    layers: tuple[LayerCalibration, ...]
    batches: int
    samples: int
    world_size: int
    seconds: float
    accumulation_dtype: str = "float64"
    notes: tuple[str, ...] = ()
    per_rank: tuple[RankShare, ...] = ()

    @property
    def recalibrated(self) -> tuple[LayerCalibration, ...]:
        return tuple(x for x in self.layers if x.status is LayerStatus.RECALIBRATED)

    @property
    def unseen(self) -> tuple[LayerCalibration, ...]:
        """BatchNorms that no batch reached: their statistics are still the old ones."""
        return tuple(x for x in self.layers if x.status is LayerStatus.NO_DATA)

    @property
    def skipped(self) -> tuple[LayerCalibration, ...]:
        """BatchNorms without running statistics (nothing to recalibrate)."""
        return tuple(x for x in self.layers if x.status is LayerStatus.NO_RUNNING_STATS)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: how many BatchNorms were recalibrated, on how much data; what was not."""
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        text = (
            f"recalibrated {len(self.recalibrated)} of {len(self.layers)} BatchNorms from "
            f"{self.batches} batches ({self.samples} samples{ranks}) in {self.seconds:.2f} s"
        )
        if self.unseen:
            text += f"; no data reached {', '.join(x.name for x in self.unseen)} (left as is)"
        if self.skipped:
            text += f"; skipped {', '.join(x.name for x in self.skipped)} (no running stats)"
        return text

    def format_text(self) -> str:
        """A plain-text table, one row per BatchNorm, then the summary line."""
        header = ("BatchNorm", "samples", "max mean shift (old std)", "std ratio", "var<eps", "")
        rows = [header]
        for layer in self.layers:
            if layer.status is LayerStatus.RECALIBRATED:
                assert layer.mean_shift is not None and layer.std_ratio is not None
                rows.append(
                    (
                        layer.name,
                        str(layer.samples),
                        f"{layer.mean_shift.max:.3g}",
                        f"{layer.std_ratio.min:.3g}..{layer.std_ratio.max:.3g}",
                        str(len(layer.near_zero_var_channels) or ""),
                        "",
                    )
                )
            else:
                label = "no data" if layer.status is LayerStatus.NO_DATA else "no running stats"
                rows.append((layer.name, "0", "-", "-", "", label))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        notes = [f"note: {note}" for note in self.notes]
        return "\n".join([*lines, *notes, *self._rank_lines(), self.summary()])

    def _rank_lines(self) -> list[str]:
        """Under ``torch.distributed``: what each rank fed, in rank order."""
        if self.world_size < 2 or not self.per_rank:
            return []
        samples = ", ".join(str(share.samples) for share in self.per_rank)
        batches = ", ".join(str(share.batches) for share in self.per_rank)
        return [f"per rank (rank 0 first): samples {samples}; batches {batches}"]


# ------------------------------------------------------------------------------------ building


@dataclass
class Recalibrated:
    """One recalibrated BatchNorm's data for the report."""

    name: str
    bn: nn.Module
    calls: int
    count: int
    new_mean: np.ndarray | torch.Tensor  # float64
    new_var: np.ndarray | torch.Tensor  # float64, unbiased
    old_mean: torch.Tensor
    old_var: torch.Tensor


def build_report(
    named: Sequence[tuple[str, nn.Module]],
    recalibrated: Sequence[Recalibrated],
    skipped: Sequence[str],
    per_rank: Sequence[RankShare],
    world: int,
    started: float,
    notes: tuple[str, ...] = (),
) -> CalibrationReport:
    """One entry per BatchNorm in ``named`` (``model.named_modules()``) order; the totals are
    the sums over ``per_rank``."""
    done = dict(zip((r.name for r in recalibrated), _summaries(recalibrated), strict=True))
    layers = []
    for name, module in named:
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        label = name or "(model)"
        if label in done:
            layers.append(done[label])
        elif label in skipped:
            layers.append(_unpooled(label, module, LayerStatus.NO_RUNNING_STATS))
        else:
            layers.append(_unpooled(label, module, LayerStatus.NO_DATA))
    return CalibrationReport(
        layers=tuple(layers),
        batches=sum(share.batches for share in per_rank),
        samples=sum(share.samples for share in per_rank),
        world_size=world,
        seconds=time.perf_counter() - started,
        notes=notes,
        per_rank=tuple(per_rank),
    )


def _unpooled(label: str, module: nn.Module, status: LayerStatus) -> LayerCalibration:
    detail = (
        "track_running_stats=False: eval mode uses batch statistics, nothing to recalibrate"
        if status is LayerStatus.NO_RUNNING_STATS
        else "no batch reached this layer: its statistics are still the old ones"
    )
    return LayerCalibration(
        name=label,
        type=type(module).__name__,
        status=status,
        num_features=module.num_features,
        detail=detail,
    )


def _summaries(layers: Sequence[Recalibrated]) -> list[LayerCalibration]:
    """Every layer's channel summaries from one table of all their channels (in numpy: a few
    operations on small arrays, where each torch operation would cost more than its work)."""
    if not layers:
        return []
    widths = [r.bn.num_features for r in layers]
    starts = [0, *itertools.accumulate(widths[:-1])]
    # rows: old mean, new mean, old var, new var, mean shift, std ratio
    table = np.empty((6, sum(widths)))
    keys = ("old_mean", "new_mean", "old_var", "new_var")
    np.concatenate([_host(getattr(r, key)) for key in keys for r in layers], out=table[:4].ravel())
    old_mean, new_mean, old_var, new_var, shift, ratio = table
    eps = _eps(layers, widths)
    with np.errstate(divide="ignore", invalid="ignore"):
        old_scale = old_var + eps
        np.divide(np.abs(new_mean - old_mean), np.sqrt(np.maximum(old_scale, 0.0)), out=shift)
        np.sqrt((new_var + eps) / np.maximum(old_scale, math.ulp(0.0)), out=ratio)
    low = np.minimum.reduceat(table, starts, axis=1).T.tolist()
    mid = (np.add.reduceat(table, starts, axis=1) / widths).T.tolist()
    high = np.maximum.reduceat(table, starts, axis=1).T.tolist()
    tiny = _near_zero(new_var < NEAR_ZERO_VAR_FACTOR * eps, starts)
    return [
        _recalibrated(r, [ChannelSummary(*values) for values in zip(*rows, strict=True)], near)
        for r, *rows, near in zip(layers, low, mid, high, tiny, strict=True)
    ]


def _eps(layers: Sequence[Recalibrated], widths: list[int]) -> float | np.ndarray:
    """Each channel's ``eps`` (one number when every layer has the same)."""
    values = [float(r.bn.eps) for r in layers]
    if values.count(values[0]) == len(values):
        return values[0]
    return np.repeat(values, widths)


def _recalibrated(
    r: Recalibrated, summary: list[ChannelSummary], near: list[int]
) -> LayerCalibration:
    return LayerCalibration(
        name=r.name,
        type=type(r.bn).__name__,
        status=LayerStatus.RECALIBRATED,
        num_features=r.bn.num_features,
        calls=r.calls,
        samples=r.count,
        old_mean=summary[0],
        new_mean=summary[1],
        old_var=summary[2],
        new_var=summary[3],
        mean_shift=summary[4],
        std_ratio=summary[5],
        near_zero_var_channels=tuple(near),
    )


def _host(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-channel values as a numpy array (a view where it can be)."""
    if isinstance(values, np.ndarray):
        return values
    if values.is_cpu and values.dtype in NUMPY_DTYPES and not values.requires_grad:
        return values.numpy()
    return values.detach().to("cpu", torch.float64).numpy()


def _near_zero(mask: np.ndarray, starts: list[int]) -> list[list[int]]:
    """Per layer, the channel indices where ``mask`` (over all layers' channels) is set."""
    found: list[list[int]] = [[] for _ in starts]
    for column in mask.nonzero()[0].tolist():
        layer = bisect.bisect_right(starts, column) - 1
        found[layer].append(column - starts[layer])
    return found
