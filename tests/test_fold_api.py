"""The public fold API: caller untouched, in-place mode, records, errors, exported programs."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from fold_checks import assert_same_snapshot, fold_fp64, randomize, rel_error, run, snapshot
from torch import nn

import bnfold
from bnfold import zoo


def _small() -> nn.Module:
    return randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
        )
    )


def test_caller_model_in_train_mode_is_bit_identical() -> None:
    model = _small().train()
    model[1].momentum = 0.3
    before = snapshot(model)
    x = torch.randn(2, 3, 8, 8)
    result = bnfold.fold(model, x)
    assert_same_snapshot(before, model)
    assert model.training and model[1].training
    assert not result.model.training
    assert result.plan.model_was_training
    assert any("train mode" in note for note in result.plan.notes)
    expected = run(model.eval(), x)
    assert rel_error(expected, run(result.model, x)) < 1e-5


def test_submodules_in_train_mode_are_named_in_a_note() -> None:
    model = _small().eval()
    model[1].train()
    result = bnfold.fold(model, torch.randn(2, 3, 8, 8))
    assert model[1].training and not result.model[1].training
    (note,) = [note for note in result.plan.notes if "train mode" in note]
    assert note.startswith("1 in train mode inside an eval-mode model")
    model[1].eval()
    assert not any(
        "train mode" in n for n in bnfold.find_pairs(model, torch.randn(2, 3, 8, 8)).notes
    )


def test_find_pairs_does_not_touch_the_model() -> None:
    model = _small()
    before = snapshot(model)
    plan = bnfold.find_pairs(model, torch.randn(2, 3, 8, 8))
    assert_same_snapshot(before, model)
    assert [p.bn for p in plan.pairs] == ["1", "4"]
    assert not hasattr(model, "_tensor_constant0")


def test_inplace_folds_the_model_itself() -> None:
    model = _small().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = run(model, x)
    result = bnfold.fold(model, x, inplace=True)
    assert result.model is model and result.inplace
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    assert rel_error(expected, run(model, x)) < 1e-5


def test_records_are_json_serialisable() -> None:
    model = randomize(zoo.resnet18(width=8, num_classes=10))
    result = bnfold.fold(model, zoo.example_input("resnet18"))
    data = json.loads(result.to_json())
    assert "model" not in data
    assert len(data["folded"]) == 20 and data["skipped"] == []
    assert data["plan"]["summary"] == "20 of 20 BatchNorms foldable"
    assert data["folded"][0]["pair"]["pattern"] == "conv→bn"
    assert json.loads(bnfold.find_pairs(model, zoo.example_input("resnet18")).to_json())


def test_plan_summary_counts_reasons() -> None:
    plan = bnfold.Plan(
        pairs=(),
        skipped=tuple(
            bnfold.Skip("bn", "BatchNorm2d", reason, "d")
            for reason in [bnfold.SkipReason.PRODUCER_FANOUT] * 2 + [bnfold.SkipReason.ZERO_PADDING]
        ),
        method="fx",
        model_was_training=False,
    )
    assert plan.summary() == (
        "0 of 3 BatchNorms foldable; 3 skipped: 2 residual fan-out, 1 zero-padded BN→Conv"
    )


def test_untraceable_model_is_recorded_not_an_error() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.bn(self.conv(x))
            return self.conv(x)

    plan = bnfold.find_pairs(DataDependent(), torch.ones(1, 3, 8, 8))
    assert plan.method == "recorded"  # fx fails; the real forward's dataflow is recorded
    assert [s.reason for s in plan.skipped] == [bnfold.SkipReason.INPUT_DEPENDENT]


def test_input_the_model_rejects_names_the_layer() -> None:
    with pytest.raises(bnfold.ModelInputError, match="layer '0'"):
        bnfold.find_pairs(_small(), torch.randn(2, 5, 8, 8))


def test_exported_program_module_folds_exactly() -> None:
    model = _small().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gm = torch.export.export(model, (x,)).module()
    result = fold_fp64(gm, x, folded=2, skipped=0)
    assert result.graph_rewritten
    assert all(f.pair.bn_kind == bnfold.BnKind.FUNCTIONAL for f in result.folded)
    assert rel_error(run(model, x), run(result.model, x)) < 1e-10


def test_zoo_models_fold_completely() -> None:
    for name in ("mobilenet_v2", "unet3d", "mlp", "small_cnn"):
        model = randomize(zoo.BUILDERS[name]())
        result = fold_fp64(model, zoo.example_input(name), skipped=0)
        assert len(result.folded) == result.plan.bn_total > 0


def test_loaded_exported_program_module_folds(tmp_path) -> None:
    """``torch.export.load(...).module()`` refuses ``.eval()``; the fold must not call it."""
    model = _small().eval()
    x = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2").module()
    assert len(bnfold.find_pairs(loaded, x).pairs) == 2
    result = bnfold.fold(loaded, x)
    assert bnfold.count_bn_kernels(result.model, x) == 0
    assert rel_error(run(model, x), run(result.model, x)) < 1e-5


def test_a_torch_export_program_is_folded_as_its_module() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    result = bnfold.fold(program, x)
    assert len(result.folded) == 1 and "took the program's module" in result.plan.notes[0]
    assert len(bnfold.find_pairs(program, x).pairs) == 1
    assert bnfold.count_bn_kernels(program, x) == 1
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-5)
    with pytest.raises(bnfold.UsageError, match="no module to update"):
        bnfold.recalibrate(program, [x])


class ReadsNormSize(nn.Module):
    """The forward reads a plain setting of the BN it folds (``num_features``) for a shape."""

    def __init__(self, gate: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate and x.dim() != 4:  # fx cannot decide this: the dataflow is recorded
            raise ValueError("expects images")
        y = self.bn(self.conv(x))
        return y.view(y.shape[0], self.bn.num_features, -1).mean(-1)


@pytest.mark.parametrize("gate", [False, True])
def test_a_folded_norm_keeps_its_plain_settings_for_the_forward(gate: bool) -> None:
    model = randomize(ReadsNormSize(gate).eval())
    result = fold_fp64(model, torch.randn(2, 4, 5, 5), folded=1, skipped=0)
    assert result.plan.method == ("recorded" if gate else "fx")
    norm = result.model.bn
    assert isinstance(norm, nn.Identity) and norm.num_features == 4
    assert torch.equal(norm.running_mean, model.bn.running_mean.double())  # read, as before
    assert not any(key.startswith("bn.") for key in result.model.state_dict())


def test_a_model_that_cannot_be_copied_is_refused_with_what_to_do() -> None:
    model = _small().eval()
    model.lock = threading.Lock()  # type: ignore[assignment]
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(bnfold.UsageError, match="cannot copy Sequential") as caught:
        bnfold.fold(model, x)
    assert "inplace=True" in str(caught.value)
    assert bnfold.fold(model, x, inplace=True).model is model


class RegisteredTwice(nn.Module):
    """One BN module under two names (``self.bn`` and ``self.body[1]``); ``body`` runs it."""

    def __init__(self, gate: bool) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), self.bn, nn.ReLU())
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate and x.dim() != 4:  # fx cannot decide this: the dataflow is recorded
            raise ValueError("expects images")
        return self.body(x)


@pytest.mark.parametrize("gate", [False, True])
def test_a_norm_registered_under_two_names_is_removed_under_both(gate: bool) -> None:
    model = randomize(RegisteredTwice(gate).eval())
    x = torch.randn(2, 3, 6, 6)
    result = fold_fp64(model, x, folded=1, skipped=0)
    assert result.model.bn is result.model.body[1]
    assert isinstance(result.model.bn, nn.Identity)
    assert bnfold.count_bn_kernels(result.model, x.double()) == 0


class ReadsNormTensors(ReadsNormSize):
    """Reads the BN's tensors beside its call in ways the analysis does not see: fx bakes
    ``running_mean.clone()`` into a constant of its graph, a recorded forward does not see
    ``weight.shape``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if not self.gate:
            return y.mean((2, 3)) - self.bn.running_mean.clone()
        if x.dim() != 4:  # fx cannot decide this: the dataflow is recorded
            raise ValueError("expects images")
        return y.view(y.shape[0], self.bn.weight.shape[0], -1).mean(-1)


