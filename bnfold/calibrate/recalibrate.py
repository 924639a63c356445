"""Recalibrate BatchNorm running statistics on sample data: exactly, and touching nothing else.

How the forward passes run (the semantics of ``torch.optim.swa_utils.update_bn``, done right):
every module is in eval mode (Dropout off) and autograd is off; every BatchNorm normalises its
input with that call's batch statistics, as in training, so each BatchNorm sees what it would
see in training; each call's statistics are pooled by count in float64
(``bnfold.calibrate.statistics``). The running buffers are written once, last; on any error
(``KeyboardInterrupt`` included) every flag, momentum and statistic is as it was.

Distributed: when ``torch.distributed`` is initialised, ``data`` is **this rank's part** and is
fed as it is (never split again: split a file with ``load_data(..., shard=(rank, world_size))``,
or use a ``DistributedSampler``). Ranks may feed different numbers of batches, or none. What is
checked: a rank that fails makes every rank raise; two ranks whose first batches are identical
are refused (unless bnfold split the data itself); a ``DataSource`` split for another rank or
world size is refused. The report gives each rank's batches and samples, so the caller can check
that they add up to the data set (``bnfold.calibrate.distributed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from bnfold.calibrate import distributed
from bnfold.calibrate.report import (
    CalibrationReport,
    Change,
    ChannelSummary,
    LayerCalibration,
    LayerStatus,
    RankShare,
    build_report,
)
from bnfold.calibrate.sources import Batch, DataSource, batch_items, map_tensors
from bnfold.calibrate.statistics import Layer, Observer, Pooled
from bnfold.errors import BnfoldError, CalibrationError, ModelInputError, UsageError
from bnfold.find.sites import is_stock_norm
from bnfold.find.unwrap import unwrap
from bnfold.folding.clone import clone_model
from bnfold.modes import eval_mode

__all__ = [
    "CalibrationReport",
    "ChannelSummary",
    "LayerCalibration",
    "LayerStatus",
    "RankShare",
    "recalibrate",
]

ForwardFn = Callable[[nn.Module, Batch], Any]
ProgressFn = Callable[[int, int], None]


def recalibrate(
    model: nn.Module,
    data: Iterable[Batch],
    *,
    batches: int | None = None,
    forward: ForwardFn | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
    inplace: bool = True,
) -> CalibrationReport:
    """Replace every BatchNorm's running statistics by exact statistics over ``data``.

    Recalibration exists to update a model, so by default (``inplace=True``) it updates
    ``model`` itself; with ``inplace=False`` the caller's model is not changed at all and a
    recalibrated copy is returned as ``report.model``. Each BatchNorm that saw data gets
    ``running_mean`` = mean and ``running_var`` = unbiased variance of every element it saw
    (all batches, all calls, pooled by count in float64) and ``num_batches_tracked`` = the
    number of calls pooled. Nothing else changes (parameters, other buffers, ``training`` and
    ``momentum`` flags). On any error the model is left exactly as it was, statistics included.

    Args:
        model: the model; its BatchNorms (BatchNorm1d/2d/3d, SyncBatchNorm and subclasses) are
            recalibrated. Wrappers (DataParallel, DistributedDataParallel, ``torch.compile``)
            are looked through: the inner module shares their statistics.
        data: an iterable of batches (a DataLoader, a list). A batch is a tensor (one
            positional input), a tuple/list (positional inputs) or a dict (keyword inputs).
            Under ``torch.distributed``, this rank's part of the data, fed as it is.
        batches: use at most this many batches (per rank under ``torch.distributed``).
        forward: ``forward(model, batch)`` feeds one batch; use it for batches that are not
            plain inputs, e.g. ``lambda m, b: m(b[0])`` for ``(inputs, labels)`` batches.
        device: where tensors in each batch are moved; default the device of the model's first
            parameter or buffer. The model itself is not moved.
        progress: called after each batch as ``progress(batch_index, batch_items)``.
        inplace: update ``model`` (default) or a copy of it.

    Returns:
        A ``CalibrationReport``: per BatchNorm, old vs new statistics, the shift in units of the
        old std, near-zero-variance channels, samples seen; BatchNorms that saw no data
        (``NO_DATA``, left unchanged) and BatchNorms without running statistics
        (``NO_RUNNING_STATS``, skipped); the batches and samples each rank fed; ``model``, the
        recalibrated module (inside any wrapper).

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
    if not inplace:
        model = clone_model(model)
    named = list(model.named_modules())
    targets, skipped = _find_batchnorms(named)
    if isinstance(data, DataSource):
        notes += data.notes
    if not targets:
        return build_report(named, [], skipped, (), started, notes, model)
    device = torch.device(device) if device is not None else _model_device(model)
    world = distributed.world_size()
    layers = {name: Layer(name, bn, _stock(bn, world)) for name, bn in targets.items()}
    observer = Observer(layers)
    try:
        with eval_mode(model, (module for _, module in named)), torch.no_grad():
            observer.attach()
            try:
                run = _Run(model, observer, forward or _default_forward, device, progress)
                shares = _feed_everywhere(run, data, batches, world)
                pooled = _pooled(observer, world, device)
            finally:
                observer.detach()
        changes = [Change(n, targets[n], p, *layers[n].old_statistics()) for n, p in pooled.items()]
        report = build_report(named, changes, skipped, shares, started, notes, model)
        _write(targets, pooled)  # last: nothing after it can fail
    except BaseException:
        with torch.no_grad():
            for layer in layers.values():
                layer.restore()
        raise
    return report


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


