"""Each BatchNorm call's batch statistics during recalibration, pooled exactly in float64.

For the run, every recalibrated BatchNorm's forward is replaced (as the instance's own
``forward``, restored after; ``Observer``), and the model stays in eval mode:

- **Stock** (torch's own forward: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` outside a process
  group): torch's train-mode batch norm runs with momentum 1 on fresh zero tensors in place of
  the running buffers, so each call leaves its batch mean and unbiased variance from torch's
  kernel there: the call's row, the buffers untouched. A call the kernel does not sum to about
  float32 rounding (``Layer.kernel_row``), and a float32 call with a channel whose |mean|
  exceeds ``FAR`` std, take their row from a float64 copy.
- **Other** (a subclass with its own forward, as timm's ``BatchNormAct2d``; a ``SyncBatchNorm``
  in a process group, whose train-mode forward would all-reduce every call): its own forward
  runs, in eval mode, while each batch norm it runs on its running statistics is seen, in the
  thread that runs it (``bnfold.calibrate.inside``). The float64 batch mean and biased variance
  of that call's own input (what it normalises, which its forward may have transposed or
  scaled) are written into the running buffers first, so it normalises with batch statistics
  and keeps its extra behaviour (activation, dropout) in eval form. A forward that runs no such
  batch norm on a non-empty batch is refused: what it normalises is unknown.

Each call's row is checked for NaN/inf as it comes (the error names the first BatchNorm that saw
them), and each layer pools its rows by Chan's formula in float64.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnfold.calibrate.inside import NormCalls
from bnfold.errors import CalibrationError, ModelInputError
from bnfold.find.sites import is_stock_norm

F64 = torch.float64

#: A float32 row's mean is rounded by up to 2^-24 · |mean|; within FAR std of zero that moves
#: the pooled variance by at most about 2^-24 · FAR · 2 relative (2e-6, and ~1e-7 in practice).
FAR = 16.0
#: On CPU the kernel sums a batch without spatial extent, ``(N, C)`` or ``(N, C, 1)``, along the
#: batch in float32. Measured worst variance error in float32 roundings of the result: 2 at 16
#: rows, 4 at 64, 10 at 1,024, 26 at 4,096 (and 9e-7 relative at 12,544 rows, 7e-6 at 100,000).
#: Up to this many rows the kernel's row is taken (its float64 copy would cost a small batch
#: more than the forward), above it a float64 copy.
KERNEL_ROWS_FLAT = 1024
#: The channels-last memory format of 4-D and 5-D inputs.
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
#: Rows a layer keeps before pooling them (a few tensor operations per pooling, not per call).
POOL_EVERY = 64


class Row(NamedTuple):
    """One call's mean and unbiased variance per channel."""

    mean: torch.Tensor
    var: torch.Tensor


@dataclass(frozen=True)
class Moments:
    """Count, mean and sum of squared deviations (``m2``) per channel, float64 on the CPU."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    def merge(self, other: Moments) -> Moments:
        """Both sets of values together (Chan's formula)."""
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / count)
        return Moments(count, mean, m2)

    @functools.cached_property
    def var(self) -> np.ndarray:
        """The unbiased variance (every call has at least two values per channel)."""
        return self.m2 / (self.count - 1)


