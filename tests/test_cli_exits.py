"""Honest exits and outputs: exit 1 only for a failed verification, one ``error:`` line for
anything else, JSON alone on stdout, saved programs with a dynamic batch, messages that name
the real problem, and what was written when a later stage fails."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from bnfold_cli.main import main
from exit_models import MODULE, run

import bnfold
from bnfold import pipeline


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------ exit codes


@pytest.mark.parametrize("factory, code", [("exits_zero", 0), ("exits_two", 2)])
def test_a_factory_calling_sys_exit_is_an_error_not_its_exit_code(capsys, models, factory, code):
    status, out, err = run(capsys, "fold", f"{MODULE}:{factory}", "--input-shape", "2x3x8x8")
    assert status == 3 and out == ""
    line = one_error_line(err)
    assert f"{MODULE}:{factory} called sys.exit({code}) while building the model" in line


@pytest.mark.parametrize(
    "attribute, exception, stage",
    [
        ("fold", KeyError("boom"), "folding failed: KeyError: 'boom'"),
        ("fold", MemoryError(), "folding failed: MemoryError (out of memory"),
        ("export_onnx", zipfile.BadZipFile("bad header"), "exporting"),
    ],
)
def test_an_unexpected_exception_is_one_line_naming_the_stage_and_exit_3(
    capsys, models, monkeypatch, tmp_path, attribute, exception, stage
):
    def fail(*args, **kwargs):
        raise exception

    monkeypatch.setattr(pipeline, attribute, fail)
    argv = [
        "fold",
        f"{MODULE}:build",
        "--input-shape",
        "2x3x8x8",
        "-o",
        tmp_path / "out.pt2",
        "--onnx",
        tmp_path / "out.onnx",
    ]
    status, _, err = run(capsys, *argv)
    assert status == 3
    line = one_error_line(err)
    assert stage in line and "--debug" in line and "Traceback" not in err
    status, _, err = run(capsys, *argv, "--force", "--debug")
    assert status == 3 and "Traceback" in err and type(exception).__name__ in err
    assert err.strip().splitlines()[-1].startswith("error: ")


def test_an_example_input_larger_than_memory_is_refused_before_allocating(
    capsys, models, monkeypatch
):
    monkeypatch.setattr("bnfold.io.inputs._physical_memory", lambda: 8 * 10**9)
    status, _, err = run(capsys, "fold", f"{MODULE}:build", "--input-shape", "100000x3x224x224")
    assert status == 3
    line = one_error_line(err)
    assert "needs 60.2 GB, more than this machine's 8.0 GB" in line


def test_an_input_that_cannot_be_allocated_is_one_line(capsys, models, monkeypatch):
    real_randn = torch.randn

    def randn(*args, **kwargs):  # what torch's allocator raises when the kernel says no
        shape = args[0] if args else kwargs["size"]
        if torch.Size(shape).numel() > 10**9:
            raise RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to "
                "allocate 60211200000 bytes"
            )
        return real_randn(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", randn)
    monkeypatch.setattr("bnfold.io.inputs._physical_memory", lambda: None)  # unknown: try it
    status, _, err = run(capsys, "fold", f"{MODULE}:build", "--input-shape", "100000x3x224x224")
    assert status == 3
    assert "cannot allocate the example input 100000x3x224x224 float32" in one_error_line(err)


def test_a_failed_verification_is_still_exit_1(capsys, models, monkeypatch, tmp_path):
    def wrong(module, *args, **kwargs):  # a fold that forgets the folded bias
        result = real_fold(module, *args, **kwargs)
        with torch.no_grad():
            result.model[0].bias.zero_()
        return result

    real_fold = pipeline.fold
    monkeypatch.setattr(pipeline, "fold", wrong)
    status, _, err = run(
        capsys,
        "fold",
        f"{MODULE}:build",
        "--input-shape",
        "2x3x8x8",
        "-o",
        tmp_path / "out.pt2",
        "--verify",
    )
    assert status == 1 and "verification failed" in one_error_line(err)


# ------------------------------------------------------------------ --json -


def test_json_on_stdout_is_the_json_alone_whatever_the_model_prints(capfd, models, tmp_path):
    capfd.readouterr()
    stdout = sys.stdout
    for factory, who in (("prints", "factory"), ("prints_in_forward", "forward")):
        with pytest.raises(SystemExit) as caught:
            main(
                [
                    "fold",
                    f"{MODULE}:{factory}",
                    "--input-shape",
                    "2x3x8x8",
                    "--verify",
                    "-o",
                    str(tmp_path / f"{factory}.pt2"),
                    "--json",
                    "-",
                ]
            )
        ctypes.CDLL(None).fflush(None)  # anything C stdio still held would land now
        out, err = capfd.readouterr()
        assert caught.value.code == 0, err
        report = json.loads(out)  # nothing but the JSON
        assert report["command"] == "fold" and report["verification"]["passed"]
        assert f"{who}: print" in err and f"{who}: os.write to fd 1" in err
        if who == "factory":
            assert "factory: C printf" in err
    assert sys.stdout is stdout  # both restored afterwards
    os.write(1, b"after the command\n")
    assert capfd.readouterr().out == "after the command\n"


def test_json_on_stdout_in_a_fresh_process_and_no_torch_noise(models, tmp_path):
    """The real process: fd 1, torch's log lines and warnings (a channels_last model, a batch-1
    example, an ONNX export)."""
    command = [
        sys.executable,
        "-m",
        "bnfold_cli.main",
        "fold",
        f"{MODULE}:channels_last",
        "--input-shape",
        "1x3x8x8",
        "-o",
        "out.pt2",
        "--onnx",
        "out.onnx",
        "--verify",
        "--json",
        "-",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verification"]["passed"]
    assert done.stderr == "", done.stderr  # no warning, no torch log line


# ------------------------------------------------------------------ dynamic batch


def test_a_batch_1_input_shape_saves_a_program_that_runs_any_batch(capsys, models, tmp_path):
    out = tmp_path / "out.pt2"
    status, text, err = run(
        capsys, "fold", f"{MODULE}:build", "--input-shape", "1x3x8x8", "-o", out
    )
    assert status == 0, err
    assert "dynamic dims kept: input 0 dim 0" in text
    program = torch.export.load(str(out))
    folded = program.module()
    original = models.build()
    for batch in (1, 3, 4):
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(folded(x), original(x), rtol=1e-4, atol=1e-5)


def test_a_model_that_fixes_the_batch_is_saved_static_and_the_report_says_why(
    capsys, models, tmp_path
):
    out = tmp_path / "out.pt2"
    status, _, err = run(
        capsys,
        "fold",
        f"{MODULE}:batch_one_only",
        "--input-shape",
        "1x3x8x8",
        "-o",
        out,
        "--json",
        tmp_path / "report.json",
    )
    assert status == 0, err
    notes = json.loads((tmp_path / "report.json").read_text())["outputs"][0]["notes"]
    assert any(
        "static shapes (it runs only at 1x3x8x8)" in note and "x.flatten(1)" in note
        for note in notes
    ), notes
    torch.export.load(str(out)).module()(torch.randn(1, 3, 8, 8))


def test_save_model_keeps_the_batch_of_dict_inputs_dynamic(tmp_path, models):
    class DictInput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = models.build()

        def forward(self, inputs):
            return self.body(inputs["image"])

    model = DictInput().eval()
    saved = bnfold.save_model(
        model, tmp_path / "dict.pt2", example_inputs=({"image": torch.randn(1, 3, 8, 8)},)
    )
    assert saved.notes[0].startswith("dynamic dims kept: input 0 dim 0")
    loaded = torch.export.load(str(tmp_path / "dict.pt2")).module()
    for batch in (1, 3, 4):
        assert loaded({"image": torch.randn(batch, 3, 8, 8)}).shape[0] == batch


# ------------------------------------------------------------------ messages


def test_a_meta_device_model_is_said_to_have_no_data(capsys, models):
    status, _, err = run(capsys, "fold", f"{MODULE}:on_meta", "--input-shape", "2x3x8x8")
    assert status == 3
    line = one_error_line(err)
    assert "has no data" in line and "meta device" in line
    assert "input shape" not in line


def test_nan_statistics_are_named_and_not_blamed_on_a_trace_trap(models):
    plan = bnfold.find_pairs(models.nan_stats(), torch.randn(2, 3, 8, 8))
    assert plan.method == "fx"  # the trace reproduces the model, NaN included
    assert not any("isinstance" in note or "could not read" in note for note in plan.notes)
    (skip,) = plan.skipped
    assert skip.bn == "1" and skip.reason is bnfold.SkipReason.NON_FINITE
    assert "running_var is not finite in 1 of 8 channels" in skip.detail
    assert "recalibrate" in skip.detail


def test_a_failure_after_the_model_was_written_says_what_was_written(capsys, models, tmp_path):
    out, onnx = tmp_path / "out.pt2", tmp_path / "out.onnx"
    status, _, err = run(
        capsys,
        "fold",
        f"{MODULE}:batch_two_only",
        "--input-shape",
        "2x3x8x8",
        "-o",
        out,
        "--onnx",
        onnx,
    )
    assert status == 3
    line = one_error_line(err)
    assert "specialised the batch dimension" in line  # the ONNX export failed...
    assert "No ONNX file was written" in line and "Nothing was written" not in line
    assert f"already written, complete: {out}" in line  # ...after the .pt2 was written
    assert out.is_file() and not onnx.exists()


def test_recalibrate_and_export_name_what_they_wrote_when_a_later_stage_fails(
    capsys, models, monkeypatch, tmp_path
):
    def fail(*args, **kwargs):
        raise RuntimeError("the plot failed on purpose")

    monkeypatch.setattr("bnfold.calibrate.plot.plot_shifts", fail)
    torch.save(torch.randn(8, 3, 8, 8), tmp_path / "samples.pt")
    out = tmp_path / "recal.pt2"
    status, _, err = run(
        capsys,
        "recalibrate",
        f"{MODULE}:build",
        "--data",
        tmp_path / "samples.pt",
        "-o",
        out,
        "--plot",
        tmp_path / "plot.png",
    )
    line = one_error_line(err)
    assert status == 3 and "writing the report failed: RuntimeError" in line
    assert f"already written, complete: {out}" in line and out.is_file()

    def no_verification(*args, **kwargs):
        raise bnfold.ModelInputError("the reference model failed on input #1")

    monkeypatch.setattr(pipeline, "verify", no_verification)
    onnx = tmp_path / "model.onnx"
    status, _, err = run(
        capsys, "export", f"{MODULE}:build", "--input-shape", "2x3x8x8", "--onnx", onnx, "--verify"
    )
    line = one_error_line(err)
    assert status == 3 and "the reference model failed" in line
    assert f"already written, complete: {onnx}" in line and onnx.is_file()


def test_bn_relu_conv_is_kept_as_non_affine_between_naming_the_relu():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 1))
    (skip,) = bnfold.find_pairs(model.eval(), torch.randn(2, 3, 8, 8)).skipped
    assert skip.reason is bnfold.SkipReason.NON_AFFINE_BETWEEN
    assert skip.reason.label == "non-affine op between"
    assert "feeds 1 (ReLU), which feeds 2 (Conv2d)" in skip.detail


# ------------------------------------------------------------------ text widths

DEEP_BN = "encoder_stage_three.residual_block_seven.batch_normalisation_with_a_long_name"
DEEP_CONV = "encoder_stage_three.residual_block_seven.convolution_with_a_long_name"


def test_piped_output_prints_whole_names_and_honours_columns(capsys, models, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    status, out, err = run(capsys, "inspect", f"{MODULE}:deep", "--input-shape", "2x3x8x8")
    assert status == 0, err
    row = next(line for line in out.splitlines() if line.startswith(DEEP_BN))
    assert DEEP_CONV in row and "…" not in out  # not a terminal, no COLUMNS: nothing wrapped
    monkeypatch.setenv("COLUMNS", "80")
    status, out, err = run(capsys, "inspect", f"{MODULE}:deep", "--input-shape", "2x3x8x8")
    assert status == 0, err
    assert max(len(line) for line in out.splitlines()) <= 80, out
    row = next(line for line in out.splitlines() if "conv→bn" in line)
    bn, _, layer = [cell.strip() for cell in row.split("   ") if cell.strip()][:3]
    assert bn.startswith("…") and DEEP_BN.endswith(bn[1:])
    assert layer.startswith("…") and DEEP_CONV.endswith(layer[1:])
    kept = next(line for line in out.splitlines() if line.startswith("decoder_bn"))
    assert "no adjacent" in kept