def _find_batchnorms(named: list[tuple[str, nn.Module]]) -> tuple[dict[str, nn.Module], list[str]]:
    """BatchNorms with running statistics (to recalibrate) and the names of those without."""
    targets: dict[str, nn.Module] = {}
    skipped: list[str] = []
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
            skipped.append(label)
        else:
            targets[label] = module
    if not targets and not skipped:
        raise UsageError(
            "the model has no BatchNorm layer (nn.BatchNorm1d/2d/3d, SyncBatchNorm or a "
            "subclass): nothing to recalibrate"
        )
    return targets, skipped


def _stock(bn: nn.Module, world: int) -> bool:
    """Whether torch's own train-mode forward computes the batch statistics (a SyncBatchNorm's
    would all-reduce them across the process group on every call)."""
    synced = isinstance(bn, nn.SyncBatchNorm) and world > 1
    return is_stock_norm(bn) and "forward" not in bn.__dict__ and not synced


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter, else of its first buffer."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------- the loop


def _default_forward(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class _Run:
    """What feeding batches needs: the model, its observer, how to feed, where, progress."""

    def __init__(self, model: nn.Module, observer: Observer, feed: ForwardFn,
                 device: torch.device, progress: ProgressFn | None) -> None:  # fmt: skip
        self.model, self.observer, self.feed = model, observer, feed
        self.device, self.progress = device, progress

    def batches(self, data: Iterable[Batch], limit: int | None) -> Iterator[tuple[int, Batch]]:
        """``(index, batch)`` for at most ``limit`` batches; a failing read names the batch."""
        try:
            iterator = iter(data)
        except TypeError as exc:
            raise UsageError(
                f"data must be an iterable of batches, got {type(data).__name__}"
            ) from exc
        index = 0
        while limit is None or index < limit:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except BnfoldError:
                raise
            except Exception as exc:
                raise CalibrationError(
                    f"reading batch {index} from the data failed: {exc}"
                ) from exc
            yield index, batch
            index += 1

    def one(self, index: int, batch: Batch) -> int:
        """Feed one batch (already on the device); returns its batch items."""
        self.observer.batch = index
        self.observer.running.clear()
        try:
            self.feed(self.model, batch)
        except BnfoldError:
            raise
        except Exception as exc:
            raise _rejected(index, batch, exc, self.observer.inside()) from exc
        items = batch_items(batch)
        if self.progress is not None:
            self.progress(index, items)
        return items

    def all(
        self, data: Iterable[Batch], limit: int | None, *, fingerprint: bool
    ) -> distributed.Fed:
        """Feed the batches; what was fed (with the first batch's fingerprint if asked)."""
        fed, samples, first = 0, 0, 0
        for index, batch in self.batches(data, limit):
            if fingerprint and index == 0:
                first = distributed.fingerprint(batch)
            samples += self.one(index, map_tensors(batch, lambda t: t.to(self.device)))
            fed += 1
        self.observer.pool()
        return distributed.Fed(fed, samples, first)


def _rejected(index: int, batch: Batch, exc: Exception, inside: str | None) -> ModelInputError:
    where = f" inside BatchNorm {inside!r}" if inside is not None else ""
    hint = ""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        hint = (
            " (a tuple/list batch is passed as positional inputs; for (inputs, labels) "
            "batches pass forward=lambda model, batch: model(batch[0]))"
        )
    return ModelInputError(
        f"batch {index}: the model rejected the batch{where}: {type(exc).__name__}: {exc}"
        f"{hint}. Statistics restored, model unchanged"
    )


def _feed_everywhere(
    run: _Run, data: Iterable[Batch], limit: int | None, world: int
) -> tuple[RankShare, ...]:
    """Feed this rank's batches; under torch.distributed, what every rank fed."""
    if world == 1:
        shares = [run.all(data, limit, fingerprint=False)]
    else:

        def feed(fingerprint: bool) -> distributed.Fed:
            return run.all(data, limit, fingerprint=fingerprint)

        shares = distributed.feed_everywhere(feed, data, run.device, world)
    if not any(share.batches for share in shares):
        raise CalibrationError(
            "no batches: the data yielded nothing, so there is nothing to recalibrate from "
            "(model left unchanged)"
        )
    return tuple(RankShare(rank, s.batches, s.samples) for rank, s in enumerate(shares))


# ------------------------------------------------------------------------------------ results


def _pooled(observer: Observer, world: int, device: torch.device) -> dict[str, Pooled]:
    layers = list(observer.layers.values())
    if world > 1:
        return distributed.all_reduce(layers, device)
    return {layer.name: pooled for layer in layers if (pooled := layer.pooled()) is not None}


def _write(targets: dict[str, nn.Module], pooled: dict[str, Pooled]) -> None:
    """Each layer's new statistics into its running buffers, rounded once to their dtype, and
    its pooled calls into ``num_batches_tracked``."""
    with torch.no_grad():
        for name, final in pooled.items():
            bn = targets[name]
            bn.running_mean.copy_(final.mean)
            bn.running_var.copy_(final.var)
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(final.calls)
