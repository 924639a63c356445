"""Third-party networks (MONAI, pure PyTorch) with realistic BatchNorm statistics: folded
exactly in float64, the batch norms left are exactly the plan's skips, and the folded model
exports to ONNX and verifies on ONNX Runtime CPU. The default run folds one network of each
family; ``-m slow`` runs all of them (and their ONNX round trips)."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

pytest.importorskip("monai")

from monai_models import FAST, FAST_ONNX, MODELS, build
from wild_checks import fold_checked

import bnfold
from bnfold.verification.compare import DEFAULT_TOLERANCES, Tolerance

# name -> (how the dataflow is read, BNs folded, skips by reason). DenseNet's norm1/transition
# norms and HighResNet's are pre-activation (BN -> ReLU -> conv); DenseNet's norm5 feeds a ReLU
# that feeds pooling, not a layer.
EXPECTED: dict[str, tuple[str, int, dict[str, int]]] = {
    "resnet10-3d": ("fx", 12, {}),
    "resnet18-2d": ("fx", 20, {}),
    "resnet34-3d": ("fx", 36, {}),
    "resnet50-2d": ("fx", 53, {}),
    "seresnet50-2d": ("fx", 53, {}),
    "seresnet50-3d": ("fx", 53, {}),
    "densenet121-2d": (
        "fx",
        59,
        {"producer_fanout": 55, "no_producer": 6, "non_affine_between": 1},
    ),
    "densenet121-3d": (
        "fx",
        59,
        {"producer_fanout": 55, "no_producer": 6, "non_affine_between": 1},
    ),
    "efficientnet-b0-2d": ("fx", 49, {}),
    "efficientnet-b1-3d": ("fx", 69, {}),
    "unet-2d": ("fx", 9, {}),
    "unet-3d": ("fx", 9, {}),
    "basicunet-2d": ("recorded", 18, {}),  # fx takes the wrong branch of an isinstance check
    "basicunet-3d": ("recorded", 18, {}),
    "dynunet-2d": ("fx", 10, {}),
    "dynunet-3d": ("fx", 10, {}),
    "attentionunet-2d": ("fx", 14, {}),
    "attentionunet-3d": ("fx", 14, {}),
    "vnet-3d": ("fx", 24, {}),
    "highresnet-2d": (
        "recorded",
        12,
        {"non_affine_between": 1, "no_producer": 8},
    ),  # fx cannot trace it at all
    "highresnet-3d": ("recorded", 12, {"non_affine_between": 1, "no_producer": 8}),
}

SLOW = tuple(name for name in MODELS if name not in FAST)


def _params(names: tuple[str, ...], slow: bool) -> list:
    marks = [pytest.mark.slow] if slow else []
    return [pytest.param(name, marks=marks, id=name) for name in names]


def test_every_model_has_an_expectation() -> None:
    assert set(EXPECTED) == set(MODELS)


@pytest.mark.parametrize("name", _params(FAST, False) + _params(SLOW, True))
def test_monai_network_folds_exactly(name: str) -> None:
    model, x = build(name)
    result = fold_checked(model, (x,))  # fp64 < 1e-10, BN kernels left == skips, untouched
    method, folded, skipped = EXPECTED[name]
    assert result.plan.method == method
    assert len(result.folded) == folded
    assert dict(Counter(s.reason.value for s in result.skipped)) == skipped


ONNX_SLOW = tuple(name for name in MODELS if name not in FAST_ONNX)


def _own_fp32_tolerance(model, x) -> Tolerance:
    """Random deep networks are chaotic in float32: the original model's own float32 output
    can be 1e-3 (relative to its peak) away from float64. Allow 10x that, never less than the
    default; a real folding mistake changes outputs by O(1), and exactness is proven in float64
    by ``test_monai_network_folds_exactly``."""
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
        noise = float((model(x).double() - reference).abs().max() / reference.abs().max())
    default = DEFAULT_TOLERANCES["torch-cpu"]
    return Tolerance(
        atol=max(default.atol, 10 * noise),
        rtol=default.rtol,
        why=f"this network's own float32 error vs float64 is {noise:.1e} of its peak",
    )


@pytest.mark.parametrize("name", _params(FAST_ONNX, False) + _params(ONNX_SLOW, True))
def test_monai_network_exports_and_verifies_on_ort_cpu(name: str, tmp_path) -> None:
    model, x = build(name)
    result = bnfold.fold(model, x)
    exported = bnfold.export_onnx(result, x, tmp_path / f"{name}.onnx")
    tolerance = _own_fp32_tolerance(model, x)
    report = bnfold.verify(
        model,
        {"folded": result, "onnx": exported},
        x,
        providers=["cpu"],
        random_batch_sizes=(),  # the tolerance is this network's own noise on x
        tolerances=dict.fromkeys(("torch-cpu", "ort-cpu", "ort-cpu-noopt"), tolerance),
    )
    assert report.passed, report.format_text()
