"""Recalibrate BatchNorm running statistics on sample data: exactly, and touching nothing else.

``recalibrate(model, data)`` **updates the model in place**: afterwards every BatchNorm that saw
data holds, as ``running_mean`` / ``running_var``, the mean and unbiased variance of every element
it saw (count-weighted over all batches and all calls, accumulated in float64), and
``num_batches_tracked`` counts the calls pooled. Nothing else in the model changes: parameters,
other buffers, ``training`` flags and ``momentum`` are as before (a test compares them bit for
bit). If anything fails, the statistics are restored too and the model is exactly as it was:
the running buffers are written once, last, and the only route that writes them per call (the
sums route, for the layer's own forward) keeps the old values before its first write.

How a forward pass is run (the semantics of ``torch.optim.swa_utils.update_bn``, done right):

- Every module is in eval mode (Dropout off, anything else whose train mode differs is off) and
  autograd is off.
- Every BatchNorm normalises its input with that call's *batch* statistics, as a train-mode
  BatchNorm does, so each downstream BatchNorm sees exactly what it would see in training. The
  layer's ``training`` flag stays False: a stock BatchNorm on CPU is run through torch's
  train-mode kernel directly, and a BN subclass with its own forward gets the batch statistics
  in its running buffers and runs its eval forward, so it keeps its extra behaviour
  (activation, dropout) in eval form. A ``SyncBatchNorm`` normalises each rank's batch by
  itself (no collective in the forward).
- Statistics (``bnfold.batchstats``): each call's are taken exactly (torch's CPU kernel sums in
  float64; other small inputs go through the kernel as a float64 copy; large ones are summed
  about a shift near the layer's mean) and pooled over calls by Chan's formula in float64, so
  the result matches float64 statistics of the same inputs to ~1e-7 relative (the tests hold it
  to 1e-6; data with mean/std = 1e4 is exact too; the stored mean is rounded once to the
  buffer's dtype).
  Where float32 kernel rows far from zero could cost more than ``BOUND_NOTE``, the report says
  so with the bound.
- NaN/inf: checked every ``_Session.CHECK_EVERY`` batches and at the end; the error names the
  batch and the first BatchNorm, in call order, whose input held them.

Distributed: when ``torch.distributed`` is initialised, ``data`` is **this rank's part** and is
fed as it is (never split again: split a file with ``load_data(..., shard=(rank, world_size))``,
or use a ``DistributedSampler``). Ranks may feed different numbers of batches, or none: there is
no collective per batch. Afterwards the per-channel count, mean and squared deviations are
all-reduced in float64 (two reductions: the global mean first, then the squared deviations
about it), so every rank ends with identical statistics, equal to one process fed every rank's
batches; the report gives each rank's batches and samples (gathered). What is checked: a rank
that fails makes every rank raise (statistics restored everywhere); two ranks whose first
batches are identical (the same data on several ranks, which would count each sample once per
rank) are refused, unless bnfold split the data itself; a ``DataSource`` split for another rank
or world size is refused. Data that
overlaps between ranks in any other way cannot be seen here: the per-rank counts let the caller
check that they add up to the data set.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from bnfold.calibrate.batchstats import F64, NUMPY_DTYPES, Array, LayerStatistics, Pooled, RowTable
from bnfold.calibrate.data import DataSource, batch_items
from bnfold.calibrate.report import (
    CalibrationReport,
    ChannelSummary,
    LayerCalibration,
    LayerStatus,
    RankShare,
    Recalibrated,
    build_report,
)
from bnfold.errors import BnfoldError, CalibrationError, ModelInputError, UsageError
from bnfold.find.leafcalls import ForwardPatches
from bnfold.find.sites import is_stock_norm
from bnfold.find.unwrap import unwrap
from bnfold.modes import eval_mode

__all__ = [
    "CalibrationReport",
    "ChannelSummary",
    "LayerCalibration",
    "LayerStatus",
    "RankShare",
    "recalibrate",
]

Batch = Any
ForwardFn = Callable[[nn.Module, Batch], Any]
ProgressFn = Callable[[int, int], None]

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
            Under ``torch.distributed``, this rank's part of the data, fed as it is.
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
        (``NO_RUNNING_STATS``, skipped); the batches and samples each rank fed.

    Raises:
        UsageError: bad arguments, a model without BatchNorm, a TorchScript model, an
            uninitialised lazy BatchNorm, a ``DataSource`` split for another rank or world size.
        ModelInputError: the model rejected a batch (the message names the batch index and the
            BatchNorm it was in, if any).
        CalibrationError: no batches, NaN/inf reaching a BatchNorm (named), a BatchNorm that saw
            a single value per channel, another rank failed, or two ranks fed the same first
            batch.
    """
    _check_arguments(model, batches)
    started = time.perf_counter()
    model, notes = _unwrap(model)
    named = list(model.named_modules())
    targets, skipped = _find_batchnorms(named)
    if not targets:
        return build_report(named, [], list(skipped), (), 1, started, notes)
    device = torch.device(device) if device is not None else _model_device(named)
    feed = forward if forward is not None else _default_forward
    world = _world_size()
    if isinstance(data, DataSource):
        notes += data.notes
    with eval_mode(model, (module for _, module in named)):  # every flag restored afterwards
        session = _Session(targets)
        try:
            shares = _run_everywhere(model, data, session, feed, device, batches, progress, world)
            if not any(share.batches for share in shares):
                raise CalibrationError(
                    "no batches: the data yielded nothing, so there is nothing to recalibrate "
                    "from (model left unchanged)"
                )
            pooled = session.pooled(world > 1, device)
            report = _report(named, session, pooled, skipped, shares, world, started, notes)
            _write_statistics(session.layers, pooled)  # last: nothing after it can fail
        except BaseException:
            session.restore_statistics()
            raise
        finally:
            session.remove_hooks()
    return report


