"""recalibrate: exact pooled statistics, train-mode BN semantics, and nothing else touched."""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from calibrate_models import (
    all_state,
    assert_same,
    frozen_state,
    mixed,
    reference_statistics,
    statistics_error,
    uneven_batches,
)
from torch import nn
from torch.optim.swa_utils import update_bn

import bnfold
from bnfold.calibrate.recalibrate import recalibrate
from bnfold.calibrate.report import CalibrationReport, LayerStatus, RankShare
from bnfold.zoo import randomize_bn, small_cnn


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.float64, 1e-10)], ids=["fp32", "fp64"]
)
def test_closed_form_uneven_batches(dtype: torch.dtype, tolerance: float) -> None:
    model = mixed(dtype=dtype)
    batches = uneven_batches(dtype=dtype)
    reference = reference_statistics(model, batches)
    report = recalibrate(model, batches)
    errors = statistics_error(model, reference)
    assert set(errors) == {"bn", "shared", "bn_act", "seq_bn", "bn1d"}
    for name, (mean_error, var_error) in errors.items():
        assert mean_error < tolerance, (name, mean_error)
        assert var_error < tolerance, (name, var_error)
    layers = {layer.name: layer for layer in report.layers}
    for name, (_, _, count) in reference.items():
        assert layers[name].samples == count
        assert layers[name].status is LayerStatus.RECALIBRATED


def test_bn_called_twice_pools_both_calls() -> None:
    model = mixed()
    batches = uneven_batches()
    report = recalibrate(model, batches)
    shared = next(layer for layer in report.layers if layer.name == "shared")
    assert shared.calls == 2 * len(batches)
    assert shared.samples == 2 * sum(b.shape[0] for b in batches) * 8 * 8
    assert int(model.shared.num_batches_tracked) == 2 * len(batches)
    assert int(model.bn.num_batches_tracked) == len(batches)


def test_bn3d_closed_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.BatchNorm3d(4)
    ).eval()
    batches = uneven_batches((2, 5, 3), (1, 4, 4, 4))
    reference = reference_statistics(model, batches)
    recalibrate(model, batches)
    for name, (mean_error, var_error) in statistics_error(model, reference).items():
        assert mean_error < 1e-6 and var_error < 1e-6, name


def test_large_offset_is_exact() -> None:
    """Data with mean/std = 1e4: a sum-of-squares formula in float32 would lose everything."""
    model = nn.Sequential(nn.BatchNorm1d(6)).eval()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(n, 6, 16, generator=gen, dtype=torch.float64) + 1e4).float()
        for n in (7, 3, 12)
    ]
    values = torch.cat(batches).double().transpose(0, 1).reshape(6, -1)
    recalibrate(model, batches)
    var = model[0].running_var.double()
    assert float(((var - values.var(dim=1)).abs() / values.var(dim=1)).max()) < 1e-6


def test_dropout_and_train_mode_modules_do_not_change_the_result() -> None:
    with_dropout = mixed()
    without = copy.deepcopy(with_dropout)
    without.drop = nn.Identity()
    without.bn_act.drop = nn.Identity()
    batches = uneven_batches()
    recalibrate(with_dropout, batches)
    recalibrate(without, batches)
    for (name, a), (_, b) in zip(
        with_dropout.named_buffers(), without.named_buffers(), strict=True
    ):
        assert torch.equal(a, b), name


def test_update_bn_is_wrong_where_bnfold_is_exact() -> None:
    """The anchor: update_bn (whole model in train mode, equal-weight batches) misses."""
    model = mixed()
    batches = uneven_batches()
    reference = reference_statistics(model, batches)
    anchor = copy.deepcopy(model)
    update_bn(batches, anchor)
    worst = max(err for pair in statistics_error(anchor, reference).values() for err in pair)
    assert worst > 1e-2


