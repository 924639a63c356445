"""``bnfold export`` and ``bnfold verify``: files, reports, exit codes (0 ok, 1 failed, 2, 3)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from bnfold_cli.main import main
from onnx_models import ConvNet, image, ready

import bnfold
from bnfold.runtime import ort_cuda_unavailable_reason


def run(capsys, *args: object) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def _save_pt2(model: torch.nn.Module, path) -> None:
    dims = ({0: torch.export.Dim.AUTO},)
    torch.export.save(torch.export.export(model, (image(),), dynamic_shapes=dims), path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """model.pt2 (original), out.onnx from ``bnfold export``, and a broken fold as .pt2/.onnx."""
    root = tmp_path_factory.mktemp("cli_onnx")
    model = ready(ConvNet())
    _save_pt2(model, root / "model.pt2")
    broken = copy.deepcopy(bnfold.fold(model, image()).model)
    with torch.no_grad():
        broken.get_submodule("conv").weight.mul_(1.001)
    _save_pt2(broken, root / "broken.pt2")
    bnfold.export_onnx(broken, image(), root / "broken.onnx")
    return root


def test_export_then_verify(files, capsys) -> None:
    out = files / "out.onnx"
    code, text, err = run(
        capsys,
        "export",
        files / "model.pt2",
        "--onnx",
        out,
        "--verify",
        "--json",
        files / "export.json",
    )
    assert code == 0, err
    assert out.is_file() and "wrote" in text and "verification PASSED" in text
    report = json.loads((files / "export.json").read_text())
    assert report["command"] == "export" and report["export"]["dynamic_batch"]["proven"]
    assert report["verification"]["passed"] is True
    kinds = {c["name"]: c["status"] for c in report["verification"]["candidates"]}
    assert kinds["folded:torch-cpu"] == kinds["onnx:ort-cpu"] == "passed"

    code, text, err = run(capsys, "verify", out, "--reference", files / "model.pt2", "--json", "-")
    assert code == 0, err
    data = json.loads(text)
    assert data["command"] == "verify" and data["verification"]["passed"] is True
    assert {i["batch_size"] for i in data["verification"]["inputs"]} == {1, 2, 3}

    code, _, err = run(capsys, "export", files / "model.pt2", "--onnx", out)
    assert code == 2 and "--force" in err


def test_broken_fold_exits_1_and_names_the_layer(files, capsys) -> None:
    code, text, err = run(
        capsys,
        "verify",
        files / "broken.onnx",
        "--reference",
        files / "model.pt2",
        "--folded",
        files / "broken.pt2",
    )
    assert code == 1
    assert "verification FAILED" in text and "error: verification failed" in err
    assert "first diverging layer: conv (folded with bn)" in text
    assert "folded:torch-cpu" in err


@pytest.mark.skipif(ort_cuda_unavailable_reason() is None, reason="ORT CUDA is usable here")
def test_explicit_cuda_that_cannot_run_exits_3(files, capsys) -> None:
    code, _, err = run(
        capsys,
        "verify",
        files / "broken.onnx",
        "--reference",
        files / "model.pt2",
        "--providers",
        "cpu,cuda",
    )
    assert code == 3 and "CUDA is not usable" in err


def test_usage_errors_exit_2(files, capsys) -> None:
    code, _, err = run(capsys, "verify", files / "missing.onnx", "--reference", files / "model.pt2")
    assert code == 2 and "no ONNX file" in err
    code, _, err = run(
        capsys,
        "verify",
        files / "broken.onnx",
        "--reference",
        files / "model.pt2",
        "--providers",
        "tpu",
    )
    assert code == 2 and "--providers" in err


def test_verify_on_sample_data(files, capsys) -> None:
    data = files / "samples.pt"
    torch.save(torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(3)), data)
    code, text, err = run(
        capsys,
        "verify",
        files / "broken.onnx",
        "--reference",
        files / "model.pt2",
        "--data",
        data,
        "--batches",
        "2",
        "--batch-size",
        "4",
        "--random-batches",
        "none",
        "--json",
        "-",
    )
    assert code == 1, err  # the broken ONNX fails on the sample data too
    inputs = json.loads(text)["verification"]["inputs"]
    assert [(i["source"], i["batch_size"]) for i in inputs] == [("sample", 4), ("sample", 4)]


def test_verify_exits_1_when_a_candidate_cannot_run_an_input_the_original_runs(
    files, capsys
) -> None:
    """An ONNX file exported with a fixed batch of 2, verified on batches of 4: no output is
    compared, and that is a failed verification (exit 1) with ONNX Runtime's own reason."""
    fixed = files / "fixed.onnx"
    bnfold.export_onnx(ready(ConvNet()), image(), fixed, dynamic_batch=False)
    data = files / "samples4.pt"
    torch.save(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(4)), data)
    code, _, err = run(
        capsys,
        "verify",
        fixed,
        "--reference",
        files / "model.pt2",
        "--data",
        data,
        "--batch-size",
        "4",
        "--random-batches",
        "none",
    )
    assert code == 1, err
    assert "the original runs this input, this candidate does not" in err
    assert "Expected: 2" in err
