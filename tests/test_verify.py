"""Tests for bnfold.verification: metrics, verdicts, CUDA honesty, the first diverging layer."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from onnx_models import ConvNet, TwoInTwoOut, bn_before_conv, image, mlp_bn_first, ready, vector
from torch import nn

import bnfold
from bnfold.errors import RuntimeUnavailableError, UsageError, VerificationFailed
from bnfold.export import export_onnx
from bnfold.runtime import ort_cuda_unavailable_reason, torch_cuda_unavailable_reason
from bnfold.verification.compare import CPU_FP32, CUDA_FP32, Tolerance, compare_arrays
from bnfold.verification.locate import locate_divergence
from bnfold.verification.records import (
    CandidateReport,
    Status,
    VerificationReport,
    require_passed,
)
from bnfold.verification.verifier import verify

NO_ORT_CUDA = ort_cuda_unavailable_reason()


@pytest.fixture(scope="module")
def convnet(tmp_path_factory):
    """(original, FoldResult, ExportResult) for ConvNet."""
    model = ready(ConvNet())
    folded = bnfold.fold(model, image())
    path = tmp_path_factory.mktemp("verify") / "convnet.onnx"
    return model, folded, export_onnx(folded, image(), path)


def _by_kind(report: VerificationReport) -> dict[str, CandidateReport]:
    return {c.name.split(":")[-1]: c for c in report.candidates}


def _perturbed(folded: bnfold.FoldResult, layer: str, factor: float = 1.001) -> nn.Module:
    broken = copy.deepcopy(folded.model)
    with torch.no_grad():
        broken.get_submodule(layer).weight.mul_(factor)
    return broken


# ----------------------------------------------------------------------------------- metrics


def test_compare_arrays_metrics() -> None:
    ref = np.array([[1.0, -2.0, 4.0], [0.5, 3.0, -1.0]], dtype=np.float32)
    cand = ref.copy()
    cand[1, 1] += 0.01
    tol = Tolerance(atol=1e-3, rtol=1e-3, why="test")
    stats = compare_arrays(ref, cand, tol)
    assert stats.max_abs == pytest.approx(0.01, rel=1e-4)
    assert stats.sum_abs / stats.count == pytest.approx(0.01 / 6, rel=1e-4)
    assert stats.max_rel == pytest.approx(0.01 / 3.0, rel=1e-4)
    assert stats.worst_index == (1, 1)
    assert stats.ratio == pytest.approx(0.01 / (1e-3 * 4.0 + 1e-3 * 3.0), rel=1e-4)
    assert stats.top1 == (2, 2)
    assert 0.99999 < stats.cosine < 1.0


def test_compare_arrays_top1_cosine_and_failures() -> None:
    ref = np.array([[1.0, 2.0], [3.0, 1.0]])
    swapped = np.array([[2.0, 1.0], [3.0, 1.0]])
    stats = compare_arrays(ref, swapped, CPU_FP32)
    assert stats.top1 == (1, 2) and stats.ratio > 1
    assert compare_arrays(ref, ref, CPU_FP32).cosine == pytest.approx(1.0)
    assert compare_arrays(ref, ref[:1], CPU_FP32).detail.startswith("shape (1, 2)")
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert "non-finite" in compare_arrays(ref, nan, CPU_FP32).detail
    assert compare_arrays(np.zeros(3), np.zeros(3), CPU_FP32).ratio == 0.0


def test_tolerances_are_documented_and_cuda_is_wider() -> None:
    assert CPU_FP32.atol < CUDA_FP32.atol and CPU_FP32.rtol <= CUDA_FP32.rtol
    assert len(CPU_FP32.why) > 100 and "TF32" in CUDA_FP32.why


# ----------------------------------------------------------------------------------- verdicts


def test_folded_and_onnx_pass_on_cpu_and_cuda_is_not_run_here(convnet) -> None:
    model, folded, exported = convnet
    report = verify(model, {"folded": folded, "onnx": exported}, image())
    kinds = _by_kind(report)
    for kind in ("torch-cpu", "ort-cpu", "ort-cpu-noopt"):
        assert kinds[kind].status is Status.PASSED, kinds[kind].reason
        (out,) = kinds[kind].outputs
        assert out.ratio <= 1 and out.top1_agreement == 1.0 and out.cosine_similarity > 0.9999
        assert out.needed_atol == pytest.approx(out.ratio * CPU_FP32.atol)
    assert kinds["ort-cpu"].providers[0] == "CPUExecutionProvider"
    assert kinds["ort-cpu-noopt"].settings["graph_optimization_level"] == "ORT_DISABLE_ALL"
    if NO_ORT_CUDA:
        assert kinds["ort-cuda"].status is Status.NOT_RUN
        assert "lacks the CUDA execution provider" in kinds["ort-cuda"].reason
    if torch_cuda_unavailable_reason():
        assert kinds["torch-cuda"].status is Status.NOT_RUN
    assert report.passed
    assert report.settings["torch.backends.cudnn.allow_tf32"] == "False"
    assert report.settings["ort.cuda.use_tf32"] == "0"
    assert {info.batch_size for info in report.inputs} == {1, 2, 3}
    assert [info.source for info in report.inputs] == ["sample", "random", "random"]
    data = json.loads(report.to_json())
    assert data["passed"] is True and data["candidates"][0]["status"] == "passed"
    assert "not run" in report.format_text()
    assert require_passed(report) is report


@pytest.mark.parametrize("build", [mlp_bn_first, bn_before_conv], ids=["mlp", "bn_conv"])
def test_bn_before_layer_fixtures_pass(build, tmp_path) -> None:
    model = ready(build())
    inputs = vector() if build is mlp_bn_first else image()
    folded = bnfold.fold(model, inputs)
    assert not folded.skipped
    exported = export_onnx(folded, inputs, tmp_path / "m.onnx")
    assert exported.batchnorm_nodes == ()
    report = verify(model, [folded.model, exported.path], [inputs], providers=["cpu"])
    assert report.passed and len(report.candidates) == 3


def test_two_inputs_and_outputs_with_sample_batches() -> None:
    model = ready(TwoInTwoOut())
    batches = [(image(batch=b), vector(batch=b, features=6, seed=b)) for b in (2, 4)]
    folded = bnfold.fold(model, batches[0])
    report = verify(model, folded, batches, providers=["cpu"], random_batch_sizes=(1,))
    (cand,) = report.candidates
    assert cand.passed and [o.output for o in cand.outputs] == ["output_0", "output_1"]
    assert cand.outputs[0].top1_agreement is None and cand.outputs[1].top1_agreement == 1.0
    assert [i.batch_size for i in report.inputs] == [2, 4, 1]


def test_broken_fold_fails_and_names_the_layer(convnet) -> None:
    model, folded, _ = convnet
    broken = _perturbed(folded, "conv")
    report = verify(model, broken, image(), providers=["cpu"])
    (cand,) = report.candidates
    assert not report.passed and cand.status is Status.FAILED
    assert cand.outputs[0].ratio > 1 and "x the tolerance" in cand.reason
    assert cand.divergence is not None
    assert (cand.divergence.layer, cand.divergence.reference_layer) == ("conv", "bn")
    assert cand.divergence.folded_with == "bn"
    assert "fold is wrong" in cand.hint and "float64 copies" in cand.hint
    with pytest.raises(VerificationFailed, match=r"torch-cpu.*first diverging layer: conv"):
        require_passed(report)


def test_broken_fold_deep_in_a_resnet_names_that_layer() -> None:
    from bnfold import zoo

    model = zoo.randomize_bn(zoo.resnet18(width=8, num_classes=10))
    x = zoo.example_input("resnet18")
    folded = bnfold.fold(model, x)
    report = verify(model, _perturbed(folded, "layer2.1.conv1"), x, providers=["cpu"])
    (cand,) = report.candidates
    assert cand.status is Status.FAILED
    assert cand.divergence.layer == "layer2.1.conv1"
    assert cand.divergence.folded_with == "layer2.1.bn1"
    # with the FoldResult's own pairs the answer is the same
    pairs = [(fp.pair.producer, fp.pair.bn) for fp in folded.folded]
    broken = _perturbed(folded, "layer2.1.conv1")
    divergence = locate_divergence(model, broken, x, CPU_FP32, pairs)
    assert divergence.layer == "layer2.1.conv1"


def test_bn_before_layer_broken_fold_names_the_layer() -> None:
    model = ready(mlp_bn_first())
    folded = bnfold.fold(model, vector())
    report = verify(model, _perturbed(folded, "1"), vector(), providers=["cpu"])
    (cand,) = report.candidates
    assert cand.divergence.layer == "1" and cand.divergence.reference_layer == "2"
    assert locate_divergence(model, folded.model, vector()) is None


def test_broken_onnx_is_caught_and_points_at_the_export(convnet, tmp_path) -> None:
    model, folded, _ = convnet
    exported = export_onnx(_perturbed(folded, "fc", 1.01), image(), tmp_path / "bad.onnx")
    report = verify(model, {"folded": folded, "onnx": exported}, image(), providers=["cpu"])
    kinds = _by_kind(report)
    assert kinds["torch-cpu"].passed
    assert kinds["ort-cpu"].status is Status.FAILED and "ONNX export" in kinds["ort-cpu"].hint
    assert kinds["ort-cpu"].divergence is None
    assert report.summary().startswith("verification FAILED")


def test_onnx_that_fails_at_another_batch_size_is_a_failure(tmp_path) -> None:
    model = ready(mlp_bn_first())
    exported = export_onnx(model, vector(batch=2), tmp_path / "fixed.onnx", dynamic_batch=False)
    report = verify(model, exported, vector(batch=2), providers=["cpu"])
    kinds = _by_kind(report)
    assert kinds["ort-cpu"].status is Status.FAILED and "raised" in kinds["ort-cpu"].reason
    reason = kinds["ort-cpu"].reason
    assert "Expected: 2" in reason  # ONNX Runtime's lines after its first: which dim, which size
    assert "the original runs this input, this candidate does not" in reason
    assert not report.passed


# ------------------------------------------------------------------------------ CUDA honesty


@pytest.mark.skipif(NO_ORT_CUDA is None, reason="ORT CUDA is usable here")
def test_explicit_cuda_raises_with_the_reason(convnet) -> None:
    model, _, exported = convnet
    with pytest.raises(RuntimeUnavailableError, match="CUDA"):
        verify(model, exported, image(), providers=("cpu", "cuda"))


@pytest.mark.skipif(torch_cuda_unavailable_reason() is None, reason="torch CUDA is usable here")
def test_explicit_cuda_with_only_torch_candidates_raises(convnet) -> None:
    model, folded, _ = convnet
    with pytest.raises(RuntimeUnavailableError, match=r"CPU-only build|no CUDA device"):
        verify(model, folded, image(), providers=["cuda"])


def test_not_run_is_never_a_pass() -> None:
    not_run = CandidateReport(
        "ort-cuda", "onnxruntime", "cuda", Status.NOT_RUN, CUDA_FP32, reason="no device"
    )
    report = VerificationReport("M", (not_run,), (), {})
    assert not report.passed
    with pytest.raises(VerificationFailed, match="no candidate could be run"):
        require_passed(report)


@pytest.mark.cuda
@pytest.mark.skipif(
    torch_cuda_unavailable_reason() is not None,
    reason=f"PyTorch CUDA not usable: {torch_cuda_unavailable_reason()}",
)
def test_folded_torch_on_cuda_passes_with_tf32_off(convnet) -> None:
    model, folded, _ = convnet
    torch.backends.cudnn.allow_tf32 = True
    report = verify(model, folded, image(), providers=["cpu", "cuda"])
    assert torch.backends.cudnn.allow_tf32 is True  # restored
    kinds = _by_kind(report)
    assert kinds["torch-cuda"].passed and kinds["torch-cuda"].device == "cuda"
    assert kinds["torch-cuda"].settings["torch.backends.cudnn.allow_tf32"] == "False"


@pytest.mark.cuda
@pytest.mark.skipif(NO_ORT_CUDA is not None, reason=f"ORT CUDA not usable: {NO_ORT_CUDA}")
def test_onnx_on_ort_cuda_passes(convnet) -> None:
    model, _, exported = convnet
    report = verify(model, exported, image(), providers=["cuda"])
    (cand,) = report.candidates
    assert cand.passed and cand.providers[0] == "CUDAExecutionProvider"
    assert cand.settings["cuda.use_tf32"] == "0"


# ------------------------------------------------------------------------------ contracts


def test_reference_and_candidate_are_not_mutated(convnet) -> None:
    model, folded, _ = convnet
    model.train()
    try:
        before = {k: v.clone() for k, v in model.state_dict().items()}
        verify(model, folded, image(), providers=["cpu"])
        assert all(m.training for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        model.eval()


def test_torch_tf32_flags_are_restored(convnet) -> None:
    model, folded, _ = convnet
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        report = verify(model, folded, image(), providers=["cpu"])
        assert report.settings["torch.backends.cuda.matmul.allow_tf32"] == "False"
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_bad_arguments(convnet) -> None:
    model, folded, _ = convnet
    with pytest.raises(UsageError, match="providers"):
        verify(model, folded, image(), providers=["tpu"])
    with pytest.raises(UsageError, match="cannot verify"):
        verify(model, [42], image())
    with pytest.raises(UsageError, match="named"):
        verify(model, [folded, folded], image(), providers=["cpu"])
    with pytest.raises(UsageError, match="at least one input batch"):
        verify(model, folded, [], providers=["cpu"])


def test_tolerance_override_turns_a_pass_into_a_failure(convnet) -> None:
    model, folded, _ = convnet
    strict = Tolerance(atol=0.0, rtol=1e-12, why="impossible")
    report = verify(model, folded, image(), providers=["cpu"], tolerances={"torch-cpu": strict})
    (cand,) = report.candidates
    max_abs = cand.outputs[0].max_abs_diff
    assert (cand.status is Status.FAILED) == (max_abs > 0)