def test_nothing_but_statistics_changes() -> None:
    model = mixed()
    model.train()
    model.seq_bn.eval()  # a mixed pattern of flags, restored exactly
    model.drop.eval()
    before = frozen_state(model)
    stats_before = {name: buf.clone() for name, buf in model.named_buffers()}
    recalibrate(model, uneven_batches())
    assert_same(before, frozen_state(model))
    changed = {
        name for name, buf in model.named_buffers() if not torch.equal(buf, stats_before[name])
    }
    assert changed  # the statistics did change...
    assert all(
        name.rsplit(".", 1)[1] in {"running_mean", "running_var", "num_batches_tracked"}
        for name in changed
    )
    assert not any(name.startswith("unused.") for name in changed)  # ...and only those seen


def test_inplace_false_recalibrates_a_copy_and_leaves_the_model() -> None:
    model = nn.DataParallel(mixed())  # a wrapper: the copy is of the module inside
    before = all_state(model)
    batches = uneven_batches()
    report = recalibrate(model, batches, inplace=False)
    assert_same(before, all_state(model))
    expected = mixed()
    in_place = recalibrate(expected, batches)
    assert in_place.model is expected
    assert isinstance(report.model, type(expected)) and report.model is not model.module
    got = dict(report.model.named_buffers())
    for name, value in expected.named_buffers():
        assert torch.equal(got[name], value), name
    assert report.layers == in_place.layers
    assert "model" not in report.to_dict()


def test_written_statistics_bump_their_version_counters() -> None:
    """Autograd learns of the writes (torch's own in-place operations), on every buffer
    written and no other."""
    model = mixed()
    versions = {name: buf._version for name, buf in model.named_buffers()}
    recalibrate(model, uneven_batches())
    bumped = {name for name, buf in model.named_buffers() if buf._version > versions[name]}
    seen = {name.rsplit(".", 1)[0] for name in bumped}
    assert bumped == {
        f"{layer}.{buffer}"
        for layer in seen
        for buffer in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert seen and not any(name.startswith("unused.") for name in seen)


def test_downstream_bns_see_batch_normalised_inputs() -> None:
    """On one batch, eval mode after recalibration computes what train-mode BNs compute.

    Train mode normalises with the biased batch variance; running_var is unbiased. Undo that
    factor and the two forwards agree to float64 rounding, downstream BNs included.
    """
    model = randomize_bn(small_cnn(width=8)).double()
    x = uneven_batches((16,), (3, 16, 16), dtype=torch.float64)[0]
    twin = copy.deepcopy(model)
    for module in twin.modules():
        module.training = isinstance(module, nn.modules.batchnorm._BatchNorm)
    with torch.no_grad():
        expected = twin(x)
    report = recalibrate(model, [x])
    modules = dict(model.named_modules())
    assert len(report.recalibrated) == 5
    for layer in report.recalibrated:
        assert layer.calls == 1
        modules[layer.name].running_var.mul_((layer.samples - 1) / layer.samples)
    with torch.no_grad():
        got = model(x)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------ batch forms


def test_tuple_dict_forward_and_cap() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.bn(a + b)

    batches = uneven_batches((4, 6, 3), (4,))
    pairs = [(x, 2 * x) for x in batches]
    dicts = [{"a": x, "b": 2 * x} for x in batches]
    labelled = [(3 * x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
    results = []
    for data, forward in [
        (pairs, None),
        (dicts, None),
        (labelled, lambda model, batch: model(batch[0], torch.zeros_like(batch[0]))),
    ]:
        model = TwoInputs().eval()
        recalibrate(model, data, forward=forward)
        results.append(model.bn.running_var.clone())
    assert torch.allclose(results[0], results[1]) and torch.allclose(results[0], results[2])

    capped, first_two = TwoInputs().eval(), TwoInputs().eval()
    report = recalibrate(capped, pairs, batches=2)
    recalibrate(first_two, pairs[:2])
    assert report.batches == 2 and report.samples == 10
    assert torch.equal(capped.bn.running_var, first_two.bn.running_var)


def test_progress_and_device() -> None:
    model = mixed()
    seen = []
    report = recalibrate(
        model, uneven_batches(), device="cpu", progress=lambda i, n: seen.append((i, n))
    )
    assert seen == [(0, 3), (1, 8), (2, 5), (3, 2), (4, 11)]
    assert report.samples == 29 and report.batches == 5 and report.world_size == 1


def test_float16_statistics() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4)).half().eval()
    batches = uneven_batches((3, 5), (4, 6, 6), dtype=torch.float16, offset=2.0, scale=1.0)
    recalibrate(model, batches)
    values = torch.cat(batches).double().transpose(0, 1).reshape(4, -1)
    assert model[0].running_var.dtype == torch.float16
    rel = (model[0].running_var.double() - values.var(dim=1)).abs() / values.var(dim=1)
    assert float(rel.max()) < 1e-3  # one float16 rounding of the result


def test_bfloat16_statistics_and_their_report() -> None:
    """numpy has no bfloat16: the report reads such buffers through a float64 copy."""
    model = nn.Sequential(nn.BatchNorm1d(4)).to(torch.bfloat16).eval()
    old_mean = model[0].running_mean.clone()
    batches = uneven_batches((8, 5, 9), (4,), dtype=torch.bfloat16, offset=5.0, scale=3.0)
    report = recalibrate(model, batches)
    values = torch.cat(batches).double()
    assert model[0].running_mean.dtype == torch.bfloat16
    rel = (model[0].running_var.double() - values.var(dim=0)).abs() / values.var(dim=0)
    assert float(rel.max()) < 1e-2  # one bfloat16 rounding of the result
    (layer,) = report.layers
    assert layer.old_mean is not None and layer.new_var is not None
    assert layer.old_mean.max == float(old_mean.max())
    assert layer.new_var.min == pytest.approx(float(values.var(dim=0).min()), rel=1e-12)
    json.loads(report.to_json())


# ------------------------------------------------------------------------------------ report


def test_report_is_json_and_names_unseen_and_skipped() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False)
    ).eval()
    with torch.no_grad():
        model[0].weight[0].zero_()  # channel 0 is constant: zero variance
    report = recalibrate(model, uneven_batches())
    assert isinstance(report, CalibrationReport)
    data = json.loads(report.to_json())
    assert [layer["status"] for layer in data["layers"]] == ["recalibrated", "no_running_stats"]
    assert report.layers[0].near_zero_var_channels == (0,)
    assert report.skipped[0].name == "2" and "track_running_stats" in report.skipped[0].detail
    assert report.layers[0].mean_shift is not None and report.layers[0].std_ratio is not None

    unseen = mixed()
    before = unseen.unused.running_mean.clone()
    report = recalibrate(unseen, uneven_batches())
    assert [layer.name for layer in report.unseen] == ["unused"]
    assert torch.equal(unseen.unused.running_mean, before)
    assert "unused" in report.summary() and "no data" in report.format_text()


