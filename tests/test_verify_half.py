"""Verification of float16/bfloat16 (and float64) models: each candidate runs in its own dtype,
against the original in that dtype and against its float32 copy, with the documented
half-precision tolerance; a perturbed fold still fails."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from exit_models import MODULE, run

import bnfold
from bnfold import zoo
from bnfold.verification.compare import HALF_EPS, half_tolerance
from bnfold.verification.records import Status

HALF = [torch.float16, torch.bfloat16]


def _model(dtype: torch.dtype) -> torch.nn.Module:
    return zoo.randomize_bn(zoo.small_cnn()).eval().to(dtype)


def _input(dtype: torch.dtype) -> torch.Tensor:
    return zoo.example_input("small_cnn").to(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_half_fold_passes_against_the_original_and_its_float32_copy(dtype):
    model, x = _model(dtype), _input(dtype)
    before = copy.deepcopy(model.state_dict())
    result = bnfold.fold(model, x)
    report = bnfold.verify(model, {"folded": result}, x, providers=("cpu",))
    assert report.passed, report.format_text()
    (candidate,) = report.candidates
    assert [out.output for out in candidate.outputs] == ["output", "output vs float32"]
    eps = HALF_EPS[dtype]
    assert candidate.tolerance == half_tolerance(dtype)
    assert candidate.tolerance.atol == candidate.tolerance.rtol == 4 * eps
    assert all(out.ratio < 0.5 for out in candidate.outputs)  # measured: <= 0.3
    assert candidate.settings["dtype"] == str(dtype).removeprefix("torch.")
    assert all(p.dtype == dtype for p in model.parameters())  # the caller's model untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "dtype, factor",
    [(torch.float16, 1.03), (torch.bfloat16, 1.10)],
    ids=["float16-3%", "bfloat16-10%"],
)
def test_a_perturbed_half_fold_fails(dtype, factor):
    """The last folded layer's weight off by a few percent (bfloat16's eps is 8x float16's: a
    3% error there is within rounding, see half_tolerance)."""
    model, x = _model(dtype), _input(dtype)
    result = bnfold.fold(model, x)
    wrong = copy.deepcopy(result.model)
    with torch.no_grad():
        wrong.fc.weight.mul_(factor)
    report = bnfold.verify(model, {"folded": wrong}, x, providers=("cpu",))
    (candidate,) = report.candidates
    assert candidate.status is Status.FAILED
    assert "raised" not in candidate.reason  # a numerical failure, not a dtype error
    assert all(not out.passed and out.ratio > 1 for out in candidate.outputs)


def test_a_bfloat16_onnx_export_is_refused_with_the_reason(tmp_path):
    model, x = _model(torch.bfloat16), _input(torch.bfloat16)
    with pytest.raises(bnfold.ExportError, match="bfloat16 models are not exported to ONNX"):
        bnfold.export_onnx(model, x, tmp_path / "bf16.onnx")
    assert not (tmp_path / "bf16.onnx").exists()


def test_cli_fold_of_a_bfloat16_model_with_onnx_writes_nothing(capsys, models, tmp_path):
    """The refusal comes before any stage writes: no folded model is left behind either."""
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(
        capsys,
        "fold",
        f"{MODULE}:bfloat16",
        "--input-shape",
        "1x3x8x8",
        "--onnx",
        out / "bf16.onnx",
        "-o",
        out / "bf16.pt2",
    )
    assert code == 3 and "bfloat16 models are not exported to ONNX" in err
    assert "already written" not in err
    assert list(out.iterdir()) == []


def test_a_float64_model_is_verified_on_float64_inputs():
    model, x = _model(torch.float64), _input(torch.float64)
    report = bnfold.verify(model, bnfold.fold(model, x), x, providers=("cpu",))
    assert report.passed, report.format_text()
    assert report.candidates[0].settings["dtype"] == "float64"


def test_cli_fold_verify_of_a_half_model_with_onnx(capsys, models, tmp_path):
    code, out, err = run(
        capsys,
        "fold",
        f"{MODULE}:half",
        "--input-shape",
        "1x3x8x8",
        "--onnx",
        tmp_path / "half.onnx",
        "--verify",
        "--json",
        "-",
    )
    assert code == 0, err
    verification = json.loads(out)["verification"]
    assert verification["passed"]
    ran = {c["name"]: c["status"] for c in verification["candidates"]}
    assert ran["folded (torch):torch-cpu"] == "passed"  # in float16, vs float16 and float32
    assert ran["onnx:ort-cpu"] == ran["onnx:ort-cpu-noopt"] == "passed"  # ORT in float16
    code, out, err = run(
        capsys,
        "fold",
        f"{MODULE}:bfloat16",
        "--input-shape",
        "1x3x8x8",
        "--verify",
        "--dtype",
        "bfloat16",
        "-o",
        tmp_path / "bf16.pt2",
    )
    assert code == 0, err
    assert "verification PASSED" in out
