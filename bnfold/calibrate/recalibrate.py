"""``recalibrate``: the run. Statistics are taken by ``bnfold.calibrate.statistics``, merged
across ranks by ``bnfold.calibrate.distributed`` and written once, last."""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from bnfold.calibrate import distributed
from bnfold.calibrate.report import CalibrationReport, RankShare, build_report
from bnfold.calibrate.sources import Batch, DataSource, batch_items, map_tensors
from bnfold.calibrate.statistics import Layer, Observer
from bnfold.errors import BnfoldError, CalibrationError, ModelInputError, UsageError
from bnfold.find.unwrap import unwrap
from bnfold.folding.clone import clone_model
from bnfold.io.inputs import as_args
from bnfold.modes import eval_mode

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

    Each BatchNorm that saw data gets ``running_mean`` = mean and ``running_var`` = unbiased
    variance of every element it saw (all batches, all calls, pooled by count in float64) and
    ``num_batches_tracked`` = the calls pooled. Nothing else changes (parameters, other buffers,
    ``training`` and ``momentum`` flags); on any error the model is left exactly as it was.
    Recalibration exists to update a model, so by default (``inplace=True``) ``model`` itself is
    updated; with ``inplace=False`` the caller's model is not changed at all and a recalibrated
    copy is ``report.model``. Wrappers (DataParallel, DistributedDataParallel, ``torch.compile``)
    are looked through: the inner module shares their statistics.

    ``data`` is an iterable of batches (a DataLoader, a list), under ``torch.distributed`` this
    rank's part, fed as it is. A batch is a tensor (one positional input), a tuple/list
    (positional inputs) or a dict (keyword inputs); ``forward(model, batch)`` feeds other kinds,
    e.g. ``lambda m, b: m(b[0])`` for ``(inputs, labels)``. ``batches`` caps the batches (per
    rank); each batch's tensors go to ``device`` (default: the device of the model's first
    parameter or buffer; the model is not moved); ``progress(batch_index, batch_items)`` is
    called after each batch. The ``CalibrationReport`` has one entry per BatchNorm: those that
    saw no data are left unchanged, those without running statistics skipped.

    Raises ``UsageError`` (bad arguments, a model without BatchNorm, a TorchScript model, an
    uninitialised lazy BatchNorm, a ``DataSource`` split for another rank or world size),
    ``ModelInputError`` (the model rejected a batch, or a BatchNorm got one value per channel;
    the message names the batch and the BatchNorm) or ``CalibrationError`` (no batches, NaN/inf
    reaching a BatchNorm, another rank failed, two ranks fed the same first batch).
    """
    _check_arguments(model, batches)
    started = time.perf_counter()
    # the module inside a wrapper shares its statistics (and a DistributedDataParallel forward
    # would run a collective per batch: a hang when ranks feed different numbers of batches)
    inner, wrapped = unwrap(model)
    notes = (f"recalibrated the module inside {type(model).__name__}",) if wrapped else ()
    model = inner if inplace else clone_model(inner)
    named = list(model.named_modules())
    norms = _find_batchnorms(named)
    if isinstance(data, DataSource):
        notes += data.notes
    world = distributed.world_size()
    layers = {
        name: Layer(name, bn, world)
        for name, bn in norms.items()
        if bn.running_mean is not None and bn.running_var is not None
    }
    if not layers:
        return build_report(norms, {}, (), started, notes, model)
    tensors = itertools.chain(model.parameters(), model.buffers())
    device = torch.device(device) if device is not None else next(tensors, torch.empty(0)).device
    observer = Observer(layers)
    try:
        with eval_mode(model, (module for _, module in named)), torch.no_grad():
            try:
                observer.attach()
                feeder = _Feeder(model, observer, forward or _default_forward, device, progress)
                feed = functools.partial(feeder.all, data, batches)
                shares = distributed.feed_everywhere(feed, data, device, world)
                if not any(share.batches for share in shares):
                    raise CalibrationError(
                        "no batches: the data yielded nothing, so there is nothing to "
                        "recalibrate from (model left unchanged)"
                    )
                if world > 1:
                    distributed.all_reduce(list(layers.values()), device)
                if not any(layer.total for layer in layers.values()):
                    raise CalibrationError(
                        "no BatchNorm saw any data: every batch was empty (0 samples) or took "
                        "a route without BatchNorms (model left unchanged)"
                    )
            finally:
                observer.detach()
        per_rank = [RankShare(rank, s.batches, s.samples) for rank, s in enumerate(shares)]
        report = build_report(norms, layers, per_rank, started, notes, model)
        for layer in layers.values():
            layer.check_fits()
        for layer in layers.values():  # last
            layer.write()
    except BaseException:
        for layer in layers.values():
            layer.restore()
        raise
    return report


def _check_arguments(model: nn.Module, batches: int | None) -> None:
    if isinstance(model, torch.export.ExportedProgram):
        raise UsageError(
            "recalibrate updates a module's statistics and a torch.export program has no module "
            "to update; recalibrate the eager module before exporting, or load the .pt2 with "
            "bnfold.load_model and recalibrate loaded.model"
        )
    if not isinstance(model, nn.Module):
        raise UsageError(f"recalibrate needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError(
            "recalibrate cannot swap a TorchScript module's BatchNorm forwards; pass the eager "
            "nn.Module (or a .pt2 program loaded as a module)"
        )
    if batches is not None and (
        isinstance(batches, bool) or not isinstance(batches, int) or batches < 1
    ):
        raise UsageError(f"batches must be a positive integer or None, got {batches!r}")


def _find_batchnorms(named: list[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    """Every BatchNorm, by name (``(model)`` for the model itself)."""
    norms = {name or "(model)": m for name, m in named if isinstance(m, _BatchNorm)}
    if not norms:
        raise UsageError(
            "the model has no BatchNorm layer (nn.BatchNorm1d/2d/3d, SyncBatchNorm or a "
            "subclass): nothing to recalibrate"
        )
    for label, module in norms.items():
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
            raise UsageError(
                f"BatchNorm {label!r} is a lazy module that has not run yet; run one forward "
                "pass first so its statistics have a shape"
            )
    return norms


def _default_forward(model: nn.Module, batch: Batch) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    return model(*as_args(batch))


@dataclass(frozen=True)
class _Feeder:
    """Feeds batches: each moved to ``device``, fed by ``feed``, then reported to ``progress``."""

    model: nn.Module
    observer: Observer
    feed: ForwardFn
    device: torch.device
    progress: ProgressFn | None

    def all(self, data: Iterable[Batch], limit: int | None, fingerprint: bool) -> distributed.Fed:
        """Feed the batches; what was fed (with the first batch's fingerprint if asked)."""
        fed = samples = first = 0
        for index, batch in enumerate(_batches(data, limit)):
            if fingerprint and not first:  # the first batch that holds values
                first = distributed.fingerprint(batch)
            batch = map_tensors(batch, lambda t: t.to(self.device))
            self.observer.start(index)
            try:
                self.feed(self.model, batch)
            except BnfoldError:
                raise
            except Exception as exc:
                raise _rejected(index, batch, exc, self.observer.failed_in) from exc
            items = batch_items(batch)
            if self.progress is not None:
                self.progress(index, items)
            samples += items
            fed += 1
        for layer in self.observer.layers.values():
            layer.pool()
        return distributed.Fed(fed, samples, first)


def _batches(data: Iterable[Batch], limit: int | None) -> Iterator[Batch]:
    """At most ``limit`` batches of ``data``; a failing read names the batch."""
    try:
        iterator = iter(data)
    except TypeError as exc:
        raise UsageError(f"data must be an iterable of batches, got {type(data).__name__}") from exc
    for index in itertools.count() if limit is None else range(limit):
        try:
            yield next(iterator)
        except StopIteration:
            return
        except BnfoldError:
            raise
        except Exception as exc:
            raise CalibrationError(f"reading batch {index} from the data failed: {exc}") from exc


def _rejected(index: int, batch: Batch, exc: Exception, inside: str | None) -> ModelInputError:
    where = f" inside BatchNorm {inside!r}" if inside is not None else ""
    hint = ""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        hint = (
            " (a tuple/list batch is passed as positional inputs; for (inputs, labels) "
            "batches pass forward=lambda model, batch: model(batch[0]) in Python, or have a "
            "--data callable yield the inputs alone)"
        )
    return ModelInputError(
        f"batch {index}: the model rejected the batch{where}: {type(exc).__name__}: {exc}"
        f"{hint}. Statistics restored, model unchanged"
    )
