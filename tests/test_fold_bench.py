"""benchmarks/fold_bench.py's hand-written deploy forms (benchmarks/deploy_forms.py) compute the
same function as their originals in float64, hold no batch norm, and are sensitive to every
batch norm (a deploy form that ignored one would not pass); and a short run prints both tables."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import bnfold
from bnfold import zoo

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
EXACT = 1e-10


@pytest.fixture
def bench_modules(monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, ModuleType]:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("blocks", "deploy_forms"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("blocks"), importlib.import_module("deploy_forms")


def _model(blocks: ModuleType, name: str) -> tuple[nn.Module, torch.Tensor]:
    build, shape = blocks.MODELS[name]
    torch.manual_seed(0)
    model = zoo.randomize_bn(build())
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["repvgg", "mixnet", "levit", "resnet_final_bn"])
def test_deploy_form_is_exact_and_has_no_batch_norm(name: str, bench_modules) -> None:
    blocks, deploy_forms = bench_modules
    model, x = _model(blocks, name)
    assert deploy_forms.deploy_error_fp64(name, model, x) < EXACT
    deployed = deploy_forms.CONVERTERS[name](model)
    assert bnfold.count_bn_kernels(model, x) > 0
    assert bnfold.count_bn_kernels(deployed, x) == 0
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert all(p.dtype == torch.float32 for p in deployed.parameters())  # the original's dtype


@pytest.mark.parametrize("name", ["repvgg", "mixnet", "levit", "resnet_final_bn"])
def test_every_batch_norm_changes_the_output(name: str, bench_modules) -> None:
    """The exactness check above can catch a deploy form that drops or misplaces a BN only if
    each BN matters: shifting any one BN's statistics moves the original's output."""
    blocks, _ = bench_modules
    model, x = _model(blocks, name)
    model = model.double()
    with torch.no_grad():
        reference = model(x.double())
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            saved = bn.running_mean.clone()
            bn.running_mean.add_(1.0)
            moved = float((model(x.double()) - reference).abs().max() / reference.abs().max())
            bn.running_mean.copy_(saved)
            assert moved > 1e-6, bn


def test_a_wrong_deploy_form_is_reported(bench_modules, monkeypatch: pytest.MonkeyPatch) -> None:
    """A converter that forgets the identity branches' BN gives a deploy form that is off."""
    blocks, deploy_forms = bench_modules
    model, x = _model(blocks, "repvgg")
    right = deploy_forms.CONVERTERS["repvgg"]

    def forgets_identity(original: nn.Module) -> nn.Module:
        deployed = right(original)
        for block, merged in zip(original.blocks, deployed.blocks, strict=True):
            conv = merged.conv
            if block.bn_id is not None:
                s, t = deploy_forms.affine(block.bn_id)
                channels = torch.arange(s.numel())
                with torch.no_grad():
                    conv.weight[channels, channels, 1, 1] -= s.to(conv.weight.dtype)
                    conv.bias -= t.to(conv.bias.dtype)
        return deployed

    assert deploy_forms.deploy_error_fp64("repvgg", model, x) < EXACT
    monkeypatch.setitem(deploy_forms.CONVERTERS, "repvgg", forgets_identity)
    assert deploy_forms.deploy_error_fp64("repvgg", model, x) > 1e-6


def test_short_run_prints_the_deploy_table(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("fold_bench", BENCHMARKS / "fold_bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # fold_bench adds benchmarks/ to it
    spec.loader.exec_module(bench)
    models = ["--models", "traps", "levit", "resnet_final_bn"]
    rows = bench.main(["--repeat", "1", "--deploy-batch", "4", *models])
    out = capsys.readouterr().out
    assert "| traps | 3 |" in out and "folded/deploy (target ≤ 1.05)" in out
    by_name = {row["model"]: row for row in rows}
    assert "bn_left_deploy" not in by_name["traps"]  # no deploy form: the first table only
    for name in ("levit", "resnet_final_bn"):
        row = by_name[name]
        assert row["deploy_error_fp64"] < EXACT and row["bn_left_deploy"] == 0
        assert row["bnfold_error_fp64"] < bench.WRONG
        assert row["folded_deploy_ratio"] > 0 and row["folded_deploy_ratio_batch"] > 0
        assert row["deploy_batch"] == 4 and row["deploy_precision_ratio"] > 0
        assert f"| {name} | {row['bn_total']} / {row['bn_left_bnfold']} / 0 | exact" in out