def _report(
    named: list[tuple[str, nn.Module]],
    session: _Session,
    pooled: dict[str, _Final],
    skipped: dict[str, nn.Module],
    shares: tuple[RankShare, ...],
    world: int,
    started: float,
    notes: tuple[str, ...],
) -> CalibrationReport:
    """The report, built before the new statistics are written (it reads the old ones)."""
    recalibrated = [
        Recalibrated(name, session.layers[name].bn, p.calls, p.count, p.mean, p.var,
                     *session.layers[name].old_statistics())
        for name, p in pooled.items()
    ]  # fmt: skip
    notes += _bound_notes(pooled)
    return build_report(named, recalibrated, list(skipped), shares, world, started, notes)


#: A pooled variance whose error bound exceeds this gets a note in the report.
BOUND_NOTE = 1e-6


def _bound_notes(pooled: dict[str, _Final]) -> tuple[str, ...]:
    return tuple(
        f"BatchNorm {name!r}: its inputs moved far from zero after the first batch (|mean| "
        f"over {LayerStatistics.KERNEL_OFFSET:g} std); its variance is exact only to "
        f"{p.var_error_bound:.1e} relative. Recalibrate a float64 copy of the model for "
        "exact statistics"
        for name, p in pooled.items()
        if p.var_error_bound > BOUND_NOTE
    )


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

    inner, _ = unwrap(model)
    kinds = []
    while model is not inner:
        kinds.append(type(model).__name__)
        wrapped = getattr(model, "module", None)
        model = wrapped if isinstance(wrapped, nn.Module) else model._orig_mod
    if not kinds:
        return inner, ()
    return inner, (f"recalibrated the module inside {', '.join(kinds)}; it shares the statistics",)


