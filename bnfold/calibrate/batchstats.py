"""BatchNorm statistics during recalibration: each call's batch statistics for the forward pass,
and exact float64 pooling of every element each layer saw.

Each call takes one of three routes (``LayerStatistics.call``); all three are exact to float32
rounding and normalise the call's input with its own batch statistics, as a train-mode
BatchNorm does:

- **kernel** (a stock BatchNorm on CPU; input in its float32/float64 statistics' dtype,
  float64 or contiguous channels-first with more than one value per channel per sample, and
  below ``SUMS_MIN`` elements or with fewer than ``SUMS_ROW_MIN`` values per channel per
  sample):
  torch's train-mode kernel normalises the batch and, given momentum 1, writes the batch mean
  and unbiased variance into a row of a ``RowTable``. For these inputs the CPU kernel sums in
  float64 and rounds once (the tests hold it to that). The rows of every layer are pooled
  together in float64 by Chan's formula (a few tensor operations per ``RowTable.settle``, not
  per layer). A float32 row's mean is rounded (by at most half an ulp of the largest |m_b|),
  and that rounding enters the between-call term Σ n_b (m_b − M)²; ``RowTable.bounds`` bounds
  its effect on the variance. So float32 inputs take this route only while every channel's
  |mean| ≤ ``KERNEL_OFFSET`` std (checked on the layer's first call and on every row pooled),
  and a bound above ``bnfold.calibrate.recalibrate.BOUND_NOTE`` is reported.
- **exact** (any other input of a stock BatchNorm on CPU up to ``EXACT_MAX`` elements in a
  dtype the layer takes: 2-D, channels-last, float16/bfloat16, far from zero): the train-mode
  kernel runs on a float64 copy of the input (float64 parameters), so its rows are float64
  statistics, summed in float64 whatever the layout; they go into a float64 ``RowTable``
  shared by the layers and are pooled like the kernel rows. The output is rounded once to the
  input's dtype.
- **sums** (everything else: large inputs, layers off the CPU, BatchNorm subclasses with their
  own forward): per-channel sums of ``d = x − K`` and ``d²`` (``_ShiftedSums``; a shift
  ``K`` near the layer's mean keeps them free of cancellation; ``d`` is made a few samples at
  a time, ``SHIFT_CHUNK_BYTES``). The batch mean and biased variance go into the layer's
  running buffers and the layer runs its own eval-mode forward, so a subclass keeps its extra
  behaviour in eval form.

On CPU the kernel route costs what ``torch.optim.swa_utils.update_bn`` costs per call (the same
kernel), and less for small inputs the kernel sums along the batch (2-D, channels-last): those
calls run on one thread (``serial``), where starting a parallel region costs more than the
work. Below ``SUMS_MIN`` elements the sums route's fixed cost (about ten small operations)
exceeds the kernel's slower loops; above it the sums route is cheaper where each sample's rows
are long enough (``SUMS_ROW_MIN``; ``benchmarks/recalibrate_bench.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

Forward = Callable[..., Any]

F64 = torch.float64


#: Per-channel float64 values: a numpy array for statistics on the CPU (where numpy's small
#: operations cost less than torch's), a tensor on other devices. Both take the same arithmetic.
Array = np.ndarray | torch.Tensor

#: Tensor dtypes numpy has: a CPU tensor of one of these is read or written through a numpy view
#: (a tenth of a torch operation's cost for a few hundred values).
NUMPY_DTYPES = frozenset((torch.float64, torch.float32, torch.float16, torch.int64))


@dataclass
class Pooled:
    """Count, mean and sum of squared deviations (``m2``) of a set of values, per channel."""

    count: int
    mean: Array  # float64
    m2: Array  # float64
    var: Array | None = None  # m2 / (count - 1), when already computed

    def unbiased(self) -> Array:
        if self.var is not None:
            return self.var
        return self.m2 / (self.count - 1)

    def merge(self, other: Pooled) -> Pooled:
        """Both sets together (Chan's formula, float64)."""
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / count)
        return Pooled(count, mean, m2)


def _array(t: torch.Tensor) -> Array:
    """A CPU tensor as a numpy view; others as they are."""
    return t.numpy() if t.is_cpu else t


def merge_all(parts: Sequence[Pooled | None]) -> Pooled | None:
    total = None
    for part in parts:
        if part is not None and part.count:
            total = part if total is None else total.merge(part)
    return total


