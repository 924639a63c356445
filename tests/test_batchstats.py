"""The three statistics routes of recalibration (kernel rows, exact float64 rows, shifted sums):
which input takes which, each exact against float64, the row tables, and the float32 error
bound."""

from __future__ import annotations

import pytest
import torch
from calibrate_models import reference_statistics, statistics_error
from torch import nn

from bnfold.calibrate.batchstats import SERIAL_MAX, LayerStatistics, Pooled, RowTable, serial
from bnfold.calibrate.recalibrate import recalibrate

F64 = torch.float64


def _batches(shape: tuple[int, ...], sizes=(5, 2, 9, 3), offset=3.0, seed=0, **kw) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn((n, *shape), generator=gen, dtype=F64) * 2 + offset).to(
            **{"dtype": torch.float32, **kw}
        )
        for n in sizes
    ]


def _exact(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    flat = torch.cat([v.to(F64).transpose(0, 1).reshape(v.shape[1], -1) for v in values], 1)
    return flat.mean(1), flat.var(1)


def _layer(bn: nn.Module) -> LayerStatistics:
    table = RowTable([bn.num_features], bn.running_mean.dtype, torch.device("cpu"))
    return LayerStatistics("bn", bn.eval(), table, 0)


def _feed(layer: LayerStatistics, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad():
        for x in batches:
            y, check = layer.call(x, x.numel() // x.shape[1], layer.bn.forward, (x,), {})
            assert bool(torch.isfinite(check).all())
            outputs.append(y)
    for table in (layer.table, layer.exact):
        assert table is not None
        table.settle(layer.KERNEL_OFFSET)
    return outputs


def _assert_exact(pooled: Pooled | None, batches: list[torch.Tensor], tol: float = 1e-6) -> None:
    assert pooled is not None
    mean, var = _exact(batches)
    std = var.sqrt()
    assert pooled.count == sum(x.numel() // x.shape[1] for x in batches)
    assert float(((torch.as_tensor(pooled.mean) - mean).abs() / std).max()) < tol
    unbiased = torch.as_tensor(pooled.m2) / (pooled.count - 1)
    assert float(((unbiased - var).abs() / var).max()) < tol


# ------------------------------------------------------------------------ torch's CPU kernel


@pytest.mark.parametrize(
    "shape",
    [(64, 8, 300), (16, 6, 32, 32), (4, 3, 4, 8, 8), (64, 1, 32), (1, 8, 40, 40), (300, 4, 2)],
    ids=["ncl", "nchw", "ncdhw", "one-channel", "one-sample", "two-values"],
)
def test_cpu_kernel_rows_are_summed_in_float64(shape: tuple[int, ...]) -> None:
    """What the kernel route stands on: for contiguous channels-first float32 input torch's CPU
    train-mode kernel sums in float64 and rounds once, even 1e4 std from zero."""
    x = (torch.randn(shape, dtype=F64) + 1e4).float()
    mean, var = torch.zeros(shape[1]), torch.zeros(shape[1])
    torch.batch_norm(x, None, None, mean, var, True, 1.0, 1e-5, False)
    exact_mean, exact_var = _exact([x])
    assert torch.equal(mean, exact_mean.float())  # one rounding of the float64 mean
    assert float(((var.double() - exact_var).abs() / exact_var).max()) < 1e-6


@pytest.mark.parametrize("layout", ["2-D", "channels-last", "strided"])
def test_cpu_kernel_float64_statistics_in_any_layout(layout: str) -> None:
    x = torch.randn(64, 8, 6, 6, dtype=F64) + 1e4
    x = {
        "2-D": x[:, :, 0, 0].contiguous(),
        "channels-last": x.contiguous(memory_format=torch.channels_last),
        "strided": x[:, :, ::2],
    }[layout]
    mean, var = torch.zeros(8, dtype=F64), torch.zeros(8, dtype=F64)
    torch.batch_norm(x, None, None, mean, var, True, 1.0, 1e-5, False)
    exact_mean, exact_var = _exact([x])
    assert float(((mean - exact_mean).abs() / exact_var.sqrt()).max()) < 1e-9
    assert float(((var - exact_var).abs() / exact_var).max()) < 1e-9


# ------------------------------------------------------------------------------------ routes


def test_contiguous_input_takes_the_kernel_route() -> None:
    layer = _layer(nn.BatchNorm2d(5))
    batches = _batches((5, 6, 6))
    _feed(layer, batches)
    assert layer.kernel_ok is True
    assert layer.table is not None
    assert layer.table.pooled_counts == [sum(b.shape[0] for b in batches) * 36]
    assert layer.exact is not None and layer.exact.table is None  # never needed: not made
    assert layer.sums is None
    _assert_exact(layer.pooled(), batches)


@pytest.mark.parametrize(
    ("bn", "shape", "kw"),
    [
        (nn.BatchNorm1d(7), (7,), {}),
        (nn.BatchNorm2d(5), (5, 6, 6), {"memory_format": torch.channels_last}),
        (nn.BatchNorm2d(5).half(), (5, 6, 6), {"dtype": torch.float16}),
    ],
    ids=["2-D", "channels-last", "float16"],
)
def test_other_small_inputs_take_exact_float64_rows(bn, shape, kw) -> None:
    layer = _layer(bn)
    batches = _batches(shape, **kw)
    outputs = _feed(layer, batches)
    assert layer.table is not None and layer.table.table is None  # no kernel row at all
    assert layer.exact is not None
    assert layer.exact.pooled_counts == [sum(x.numel() // x.shape[1] for x in batches)]
    assert layer.sums is None
    _assert_exact(layer.pooled(), batches, 1e-12)  # float64 rows of float32/16 data: exact
    for x, y in zip(batches, outputs, strict=True):  # the output keeps the input's dtype
        assert y.dtype == x.dtype and y.shape == x.shape


def test_a_first_call_far_from_zero_turns_the_kernel_route_off() -> None:
    layer = _layer(nn.BatchNorm2d(4))
    batches = _batches((4, 5, 5), offset=200.0)  # |mean| = 100 std
    _feed(layer, batches)
    assert layer.kernel_ok is False
    assert layer.table is not None and layer.table.pooled_counts == [0]
    assert layer.exact is not None and layer.exact.pooled_counts == [19 * 25]
    _assert_exact(layer.pooled(), batches, 1e-12)


def test_large_inputs_off_the_kernel_route_are_summed_for_the_layers_own_forward() -> None:
    layer = _layer(nn.BatchNorm2d(3))
    shape = (3, 120, 120)
    assert 2 * 3 * 120 * 120 > LayerStatistics.EXACT_MAX
    batches = _batches(shape, sizes=(2, 3), memory_format=torch.channels_last)
    outputs = _feed(layer, batches)
    assert layer.sums is not None and layer.table is not None and layer.exact is not None
    assert layer.table.pooled_counts == layer.exact.pooled_counts == [0]
    _assert_exact(layer.pooled(), batches)
    # the last call's output used that call's batch statistics, as in training
    x = batches[-1]
    expected = nn.functional.batch_norm(x, None, None, layer.bn.weight, layer.bn.bias, True)
    torch.testing.assert_close(outputs[-1], expected, rtol=1e-5, atol=1e-5)


def test_large_contiguous_inputs_are_summed() -> None:
    layer = _layer(nn.BatchNorm2d(4))
    batches = _batches((4, 128, 128), sizes=(4, 2))
    assert min(x.numel() for x in batches) >= LayerStatistics.SUMS_MIN
    _feed(layer, batches)
    assert layer.sums is not None and layer.table is not None
    assert layer.table.pooled_counts == [0]
    _assert_exact(layer.pooled(), batches)


def test_a_subclass_with_its_own_forward_is_summed() -> None:
    class Scaled(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    bn = Scaled(4)
    layer = LayerStatistics("bn", bn.eval(), None, 0)
    batches = _batches((4, 3, 3))
    with torch.no_grad():
        outputs = [layer.call(x, x.numel() // 4, bn.forward, (x,), {})[0] for x in batches]
    assert layer.sums is not None
    _assert_exact(layer.pooled(), batches)
    x = batches[-1]
    expected = 2 * nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True)
    torch.testing.assert_close(outputs[-1], expected, rtol=1e-5, atol=1e-5)


def test_every_route_normalises_with_batch_statistics() -> None:
    """Kernel and exact-row calls produce what a train-mode BatchNorm produces (2-D inputs on
    one thread, channels-last ones on every thread)."""
    for bn, shape, kw in [
        (nn.BatchNorm2d(4), (4, 6, 6), {}),
        (nn.BatchNorm1d(6), (6,), {}),
        (nn.BatchNorm2d(4), (4, 6, 6), {"memory_format": torch.channels_last}),
    ]:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
        layer = _layer(bn)
        x = _batches(shape, **kw)[0]
        y = _feed(layer, [x])[0]
        expected = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------- the table


def test_rows_grow_and_pool_exactly_across_layers() -> None:
    """Three layers in one table, one called three times per batch (the table grows)."""
    bns = [nn.BatchNorm2d(3).eval(), nn.BatchNorm2d(5).eval(), nn.BatchNorm1d(2).eval()]
    table = RowTable([3, 5, 2], torch.float32, torch.device("cpu"), rows=2)
    layers = [LayerStatistics(str(i), bn, table, i) for i, bn in enumerate(bns)]
    fed: list[list[torch.Tensor]] = [[], [], []]
    shapes = [(3, 4, 4), (5, 2, 3), (2, 16)]
    with torch.no_grad():
        for step in range(5):
            for i, layer in enumerate(layers):
                for x in _batches(shapes[i], sizes=(3 + step,) * (3 if i == 1 else 1), seed=step):
                    layer.call(x, x.numel() // x.shape[1], layer.bn.forward, (x,), {})
                    fed[i].append(x)
            if step == 2:
                table.settle(LayerStatistics.KERNEL_OFFSET)
    table.settle(LayerStatistics.KERNEL_OFFSET)
    assert table.table.shape[0] >= 9  # grew from 2 rows
    for layer, batches in zip(layers, fed, strict=True):
        _assert_exact(layer.pooled(), batches)


def test_float32_bound_covers_drift_and_is_noted() -> None:
    """A wide first batch (mean 12 std from zero: the kernel route), then narrow batches 300
    std from zero whose means differ: their float32 row means lose precision in the
    between-batch term. The bound covers the actual error and the report says so."""
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 4, 4, generator=gen) * 25 + 300]
    batches += [torch.randn(4, 3, 4, 4, generator=gen) + 300 + 3 * i for i in range(9)]
    reference = reference_statistics(model, batches)
    report = recalibrate(model, batches)
    _, var_error = statistics_error(model, reference)["0"]
    (note,) = report.notes
    assert "'0'" in note and "far from zero" in note and "float64 copy" in note
    bound = float(note.split("exact only to ")[1].split(" ")[0])
    assert var_error <= bound
    assert var_error > 1e-9  # the drift did cost precision: the bound is not vacuous


def test_no_note_when_the_bound_is_small() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    report = recalibrate(model, _batches((3, 5, 5), offset=6.0))
    assert report.notes == ()


def test_bound_holds_on_random_offsets() -> None:
    """The bound is rigorous: random per-batch offsets up to the limit, worst case kept."""
    gen = torch.Generator().manual_seed(5)
    for trial in range(20):
        scale = float(torch.rand(1, generator=gen)) * 12
        offsets = (1 + torch.rand(6, generator=gen)) * scale
        batches = [torch.randn(3, 4, 5, 5, generator=gen) + float(o) for o in offsets]
        layer = _layer(nn.BatchNorm2d(4))
        _feed(layer, batches)
        pooled = layer.pooled()
        assert pooled is not None and layer.table is not None
        (bound,) = layer.table.bounds(layer.ROW_ERROR)
        _, var = _exact(batches)
        error = float(((torch.as_tensor(pooled.m2) / (pooled.count - 1) - var).abs() / var).max())
        assert error <= max(bound, 1e-12), (trial, error, bound)  # 0: no float32 rows


# ------------------------------------------------------------------------------- exact rows


def test_exact_rows_share_one_float64_table_across_layers() -> None:
    """Two 2-D layers and a channels-last one in one group: their float64 rows share a table
    (made on the first exact call), the row table of the float32 kernel stays unmade."""
    bns = [nn.BatchNorm1d(6).eval(), nn.BatchNorm1d(3).eval(), nn.BatchNorm2d(4).eval()]
    table = RowTable([6, 3, 4], torch.float32, torch.device("cpu"), rows=2)
    exact = RowTable([6, 3, 4], F64, torch.device("cpu"), rows=2)
    layers = [LayerStatistics(str(i), bn, table, i, exact=exact) for i, bn in enumerate(bns)]
    shapes: list[tuple[tuple[int, ...], dict]] = [
        ((6,), {}),
        ((3,), {}),
        ((4, 3, 3), {"memory_format": torch.channels_last}),
    ]
    fed: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        for step in range(5):
            for i, layer in enumerate(layers):
                shape, kw = shapes[i]
                for x in _batches(shape, sizes=(2 + step,), offset=1e4, seed=step, **kw):
                    layer.call(x, x.numel() // x.shape[1], layer.bn.forward, (x,), {})
                    fed[i].append(x)
    exact.settle(LayerStatistics.KERNEL_OFFSET)
    table.settle(LayerStatistics.KERNEL_OFFSET)
    assert table.table is None and exact.table is not None and exact.table.shape[0] >= 5
    for layer, batches in zip(layers, fed, strict=True):
        _assert_exact(layer.pooled(), batches, 1e-12)


def test_mixed_dtypes_the_layer_rejects_go_to_its_own_forward() -> None:
    """A float32 input to a float64 BatchNorm: the layer's own forward decides (it rejects it,
    as it would outside recalibration)."""
    layer = _layer(nn.BatchNorm1d(3).double())
    x = _batches((3,))[0]
    with torch.no_grad(), pytest.raises(RuntimeError):
        layer.call(x, x.shape[0], layer.bn.forward, (x,), {})


def test_half_inputs_of_a_float32_layer_take_exact_rows() -> None:
    """Half-precision inputs to a float32 BatchNorm (torch's mixed-precision kernel accepts
    them): exact rows, output in the input's dtype."""
    layer = _layer(nn.BatchNorm1d(5))
    batches = _batches((5,), dtype=torch.bfloat16)
    outputs = _feed(layer, batches)
    assert layer.exact is not None and layer.exact.pooled_counts == [19]
    _assert_exact(layer.pooled(), batches, 1e-12)
    assert all(y.dtype == torch.bfloat16 for y in outputs)


def test_serial_restores_the_thread_count_also_on_error() -> None:
    threads = torch.get_num_threads()
    assert serial(torch.get_num_threads) == 1
    with pytest.raises(RuntimeError):  # a kernel that rejects its input
        serial(torch.batch_norm, torch.ones(2, 3), None, None, None, None, False, 0.1, 1e-5, False)
    assert torch.get_num_threads() == threads


def test_small_batch_summed_inputs_run_on_one_thread(monkeypatch) -> None:
    """2-D inputs up to SERIAL_MAX elements run the kernel on one thread; contiguous
    channels-first ones keep every thread."""
    seen: list[int] = []
    kernel = torch.batch_norm

    def spy(*args):
        seen.append(torch.get_num_threads())
        return kernel(*args)

    monkeypatch.setattr(torch, "batch_norm", spy)
    if torch.get_num_threads() == 1:
        pytest.skip("one intra-op thread: nothing to switch")
    for bn, x in [
        (nn.BatchNorm1d(8), torch.randn(16, 8)),
        (nn.BatchNorm1d(8), torch.randn(SERIAL_MAX // 8 + 1, 8)),
        (nn.BatchNorm2d(8), torch.randn(4, 8, 5, 5)),
    ]:
        layer = _layer(bn)
        with torch.no_grad():
            layer.call(x, x.numel() // 8, bn.forward, (x,), {})
    threads = torch.get_num_threads()
    assert seen == [1, threads, threads]


def test_pooled_merge_is_chan() -> None:
    batches = _batches((3,), sizes=(4, 7), offset=50.0)
    parts = []
    for x in batches:
        mean, var = _exact([x])
        parts.append(Pooled(x.shape[0], mean, var * (x.shape[0] - 1)))
    _assert_exact(parts[0].merge(parts[1]), batches, 1e-12)


@pytest.mark.parametrize(
    ("shape", "kw"),
    [
        ((3, 4, 4), {}),
        ((3, 4, 4), {"memory_format": torch.channels_last}),
        ((3, 120, 120), {"memory_format": torch.channels_last}),
    ],
    ids=["kernel", "exact", "summed"],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_refused_on_every_route(shape: tuple, kw: dict, bad: float) -> None:
    from bnfold.errors import CalibrationError

    model = nn.Sequential(nn.Identity(), nn.BatchNorm2d(3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(shape, sizes=(2, 3, 2), **kw)
    batches[1][1, 2, 3, 1] = bad
    with pytest.raises(CalibrationError, match=r"batch 1: BatchNorm '1' is the first layer"):
        recalibrate(model, batches)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------- stock variants


def test_affine_free_sync_and_hooked_batchnorms_are_exact() -> None:
    """BatchNorm without affine parameters, SyncBatchNorm outside torch.distributed, and a
    BatchNorm whose pre-hook rescales its input (the statistics are of what the layer gets) and
    whose forward hook sees the train-mode output."""
    seen = []
    hooked = nn.BatchNorm2d(3)
    hooked.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    hooked.register_forward_hook(lambda m, args, out: seen.append(out.mean().item()))
    model = nn.Sequential(
        nn.BatchNorm2d(3, affine=False),
        nn.SyncBatchNorm(3),
        hooked,
        nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(3)),  # (N, 3, 36): kernel route
    ).eval()
    batches = _batches((3, 6, 6))
    reference = reference_statistics(model, batches)
    seen.clear()  # the reference's copy of the model ran the hook too
    recalibrate(model, batches)
    errors = statistics_error(model, reference)
    assert set(errors) == {"0", "1", "2", "3.1"}
    for name, (mean_error, var_error) in errors.items():
        assert mean_error < 1e-6 and var_error < 1e-6, name
    assert len(seen) == len(batches) and all(abs(m) < 1e-5 for m in seen)  # normalised


def test_report_has_the_old_statistics_on_every_route() -> None:
    """The report reads the old statistics before the new ones are written; the sums route,
    which writes each call's statistics into the buffers, keeps the old ones first."""
    model = nn.Sequential(
        nn.BatchNorm2d(3),  # small contiguous input: kernel rows
        nn.Flatten(0, 1),  # (N·3, 6, 6) → a BatchNorm1d over 6 "channels" of a 3-D input
        nn.BatchNorm1d(6),  # channels-first 3-D, small: kernel rows
    ).eval()
    wide = nn.Sequential(nn.BatchNorm2d(2), nn.Flatten(1), nn.BatchNorm1d(2 * 150 * 150))
    for bn in [*model.modules(), *wide.modules()]:
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                bn.running_mean.uniform_(-3, 3)
                bn.running_var.uniform_(0.5, 4)
    for net, batches in [
        (model, _batches((3, 6, 6))),
        (wide, _batches((2, 150, 150), sizes=(3, 4))),  # both layers large: the sums route
    ]:
        before = {
            name: (bn.running_mean.clone(), bn.running_var.clone())
            for name, bn in net.named_modules()
            if isinstance(bn, nn.modules.batchnorm._BatchNorm)
        }
        report = recalibrate(net, batches)
        for layer in report.layers:
            old_mean, old_var = before[layer.name]
            bn = net.get_submodule(layer.name)
            assert layer.old_mean is not None and layer.new_mean is not None
            assert layer.old_var is not None
            assert layer.old_mean.max == pytest.approx(float(old_mean.max()))
            assert layer.old_mean.min == pytest.approx(float(old_mean.min()))
            assert layer.old_var.max == pytest.approx(float(old_var.max()))
            assert layer.new_mean.max == pytest.approx(float(bn.running_mean.max()), rel=1e-6)


@pytest.mark.parametrize(
    "layout", [{}, {"memory_format": torch.channels_last}], ids=["nchw", "nhwc"]
)
def test_large_inputs_are_shifted_a_few_samples_at_a_time(
    layout: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pieces of two samples (the input is 9): the same sums as one shifted copy, and exact."""
    from bnfold.calibrate import batchstats

    batches = _batches((3, 8, 8), sizes=(9, 4), offset=40.0, **layout)
    whole = batchstats._ShiftedSums(batches[0])
    for x in batches:
        whole.add(x)
    monkeypatch.setattr(batchstats, "SHIFT_CHUNK_BYTES", 2 * 3 * 8 * 8 * 4)
    pieces = batchstats._ShiftedSums(batches[0])
    assert pieces.subtract
    calls = []
    original = batchstats.channel_sums
    monkeypatch.setattr(
        batchstats, "channel_sums", lambda d: calls.append(d.shape[0]) or original(d)
    )
    for x in batches:
        pieces.add(x)
    assert calls == [2, 2, 2, 2, 1, 2, 2]
    assert torch.allclose(pieces.total, whole.total, rtol=1e-12, atol=0)
    _assert_exact(pieces.pool(), batches)


@pytest.mark.parametrize(
    ("shape", "summed"),
    [((32, 2, 2), False), ((8, 8, 8), True), ((2, 16, 16), True)],
    ids=["4 per sample: kernel", "64 per sample: sums", "256 per sample: sums"],
)
def test_large_inputs_take_the_kernel_when_their_rows_are_short(
    shape: tuple[int, ...], summed: bool
) -> None:
    """Above SUMS_MIN elements the sums route is faster only on long rows per sample."""
    channels = shape[0]
    count = LayerStatistics.SUMS_MIN // (channels * shape[1] * shape[2])
    batches = _batches(shape, sizes=(count, count + 3), offset=1.0)
    assert all(x.numel() >= LayerStatistics.SUMS_MIN for x in batches)
    layer = _layer(nn.BatchNorm2d(channels))
    _feed(layer, batches)
    assert (layer.sums is not None) is summed
    assert layer.table is not None and (layer.table.pooled_counts[0] == 0) is summed
    _assert_exact(layer.pooled(), batches)