def test_shift_is_in_units_of_the_old_std() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2)).eval()
    with torch.no_grad():
        model[0].running_mean.fill_(1.0)
        model[0].running_var.fill_(4.0)
    x = torch.tensor([[5.0, 1.0], [5.0, 3.0], [5.0, 5.0]])
    report = recalibrate(model, [x])
    layer = report.layers[0]
    eps = model[0].eps
    # channel 0: mean 5 (shift 4 / sqrt(4 + eps)); channel 1: mean 3 (shift 2 / sqrt(4 + eps))
    assert layer.mean_shift.max == pytest.approx(4 / (4 + eps) ** 0.5)
    assert layer.mean_shift.min == pytest.approx(2 / (4 + eps) ** 0.5)
    assert layer.near_zero_var_channels == (0,)
    assert layer.new_var.max == pytest.approx(4.0)


def test_exported_from_package() -> None:
    assert bnfold.recalibrate is recalibrate
    assert bnfold.CalibrationReport is CalibrationReport


def test_model_without_running_stats_only_is_reported_not_run() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False))
    report = recalibrate(model, [])
    assert report.batches == 0 and report.skipped and not report.recalibrated


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_memory_layouts(layout: str) -> None:
    batches = uneven_batches((5, 9, 3), (6, 10, 10), offset=50.0, scale=2.0)
    if layout == "channels_last":
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    elif layout == "strided":
        batches = [x.transpose(2, 3) for x in batches]
    model = nn.Sequential(nn.BatchNorm2d(6)).eval()
    recalibrate(model, batches)
    values = torch.cat(batches).double().transpose(0, 1).reshape(6, -1)
    var = model[0].running_var.double()
    assert float(((var - values.var(dim=1)).abs() / values.var(dim=1)).max()) < 1e-6
    # the mean is stored in float32: its rounding (|mean| 50 × 2**-24) bounds the error
    mean_error = (model[0].running_mean.double() - values.mean(dim=1)).abs().max()
    assert float(mean_error) < 50 * 2**-23


