"""The report of a recalibration: per BatchNorm, old against new statistics; its text."""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bnfold.calibrate.statistics import Layer
from bnfold.records import Record, not_serialised
from bnfold.text import table


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
    ``near_zero_var_channels`` lists channels whose new variance is below ``eps`` (a dead
    channel or a constant input): a fold scales them by about ``gamma / sqrt(eps)``.
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
        """A plain-text table, one row per BatchNorm, then notes, ranks and the summary line."""
        rows = [("BatchNorm", "samples", "max mean shift (old std)", "std ratio", "var<eps", "")]
        rows += [_text_row(layer) for layer in self.layers]
        lines = table(rows) + [f"note: {note}" for note in self.notes]
        if self.world_size > 1 and self.per_rank:
            samples = ", ".join(str(share.samples) for share in self.per_rank)
            batches = ", ".join(str(share.batches) for share in self.per_rank)
            lines.append(f"per rank (rank 0 first): samples {samples}; batches {batches}")
        return "\n".join([*lines, self.summary()])


def _text_row(layer: LayerCalibration) -> tuple[str, ...]:
    if layer.mean_shift is None or layer.std_ratio is None:
        label = "no data" if layer.status is LayerStatus.NO_DATA else "no running stats"
        return (layer.name, "0", "-", "-", "", label)
    ratio = f"{layer.std_ratio.min:.3g}..{layer.std_ratio.max:.3g}"
    near = str(len(layer.near_zero_var_channels) or "")
    return (layer.name, str(layer.samples), f"{layer.mean_shift.max:.3g}", ratio, near, "")


def build_report(
    norms: Mapping[str, nn.Module],
    layers: Mapping[str, Layer],
    per_rank: Sequence[RankShare],
    started: float,
    notes: tuple[str, ...] = (),
    model: nn.Module | None = None,
) -> CalibrationReport:
    """One entry per BatchNorm of ``norms`` (by name, in model order): the ``layers`` that saw
    data recalibrated, the others without data, the rest without running statistics. The totals
    are the sums over ``per_rank``."""
    seen = [layer for layer in layers.values() if layer.total is not None]
    done = {layer.name: entry for layer, entry in zip(seen, _summaries(seen), strict=True)}
    entries = []
    for label, module in norms.items():
        status = LayerStatus.NO_DATA if label in layers else LayerStatus.NO_RUNNING_STATS
        kind, width, detail = type(module).__name__, module.num_features, _DETAILS[status]
        entries.append(
            done.get(label) or LayerCalibration(label, kind, status, width, detail=detail)
        )
    return CalibrationReport(
        layers=tuple(entries),
        batches=sum(share.batches for share in per_rank),
        samples=sum(share.samples for share in per_rank),
        world_size=max(len(per_rank), 1),
        seconds=time.perf_counter() - started,
        notes=notes,
        per_rank=tuple(per_rank),
        model=model,
    )


_DETAILS = {
    LayerStatus.NO_DATA: "no batch reached this layer: its statistics are still the old ones",
    LayerStatus.NO_RUNNING_STATS: (
        "track_running_stats=False: eval mode uses batch statistics, nothing to recalibrate"
    ),
}


def _summaries(layers: Sequence[Layer]) -> list[LayerCalibration]:
    """Every layer's channel summaries from one table of all their channels (numpy's
    ``reduceat`` gives each layer's min, mean and max at once)."""
    if not layers:
        return []
    widths = [layer.bn.num_features for layer in layers]
    starts = [0, *itertools.accumulate(widths[:-1])]
    new = [layer.total for layer in layers if layer.total is not None]
    old = [layer.saved for layer in layers]  # running mean, running var, ...
    table = np.empty((6, sum(widths)))  # old mean, new mean, old var, new var, shift, ratio
    saved = torch.cat([o[0] for o in old] + [o[1] for o in old]).to("cpu", torch.float64)
    table[[0, 2]] = saved.view(2, -1).numpy()
    table[1] = np.concatenate([m.mean for m in new])
    table[3] = np.concatenate([m.var for m in new])
    old_mean, new_mean, old_var, new_var, shift, ratio = table
    eps = np.repeat([float(layer.bn.eps) for layer in layers], widths)
    with np.errstate(divide="ignore", invalid="ignore"):
        shift[:] = np.abs(new_mean - old_mean) / np.sqrt(np.maximum(old_var + eps, 0.0))
        ratio[:] = np.sqrt((new_var + eps) / np.maximum(old_var + eps, math.ulp(0.0)))
    low = np.minimum.reduceat(table, starts, axis=1).T.tolist()
    mid = (np.add.reduceat(table, starts, axis=1) / widths).T.tolist()
    high = np.maximum.reduceat(table, starts, axis=1).T.tolist()
    tiny = new_var < eps
    ends = [*starts[1:], len(tiny)]
    return [
        LayerCalibration(
            layer.name,
            type(layer.bn).__name__,
            LayerStatus.RECALIBRATED,
            layer.bn.num_features,
            layer.calls,
            moments.count,
            *(ChannelSummary(*values) for values in zip(*rows, strict=True)),
            near_zero_var_channels=tuple(tiny[start:end].nonzero()[0].tolist()),
        )
        for layer, moments, *rows, start, end in zip(
            layers, new, low, mid, high, starts, ends, strict=True
        )
    ]