def _find_batchnorms(
    named: list[tuple[str, nn.Module]],
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """BatchNorms with running statistics (to recalibrate) and without (reported, skipped)."""
    targets: dict[str, nn.Module] = {}
    skipped: dict[str, nn.Module] = {}
    for name, module in named:
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


def _model_device(named: list[tuple[str, nn.Module]]) -> torch.device:
    """The device of the model's first parameter, else of its first buffer (in the order of
    ``model.parameters()``: modules in ``named_modules`` order)."""
    for tensors in ("_parameters", "_buffers"):
        for _, module in named:
            for tensor in getattr(module, tensors).values():
                if tensor is not None:
                    return tensor.device
    return torch.device("cpu")


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _check_split(data: Iterable[Batch], world: int) -> None:
    """A ``DataSource`` that bnfold splits by batch must be split for this rank and world."""
    if world == 1 or not isinstance(data, DataSource) or data.split == "as_given":
        return
    rank = torch.distributed.get_rank()
    if (data.rank, data.world) != (rank, world):
        split = f"split for rank {data.rank} of {data.world}" if data.world > 1 else "not split"
        raise UsageError(
            f"{data.description}: the data is {split}, but this process is rank {rank} of "
            f"{world}; open it with load_data(..., shard=(rank, world_size)) so that each rank "
            "feeds its own batches and together they feed each batch once"
        )


def _groups(targets: dict[str, nn.Module]) -> dict[tuple[torch.dtype, torch.device], list[str]]:
    """Target names by the dtype and device of their statistics."""
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for name, bn in targets.items():
        statistics = bn.running_mean
        key = (statistics.dtype, statistics.device)
        groups.setdefault(key, []).append(name)
    return groups


# ------------------------------------------------------------------------------- the statistics


@dataclass
class _Final:
    """Final statistics of one BatchNorm (what is written and reported)."""

    count: int
    calls: int
    mean: Array  # float64
    var: Array  # float64, unbiased
    var_error_bound: float = 0.0  # from float32 kernel rows (see bnfold.calibrate.batchstats)


class _Session:
    """Every target BatchNorm's forward wrapped, and the bookkeeping the wrappers share."""

    #: Batches between NaN/inf checks (each check synchronises with the device once), after
    #: which the row tables are pooled and their rows reused.
    CHECK_EVERY = 16

    def __init__(self, targets: dict[str, nn.Module]) -> None:
        loose: list[torch.Tensor] = []  # NaN-check tensors of calls outside the row tables
        self.tables: list[tuple[RowTable, list[LayerStatistics]]] = []
        self.layers: dict[str, LayerStatistics] = {}
        for (dtype, device), names in _groups(targets).items():
            tabled = [name for name in names if _tabled(targets[name])]
            if tabled and device.type == "cpu":
                widths = [targets[n].running_mean.shape[0] for n in tabled]
                table = RowTable(widths, dtype, device, rows=self.CHECK_EVERY)
                exact = RowTable(widths, F64, device, rows=self.CHECK_EVERY)
                layers = [
                    LayerStatistics(n, targets[n], table, i, loose, exact)
                    for i, n in enumerate(tabled)
                ]
                self.tables += [(table, layers), (exact, layers)]
                self.layers.update((layer.name, layer) for layer in layers)
            for name in names:
                if name not in self.layers:
                    self.layers[name] = LayerStatistics(name, targets[name], None, 0, loose)
        self.layers = {name: self.layers[name] for name in targets}  # named_modules order
        self.names = {id(bn): name for name, bn in targets.items()}
        self.batch_index = 0
        self.checks: list[tuple[int, str, torch.Tensor]] = []  # calls since the last check
        self.loose = loose
        self.patches = ForwardPatches()
        for name, bn in targets.items():
            self.patches.wrap(bn, lambda forward, m=self.layers[name]: self._observing(m, forward))

    def _observing(self, layer: LayerStatistics, forward: Callable[..., Any]) -> Callable[..., Any]:
        """``forward`` run with batch statistics, pooling its input (see ``bnfold._patch``: it
        sees the input after any pre-hooks of the layer, as a last pre-hook would)."""

        def observed(*args: Any, **kwargs: Any) -> Any:
            x = args[0] if args else kwargs.get("input")
            if not _usable_input(x, layer.bn):  # the layer's own forward rejects it
                return forward(*args, **kwargs)
            n = x.numel() // x.shape[1]
            if n < 2:
                raise ModelInputError(
                    f"batch {self.batch_index}: BatchNorm {layer.name!r} got one value per "
                    f"channel (input shape {tuple(x.shape)}); batch statistics need at least "
                    "two, as in training: use a larger batch size"
                )
            y, check = layer.call(x, n, forward, args, kwargs)
            self.checks.append((self.batch_index, layer.name, check))
            return y

        return observed

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
            self.settle()

    def settle(self) -> None:
        """Pool the row tables (after the NaN check: their rows are then reused)."""
        for table, layers in self.tables:
            for slot in table.settle(LayerStatistics.KERNEL_OFFSET):
                layers[slot].kernel_ok = False

    def check_finite(self) -> None:
        """Refuse NaN/inf, naming the first BatchNorm (in call order) that saw them.

        Every call's check tensor is recorded in call order, but the common case reads only
        the row tables (whole) and the checks outside them."""
        checks, self.checks = self.checks, []
        loose, self.loose[:] = list(self.loose), []
        if not checks:
            return
        if all(table.finite() for table, _ in self.tables) and (
            not loose or bool(torch.isfinite(torch.cat(loose)).all())
        ):
            return
        for index, name, s2 in checks:
            if not bool(torch.isfinite(s2).all()):
                raise CalibrationError(
                    f"batch {index}: BatchNorm {name!r} is the first layer whose input holds "
                    "NaN or infinite values; check the data (and the layers before "
                    f"{name!r}) for NaN/inf. Statistics restored, model unchanged"
                )

    def pooled(self, distributed: bool, device: torch.device) -> dict[str, _Final]:
        self.settle()
        bounds = dict.fromkeys(self.layers, 0.0)
        for table, layers in self.tables:
            for layer, bound in zip(layers, table.bounds(LayerStatistics.ROW_ERROR), strict=True):
                bounds[layer.name] = max(bounds[layer.name], bound)
        if distributed:
            return _all_reduce_moments(self.layers, bounds, device)
        result = {}
        for name, layer in self.layers.items():
            pooled = layer.pooled()
            if pooled is not None:
                result[name] = _pooled(name, pooled, layer.calls, bounds[name])
        return result

    def restore_statistics(self) -> None:
        """Put back the statistics of every layer whose buffers were written (sums route)."""
        for layer in self.layers.values():
            layer.restore_statistics()

    def remove_hooks(self) -> None:
        """Give each layer its own ``forward`` back."""
        self.patches.restore()


def _tabled(bn: nn.Module) -> bool:
    """Whether a BatchNorm's calls can go through torch's kernel (stock forward)."""
    return is_stock_norm(bn) and "forward" not in bn.__dict__


def _usable_input(x: Any, bn: nn.Module) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dim() >= 2
        and x.shape[1] == bn.num_features
        and x.numel() > 0
    )