class Layer:
    """One BatchNorm during the run: how it is observed, and what it saw."""

    def __init__(self, name: str, bn: nn.Module, world: int = 1) -> None:
        self.name, self.bn = name, bn
        synced = isinstance(bn, nn.SyncBatchNorm) and world > 1  # its forward would all-reduce
        self.stock = is_stock_norm(bn) and "forward" not in bn.__dict__ and not synced
        self.calls = 0
        self.unusable = False  # a call whose input no statistics can be taken from
        self.counts: list[int] = []  # values per channel of each row not yet pooled
        self.rows: list[Row] = []  # each call's row not yet pooled
        self.total: Moments | None = None  # every value it saw (on every rank, once reduced)
        self.saved = tuple(t.clone() for t in self._buffers())  # the statistics before the run
        self.lock = threading.RLock()  # rows added (and own forwards run) one at a time

    def restore(self) -> None:
        for buffer, value in zip(self._buffers(), self.saved, strict=True):
            buffer.copy_(value)

    def check_fits(self) -> None:
        """Refuse pooled statistics the running buffers' dtype cannot hold (a float16 variance
        above 65504 would be written as inf)."""
        if self.total is not None:
            largest = max(float(np.abs(self.total.mean).max()), float(self.total.var.max()))
            self._refuse_above(largest, "its input's statistics reach")

    def _refuse_above(self, largest: float, what: str) -> None:
        """Refuse statistics of magnitude ``largest`` that the running buffers cannot hold."""
        dtype = self.bn.running_var.dtype
        limit = torch.finfo(dtype).max
        if largest > limit:  # NaN compares false: it is refused where it comes in
            raise CalibrationError(
                f"BatchNorm {self.name!r}: {what} {largest:.3g}, more than its "
                f"{str(dtype).removeprefix('torch.')} running statistics can hold ({limit:.3g}); "
                "keep this BatchNorm in float32 (bn.float()) or recalibrate a float32 copy. "
                "Statistics restored, model unchanged"
            )

    def write(self) -> None:
        """The pooled statistics into the running buffers (rounded once to their dtype), the
        calls pooled into ``num_batches_tracked``; a layer that saw nothing gets its own back."""
        if self.total is None:
            self.restore()
            return
        self.bn.running_mean.copy_(torch.from_numpy(self.total.mean))
        self.bn.running_var.copy_(torch.from_numpy(self.total.var))
        if self.bn.num_batches_tracked is not None:
            self.bn.num_batches_tracked.fill_(self.calls)

    def _buffers(self) -> list[torch.Tensor]:
        buffers = (self.bn.running_mean, self.bn.running_var, self.bn.num_batches_tracked)
        return [t for t in buffers if t is not None]

    def fresh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two zero tensors like the running statistics, for one call's kernel to fill."""
        like = self.saved[0]  # a copy of running_mean (its own lookup costs more than this)
        return torch.zeros_like(like), torch.zeros_like(like)

    def kernel_row(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> Row:
        """This call's row: what the train-mode kernel wrote (``mean``, ``var``) where it sums to
        about float32 rounding (on CPU a contiguous channels-first input with spatial dims in
        float64, one without spatial extent of up to ``KERNEL_ROWS_FLAT`` rows in float32 along
        the batch; on CUDA by Welford's method), else from a float64 copy: a longer batch
        without spatial extent, a channels-last batch or half inputs of float32 statistics
        (summed in float32 or less over the whole batch), and a float32 row far from zero."""
        dtype = mean.dtype
        if x.dtype != dtype or dtype not in (torch.float32, F64):
            return float64_row(x)
        layout = CHANNELS_LAST.get(x.dim())
        channels_last = layout is not None and x.is_contiguous(memory_format=layout)
        if not (x.is_cuda or dtype == F64 or (x.is_contiguous() and not channels_last)):
            return float64_row(x)
        flat = x.numel() == x.shape[0] * x.shape[1]  # (N, C), (N, C, 1): summed along N
        if flat and not x.is_cuda and x.shape[0] > KERNEL_ROWS_FLAT:
            return float64_row(x)
        if dtype == F64:
            return Row(mean, var)
        # var − mean² / FAR² per channel: negative where |mean| exceeds FAR std (a float32 row
        # would round the mean too coarsely), not finite where the input held NaN or inf or
        # the float32 sums overflowed (left for the float64 row: ``Observer._add`` refuses
        # NaN/inf, statistics beyond float32 are refused when written)
        low, high = torch.aminmax(torch.addcmul(var, mean, mean, value=-(FAR**-2)))
        return Row(mean, var) if 0 <= float(low) and float(high) < math.inf else float64_row(x)

    def batch_statistics(self, x: torch.Tensor, count: int) -> Row:
        """This call's float64 row, its mean and biased variance written into the running
        buffers for the layer's eval-mode forward (outside autograd, even when the caller's
        forward turned it on)."""
        row = float64_row(x)
        largest = max(float(row.mean.abs().max()), float(row.var.max()))
        self._refuse_above(largest, "one call's statistics reach")
        with torch.no_grad():
            self.bn.running_mean.copy_(row.mean)
            self.bn.running_var.copy_(row.var * ((count - 1) / count))
        return row

    def add(self, count: int, row: Row) -> None:
        with self.lock:  # threads calling one layer: each row kept, with its own count
            self.calls += 1
            self.counts.append(count)
            self.rows.append(row)
            if len(self.rows) >= POOL_EVERY:
                self.pool()

    def pool(self) -> None:
        """Merge the waiting rows into the total (Chan's formula over the rows, in float64 on
        the CPU: a few small array operations instead of a few device calls)."""
        if not self.rows:
            return
        k = len(self.rows)
        rows = [row.mean for row in self.rows] + [row.var for row in self.rows]
        values = torch.stack(rows).to("cpu", F64).numpy()
        means, variances = values[:k], values[k:]  # (rows, channels) each
        n = np.array(self.counts, dtype=np.float64)
        total = sum(self.counts)
        mean = n @ means / total
        m2 = (n - 1) @ variances + n @ np.square(means - mean)
        part = Moments(total, mean, m2)
        self.total = part if self.total is None else self.total.merge(part)
        self.counts, self.rows = [], []


def float64_row(x: torch.Tensor) -> Row:
    """The row of ``x`` (channels on dim 1), from a float64 copy."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.detach().to(F64), dims, correction=1)
    return Row(mean, var)


class Observer:
    """Every target BatchNorm's forward, replaced for the run (as the instance's own
    ``forward``, restored by ``detach``) by one that takes each call's statistics."""

    def __init__(self, layers: dict[str, Layer]) -> None:
        self.layers = layers
        self.batch = 0
        self.failed_in: str | None = None  # the innermost BatchNorm a failure passed through
        others = {id(x.bn.running_mean): x for x in layers.values() if not x.stock}
        self.inner = NormCalls(others, self._take)
        self.forwards: list[tuple[nn.Module, Any]] = []  # each layer's instance forward, if any

    def attach(self) -> None:
        """Every layer's forward swapped (each recorded first: ``detach`` puts back what an
        interrupted ``attach`` swapped)."""
        for layer in self.layers.values():
            bn = layer.bn
            self.forwards.append((bn, bn.__dict__.get("forward")))
            if layer.stock:
                bn.forward = functools.partial(self._stock, layer)
            else:
                bn.forward = functools.partial(self._other, layer, bn.forward)

    def detach(self) -> None:
        for bn, forward in self.forwards:
            if forward is None:
                bn.__dict__.pop("forward", None)
            else:
                bn.forward = forward
        self.forwards = []

    def start(self, batch: int) -> None:
        self.batch, self.failed_in = batch, None

    def _stock(self, layer: Layer, input: torch.Tensor) -> torch.Tensor:
        """torch's train-mode batch norm, writing this call's batch mean and unbiased variance
        into fresh tensors (momentum 1 over zeros), which become its row."""
        bn = layer.bn
        try:
            bn._check_input_dim(input)  # torch's forward checks this first (a subclass may not)
            mean, var = layer.fresh()  # also what a wrong width is checked against
            if not _usable(input, bn):  # torch's kernel decides (it rejects it, or passes it)
                return F.batch_norm(input, mean, var, bn.weight, bn.bias, True, 0.0, bn.eps)
            count = self._count(layer, input)
            output = F.batch_norm(input, mean, var, bn.weight, bn.bias, True, 1.0, bn.eps)
            self._add(layer, count, layer.kernel_row(input, mean, var))
            return output
        except BaseException:
            self.failed_in = self.failed_in or layer.name
            raise

    def _other(self, layer: Layer, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The layer's own forward, its batch norm calls taken (``_take``) while it runs."""
        x = args[0] if args else kwargs.get("input")
        try:
            # one call at a time: each writes its statistics into the layer's shared buffers
            # for its own batch norm to read (threads would read each other's)
            with layer.lock, self.inner.watching():
                calls_before = layer.calls if _usable(x, layer.bn) else None  # None: no batch
                output = forward(*args, **kwargs)
                took = layer.calls != calls_before or layer.unusable
        except BaseException:
            self.failed_in = self.failed_in or layer.name
            raise
        if not took:
            raise CalibrationError(
                f"batch {self.batch}: BatchNorm {layer.name!r} ({type(layer.bn).__name__}) has "
                "its own forward, and it ran no batch norm (F.batch_norm or torch.batch_norm) on "
                "its own running statistics (buffers swapped in, as by torch.func.functional_call, "
                "are not its own), so what it normalises is unknown; give it the stock forward, "
                "or call the model itself, to recalibrate it. Statistics restored, model unchanged"
            )
        return output

    def _take(self, layer: Layer, x: torch.Tensor) -> None:
        """A batch norm call inside ``layer``'s own forward, on its running statistics: the
        statistics of ``x``, written into them for the eval-mode batch norm to use."""
        if not _usable(x, layer.bn):  # the batch norm itself decides (and rejects it)
            layer.unusable = True
            return
        count = self._count(layer, x)
        self._add(layer, count, layer.batch_statistics(x, count))

    def _count(self, layer: Layer, x: torch.Tensor) -> int:
        """Values per channel of a call; at least two, as in training."""
        count = x.numel() // x.shape[1]
        if count < 2:
            raise ModelInputError(
                f"batch {self.batch}: BatchNorm {layer.name!r} got one value per channel "
                f"(input shape {tuple(x.shape)}); batch statistics need at least two, as in "
                "training: use a larger batch size"
            )
        return count

    def _add(self, layer: Layer, count: int, row: Row) -> None:
        """Refuse NaN/inf (this is the first layer in call order that saw them)."""
        if row.mean.dtype == F64 and not math.isfinite(float(row.mean.sum() + row.var.sum())):
            raise CalibrationError(
                f"batch {self.batch}: BatchNorm {layer.name!r} is the first layer whose input "
                f"holds NaN or infinite values; check the data (and the layers before "
                f"{layer.name!r}) for NaN/inf. Statistics restored, model unchanged"
            )
        layer.add(count, row)


def _usable(x: Any, bn: nn.Module) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.dim() >= 2
        and x.shape[1] == bn.num_features
        and x.numel() > 0
    )
