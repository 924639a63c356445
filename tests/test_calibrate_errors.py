"""recalibrate on bad input: a clear error, and the model exactly as it was (statistics too)."""

from __future__ import annotations

import pytest
import torch
from calibrate_models import all_state, assert_same, mixed, uneven_batches
from torch import nn

from bnfold.calibrate.recalibrate import recalibrate
from bnfold.calibrate.report import LayerStatus
from bnfold.errors import CalibrationError, ModelInputError, UsageError


def _refused(
    model: nn.Module, data: object, error: type, match: str | None, **kwargs: object
) -> str:
    before = all_state(model)
    with pytest.raises(error, match=match) as info:
        recalibrate(model, data, **kwargs)
    assert_same(before, all_state(model))
    return str(info.value)


def test_empty_data() -> None:
    message = _refused(mixed(), [], CalibrationError, "no batches")
    assert "unchanged" in message


def test_data_of_empty_batches_only() -> None:
    batches = [torch.randn(0, 3, 8, 8) for _ in range(3)]
    message = _refused(mixed(), batches, CalibrationError, "no BatchNorm saw any data")
    assert "unchanged" in message


def test_statistics_a_float16_buffer_cannot_hold_are_refused() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4)).half().eval()
    batches = [(torch.randn(16, 4) * 400).half() for _ in range(2)]  # variance about 1.6e5
    message = _refused(model, batches, CalibrationError, "float16 running statistics")
    assert "'0'" in message


def test_batch_the_model_rejects_names_the_batch_and_restores_stats() -> None:
    batches = uneven_batches((4, 5))
    batches.append(torch.randn(3, 5, 8, 8))  # 5 channels: the first conv refuses it
    message = _refused(mixed(), batches, ModelInputError, "batch 2")
    assert "restored" in message


def test_error_inside_a_batchnorm_names_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm2d(4)).eval()  # 2-D input reaches BN2d
    message = _refused(model, [torch.randn(6, 4)], ModelInputError, "batch 0")
    assert "inside BatchNorm '1'" in message


def test_tuple_batch_error_hints_at_labels() -> None:
    batches = [(x, torch.zeros(len(x))) for x in uneven_batches((4,))]
    message = _refused(mixed(), batches, ModelInputError, "batch 0")
    assert "forward=lambda model, batch: model(batch[0])" in message
    assert "--data callable yield the inputs alone" in message  # what the CLI can do


def test_nan_in_data_names_the_first_batchnorm() -> None:
    batches = uneven_batches((4, 5, 6))
    batches[1][2, 0, 3, 3] = float("nan")
    _refused(mixed(), batches, CalibrationError, r"batch 1: BatchNorm 'bn' is the first")


class _Poison(nn.Module):
    """Turns its input to inf on one chosen batch (by call count): NaN/inf born inside."""

    def __init__(self, at_call: int) -> None:
        super().__init__()
        self.at_call, self.calls = at_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * float("inf") if self.calls == self.at_call + 1 else x


def test_inf_born_inside_the_model_names_the_downstream_batchnorm() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), _Poison(at_call=2),
        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4),
    ).eval()  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match=r"batch 2: BatchNorm '5' is the first"):
        recalibrate(model, uneven_batches((3, 4, 5, 6)))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_one_value_per_channel_is_refused_like_training() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    message = _refused(
        model, [torch.randn(5, 3), torch.randn(1, 3)], ModelInputError, "one value per channel"
    )
    assert "batch 1" in message


def test_reading_the_data_fails() -> None:
    def broken():
        yield torch.randn(4, 3, 8, 8)
        raise OSError("disk gone")

    _refused(mixed(), broken(), CalibrationError, "reading batch 1 .* disk gone")


def test_interrupt_restores_too() -> None:
    def interrupted():
        yield torch.randn(4, 3, 8, 8)
        raise KeyboardInterrupt

    _refused(mixed(), interrupted(), KeyboardInterrupt, None)


@pytest.mark.parametrize(
    ("model", "data", "kwargs", "match"),
    [
        (nn.Sequential(nn.Linear(2, 2)), [torch.randn(2, 2)], {}, "no BatchNorm"),
        (nn.Sequential(nn.BatchNorm1d(2)), [torch.randn(2, 2)], {"batches": 0}, "batches"),
        (nn.Sequential(nn.BatchNorm1d(2)), [torch.randn(2, 2)], {"batches": True}, "batches"),
        (nn.Sequential(nn.BatchNorm1d(2)), 5, {}, "iterable"),
        ("not a model", [], {}, "nn.Module"),
        (nn.Sequential(nn.LazyBatchNorm1d()), [torch.randn(2, 2)], {}, "lazy"),
    ],
    ids=["no-bn", "zero-batches", "bool-batches", "not-iterable", "not-a-module", "lazy"],
)
def test_usage_errors(model: object, data: object, kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        recalibrate(model, data, **kwargs)  # type: ignore[arg-type]


def test_batchnorm_without_running_stats_is_reported_and_skipped() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d(4)
    ).eval()
    report = recalibrate(model, uneven_batches((4, 6)))
    assert [layer.status for layer in report.layers] == [
        LayerStatus.NO_RUNNING_STATS,
        LayerStatus.RECALIBRATED,
    ]
    assert model[1].running_mean is None and model[1].num_batches_tracked is None


class ScaledFirstHalf(nn.BatchNorm1d):
    """Scales its input by 300 before its batch norm: one call's variance passes float16's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * 300)


def test_one_call_a_float16_subclass_cannot_hold_is_refused() -> None:
    model = nn.Sequential(ScaledFirstHalf(4)).half().eval()
    batches = [torch.randn(16, 4).half(), (torch.randn(16, 4) * 0.2).half()]
    _refused(model, batches, CalibrationError, "one call's statistics reach")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_torchscript_model_is_refused() -> None:
    scripted = torch.jit.script(nn.Sequential(nn.BatchNorm1d(2)))
    with pytest.raises(UsageError, match=r"TorchScript .* eager"):
        recalibrate(scripted, [torch.randn(4, 2)])