def _pooled(name: str, pooled: Pooled, calls: int, bound: float) -> _Final:
    if pooled.count < 2:
        raise CalibrationError(
            f"BatchNorm {name!r} saw a single value per channel in all the data; an unbiased "
            "variance needs at least two: use more data"
        )
    return _Final(pooled.count, calls, pooled.mean, pooled.unbiased(), bound)


# ----------------------------------------------------------------------------------- the loop


def _default_forward(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
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


@dataclass(frozen=True)
class _Fed:
    """What this rank fed: batches, batch items, and a fingerprint of its first batch (0 when
    not taken)."""

    batches: int = 0
    samples: int = 0
    first: int = 0


def _run(
    model: nn.Module,
    data: Iterable[Batch],
    session: _Session,
    feed: ForwardFn,
    device: torch.device,
    limit: int | None,
    progress: ProgressFn | None,
    *,
    fingerprint: bool = False,
) -> _Fed:
    """Feed the batches (the model in eval mode); return what was fed on this rank (with the
    first batch's fingerprint when ``fingerprint``)."""
    totals = [0, 0]
    first = 0
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
            if fingerprint and index == 0:
                first = _fingerprint(batch)
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
    return _Fed(totals[0], totals[1], first)


_END = object()

#: Bytes of each tensor that go into a batch's fingerprint (the rest is not read).
FINGERPRINT_BYTES = 1 << 16


def _fingerprint(batch: Batch) -> int:
    """A positive 62-bit hash of a batch's tensors (dtype, shape and their first
    ``FINGERPRINT_BYTES`` bytes); 0 when the batch holds no tensor it can read."""
    tensors = _tensors(batch)
    if not tensors:
        return 0
    digest = hashlib.blake2b(digest_size=8)
    try:
        for tensor in tensors:
            flat = tensor.detach().reshape(-1)
            head = flat[: max(1, FINGERPRINT_BYTES // flat.element_size())]
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(head.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    except (RuntimeError, TypeError):  # a tensor kind without plain bytes (sparse, quantized)
        return 0
    return (int.from_bytes(digest.digest(), "little") >> 2) + 1


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        return [tensor for value in batch for tensor in _tensors(value)]
    return []


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
) -> tuple[RankShare, ...]:
    """Run this rank's batches; under torch.distributed, gather what every rank fed.

    A rank that fails still joins the gather (with a failure flag) before raising, so the
    other ranks raise too instead of waiting forever in the next collective. Two ranks whose
    first batches are identical are refused on every rank (unless ``data`` is a ``DataSource``
    that bnfold split by batch: its parts are disjoint by construction).
    """
    if world == 1:
        fed = _run(model, data, session, feed, device, limit, progress)
        return (RankShare(0, fed.batches, fed.samples),)
    failure: Exception | None = None
    split_here = isinstance(data, DataSource) and data.split == "by_batch"
    try:
        _check_split(data, world)
        fed = _run(model, data, session, feed, device, limit, progress, fingerprint=not split_here)
    except Exception as exc:
        failure, fed = exc, _Fed()
    rows = _all_gather_ints([fed.batches, fed.samples, int(failure is not None), fed.first], device)
    if failure is not None:
        raise failure
    failed = sum(row[2] for row in rows)
    if failed:
        raise CalibrationError(
            f"{failed} other rank(s) failed during recalibration (see their error); statistics "
            "restored on this rank too"
        )
    _check_distinct([row[3] for row in rows])
    return tuple(RankShare(rank, row[0], row[1]) for rank, row in enumerate(rows))


def _all_gather_ints(values: list[int], device: torch.device) -> list[list[int]]:
    """Every rank's ``values`` (same length on every rank), in rank order."""
    tensor = torch.tensor(values, dtype=torch.int64, device=_collective_device(device))
    gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, tensor)
    return [row.tolist() for row in gathered]


def _check_distinct(fingerprints: list[int]) -> None:
    """Refuse the same data on several ranks: two ranks with identical first batches."""
    seen: dict[int, int] = {}
    for rank, fingerprint in enumerate(fingerprints):
        if fingerprint and fingerprint in seen:
            raise CalibrationError(
                f"ranks {seen[fingerprint]} and {rank} fed identical first batches: the data "
                "looks the same on several ranks, and every sample would be counted once per "
                "rank. Under torch.distributed each rank must feed only its own part: a "
                "DataLoader with a DistributedSampler, a callable that reads the rank, or "
                "load_data(..., shard=(rank, world_size)). Statistics restored, model unchanged"
            )
        seen.setdefault(fingerprint, rank)


def _collective_device(device: torch.device) -> torch.device:
    backend = str(torch.distributed.get_backend()).lower()
    return torch.device("cpu") if "gloo" in backend else device


def _all_reduce_moments(
    layers: dict[str, LayerStatistics], local_bounds: dict[str, float], device: torch.device
) -> dict[str, _Final]:
    """Merge every rank's (count, mean, M2) exactly: global mean first, then M2 about it."""
    dist = torch.distributed
    where = _collective_device(device)
    names = list(layers)  # named_modules order: identical on every rank
    sizes = [layers[name].bn.num_features for name in names]
    local = {}
    counts, sums = [], []
    for name, size in zip(names, sizes, strict=True):
        pooled = layers[name].pooled()
        if pooled is None:
            n, mean = 0.0, torch.zeros(size, dtype=torch.float64)
            m2 = torch.zeros(size, dtype=torch.float64)
        else:
            n, mean, m2 = float(pooled.count), pooled.mean, pooled.m2
        mean, m2 = (torch.as_tensor(t).to(where, torch.float64) for t in (mean, m2))
        local[name] = (n, mean, m2)
        counts.append(
            torch.tensor([n, float(layers[name].calls)], dtype=torch.float64, device=where)
        )
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
    global_m2 = dict(zip(names, torch.split(second, sizes), strict=True))
    bounds = torch.tensor(  # each rank's bound, summed: still a bound
        [local_bounds[name] for name in names],
        dtype=torch.float64,
        device=where,
    )
    dist.all_reduce(bounds)
    result = {}
    for i, name in enumerate(names):
        count, calls = int(head[2 * i]), int(head[2 * i + 1])
        if count:
            total = Pooled(count, global_mean[name], global_m2[name])
            result[name] = _pooled(name, total, calls, float(bounds[i]))
    return result


# ------------------------------------------------------------------------------------- write


def _write_statistics(layers: dict[str, LayerStatistics], pooled: dict[str, _Final]) -> None:
    """Each layer's new statistics into its running buffers, rounded once to their dtype, and
    its pooled calls into ``num_batches_tracked``."""
    written = []
    for name, final in pooled.items():
        layer = layers[name]
        written += _assign(layer.mean_buffer, final.mean) + _assign(layer.var_buffer, final.var)
        tracked = layer.bn.num_batches_tracked
        if tracked is not None:
            written += _assign(tracked, np.asarray(final.calls))
    torch.autograd.graph.increment_version(written)  # as torch's own in-place writes do


def _assign(buffer: torch.Tensor, values: Array) -> list[torch.Tensor]:
    """``buffer[...] = values``; returns the buffers written outside torch (their version
    counters are bumped by the caller)."""
    if isinstance(values, np.ndarray) and buffer.is_cpu and buffer.dtype in NUMPY_DTYPES:
        buffer.detach().numpy()[...] = values
        return [buffer]
    with torch.no_grad():
        buffer.copy_(torch.as_tensor(values))
    return []