@pytest.mark.parametrize("gate", [False, True])
def test_a_forward_reading_a_folded_norms_tensors_still_runs_exactly(gate: bool) -> None:
    model = randomize(ReadsNormTensors(gate).eval())
    fold_fp64(model, torch.randn(2, 4, 6, 6), folded=1, skipped=0)


@pytest.mark.parametrize("model", [None, lambda x: x, "model.pt"], ids=["none", "function", "path"])
@pytest.mark.parametrize("api", ["fold", "find_pairs", "count_bn_kernels"])
def test_anything_but_a_module_is_refused_with_what_to_do(model, api: str) -> None:
    with pytest.raises(bnfold.UsageError, match=r"must be a torch\.nn\.Module.*load_model"):
        getattr(bnfold, api)(model, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("extra", [torch.randn(2, 3, 8, 8), {"x": torch.randn(2, 3, 8, 8)}])
@pytest.mark.parametrize("api", ["fold", "find_pairs"])
def test_extra_inputs_given_as_one_input_is_refused_not_walked(extra, api: str) -> None:
    """A tensor passed as ``extra_inputs`` would be walked row by row as inputs of the wrong
    rank; it is refused, and the caller's model is untouched."""
    model = randomize(zoo.small_cnn()).eval()
    before = snapshot(model)
    with pytest.raises(bnfold.UsageError, match=r"pass \[x\]"):
        getattr(bnfold, api)(model, torch.randn(2, 3, 8, 8), extra_inputs=extra)
    assert_same_snapshot(before, model)