# ----------------------------------------------------------------------------------- threads

#: Up to this many elements, torch's CPU batch-norm kernels that sum along the batch (2-D and
#: channels-last inputs, one value per channel per sample) run faster on one thread: starting
#: the parallel region costs more than the work (on 2 cores, a 32×256 batch: 9.5 µs on one
#: thread against 17.9 µs on two; even at 2^16 elements). Contiguous channels-first inputs are
#: split by channel and gain from every thread, so they keep them.
SERIAL_MAX = 1 << 15


def serial(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on one intra-op thread; the caller's thread count is restored after. The
    count is process-wide: another Python thread running torch operations during this one call
    (microseconds) would run them on one thread too (their speed only, never their results)."""
    threads = torch.get_num_threads()
    if threads == 1:
        return fn(*args)
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------- row table

_NONE = np.zeros(0)  # an empty placeholder array


class RowTable:
    """Per-call batch mean and unbiased variance of several layers (statistics of one dtype on
    the CPU): a column block per layer (its *slot*), a row per call. Rows are pooled into
    per-column float64 totals by ``settle`` and then reused."""

    def __init__(
        self, widths: Sequence[int], dtype: torch.dtype, device: torch.device, rows: int = 8
    ) -> None:
        self.widths = list(widths)
        self.starts = [sum(self.widths[:i]) for i in range(len(self.widths))]
        self.dtype, self.device, self.rows = dtype, device, rows
        # (rows, 2, columns): each call's mean then variance; made on the first row
        self.table: torch.Tensor | None = None
        self.column_widths = np.array(self.widths)  # for numpy's repeat
        self.array = _NONE  # the table's numpy view
        self.counts: list[list[int]] = [[] for _ in self.widths]  # per row; 0: not pooled
        self.views: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.widths]
        self.pooled_counts = [0] * len(self.widths)
        # per column, float64 (numpy): count, mean, M2 and its between-call part
        self.count: np.ndarray | None = None
        self.mean = self.m2 = self.between = _NONE
        self.var: np.ndarray | None = None  # made from the final totals by ``layer``
        self.largest: np.ndarray | None = None  # per column, max |row mean| pooled

    def next(self, slot: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (mean, variance) row of ``slot``'s next call; ``count`` values per channel are
        pooled from it (0: the row is only read)."""
        counts = self.counts[slot]
        index = len(counts)
        counts.append(count)
        views = self.views[slot]
        if index < len(views):
            return views[index]
        if self.table is None:
            columns = sum(self.widths)
            self._use(torch.zeros(self.rows, 2, columns, dtype=self.dtype, device=self.device))
        elif index == self.table.shape[0]:
            self._grow()
        start, stop = self.starts[slot], self.starts[slot] + self.widths[slot]
        flat = self.table.view(-1, self.table.shape[2])[:, start:stop].unbind(0)  # one op
        self.views[slot] = list(zip(flat[::2], flat[1::2], strict=True))
        return self.views[slot][index]

    def uncount(self, slot: int) -> None:
        """Do not pool ``slot``'s last row."""
        self.counts[slot][-1] = 0

    def _grow(self) -> None:
        assert self.table is not None
        rows = self.table.shape[0]
        table = self.table.new_zeros(2 * rows, 2, self.table.shape[2])
        table[:rows] = self.table
        self._use(table)
        self.views = [[] for _ in self.widths]

    def _use(self, table: torch.Tensor) -> None:
        self.table, self.array = table, table.numpy()

    def settle(self, offset_limit: float) -> list[int]:
        """Pool the rows written since the last call; the rows are then free. Returns the
        slots with a pooled float32 row whose |mean| exceeds ``offset_limit`` std.

        In numpy: the rows are few and small, and each torch operation would cost more than
        its work."""
        counts, self.counts = self.counts, [[] for _ in self.widths]
        if self.table is None or not any(any(c) for c in counts):
            return []
        for slot, c in enumerate(counts):
            self.pooled_counts[slot] += sum(c)
        rows = max(len(c) for c in counts)
        per_slot = np.array([c + [0] * (rows - len(c)) for c in counts], dtype=np.float64).T
        n = np.repeat(per_slot, self.column_widths, axis=1)  # (rows, columns)
        n_less_one = np.maximum(n - 1.0, 0.0)
        raw = self.array[:rows]
        means, variances = (raw[:, i].astype(np.float64, copy=False) for i in (0, 1))
        self.var = None
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf: refused by the check
            total = np.repeat(per_slot.sum(0), self.column_widths)
            mean = np.einsum("rc,rc->c", n, means) / np.maximum(total, 1.0)
            deviation = means - mean
            between = np.einsum("rc,rc,rc->c", n, deviation, deviation)
            within = np.einsum("rc,rc->c", n_less_one, variances)
            self._merge(total, mean, within, between)
            if self.dtype == F64:
                return []
            # in the rows' own dtype, over every row up to ``rows``: a row not pooled now is
            # zeros, an earlier (already checked) row, or a row kept out for being far from
            # zero, which only makes the bound larger and its slot is already off the route
            magnitude = np.abs(raw[:, 0])
            largest = magnitude.max(0).astype(np.float64)
            if self.largest is not None:
                largest = np.maximum(self.largest, largest)
            self.largest = largest
            far = (magnitude > np.sqrt(raw[:, 1]) * offset_limit).any(0)
        if not far.any():
            return []
        slots = np.repeat(np.arange(len(self.widths)), self.column_widths)
        return np.unique(slots[far]).tolist()

    def finite(self) -> bool:
        """Whether every row written holds finite values (unwritten rows are zeros)."""
        return self.table is None or bool(np.isfinite(self.array).all())

    def _merge(
        self, total: np.ndarray, mean: np.ndarray, within: np.ndarray, between: np.ndarray
    ) -> None:
        """Chan's formula per column; the between-call part of M2 is kept apart as well."""
        if self.count is None:
            self.count, self.mean, self.m2, self.between = total, mean, within + between, between
            return
        count = self.count + total
        delta = mean - self.mean
        share = total / np.maximum(count, 1.0)
        gap = np.square(delta) * self.count * share
        self.mean = self.mean + delta * share
        self.m2 = self.m2 + within + between + gap
        self.between = self.between + between + gap
        self.count = count

    def layer(self, slot: int) -> Pooled | None:
        """What ``slot``'s pooled rows hold (None when none were pooled)."""
        count = self.pooled_counts[slot]
        if not count or self.count is None:
            return None
        start = self.starts[slot]
        window = slice(start, start + self.widths[slot])
        if self.var is None:  # every slot's unbiased variance at once
            self.var = self.m2 / np.maximum(self.count - 1, 1.0)
        return Pooled(count, self.mean[window], self.m2[window], self.var[window])

    def bounds(self, row_error: float) -> list[float]:
        """Per slot, a bound on the relative error of its pooled variance from float32 rows (0
        for slots without any): ``row_error`` for each row's own rounding, plus the rounding
        e_b of the rows' means, |e_b| ≤ u/2 with u = ulp(max |m_b|). A row's variance is taken
        about its rounded mean (+ n_b e_b²) and so is the between-call term, so M2 is off by
        |Σ 2 n_b (m_b − M) e_b + 2 n_b e_b²| ≤ u √(N · Σ n_b (m_b − M)²) + N u²/2."""
        if self.largest is None or self.count is None or self.table is None:
            return [0.0] * len(self.widths)
        row_dtype = self.array.dtype
        ulp = np.spacing(self.largest.astype(row_dtype)).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            error = ulp * np.sqrt(self.count * self.between) + self.count * np.square(ulp) / 2
            ratio = error / np.maximum(self.m2, math.ulp(0.0))
        worst = np.maximum.reduceat(ratio, self.starts).tolist()
        return [row_error + w if self.pooled_counts[slot] else 0.0 for slot, w in enumerate(worst)]


# ----------------------------------------------------------------------------- shifted sums


class _ShiftedSums:
    """Per-channel Σ(x − K) and Σ(x − K)², each call's sums in float64, pooled in groups.

    ``K`` is chosen on the first call: the first sample's mean (the batch mean for 2-D inputs),
    or 0 when that input is already centred (every channel's mean within ``CENTRED`` of its
    standard deviation), which saves the shifted copy; the float32 sums then lose at most a few
    parts in 1e7 of the variance to cancellation.
    """

    FLUSH = 64
    CENTRED = 1.0

    def __init__(self, x: torch.Tensor) -> None:
        compute = F64 if x.dtype == F64 else torch.float32
        self.total = torch.zeros(2, x.shape[1], dtype=F64, device=x.device)
        self.count = 0
        self.pending: list[torch.Tensor] = []  # each call's float64 [Σd, Σd²]
        self.views: dict[int, torch.Tensor] = {}  # K viewed for inputs with each number of dims
        if x.dim() == 2:  # small: always shifted, by the batch mean
            self.shift, self.subtract = x.mean(0, dtype=compute), True
            return
        centre, spread = first_sample_moments(x)
        self.subtract = x.dtype not in (torch.float32, F64) or not bool(
            (centre.abs() <= self.CENTRED * spread).all()
        )
        self.shift = (
            centre.to(compute) if self.subtract else torch.zeros_like(centre, dtype=compute)
        )

    def add(self, x: torch.Tensor) -> torch.Tensor:
        """Pool one call's input; return its float64 [Σd, Σd²] (to read, not to keep)."""
        if self.subtract:
            shift = self.views.get(x.dim())
            if shift is None:
                view = [1, x.shape[1]] + [1] * (x.dim() - 2)
                shift = self.views[x.dim()] = self.shift.view(view)
            sums = _shifted_sums(x, shift)
        else:
            sums = channel_sums(x)
        self.pending.append(sums)
        self.count += x.numel() // x.shape[1]
        if len(self.pending) >= self.FLUSH:
            self.flush()
        return sums

    def flush(self) -> None:
        if self.pending:
            self.total += torch.stack(self.pending).sum(0)
            self.pending = []

    def pool(self) -> Pooled:
        self.flush()
        total, shift = _array(self.total), _array(self.shift.to(F64))
        s1, s2 = total[0], total[1]
        mean = shift + s1 / self.count
        m2 = s2 - s1 * s1 / self.count
        m2[m2 < 0] = 0.0  # rounding of a constant channel
        return Pooled(self.count, mean, m2)


#: The shifted copy of a large input is made this many bytes at a time (whole samples): a
#: copy of the whole input would be a fresh allocation of its size, which the OS maps page by
#: page (a 50 MB input: 16.7 ms against 3.0 ms in pieces), and it would add to the peak memory.
SHIFT_CHUNK_BYTES = 2 << 20


def _shifted_sums(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``channel_sums(x − shift)``, the difference made a few samples at a time."""
    per_sample = x.numel() // x.shape[0] * max(x.element_size(), 4)  # float16 -> float32
    samples = max(1, SHIFT_CHUNK_BYTES // per_sample)
    if samples >= x.shape[0]:
        return channel_sums(x - shift)
    return torch.stack([channel_sums(part - shift) for part in x.split(samples)]).sum(0)


def first_sample_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the first sample's values (inputs with
    spatial dims), cheaply, along its contiguous axis. A shift only has to be near the data's
    mean."""
    channels = x.shape[1]
    first = x[0]
    if first.is_contiguous() or not first.movedim(0, -1).is_contiguous():
        values = first.reshape(channels, -1)
    else:
        values = first.movedim(0, -1).reshape(-1, channels).t()
    mean = values.mean(1, dtype=torch.float32 if x.dtype != F64 else F64)
    return mean, (values - mean[:, None]).square_().mean(1).sqrt_()


def channel_sums(dev: torch.Tensor) -> torch.Tensor:
    """Float64 per-channel [Σd, Σd²] of ``dev`` (channels on dim 1); may square ``dev`` in place.

    Channels-first: each sample's values are summed along the contiguous axis in ``dev``'s dtype
    (cascade summation keeps the error ~1e-7 relative), Σd² from the per-sample 2-norms (one
    read, no squared copy), then the per-sample sums in float64. Channels-last: the sums run
    along a strided axis, which torch accumulates in order, so they are taken in float64.
    """
    batch, channels = dev.shape[0], dev.shape[1]
    if dev.dim() == 2:
        return torch.stack((dev.sum(0, dtype=F64), dev.square_().sum(0, dtype=F64)))
    if dev.is_contiguous() or not dev.movedim(1, -1).is_contiguous():
        rows = dev.reshape(batch, channels, -1)  # a copy only for odd strides
        per_sample = torch.stack((rows.sum(2), torch.linalg.vector_norm(rows, dim=2).square_()))
        return per_sample.sum(1, dtype=F64)
    rows = dev.movedim(1, -1).reshape(batch, -1, channels).to(F64)
    return torch.stack((rows.sum((0, 1)), rows.square_().sum((0, 1))))


# ---------------------------------------------------------------------------------- a layer


class LayerStatistics:
    """One BatchNorm's calls: runs each (``call``) and pools what it saw (``pooled``).

    ``table`` and ``slot``: where its kernel rows go; ``exact``: the float64 table (same slots)
    for its exact rows. None for a layer that only takes the sums route: a subclass with its own
    forward, or statistics off the CPU.
    """

    #: Inputs of at least this many elements take the sums route: its vectorised passes beat
    #: the kernel's scalar statistics loops there (measured on 2 CPU cores)...
    SUMS_MIN = 1 << 17
    #: ...when each sample has at least this many values per channel: on shorter rows (the
    #: last stages of a CNN, 2×2 to 7×7) the kernel is faster (a 64×512×2×2 input: 147 µs
    #: against 384 µs), so those keep the kernel where it may run.
    SUMS_ROW_MIN = 64
    #: Inputs that cannot take the kernel route take the exact route up to this many elements
    #: (their float64 copy is made per call), and the sums route above it.
    EXACT_MAX = 1 << 16
    #: Float32 inputs take the kernel route while |mean| ≤ KERNEL_OFFSET · std per channel: the
    #: kernel's float32 batch means then cost the pooled variance at most ~1e-6 relative.
    KERNEL_OFFSET = 16.0
    #: The kernel's own rounding of a row's variance (float32 products summed in float64,
    #: rounded once), relative: the constant part of a float32 row's error bound.
    ROW_ERROR = 2.0**-22

    def __init__(
        self,
        name: str,
        bn: nn.Module,
        table: RowTable | None,
        slot: int,
        loose: list[torch.Tensor] | None = None,
        exact: RowTable | None = None,
    ) -> None:
        self.name = name
        self.bn = bn
        self.table, self.slot = table, slot
        if exact is None and table is not None:
            exact = RowTable(table.widths, F64, table.device, rows=table.rows)
        self.exact = exact
        self.loose = [] if loose is None else loose  # NaN-check tensors outside the tables
        self.mean_buffer: torch.Tensor = bn.running_mean  # looked up once: __getattr__ is slow
        self.var_buffer: torch.Tensor = bn.running_var
        self.dtype = self.mean_buffer.dtype
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps
        self.check_dim = bn._check_input_dim
        self.cudnn = torch.backends.cudnn.enabled
        self.any_layout = self.dtype == F64  # the float64 kernel sums any layout in float64
        self.clamp = not self.eps > 0  # var + eps > 0 already when eps > 0
        kernel_dtype = self.dtype in (torch.float32, F64)
        # None: decided on the first kernel call (float32)
        self.kernel_ok: bool | None = (
            True if self.dtype == F64 else (None if kernel_dtype else False)
        )
        # input dtypes the layer's own forward takes (half inputs with float32 statistics too)
        self.input_dtypes = {self.dtype}
        if self.dtype == torch.float32:
            self.input_dtypes |= {torch.float16, torch.bfloat16}
        self.affine64: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
        self.sums: _ShiftedSums | None = None
        # running mean, variance and count as they were, kept before the sums route first
        # writes the buffers (the other routes never do)
        self.saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.calls = 0

    def call(
        self, x: torch.Tensor, n: int, forward: Forward, args: tuple, kwargs: dict
    ) -> tuple[Any, torch.Tensor]:
        """Run the layer on ``x`` (``n`` values per channel) with batch statistics and pool
        ``x``. Returns the layer's output and a tensor that is non-finite when ``x`` held NaN or
        inf."""
        self.calls += 1
        if self.table is None or not x.is_cpu:
            return self._summed(x, n, forward, args, kwargs)
        size = x.numel()
        # the kernel sums along the batch (2-D, channels-last, one value per sample): in the
        # input's dtype, and faster on one thread when small (see ``SERIAL_MAX``)
        along_batch = n == x.shape[0] or not x.is_contiguous()
        dtype = x.dtype
        kernel = (
            self.kernel_ok is not False
            and dtype == self.dtype
            and (self.any_layout or not along_batch)
        )
        if size >= self.SUMS_MIN and not (kernel and n < x.shape[0] * self.SUMS_ROW_MIN):
            return self._summed(x, n, forward, args, kwargs)
        one_thread = along_batch and size <= SERIAL_MAX
        if kernel:
            self.check_dim(x)
            return self._kernel(x, n, one_thread)
        if size > self.EXACT_MAX or dtype not in self.input_dtypes:
            return self._summed(x, n, forward, args, kwargs)
        self.check_dim(x)
        return self._exact_call(x, n, one_thread)

    def _kernel(
        self, x: torch.Tensor, n: int, one_thread: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's train-mode kernel writes the batch mean and unbiased variance into a row."""
        assert self.table is not None
        mean, var = self.table.next(self.slot, n)
        y = _train_batch_norm(
            x, self.weight, self.bias, mean, var, self.eps, self.cudnn, one_thread
        )
        if self.kernel_ok is None:
            self.kernel_ok = bool((mean.abs() <= self.KERNEL_OFFSET * var.sqrt()).all())
            if not self.kernel_ok:  # far from zero: this call's row is taken exactly instead
                self.table.uncount(self.slot)
                var = self._exact_row(x.to(F64), n)
        return y, var

    def _exact_call(
        self, x: torch.Tensor, n: int, one_thread: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The train-mode kernel on a float64 copy of ``x``: float64 rows whatever the input's
        layout or dtype, and the output rounded once to ``x``'s dtype."""
        assert self.exact is not None
        if self.affine64 is None:  # parameters do not change during recalibration
            self.affine64 = tuple(
                None if p is None else p.detach().to(F64) for p in (self.weight, self.bias)
            )
        mean, var = self.exact.next(self.slot, n)
        weight, bias = self.affine64
        y = _train_batch_norm(x.to(F64), weight, bias, mean, var, self.eps, self.cudnn, one_thread)
        return y.to(x.dtype), var

    def _exact_row(self, x64: torch.Tensor, n: int) -> torch.Tensor:
        """Only the statistics of ``x64`` (float64) into an exact row; returns its variance."""
        assert self.exact is not None
        mean, var = self.exact.next(self.slot, n)
        torch.ops.aten.batch_norm_update_stats(x64, mean, var, 1.0)
        return var

    def _summed(
        self, x: torch.Tensor, n: int, forward: Forward, args: tuple, kwargs: dict
    ) -> tuple[Any, torch.Tensor]:
        if self.sums is None:
            tracked = self.bn.num_batches_tracked
            self.saved = (
                self.mean_buffer.clone(),
                self.var_buffer.clone(),
                None if tracked is None else tracked.clone(),
            )
            self.sums = _ShiftedSums(x)
        sums = self.sums.add(x)
        self._write_batch_statistics(sums, n)
        self.loose.append(sums[1])
        return forward(*args, **kwargs), sums[1]

    def _write_batch_statistics(self, sums: torch.Tensor, n: int) -> None:
        """running_mean = K + Σd/n, running_var = Σd²/n − (Σd/n)² (biased, as in training);
        each computed in float64 and rounded once into the buffer."""
        assert self.sums is not None
        scaled = sums * (1.0 / n)
        torch.add(self.sums.shift, scaled[0], out=self.mean_buffer)
        torch.addcmul(scaled[1], scaled[0], scaled[0], value=-1.0, out=self.var_buffer)
        if self.clamp:  # eps = 0: a constant channel must not get a negative variance
            self.var_buffer.clamp_(min=0.0)

    def old_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The running mean and variance as they were before recalibration."""
        if self.saved is not None:
            return self.saved[0], self.saved[1]
        return self.mean_buffer, self.var_buffer

    def restore_statistics(self) -> None:
        """Undo the sums route's writes into the running buffers."""
        if self.saved is None:
            return
        mean, var, tracked = self.saved
        with torch.no_grad():
            self.mean_buffer.copy_(mean)
            self.var_buffer.copy_(var)
            if tracked is not None:
                self.bn.num_batches_tracked.copy_(tracked)

    def pooled(self) -> Pooled | None:
        """Everything this layer saw, pooled in float64 (None when it saw nothing); the row
        tables must have been settled."""
        rows = [t.layer(self.slot) for t in (self.table, self.exact) if t is not None]
        sums = self.sums.pool() if self.sums is not None and self.sums.count else None
        return merge_all([*rows, sums])


def _train_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    cudnn: bool,
    one_thread: bool,
) -> torch.Tensor:
    """torch's train-mode kernel, momentum 1: ``mean``/``var`` get the batch mean and unbiased
    variance; on one intra-op thread if ``one_thread`` (see ``SERIAL_MAX``)."""
    args = (x, weight, bias, mean, var, True, 1.0, eps, cudnn)
    if one_thread:
        return serial(torch.batch_norm, *args)
    return torch.batch_norm(*args)