def test_wrapped_model_is_recalibrated_inside() -> None:
    model = mixed()
    plain = copy.deepcopy(model)
    batches = uneven_batches()
    report = recalibrate(nn.DataParallel(model), batches)  # no GPU: it calls the module
    recalibrate(plain, batches)
    assert report.notes and "DataParallel" in report.notes[0]
    assert report.layers[0].name == "bn"  # names of the inner module
    for (name, a), (_, b) in zip(model.named_buffers(), plain.named_buffers(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("offset", [0.0, 0.3, 50.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_centred_and_offset_inputs_stay_exact(offset: float, layout: str) -> None:
    """Centred or far from zero, either layout: the pooled statistics match float64 ones to
    well below 1e-6 (the mean up to its one rounding to float32)."""
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 6, 9, 7, generator=gen) + offset for n in (5, 2, 11)]
    if layout == "channels_last":
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    model = nn.Sequential(nn.BatchNorm2d(6)).eval()
    report = recalibrate(model, batches)
    every = torch.cat([x.double().transpose(0, 1).reshape(6, -1) for x in batches], dim=1)
    var, mean = torch.var_mean(every, dim=1)
    assert report.layers[0].samples == every.shape[1]
    mean_error = (model[0].running_mean.double() - mean).abs() / var.sqrt()
    assert float(mean_error.max()) < 1e-6 + offset * 2**-23
    assert float(((model[0].running_var.double() - var).abs() / var).max()) < 1e-6


def test_report_states_each_ranks_share() -> None:
    """The text table and the JSON give what each rank fed (tests/test_distributed.py runs it
    under torchrun)."""
    report = recalibrate(nn.Sequential(nn.BatchNorm1d(2)), [torch.randn(3, 2), torch.randn(4, 2)])
    assert report.per_rank == (RankShare(0, 2, 7),) and "per rank" not in report.format_text()
    shares = (RankShare(0, 3, 10), RankShare(1, 2, 9), RankShare(2, 0, 0))
    report = CalibrationReport(
        layers=(), batches=5, samples=19, world_size=3, seconds=0.1, per_rank=shares
    )
    assert "per rank (rank 0 first): samples 10, 9, 0; batches 3, 2, 0" in report.format_text()
    assert report.to_dict()["per_rank"][2] == {"rank": 2, "batches": 0, "samples": 0}


class TokenNorm(nn.BatchNorm1d):
    """LeViT/ViT-style: BatchNorm1d over the last dim of ``(B, L, C)`` tokens."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class ScaledFirst(nn.BatchNorm1d):
    """Scales and shifts its input before its batch norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * 10 + 3)


class ByHand(nn.BatchNorm1d):
    """Normalises with its running statistics by hand: no batch norm runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean) / (self.running_var + self.eps).sqrt()


def _channel_statistics(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance per channel (dim 1) of every part, in float64."""
    values = torch.cat([p.double().transpose(0, 1).reshape(p.shape[1], -1) for p in parts], 1)
    return values.mean(1), values.var(1)


@pytest.mark.parametrize("tokens", [6, 10])  # 6: as many tokens as channels
def test_a_subclass_is_recalibrated_on_what_its_batch_norm_normalises(tokens: int) -> None:
    gen = torch.Generator().manual_seed(0)
    spread, offset = torch.arange(1.0, 7.0), torch.arange(6.0)
    batches = [torch.randn(n, tokens, 6, generator=gen) * spread + offset for n in (4, 9)]
    norm = TokenNorm(6).eval()
    report = recalibrate(norm, batches)
    mean, var = _channel_statistics([b.transpose(1, 2) for b in batches])
    assert float(((norm.running_mean.double() - mean).abs() / var.sqrt()).max()) < 1e-6
    assert float(((norm.running_var.double() - var).abs() / var).max()) < 1e-6
    assert report.layers[0].samples == sum(b.shape[0] for b in batches) * tokens

    scaled = ScaledFirst(3).eval()
    parts = [torch.randn(n, 3, 5, generator=gen) for n in (4, 9)]
    recalibrate(scaled, parts)
    mean, var = _channel_statistics([p * 10 + 3 for p in parts])
    assert float(((scaled.running_var.double() - var).abs() / var).max()) < 1e-6


def test_a_subclass_that_runs_no_batch_norm_is_refused_and_left_as_it_was() -> None:
    model = nn.Sequential(nn.Linear(4, 3), ByHand(3), nn.BatchNorm1d(3)).eval()
    before = all_state(model)
    with pytest.raises(bnfold.CalibrationError, match="ran no batch norm"):
        recalibrate(model, [torch.randn(8, 4) for _ in range(2)])
    assert_same(before, all_state(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stored_statistics_that_are_nan_are_replaced(dtype: torch.dtype) -> None:
    """Momentum 1 computes 0 * old + 1 * new: a NaN stored before must not stay."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).to(dtype).eval()
    model[1].running_mean.fill_(float("nan"))
    model[1].running_var.fill_(float("inf"))
    batches = [b.to(dtype) for b in uneven_batches((4, 6))]
    reference = reference_statistics(model, batches)
    recalibrate(model, batches)
    mean_error, var_error = statistics_error(model, reference)["1"]
    assert mean_error < 1e-6 and var_error < 1e-6


@pytest.mark.parametrize("tail", [(), (1,)])
def test_a_batch_without_spatial_extent_is_pooled_to_float32_rounding(tail: tuple) -> None:
    """On CPU the kernel sums an (N, C) or (N, C, 1) float32 batch along the batch in float32:
    beyond ``KERNEL_ROWS_FLAT`` rows it is taken in float64 (LeViT-style (B*N, C) tokens)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12544, 8, *tail, generator=gen, dtype=torch.float64) + 15
    model = nn.Sequential(nn.BatchNorm1d(8)).eval()
    recalibrate(model, [x.float()])
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x.float().double(), dim=dims)
    assert float(((model[0].running_var.double() - var).abs() / var).max()) < 1e-7
    assert float(((model[0].running_mean.double() - mean).abs() / var.sqrt()).max()) < 1e-6


class ActAfter(nn.BatchNorm2d):
    """BN, then ReLU; empty inputs pass through without a batch norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        return torch.relu(super().forward(x))


def _subclass_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), ActAfter(4), nn.BatchNorm2d(4)).eval()


def test_a_subclass_is_recalibrated_when_the_forward_turns_grad_on() -> None:
    model = _subclass_model()
    batches = uneven_batches((4, 6))
    reference = reference_statistics(model, batches)

    def with_grad(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return m(batch)

    recalibrate(model, batches, forward=with_grad)
    assert not any(b.requires_grad for b in model.buffers())
    assert max(max(e) for e in statistics_error(model, reference).values()) < 1e-6


def test_a_subclass_run_in_another_thread_leaves_no_mode_behind() -> None:
    """A failing batch in a worker thread: afterwards a forward there changes nothing."""
    model = _subclass_model()
    before = all_state(model)
    batches = [*uneven_batches((4,)), torch.randn(3, 5, 8, 8)]  # the second one fails
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(bnfold.ModelInputError):
            recalibrate(model, batches, forward=lambda m, b: pool.submit(m, b).result())
        with torch.no_grad():
            pool.submit(model, uneven_batches((4,))[0]).result()
    assert_same(before, all_state(model))


def test_an_empty_batch_a_subclass_passes_through_is_no_error() -> None:
    model = _subclass_model()
    batches = [*uneven_batches((4,)), torch.randn(0, 3, 8, 8), *uneven_batches((6,))]
    reference = reference_statistics(model, [b for b in batches if len(b)])
    recalibrate(model, batches)
    assert max(max(e) for e in statistics_error(model, reference).values()) < 1e-6
