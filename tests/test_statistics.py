"""How each BatchNorm call's statistics are taken (torch's kernel rows, float64 rows, the
batch norm calls of a BatchNorm with its own forward), each exact against float64, far from
zero too; the pooling; and no process-wide state."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from calibrate_models import all_state, assert_same, reference_statistics, statistics_error
from torch import nn

from bnfold.calibrate import statistics
from bnfold.calibrate.recalibrate import recalibrate
from bnfold.calibrate.statistics import Layer, Moments, Observer
from bnfold.errors import CalibrationError, ModelInputError
from bnfold.modes import eval_mode

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


def _observe(bn: nn.Module, batches: list[torch.Tensor]) -> tuple:
    """``bn`` fed ``batches`` with its forward replaced, as recalibration runs it: the layer,
    its rows' dtypes in call order, and its outputs."""
    layer = Layer("bn", bn)
    observer = Observer({"bn": layer})
    dtypes, outputs = [], []
    with eval_mode(bn), torch.no_grad():
        observer.attach()
        try:
            for index, x in enumerate(batches):
                observer.batch = index
                outputs.append(bn(x))
                dtypes.append(layer.rows[-1].mean.dtype)
            layer.pool()
        finally:
            observer.detach()
    return layer, dtypes, outputs


def _assert_exact(layer: Layer, batches: list[torch.Tensor], tol: float = 1e-6) -> None:
    total = layer.total
    assert total is not None
    mean, var = _exact(batches)
    assert total.count == sum(x.numel() // x.shape[1] for x in batches)
    pooled_mean, pooled_var = torch.from_numpy(total.mean), torch.from_numpy(total.var)
    assert float(((pooled_mean - mean).abs() / var.sqrt()).max()) < tol
    assert float(((pooled_var - var).abs() / var).max()) < tol


def _train_mode(x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    return nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, eps=bn.eps)


# ------------------------------------------------------------------------ torch's CPU kernel


@pytest.mark.parametrize(
    "shape",
    [(64, 8, 300), (16, 6, 32, 32), (4, 3, 4, 8, 8), (64, 1, 32), (1, 8, 40, 40), (300, 4, 2)],
    ids=["ncl", "nchw", "ncdhw", "one-channel", "one-sample", "two-values"],
)
def test_cpu_kernel_rows_are_summed_in_float64(shape: tuple[int, ...]) -> None:
    """What the kernel rows stand on: for contiguous channels-first float32 input torch's CPU
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


# -------------------------------------------------------------------- where each row comes from


@pytest.mark.parametrize(
    "shape", [(5, 6, 6), (4, 128, 128), (7,), (7, 1)], ids=["small", "large", "2-D", "flat"]
)
def test_contiguous_input_takes_the_kernel_rows_whatever_its_size(shape: tuple) -> None:
    bn = nn.BatchNorm2d(shape[0]) if len(shape) > 2 else nn.BatchNorm1d(shape[0])
    batches = _batches(shape, sizes=(4, 2, 3))
    layer, dtypes, outputs = _observe(bn, batches)
    assert dtypes == [torch.float32] * 3
    _assert_exact(layer, batches)
    torch.testing.assert_close(outputs[-1], _train_mode(batches[-1], bn), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("bn", "shape", "kw"),
    [
        (nn.BatchNorm1d(7), (7,), {"dtype": torch.float32}),  # far from zero
        (nn.BatchNorm2d(5), (5, 6, 6), {"memory_format": torch.channels_last}),
        (nn.BatchNorm2d(3), (3, 120, 120), {"memory_format": torch.channels_last}),
        (nn.BatchNorm2d(5).half(), (5, 6, 6), {"dtype": torch.float16}),
        (nn.BatchNorm1d(5), (5,), {"dtype": torch.bfloat16}),
    ],
    ids=[
        "2-D-far",
        "channels-last",
        "large-channels-last",
        "float16",
        "bfloat16-into-float32",
    ],
)
def test_inputs_the_kernel_sums_in_float32_take_float64_rows(bn, shape, kw) -> None:
    """Channels-last and half-precision inputs (the kernel would sum every position in float32
    or less) and inputs far from zero: each call's statistics come from a float64 copy. The
    output is still torch's train-mode output, in the input's dtype."""
    offset = 1e4 if kw.get("dtype", torch.float32) == torch.float32 else 3.0
    batches = _batches(shape, sizes=(3, 2), offset=offset, **kw)
    layer, dtypes, outputs = _observe(bn, batches)
    assert dtypes == [F64, F64]
    _assert_exact(layer, batches, 1e-10)  # float64 rows of float32/16 data: exact
    for x, y in zip(batches, outputs, strict=True):
        assert y.dtype == x.dtype and y.shape == x.shape


def test_calls_far_from_zero_take_float64_rows() -> None:
    batches = _batches((4, 5, 5), offset=200.0)  # |mean| = 100 std
    layer, dtypes, _ = _observe(nn.BatchNorm2d(4), batches)
    assert dtypes == [F64] * 4
    _assert_exact(layer, batches, 1e-12)


def test_a_batchnorm_with_its_own_forward_gets_batch_statistics_in_eval_mode() -> None:
    """Its batch norm call gets the float64 batch mean and biased variance in the buffers; the
    layer's own forward (here: doubling) runs in eval mode with them."""

    class Scaled(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert not self.training
            return 2 * super().forward(x)

    bn = Scaled(4)
    batches = _batches((4, 3, 3))
    layer, dtypes, outputs = _observe(bn, batches)
    assert not layer.stock and dtypes == [F64] * 4
    _assert_exact(layer, batches, 1e-12)
    expected = 2 * _train_mode(batches[-1], bn)
    torch.testing.assert_close(outputs[-1], expected, rtol=1e-5, atol=1e-5)


def test_which_batchnorms_take_torchs_forward() -> None:
    patched = nn.BatchNorm2d(3)
    patched.forward = lambda x: x  # an instance forward replaces the class's
    assert Layer("", nn.BatchNorm2d(3)).stock and Layer("", nn.SyncBatchNorm(3)).stock
    assert not Layer("", nn.SyncBatchNorm(3), world=2).stock  # its forward would all-reduce
    assert not Layer("", patched).stock


def test_a_forward_that_calls_the_batchnorms_forward_directly_is_counted() -> None:
    """``self.bn.forward(x)`` skips the module call (and any hook); the BatchNorm's forward is
    what recalibration replaces, so the call is still seen."""

    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn.forward(self.conv(x))

    model = Direct().eval()
    batches = _batches((3, 5, 5))
    with torch.no_grad():
        mean, var = _exact([model.conv(x) for x in batches])
    report = recalibrate(model, batches)
    assert report.layers[0].calls == len(batches)
    assert float(((model.bn.running_mean.double() - mean).abs() / var.sqrt()).max()) < 1e-6
    assert float(((model.bn.running_var.double() - var).abs() / var).max()) < 1e-6


def test_each_batchnorms_own_instance_forward_is_put_back_after_a_run_and_an_error() -> None:
    patched, plain = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    own = functools.partial(nn.BatchNorm1d.forward, patched)  # runs its batch norm: usable
    patched.forward = own
    model = nn.Sequential(patched, plain).eval()
    recalibrate(model, _batches((3,)))
    with pytest.raises(ModelInputError):
        recalibrate(model, [torch.randn(4, 5)])
    assert patched.__dict__["forward"] is own and "forward" not in plain.__dict__


def test_a_wrong_width_is_refused_also_without_affine_parameters() -> None:
    """torch refuses 8 channels into ``BatchNorm2d(6, affine=False)``; so does the run (torch's
    kernel is given statistics of the layer's width to check)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(6, affine=False)).eval()
    with pytest.raises(ModelInputError, match=r"inside BatchNorm '1'.*8 elements not 6"):
        recalibrate(model, _batches((3, 4, 4)))


def test_float32_sums_that_overflow_take_float64_rows() -> None:
    """Values near 3e18 in (N, C) batches: the exact variance (about 1e37) fits in float32, the
    kernel's float32 sum of squares over 64 rows does not; the row comes from a float64 copy."""
    batches = [x * 1.5e18 for x in _batches((3,), sizes=(64, 64), offset=0.0)]
    layer, dtypes, _ = _observe(nn.BatchNorm1d(3), batches)
    assert dtypes == [F64] * len(batches)
    _assert_exact(layer, batches, 1e-12)


def test_mixed_dtypes_the_layer_rejects_go_to_its_own_forward() -> None:
    """A float32 input to a float64 BatchNorm: torch's kernel decides (it rejects it, as the
    layer's forward would outside recalibration)."""
    with pytest.raises(RuntimeError):
        _observe(nn.BatchNorm1d(3).double(), _batches((3,)))


# ---------------------------------------------------------------------------------- pooling


def test_rows_pool_exactly_in_groups_across_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three layers, one called three times per batch, each pooled every 4 rows."""
    monkeypatch.setattr(statistics, "POOL_EVERY", 4)
    model = nn.ModuleList([nn.BatchNorm2d(3), nn.BatchNorm2d(5), nn.BatchNorm1d(2)]).eval()
    layers = {str(i): Layer(str(i), bn) for i, bn in enumerate(model)}
    observer = Observer(layers)
    fed: list[list[torch.Tensor]] = [[], [], []]
    shapes = [(3, 4, 4), (5, 2, 3), (2, 16)]
    with eval_mode(model), torch.no_grad():
        observer.attach()
        for step in range(5):
            for i, bn in enumerate(model):
                for x in _batches(shapes[i], sizes=(3 + step,) * (3 if i == 1 else 1), seed=step):
                    bn(x)
                    fed[i].append(x)
        for layer in layers.values():
            layer.pool()
        observer.detach()
    for layer, batches in zip(layers.values(), fed, strict=True):
        assert layer.calls == len(batches)
        _assert_exact(layer, batches)


def test_moments_merge_is_chan() -> None:
    batches = _batches((3,), sizes=(4, 7), offset=50.0)
    parts = []
    for x in batches:
        mean, var = _exact([x])
        parts.append(Moments(x.shape[0], mean.numpy(), (var * (x.shape[0] - 1)).numpy()))
    merged = parts[0].merge(parts[1])
    mean, var = _exact(batches)
    assert merged.count == 11
    torch.testing.assert_close(torch.from_numpy(merged.mean), mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.from_numpy(merged.var), var, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- far from zero


def test_drift_far_from_zero_after_the_first_batch_stays_exact() -> None:
    """A wide first batch (mean 12 std from zero: a kernel row), then narrow batches 300 std
    from zero whose means differ: float32 row means would lose precision in the between-batch
    term, so those calls take float64 rows."""
    model = nn.Sequential(nn.BatchNorm2d(3)).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 4, 4, generator=gen) * 25 + 300]
    batches += [torch.randn(4, 3, 4, 4, generator=gen) + 300 + 3 * i for i in range(9)]
    _, dtypes, _ = _observe(nn.BatchNorm2d(3), batches)
    assert dtypes == [torch.float32] + [F64] * 9
    reference = reference_statistics(model, batches)
    report = recalibrate(model, batches)
    _, var_error = statistics_error(model, reference)["0"]
    assert var_error < 1e-6 and report.notes == ()


def test_random_offsets_stay_exact() -> None:
    """Random per-batch offsets on both sides of the limit: every pooled variance is exact."""
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        scale = float(torch.rand(1, generator=gen)) * 24
        offsets = (1 + torch.rand(6, generator=gen)) * scale
        batches = [torch.randn(3, 4, 5, 5, generator=gen) + float(o) for o in offsets]
        layer, _, _ = _observe(nn.BatchNorm2d(4), batches)
        _assert_exact(layer, batches)


# ------------------------------------------------------------------------------ every kind


@pytest.mark.parametrize(
    ("shape", "kw"),
    [
        ((3, 4, 4), {}),
        ((3, 4, 4), {"memory_format": torch.channels_last}),
        ((3, 120, 120), {}),
    ],
    ids=["kernel", "float64", "large"],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_refused_on_every_route(shape: tuple, kw: dict, bad: float) -> None:
    model = nn.Sequential(nn.Identity(), nn.BatchNorm2d(3)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = _batches(shape, sizes=(2, 3, 2), **kw)
    batches[1][1, 2, 3, 1] = bad
    with pytest.raises(CalibrationError, match=r"batch 1: BatchNorm '1' is the first layer"):
        recalibrate(model, batches)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


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
        nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(3)),  # (N, 3, 36): kernel rows
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
    """The report reads the statistics as they were before the first call wrote them."""

    class Own(nn.BatchNorm1d):  # its own forward: its batch norm call writes the buffers
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x)

    model = nn.Sequential(
        nn.BatchNorm2d(3),  # contiguous input: kernel rows
        nn.Flatten(0, 1),  # (N·3, 6, 6) → a BatchNorm1d over 6 "channels" of a 3-D input
        nn.BatchNorm1d(6),
        nn.Flatten(1),
        Own(36),  # 2-D input to a layer with its own forward
    ).eval()
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                bn.running_mean.uniform_(-3, 3)
                bn.running_var.uniform_(0.5, 4)
    before = {
        name: (bn.running_mean.clone(), bn.running_var.clone())
        for name, bn in model.named_modules()
        if isinstance(bn, nn.modules.batchnorm._BatchNorm)
    }
    report = recalibrate(model, _batches((3, 6, 6)))
    assert len(report.recalibrated) == 3
    for layer in report.layers:
        old_mean, old_var = before[layer.name]
        bn = model.get_submodule(layer.name)
        assert layer.old_mean is not None and layer.new_mean is not None
        assert layer.old_var is not None
        assert layer.old_mean.max == pytest.approx(float(old_mean.max()))
        assert layer.old_mean.min == pytest.approx(float(old_mean.min()))
        assert layer.old_var.max == pytest.approx(float(old_var.max()))
        assert layer.new_mean.max == pytest.approx(float(bn.running_mean.max()), rel=1e-6)


class _ActBN(nn.BatchNorm2d):
    """timm's BatchNormAct in short: its own forward, a batch norm on its buffers, then ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )
        return torch.relu(y)


def test_threads_calling_a_batchnorm_with_its_own_forward_read_their_own_statistics() -> None:
    """Each call's batch statistics are written into the layer's buffers for its batch norm to
    read: calls from a thread pool (chunks 100 apart) must not read each other's. The next
    BatchNorm pools exactly the chunk-normalised, rectified values."""
    model = nn.Sequential(_ActBN(4), nn.BatchNorm2d(4)).eval()
    gen = torch.Generator().manual_seed(0)
    data = [
        torch.cat([torch.randn(2, 4, 16, 16, generator=gen) + 100 * k for k in range(8)])
        for _ in range(6)
    ]
    with ThreadPoolExecutor(8) as pool:
        recalibrate(model, data, forward=lambda m, batch: list(pool.map(m, batch.split(2))))
    chunks = [x.double() for batch in data for x in batch.split(2)]
    normalised = [
        torch.relu((x - x.mean((0, 2, 3), keepdim=True)) / (x.var((0, 2, 3), keepdim=True,
                                                            correction=0) + 1e-5).sqrt())
        for x in chunks
    ]  # fmt: skip
    mean, var = _exact(normalised)
    assert float(((model[1].running_mean.double() - mean).abs() / var.sqrt()).max()) < 1e-5
    assert float(((model[1].running_var.double() - var).abs() / var).max()) < 1e-5


def test_an_interrupted_swap_of_forwards_is_undone() -> None:
    """A layer that refuses the swap (its ``__setattr__`` raises) after another was swapped:
    the error reaches the caller, and every forward is put back."""

    class Frozen(nn.BatchNorm2d):
        def __setattr__(self, key: str, value: object) -> None:
            if key == "forward":
                raise AttributeError("frozen")
            super().__setattr__(key, value)

    model = nn.Sequential(nn.BatchNorm2d(3), Frozen(3)).eval()
    before = all_state(model)
    with pytest.raises(AttributeError, match="frozen"):
        recalibrate(model, _batches((3, 4, 4)))
    assert_same(before, all_state(model))


def test_buffers_swapped_in_by_functional_call_are_named_in_the_refusal() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _ActBN(4)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match="functional_call"):
        recalibrate(
            model,
            _batches((3, 4, 4)),
            forward=lambda m, x: torch.func.functional_call(m, state, (x,)),
        )


def test_no_process_wide_state_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread count, global flag or default dtype is touched, not even for a moment."""
    calls = []
    for name in ("set_num_threads", "set_num_interop_threads", "set_default_dtype"):
        monkeypatch.setattr(torch, name, lambda *args, name=name: calls.append(name))
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Unflatten(1, (2, 4)), nn.BatchNorm1d(2))
    recalibrate(model.eval(), [torch.randn(16, 8), torch.randn(9, 8)])
    assert calls == []


def test_threads_calling_a_stock_batchnorm_pool_every_call_exactly() -> None:
    """Threads of a forward calling one stock BatchNorm on 2-row slices: every call is
    pooled, with its own count, into exact statistics (rows are added one at a time)."""

    class Threaded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(self.bn, x.split(2)))
            return x

    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(512, 16, generator=gen) * (1 + k) + k for k in range(4)]
    model = Threaded().eval()
    recalibrate(model, data)
    mean, var = _exact([x.double() for x in data])
    assert int(model.bn.num_batches_tracked) == 4 * 256
    assert float((model.bn.running_mean.double() - mean).abs().max()) < 1e-5
    assert float(((model.bn.running_var.double() - var).abs() / var).max()) < 1e-5
