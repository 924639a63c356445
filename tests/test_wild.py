"""Patterns from real code: every fixture folds exactly what can be folded and says why not
for the rest, whether torch.fx can trace it or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from wild_checks import fold_checked, folded, reasons
from wild_models import WILD, BatchNormAct2d, ChannelScale, randomise

import bnfold
from bnfold.records import BnKind


def _fixture(name: str):
    return WILD[name]()


def test_bn_subclass_with_fused_activation_and_numel_guard_keeps_the_activation() -> None:
    model, args = _fixture("fused_act_bn")
    result = fold_checked(model, args, method="fx")
    assert folded(result) == {"bn1": "stem", "bn2": "conv2"}
    assert isinstance(model.bn1, BatchNormAct2d)  # the caller's model is untouched
    assert not isinstance(result.model.bn1, torch.nn.Identity)  # the ReLU is still there
    assert isinstance(result.model.bn2, torch.nn.Identity)  # act=False: nothing left
    assert any("numel" in note for f in result.folded for note in f.notes)


def test_se_and_residual_blocks_leave_the_bn_after_an_add() -> None:
    result = fold_checked(*_fixture("se_residual"))
    assert folded(result) == {"bn0": "stem", "bn1": "conv1"}
    assert reasons(result) == {"bn_sum": "no_producer"}


def test_densenet_pre_activation_is_not_folded() -> None:
    result = fold_checked(*_fixture("preact_dense"))
    assert folded(result) == {"norm2": "conv1"}
    # conv0's output also goes to the concat; norm1 is BN -> ReLU -> conv (pre-activation)
    assert reasons(result) == {"norm1": "producer_fanout"}


def test_repvgg_branches_merge_into_one_conv() -> None:
    result = fold_checked(*_fixture("repvgg"))
    assert folded(result) == {"dense.bn": "merged", "one.bn": "merged", "identity": "merged"}
    assert reasons(result) == {}


def test_repvgg_branches_kept_apart_each_fold_and_the_identity_branch_stays() -> None:
    result = fold_checked(*_fixture("repvgg"), merge_branches=False)
    assert folded(result) == {"dense.bn": "dense.conv", "one.bn": "one.conv"}
    assert reasons(result) == {"identity": "branch_merge_off"}


def test_conv_reused_in_two_places_is_not_folded() -> None:
    result = fold_checked(*_fixture("shared_conv"))
    assert reasons(result) == {"bn_a": "producer_shared", "bn_b": "producer_shared"}


def test_detection_backbone_with_frozen_batchnorm() -> None:
    result = fold_checked(*_fixture("frozen_backbone"), method="fx")
    assert folded(result) == {
        "bn_stem": "stem",
        "bn_c2": "c2",
        "bn_c3": "c3",
        "scale": "lateral",
        "lateral_scale": "lateral",
    }
    kinds = {f.pair.bn: f.pair.bn_kind for f in result.folded}
    assert kinds["bn_c2"] == BnKind.FROZEN and kinds["scale"] == BnKind.AFFINE
    assert reasons(result) == {"bn_c3b": "not_affine"}  # it clamps
    assert "clamp" in result.skipped[0].detail
    assert any("requires_grad" in note for note in result.plan.notes)  # detectron2's guard


def test_model_whose_forward_takes_a_dict() -> None:
    result = fold_checked(*_fixture("dict_input"))
    assert folded(result) == {"bn": "conv", "bn_head": "head"}


@pytest.mark.parametrize("name", ["data_dependent", "asserts_and_loops", "head_reads_values"])
def test_models_fx_cannot_trace_are_recorded(name: str) -> None:
    model, args = _fixture(name)
    with pytest.raises(bnfold.TraceError):
        bnfold.find.trace.trace_model(model)
    fold_checked(model, args, method="recorded")


def test_fx_trace_that_takes_the_wrong_branch_is_not_trusted() -> None:
    model, args = _fixture("isinstance_trap")
    bnfold.find.trace.trace_model(model)  # fx traces it without complaint...
    result = fold_checked(model, args, method="recorded")  # ...but into the wrong branch
    assert folded(result) == {"bn": "conv"}
    assert any("does not reproduce" in note for note in result.plan.notes)


def test_a_forward_that_reads_values_needs_several_inputs_to_fold() -> None:
    model, (x,) = _fixture("head_reads_values")
    one = fold_checked(model, (x,), method="recorded")
    assert not one.folded  # after a read, any module may be called anywhere for another input
    assert set(reasons(one).values()) == {"input_dependent"}
    assert "extra_inputs" in bnfold.SkipReason.INPUT_DEPENDENT.advice()
    several = fold_checked(model, (x,), extra_inputs=[(x * 3,), (-x,)], method="recorded")
    assert folded(several) == {
        "backbone.1": "backbone.0",
        "backbone.4": "backbone.3",
        "head_bn": "head_conv",
    }
    assert any("identically on all 3 recorded inputs" in n for n in several.plan.notes)


def test_bn_subclass_branching_on_values_is_not_specialised() -> None:
    class ValueGated(BatchNormAct2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
            return self.act(x) if x.mean() > 0 else x

    model = randomise(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), ValueGated(8)))
    result = fold_checked(model, (torch.randn(2, 3, 4, 4),))
    assert reasons(result) == {"1": "unsupported_forward"}
    assert "branches on the values" in result.skipped[0].detail


def test_branch_that_routes_a_layer_elsewhere_is_not_folded() -> None:
    class Router(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) if x.mean() > 0 else y * 2  # bn only on some inputs

    model = Router().eval()
    bnfold.zoo.randomize_bn(model)
    x = torch.rand(2, 3, 4, 4)
    result = fold_checked(model, (x,), extra_inputs=[(-x,)], method="recorded")
    assert reasons(result) == {"bn": "input_dependent"}
    assert "do not run as a pair on input 1" in result.skipped[0].detail


def test_bn_subclass_with_an_activation_never_folds_into_the_next_layer() -> None:
    for act, expected in ((True, {"0": "non_affine_between"}), (False, {})):
        model = randomise(torch.nn.Sequential(BatchNormAct2d(4, act=act), torch.nn.Conv2d(4, 4, 1)))
        result = fold_checked(model, (torch.randn(2, 4, 5, 5),))
        assert reasons(result) == expected  # BN -> ReLU -> conv is pre-activation


def test_a_scale_after_a_branch_that_skips_the_layer_is_left() -> None:
    class Either(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1)
            self.scale = ChannelScale(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.scale(self.conv(x) if x.mean() > 0 else x * 2)

    model = randomise(Either())
    x = torch.rand(2, 4, 3, 3)
    result = fold_checked(model, (x,), extra_inputs=[(-x,)], method="recorded")
    assert not result.folded and not result.skipped  # a scale module is no norm: a note
    assert any(
        "scale (ChannelScale) left as it is" in n and "do not run as a pair" in n
        for n in result.plan.notes
    )


def test_fx_trace_that_skips_a_norm_is_caught_even_when_outputs_agree() -> None:
    class Trap(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(x) if isinstance(x, torch.Tensor) else x  # fx: the else branch
            return torch.relu(-y.abs())  # all zeros either way

    result = fold_checked(randomise(Trap()), (torch.randn(2, 3, 4, 4),), method="recorded")
    assert reasons(result) == {"bn": "no_producer"}
    assert any("bn runs 1 time(s) in the model and 0 in the trace" in n for n in result.plan.notes)
