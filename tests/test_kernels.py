"""The find stage counts the batch norms of the forward it already runs when asked
(``count_find_forward``): what ``count_bn_kernels`` counts, on modules, on programs, with frozen
and instance norms; not when the dataflow is recorded, and never unasked."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from wild_models import D2FrozenBatchNorm2d, FrozenBatchNorm2d, randomise

import bnfold
from bnfold import zoo
from bnfold.find import kernels
from bnfold.find.kernels import count_find_forward

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _frozen(norm: type[nn.Module]) -> nn.Module:
    return randomise(nn.Sequential(nn.Conv2d(3, 4, 3), norm(4), nn.ReLU()))


def _program() -> nn.Module:
    model = zoo.randomize_bn(zoo.small_cnn()).eval()
    return torch.export.export(model, (X,)).module()


MODELS = {
    "resnet18": lambda: zoo.randomize_bn(zoo.resnet18(width=8)).eval(),
    "program (GraphModule)": _program,
    "frozen norm, elementwise": lambda: _frozen(FrozenBatchNorm2d),
    "frozen norm, F.batch_norm": lambda: _frozen(D2FrozenBatchNorm2d),
    "instance norm beside a BN": lambda: nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.InstanceNorm2d(4), nn.BatchNorm2d(4)
    ).eval(),
    "no norm": lambda: nn.Sequential(nn.Conv2d(3, 4, 1)).eval(),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_the_find_forward_counts_what_count_bn_kernels_counts(name: str) -> None:
    model = MODELS[name]()
    expected = bnfold.count_bn_kernels(model, X)
    for stage in (bnfold.find_pairs, bnfold.fold):
        with count_find_forward() as counted:
            stage(model, X)
            stage(model, X)  # the first forward only
        assert counted.count == expected
    assert name == "no norm" or expected > 0


def test_a_recorded_dataflow_is_not_counted() -> None:
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.dim() < 2:  # a proxy cannot decide this: fx fails, the forward is recorded
                raise ValueError("expects a batch")
            return self.bn(self.conv(x))

    with count_find_forward() as counted:
        plan = bnfold.find_pairs(Untraceable().eval(), X)
    assert plan.method == "recorded" and counted.count is None


def test_nothing_is_counted_unasked(monkeypatch: pytest.MonkeyPatch) -> None:
    def counting_is_not_free(*args: object) -> None:
        raise AssertionError("a find forward was counted unasked")

    monkeypatch.setattr(kernels, "counting_bn_kernels", counting_is_not_free)
    bnfold.fold(MODELS["resnet18"](), X)
