"""The report of a recalibration: per BatchNorm, old against new statistics (built for every
layer at once: a few tensor operations in all, not per layer), and its text rendering."""

from __future__ import annotations

import bisect
import enum
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bnfold.calibrate.statistics import Pooled
from bnfold.records import Record, not_serialised

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
    outside ``torch.distributed``. Statistics are pooled in ``accumulation_dtype``. ``model`` is
    the recalibrated model: the caller's own (``inplace=True``) or a copy; not serialised.
    """

    layers: tuple[LayerCalibration, ...]
    batches: int
    samples: int
    world_size: int
    seconds: float
    accumulation_dtype: str = "float64"
    notes: tuple[str, ...] = ()
    per_rank: tuple[RankShare, ...] = ()
    model: nn.Module | None = field(
        default=None, metadata=not_serialised(), repr=False, compare=False
    )

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


@dataclass(frozen=True)
class Change:
    """One recalibrated BatchNorm: its statistics before and after."""

    name: str
    bn: nn.Module
    new: Pooled
    old_mean: torch.Tensor
    old_var: torch.Tensor


def build_report(
    named: Sequence[tuple[str, nn.Module]],
    changes: Sequence[Change],
    skipped: Sequence[str],
    per_rank: Sequence[RankShare],
    started: float,
    notes: tuple[str, ...] = (),
    model: nn.Module | None = None,
) -> CalibrationReport:
    """One entry per BatchNorm in ``named`` (``model.named_modules()``) order; the totals are
    the sums over ``per_rank``."""
    done = dict(zip((c.name for c in changes), _summaries(changes), strict=True))
    layers = []
    for name, module in named:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            label = name or "(model)"
            missing = LayerStatus.NO_RUNNING_STATS if label in skipped else LayerStatus.NO_DATA
            layers.append(done.get(label) or _unpooled(label, module, missing))
    return CalibrationReport(
        layers=tuple(layers),
        batches=sum(share.batches for share in per_rank),
        samples=sum(share.samples for share in per_rank),
        world_size=max(len(per_rank), 1),
        seconds=time.perf_counter() - started,
        notes=notes,
        per_rank=tuple(per_rank),
        model=model,
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


def _summaries(changes: Sequence[Change]) -> list[LayerCalibration]:
    """Every layer's channel summaries from one table of all their channels (numpy's
    ``reduceat`` gives each layer's min, mean and max at once)."""
    if not changes:
        return []
    widths = [c.bn.num_features for c in changes]
    starts = [0, *itertools.accumulate(widths[:-1])]
    columns = [c.old_mean for c in changes] + [c.new.mean for c in changes]
    columns += [c.old_var for c in changes] + [c.new.var for c in changes]
    values = torch.cat(columns).to("cpu", torch.float64).view(4, -1)
    old_mean, new_mean, old_var, new_var = values
    eps = torch.tensor([float(c.bn.eps) for c in changes], dtype=torch.float64)
    eps = eps.repeat_interleave(torch.tensor(widths))
    old_scale = old_var + eps
    shift = (new_mean - old_mean).abs() / old_scale.clamp(min=0.0).sqrt()
    ratio = ((new_var + eps) / old_scale.clamp(min=math.ulp(0.0))).sqrt()
    table = torch.stack((old_mean, new_mean, old_var, new_var, shift, ratio)).numpy()
    low = np.minimum.reduceat(table, starts, axis=1).T.tolist()
    mid = (np.add.reduceat(table, starts, axis=1) / widths).T.tolist()
    high = np.maximum.reduceat(table, starts, axis=1).T.tolist()
    near = _near_zero((new_var < NEAR_ZERO_VAR_FACTOR * eps).numpy(), starts)
    return [
        _recalibrated(c, [ChannelSummary(*v) for v in zip(*rows, strict=True)], tiny)
        for c, *rows, tiny in zip(changes, low, mid, high, near, strict=True)
    ]


def _recalibrated(c: Change, summary: list[ChannelSummary], near: list[int]) -> LayerCalibration:
    return LayerCalibration(
        name=c.name,
        type=type(c.bn).__name__,
        status=LayerStatus.RECALIBRATED,
        num_features=c.bn.num_features,
        calls=c.new.calls,
        samples=c.new.count,
        old_mean=summary[0],
        new_mean=summary[1],
        old_var=summary[2],
        new_var=summary[3],
        mean_shift=summary[4],
        std_ratio=summary[5],
        near_zero_var_channels=tuple(near),
    )


def _near_zero(mask: np.ndarray, starts: list[int]) -> list[list[int]]:
    """Per layer, the channel indices where ``mask`` (over all layers' channels) is set."""
    found: list[list[int]] = [[] for _ in starts]
    for column in mask.nonzero()[0].tolist():
        layer = bisect.bisect_right(starts, column) - 1
        found[layer].append(column - starts[layer])
    return found
