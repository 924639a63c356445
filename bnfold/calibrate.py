"""Recalibrate BatchNorm running statistics on sample data: exactly, and touching nothing else.

``recalibrate(model, data)`` **updates the model in place**: afterwards every BatchNorm that saw
data holds, as ``running_mean`` / ``running_var``, the mean and unbiased variance of every element
it saw (count-weighted over all batches and all calls, accumulated in float64), and
``num_batches_tracked`` counts the calls pooled. Nothing else in the model changes: parameters,
other buffers, ``training`` flags and ``momentum`` are as before (a test compares them bit for
bit). If anything fails, the statistics are restored too and the model is exactly as it was.

How a forward pass is run (the semantics of ``torch.optim.swa_utils.update_bn``, done right):

- Every module is in eval mode (Dropout off, anything else whose train mode differs is off) and
  autograd is off.
- Every BatchNorm normalises its input with that call's *batch* statistics, as a train-mode
  BatchNorm does, so each downstream BatchNorm sees exactly what it would see in training.
  bnfold computes those batch statistics itself (one pass over the input, below) and hands them
  to the layer's own eval-mode forward through its running buffers; the layer's ``training``
  flag stays False, so a BN subclass keeps its extra behaviour (activation, dropout) in eval form,
  and a ``SyncBatchNorm`` normalises each rank's batch by itself (no collective in the forward).
- Statistics of a call with input ``x`` (channels on dim 1): with a per-layer shift ``K`` (near
  the mean of the first input the layer saw: its first sample's mean, or the batch mean for
  2-D inputs; 0 when that input is already centred, see ``_Moments``), ``d = x - K`` in
  float32 (float64 for float64 input);
  each sample's sums of ``d`` and ``d²`` per channel are taken along the contiguous axis
  (cascade summation), then summed over samples and calls in float64. At the end
  ``mean = K + Σd / n`` and ``var = (Σd² − (Σd)²/n) / (n − 1)``. The shift keeps the subtraction
  free of cancellation (data with mean/std = 1e4 is exact too), so the result matches float64
  statistics of the same inputs to ~1e-7 relative or better (the tests hold it to 1e-6; the
  stored mean is rounded once to the buffer's dtype).
- NaN/inf: checked every ``_Session.CHECK_EVERY`` batches and at the end; the error names the
  batch and the first BatchNorm, in call order, whose input held them.

Distributed: when ``torch.distributed`` is initialised, each rank feeds its own batches; the
per-channel count, mean and squared deviations are all-reduced in float64 (two reductions: the
global mean first, then the squared deviations about it), so every rank ends with identical
statistics, equal to one process fed every rank's batches.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bnfold._patch import ForwardPatches
from bnfold._records import Record
from bnfold.errors import BnfoldError, CalibrationError, ModelInputError, UsageError

__all__ = [
    "CalibrationReport",
    "ChannelSummary",
    "LayerCalibration",
    "LayerStatus",
    "recalibrate",
]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
ProgressFn = Callable[[int, int], None]

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
class CalibrationReport(Record):
    """What ``recalibrate`` did: one entry per BatchNorm (in ``named_modules`` order).

    ``batches`` and ``samples`` (batch items, from dim 0 of each batch's first tensor) are totals
    over every rank; ``world_size`` is 1 outside ``torch.distributed``. Statistics are pooled in
    ``accumulation_dtype``.
    """

    layers: tuple[LayerCalibration, ...]
    batches: int
    samples: int
    world_size: int
    seconds: float
    accumulation_dtype: str = "float64"
    notes: tuple[str, ...] = ()

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
        return "\n".join([*lines, *notes, self.summary()])


# ----------------------------------------------------------------------------------- public API


def recalibrate(
    model: nn.Module,
    data: Iterable[Batch],
    *,
    batches: int | None = None,
    forward: ForwardFn | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
) -> CalibrationReport:
    """Replace every BatchNorm's running statistics (in place) by exact statistics over ``data``.

    This mutates ``model``: each BatchNorm that saw data gets ``running_mean`` = mean and
    ``running_var`` = unbiased variance of every element it saw (all batches, all calls, pooled
    by count in float64) and ``num_batches_tracked`` = the number of calls pooled. Nothing else
    changes (parameters, other buffers, ``training`` and ``momentum`` flags). On any error the
    model is left exactly as it was, statistics included. See the module docstring for how the
    forward passes are run (everything in eval mode, BatchNorms normalising with batch
    statistics, no autograd).

    Args:
        model: the model; its BatchNorms (``nn.modules.batchnorm._BatchNorm``: BatchNorm1d/2d/3d,
            SyncBatchNorm and subclasses) are recalibrated.
        data: an iterable of batches (a DataLoader, a list). A batch is a tensor (one
            positional input), a tuple/list (positional inputs) or a dict (keyword inputs).
        batches: use at most this many batches (per rank under ``torch.distributed``).
        forward: ``forward(model, batch)`` feeds one batch; use it for batches that are not
            plain inputs, e.g. ``lambda m, b: m(b[0])`` for ``(inputs, labels)`` batches.
        device: where tensors in each batch are moved; default the device of the model's first
            parameter or buffer. The model itself is not moved.
        progress: called after each batch as ``progress(batch_index, batch_items)``.

    Returns:
        A ``CalibrationReport``: per BatchNorm, old vs new statistics, the shift in units of the
        old std, near-zero-variance channels, samples seen; BatchNorms that saw no data
        (``NO_DATA``, left unchanged) and BatchNorms without running statistics
        (``NO_RUNNING_STATS``, skipped).

    Raises:
        UsageError: bad arguments, a model without BatchNorm, a TorchScript model, an
            uninitialised lazy BatchNorm.
        ModelInputError: the model rejected a batch (the message names the batch index and the
            BatchNorm it was in, if any).
        CalibrationError: no batches, NaN/inf reaching a BatchNorm (named), a BatchNorm that saw
            a single value per channel, or another rank failed.
    """
    _check_arguments(model, batches)
    started = time.perf_counter()
    model, notes = _unwrap(model)
    targets, skipped = _find_batchnorms(model)
    if not targets:
        return _report(model, {}, skipped, 0, 0, 1, started, notes=notes)
    device = torch.device(device) if device is not None else _model_device(model)
    feed = forward if forward is not None else _default_forward
    world = _world_size()
    backup = _Backup(model, targets)
    session = _Session(targets)
    try:
        totals = _run_everywhere(model, data, session, feed, device, batches, progress, world)
        if totals[0] == 0:
            raise CalibrationError(
                "no batches: the data yielded nothing, so there is nothing to recalibrate from "
                "(model left unchanged)"
            )
        pooled = session.pooled(world > 1, device)
        _write_statistics(targets, pooled)
    except BaseException:
        backup.restore_statistics()
        raise
    finally:
        session.remove_hooks()
        backup.restore_flags()
    return _report(model, pooled, skipped, totals[0], totals[1], world, started, backup, notes)


# --------------------------------------------------------------------------------- preparation


def _check_arguments(model: nn.Module, batches: int | None) -> None:
    if not isinstance(model, nn.Module):
        raise UsageError(f"recalibrate needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError(
            "recalibrate cannot hook a TorchScript module; pass the eager nn.Module (or a .pt2 "
            "program loaded as a module)"
        )
    if batches is not None and (not isinstance(batches, int) or batches < 1):
        raise UsageError(f"batches must be a positive integer or None, got {batches!r}")


def _unwrap(model: nn.Module) -> tuple[nn.Module, tuple[str, ...]]:
    """The module inside DataParallel / DistributedDataParallel / torch.compile wrappers: they
    share its buffers, and a DistributedDataParallel forward would run a collective per batch
    (a hang when ranks have different numbers of batches)."""
    from bnfold.unwrap import unwrap

    inner, _ = unwrap(model)
    kinds = []
    while model is not inner:
        kinds.append(type(model).__name__)
        wrapped = getattr(model, "module", None)
        model = wrapped if isinstance(wrapped, nn.Module) else model._orig_mod
    if not kinds:
        return inner, ()
    return inner, (f"recalibrated the module inside {', '.join(kinds)}; it shares the statistics",)


def _find_batchnorms(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """BatchNorms with running statistics (to recalibrate) and without (reported, skipped)."""
    targets: dict[str, nn.Module] = {}
    skipped: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        label = name or "(model)"
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and (
            module.has_uninitialized_params()
        ):
            raise UsageError(
                f"BatchNorm {label!r} is a lazy module that has not run yet; run one forward "
                "pass first so its statistics have a shape"
            )
        if module.running_mean is None or module.running_var is None:
            skipped[label] = module
        else:
            targets[label] = module
    if not targets and not skipped:
        raise UsageError(
            "the model has no BatchNorm layer (nn.BatchNorm1d/2d/3d, SyncBatchNorm or a "
            "subclass): nothing to recalibrate"
        )
    return targets, skipped


def _model_device(model: nn.Module) -> torch.device:
    for tensors in (model.parameters(), model.buffers()):
        for tensor in tensors:
            return tensor.device
    return torch.device("cpu")


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _Backup:
    """Every module's ``training`` flag, and every target's statistics, to restore."""

    def __init__(self, model: nn.Module, targets: dict[str, nn.Module]) -> None:
        self.flags = [(module, module.training) for module in model.modules()]
        self.stats = {
            name: (
                bn.running_mean.clone(),
                bn.running_var.clone(),
                None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone(),
            )
            for name, bn in targets.items()
        }
        self.targets = targets

    def restore_flags(self) -> None:
        for module, training in self.flags:
            if module.training != training:  # Module.__setattr__ is slow: write only changes
                module.training = training

    def restore_statistics(self) -> None:
        with torch.no_grad():
            for name, (mean, var, tracked) in self.stats.items():
                bn = self.targets[name]
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                if tracked is not None:
                    bn.num_batches_tracked.copy_(tracked)


# ------------------------------------------------------------------------------- the statistics


class _Moments:
    """Per-channel sums of ``x − K`` and ``(x − K)²`` for one BatchNorm, pooled in float64.

    Each call's float64 sums are kept and added into the totals in groups of ``_FLUSH`` calls,
    which keeps the per-call work to a few tensor operations. When the layer's first input is
    centred (every channel's mean within ``CENTRED`` of its standard deviation, measured on the
    first sample), ``K = 0`` and ``x`` is summed as it is, without a shifted copy: the float32
    sums then lose at most a few parts in 1e7 of the variance to cancellation.
    """

    _FLUSH = 64
    CENTRED = 1.0

    def __init__(self, name: str, bn: nn.Module) -> None:
        self.name = name
        self.bn = bn
        self.mean_buffer: torch.Tensor = bn.running_mean  # looked up once: __getattr__ is slow
        self.var_buffer: torch.Tensor = bn.running_var
        self.shift: torch.Tensor | None = None  # K, in the compute dtype
        self.shifts: dict[int, torch.Tensor] = {}  # K viewed for inputs with each number of dims
        self.total: torch.Tensor | None = None  # float64 [2, C]: Σ(x − K), Σ(x − K)²
        self.sums: list[torch.Tensor] = []
        self.squares: list[torch.Tensor] = []
        self.count = 0
        self.calls = 0
        self.clamp = not bn.eps > 0  # var + eps > 0 already when eps > 0
        self.subtract = True  # False once K = 0: x is summed as it is

    def add(self, x: torch.Tensor) -> torch.Tensor:
        """Pool one call's input; return its per-channel sum of squares (for the NaN check).

        Also writes this call's batch mean and biased variance into the layer's running buffers,
        so its eval-mode forward normalises with batch statistics, as in training.
        """
        channels = x.shape[1]
        n = x.numel() // channels
        if self.shift is None:
            self._choose_shift(x)
        if self.subtract:
            shift = self.shifts.get(x.dim())
            if shift is None:
                view = [1, channels] + [1] * (x.dim() - 2)
                shift = self.shifts[x.dim()] = self.shift.view(view)
            s1, s2 = _channel_sums(x - shift)  # float16 -> float32
        else:
            s1, s2 = _channel_sums(x)
        self.sums.append(s1)
        self.squares.append(s2)
        self.count += n
        self.calls += 1
        if len(self.sums) >= self._FLUSH:
            self.flush()
        self._write_batch_statistics(s1, s2, n)
        return s2

    def _choose_shift(self, x: torch.Tensor) -> None:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.total = torch.zeros(2, x.shape[1], dtype=torch.float64, device=x.device)
        if x.dim() == 2:  # small: always shifted, by the batch mean
            self.shift = x.mean(0, dtype=compute)
            return
        centre, spread = _first_sample_moments(x)
        self.subtract = x.dtype not in (torch.float32, torch.float64) or not bool(
            (centre.abs() <= self.CENTRED * spread).all())
        self.shift = centre.to(compute) if self.subtract else torch.zeros_like(centre,
                                                                               dtype=compute)

    def _write_batch_statistics(self, s1: torch.Tensor, s2: torch.Tensor, n: int) -> None:
        """running_mean = K + Σd/n, running_var = (Σd² − (Σd)²/n)/n (biased, as in training);
        each computed in float64 and rounded once into the buffer."""
        torch.add(self.shift, s1, alpha=1.0 / n, out=self.mean_buffer)
        var = torch.addcmul(s2, s1, s1, value=-1.0 / n)
        torch.mul(var.clamp_(min=0.0) if self.clamp else var, 1.0 / n, out=self.var_buffer)

    def flush(self) -> None:
        if self.sums:
            assert self.total is not None
            self.total[0] += torch.stack(self.sums).sum(0, dtype=torch.float64)
            self.total[1] += torch.stack(self.squares).sum(0, dtype=torch.float64)
            self.sums, self.squares = [], []

    def local(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(count, mean, M2) of everything pooled here, float64; M2 = Σ (x − mean)²."""
        self.flush()
        assert self.total is not None and self.shift is not None
        n = float(self.count)
        s1, s2 = self.total[0], self.total[1]
        mean = self.shift.to(torch.float64) + s1 / n
        m2 = (s2 - s1 * s1 / n).clamp_(min=0.0)
        return n, mean, m2


@dataclass
class _Pooled:
    """Final statistics of one BatchNorm."""

    count: int
    calls: int
    mean: torch.Tensor  # float64
    var: torch.Tensor  # float64, unbiased


class _Session:
    """Hooks on every target BatchNorm, and the bookkeeping they share."""

    #: Batches between NaN/inf checks (each check synchronises with the device once).
    CHECK_EVERY = 16

    def __init__(self, targets: dict[str, nn.Module]) -> None:
        self.moments = {name: _Moments(name, bn) for name, bn in targets.items()}
        self.names = {id(bn): name for name, bn in targets.items()}
        self.batch_index = 0
        self.checks: list[tuple[int, str, torch.Tensor]] = []  # calls since the last check
        self.patches = ForwardPatches()
        for name, bn in targets.items():
            self.patches.wrap(bn, lambda forward, m=self.moments[name]: self._observing(m, forward))

    def _observing(self, moments: _Moments, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``forward`` that first pools its input (see ``bnfold._patch``: it sees the input after
        any pre-hooks of the layer, as a last pre-hook would)."""

        def observed(*args: Any, **kwargs: Any) -> Any:
            x = args[0] if args else kwargs.get("input")
            if _usable_input(x, moments.bn):  # else the layer's own forward rejects it
                self._observe(moments, x)
            return forward(*args, **kwargs)

        return observed

    def _observe(self, moments: _Moments, x: torch.Tensor) -> None:
        if x.numel() // x.shape[1] < 2:
            raise ModelInputError(
                f"batch {self.batch_index}: BatchNorm {moments.name!r} got one value per "
                f"channel (input shape {tuple(x.shape)}); batch statistics need at least two, "
                "as in training: use a larger batch size"
            )
        self.checks.append((self.batch_index, moments.name, moments.add(x)))

    def inside(self, exc: BaseException) -> str | None:
        """The innermost target BatchNorm whose forward is in ``exc``'s traceback, if any."""
        found = None
        tb = exc.__traceback__
        while tb is not None:
            name = self.names.get(id(tb.tb_frame.f_locals.get("self")))
            found = name or found
            tb = tb.tb_next
        return found

    def start_batch(self, index: int) -> None:
        self.batch_index = index
        if index and index % self.CHECK_EVERY == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Refuse NaN/inf, naming the first BatchNorm (in call order) that saw them."""
        checks, self.checks = self.checks, []
        if not checks or bool(torch.isfinite(torch.cat([c[2] for c in checks])).all()):
            return
        for index, name, s2 in checks:
            if not bool(torch.isfinite(s2).all()):
                raise CalibrationError(
                    f"batch {index}: BatchNorm {name!r} is the first layer whose input holds "
                    "NaN or infinite values; check the data (and the layers before "
                    f"{name!r}) for NaN/inf. Statistics restored, model unchanged"
                )

    def pooled(self, distributed: bool, device: torch.device) -> dict[str, _Pooled]:
        if distributed:
            return _all_reduce_moments(self.moments, device)
        result = {}
        for name, moments in self.moments.items():
            if moments.count == 0:
                continue
            _, mean, m2 = moments.local()
            result[name] = _pooled(name, moments.count, moments.calls, mean, m2)
        return result

    def remove_hooks(self) -> None:
        """Give each layer its own ``forward`` back."""
        self.patches.restore()


def _first_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the first sample's values (inputs with
    spatial dims), cheaply, along its contiguous axis. The shift K only has to be near the
    data's mean."""
    channels = x.shape[1]
    first = x[0]
    if first.is_contiguous() or not first.movedim(0, -1).is_contiguous():
        values = first.reshape(channels, -1)
    else:
        values = first.movedim(0, -1).reshape(-1, channels).t()
    mean = values.mean(1, dtype=torch.float32 if x.dtype != torch.float64 else torch.float64)
    return mean, (values - mean[:, None]).square_().mean(1).sqrt_()


def _channel_sums(dev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 per-channel Σd and Σd² of ``dev`` (channels on dim 1); may square ``dev`` in place.

    Each sample's values are summed first in ``dev``'s dtype, along the contiguous axis (fast,
    and cascade summation keeps the error ~1e-7 relative), then the per-sample sums in float64.
    Σd² comes from the per-sample 2-norms: one read of ``dev``, no squared copy.
    """
    batch, channels = dev.shape[0], dev.shape[1]
    if dev.dim() == 2:
        return dev.sum(0, dtype=torch.float64), dev.square_().sum(0, dtype=torch.float64)
    if dev.is_contiguous() or not dev.movedim(1, -1).is_contiguous():
        rows, axis = dev.reshape(batch, channels, -1), 2  # a copy only for odd strides
    else:  # channels last
        rows, axis = dev.movedim(1, -1).reshape(batch, -1, channels), 1
    s1 = rows.sum(axis).sum(0, dtype=torch.float64)
    norms = torch.linalg.vector_norm(rows, dim=axis).to(torch.float64)
    return s1, norms.square_().sum(0)


def _usable_input(x: Any, bn: nn.Module) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dim() >= 2
        and x.shape[1] == bn.num_features
        and x.numel() > 0
    )


def _pooled(name: str, count: int, calls: int, mean: torch.Tensor, m2: torch.Tensor) -> _Pooled:
    if count < 2:
        raise CalibrationError(
            f"BatchNorm {name!r} saw a single value per channel in all the data; an unbiased "
            "variance needs at least two: use more data"
        )
    return _Pooled(count=count, calls=calls, mean=mean, var=m2 / (count - 1))


# ----------------------------------------------------------------------------------- the loop


def _default_forward(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def batch_items(batch: Batch) -> int:
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


def _run(
    model: nn.Module,
    data: Iterable[Batch],
    session: _Session,
    feed: ForwardFn,
    device: torch.device,
    limit: int | None,
    progress: ProgressFn | None,
) -> list[int]:
    """Feed the batches; return [batches, batch items] fed on this rank."""
    for module in model.modules():
        if module.training:
            module.training = False
    totals = [0, 0]
    try:
        iterator = iter(data)
    except TypeError as exc:
        raise UsageError(f"data must be an iterable of batches, got {type(data).__name__}") from exc
    with torch.no_grad():
        index = 0
        while limit is None or index < limit:
            batch = _next_batch(iterator, index)
            if batch is _END:
                break
            batch = _to_device(batch, device)
            session.start_batch(index)
            _feed_one(model, batch, feed, session, index)
            items = batch_items(batch)
            totals[0] += 1
            totals[1] += items
            if progress is not None:
                progress(index, items)
            index += 1
    session.check_finite()
    return totals


_END = object()


def _next_batch(iterator: Any, index: int) -> Batch:
    try:
        return next(iterator)
    except StopIteration:
        return _END
    except BnfoldError:
        raise
    except Exception as exc:
        raise CalibrationError(f"reading batch {index} from the data failed: {exc}") from exc


def _feed_one(
    model: nn.Module, batch: Batch, feed: ForwardFn, session: _Session, index: int
) -> None:
    try:
        feed(model, batch)
    except BnfoldError:
        raise
    except Exception as exc:
        inside = session.inside(exc)
        where = f" inside BatchNorm {inside!r}" if inside is not None else ""
        hint = ""
        if isinstance(batch, (tuple, list)) and len(batch) > 1:
            hint = (
                " (a tuple/list batch is passed as positional inputs; for (inputs, labels) "
                "batches pass forward=lambda model, batch: model(batch[0]))"
            )
        raise ModelInputError(
            f"batch {index}: the model rejected the batch{where}: {type(exc).__name__}: {exc}"
            f"{hint}. Statistics restored, model unchanged"
        ) from exc


# ------------------------------------------------------------------------------- distributed


def _run_everywhere(
    model: nn.Module,
    data: Iterable[Batch],
    session: _Session,
    feed: ForwardFn,
    device: torch.device,
    limit: int | None,
    progress: ProgressFn | None,
    world: int,
) -> list[int]:
    """Run this rank's batches; under torch.distributed, sum [batches, items] over ranks.

    A rank that fails still joins the reduction (with a failure flag) before raising, so the
    other ranks raise too instead of waiting forever in the next collective.
    """
    if world == 1:
        return _run(model, data, session, feed, device, limit, progress)
    failure: Exception | None = None
    try:
        totals = _run(model, data, session, feed, device, limit, progress)
    except Exception as exc:
        failure, totals = exc, [0, 0]
    tensor = torch.tensor(
        [*totals, float(failure is not None)],
        dtype=torch.float64,
        device=_collective_device(device),
    )
    torch.distributed.all_reduce(tensor)
    batches, items, failed = (int(v) for v in tensor.tolist())
    if failure is not None:
        raise failure
    if failed:
        raise CalibrationError(
            f"{failed} other rank(s) failed during recalibration (see their error); statistics "
            "restored on this rank too"
        )
    return [batches, items]


def _collective_device(device: torch.device) -> torch.device:
    backend = str(torch.distributed.get_backend()).lower()
    return torch.device("cpu") if "gloo" in backend else device


def _all_reduce_moments(moments: dict[str, _Moments], device: torch.device) -> dict[str, _Pooled]:
    """Merge every rank's (count, mean, M2) exactly: global mean first, then M2 about it."""
    dist = torch.distributed
    where = _collective_device(device)
    names = list(moments)  # named_modules order: identical on every rank
    sizes = [moments[name].bn.num_features for name in names]
    local = {}
    counts, sums = [], []
    for name, size in zip(names, sizes, strict=True):
        m = moments[name]
        if m.count:
            n, mean, m2 = m.local()
        else:
            n, mean = 0.0, torch.zeros(size, dtype=torch.float64)
            m2 = torch.zeros(size, dtype=torch.float64)
        mean, m2 = mean.to(where, torch.float64), m2.to(where, torch.float64)
        local[name] = (n, mean, m2)
        counts.append(torch.tensor([n, float(m.calls)], dtype=torch.float64, device=where))
        sums.append(mean * n)
    first = torch.cat(counts + sums)
    dist.all_reduce(first)
    head, tail = first[: 2 * len(names)], first[2 * len(names) :]
    global_mean = dict(zip(names, torch.split(tail, sizes), strict=True))
    deviations = []
    for i, name in enumerate(names):
        total = float(head[2 * i])
        if total:
            global_mean[name] = global_mean[name] / total
        n, mean, m2 = local[name]
        deviations.append(m2 + n * (mean - global_mean[name]) ** 2)
    second = torch.cat(deviations)
    dist.all_reduce(second)
    result = {}
    for i, (name, m2) in enumerate(zip(names, torch.split(second, sizes), strict=True)):
        count, calls = int(head[2 * i]), int(head[2 * i + 1])
        if count:
            result[name] = _pooled(name, count, calls, global_mean[name], m2)
    return result


# ------------------------------------------------------------------------------ write, report


def _write_statistics(targets: dict[str, nn.Module], pooled: dict[str, _Pooled]) -> None:
    with torch.no_grad():
        for name, stats in pooled.items():
            bn = targets[name]
            bn.running_mean.copy_(stats.mean)
            bn.running_var.copy_(stats.var)
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(stats.calls)


def _report(
    model: nn.Module,
    pooled: dict[str, _Pooled],
    skipped: dict[str, nn.Module],
    batches: int,
    samples: int,
    world: int,
    started: float,
    backup: _Backup | None = None,
    notes: tuple[str, ...] = (),
) -> CalibrationReport:
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        label = name or "(model)"
        kind = type(module).__name__
        if label in skipped:
            layers.append(
                LayerCalibration(
                    name=label,
                    type=kind,
                    status=LayerStatus.NO_RUNNING_STATS,
                    num_features=module.num_features,
                    detail="track_running_stats=False: eval mode uses batch statistics, "
                    "nothing to recalibrate",
                )
            )
        elif label in pooled and backup is not None:
            layers.append(_layer(label, module, pooled[label], backup.stats[label]))
        else:
            layers.append(
                LayerCalibration(
                    name=label,
                    type=kind,
                    status=LayerStatus.NO_DATA,
                    num_features=module.num_features,
                    detail="no batch reached this layer: its statistics are still the old ones",
                )
            )
    return CalibrationReport(
        layers=tuple(layers),
        batches=batches,
        samples=samples,
        world_size=world,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _layer(name: str, bn: nn.Module, stats: _Pooled, old: tuple) -> LayerCalibration:
    old_mean = old[0].to(torch.float64).cpu()
    old_var = old[1].to(torch.float64).cpu()
    new_mean, new_var = stats.mean.cpu(), stats.var.cpu()
    eps = float(bn.eps)
    shift = (new_mean - old_mean).abs() / (old_var + eps).clamp(min=0).sqrt()
    ratio = ((new_var + eps) / (old_var + eps).clamp(min=math.ulp(0.0))).sqrt()
    tiny = (new_var < NEAR_ZERO_VAR_FACTOR * eps).nonzero().flatten().tolist()
    table = torch.stack([old_mean, new_mean, old_var, new_var, shift, ratio])
    low, high = table.aminmax(dim=1)
    rows = torch.stack([low, table.mean(dim=1), high], dim=1).tolist()
    summaries = [ChannelSummary(*row) for row in rows]
    return LayerCalibration(
        name=name,
        type=type(bn).__name__,
        status=LayerStatus.RECALIBRATED,
        num_features=bn.num_features,
        calls=stats.calls,
        samples=stats.count,
        old_mean=summaries[0],
        new_mean=summaries[1],
        old_var=summaries[2],
        new_var=summaries[3],
        mean_shift=summaries[4],
        std_ratio=summaries[5],
        near_zero_var_channels=tuple(int(i) for i in tiny),
    )
