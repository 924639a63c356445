"""The ``bnfold`` command: inspect and fold end to end, outputs, reports, exit codes, errors."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
import time

import pytest
import torch
from bnfold_cli.main import main
from model_files import USER_MODULE, MarkerOnLoad, install_user_module

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def user(tmp_path, monkeypatch):
    package = tmp_path / "userpkg"
    package.mkdir()
    install_user_module(package)
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop(USER_MODULE, None)
    yield importlib.import_module(USER_MODULE)
    sys.modules.pop(USER_MODULE, None)


@pytest.fixture
def pt2(tmp_path, user):
    path = tmp_path / "model.pt2"
    program = torch.export.export(user.build(), (X,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, path)
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run ``bnfold ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as caught:
        main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return caught.value.code, out, err


# ------------------------------------------------------------------ help


HELP_PROBE = """
import sys, time
start = time.perf_counter()
from bnfold_cli.main import main
for argv in (["--help"], ["fold", "--help"], ["inspect", "--help"]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
loaded = sorted(name for name in ("torch", "numpy", "rich", "bnfold") if name in sys.modules)
print("LOADED", loaded, time.perf_counter() - start)
"""


def test_help_does_not_import_torch_and_is_fast():
    probe = subprocess.run(
        [sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr
    assert "LOADED []" in probe.stdout, probe.stdout
    assert "Exit codes:" in probe.stdout and "--input-shape" in probe.stdout
    script = shutil.which("bnfold")
    if script:
        start = time.perf_counter()
        subprocess.run([script, "--help"], capture_output=True, check=True, timeout=60)
        elapsed = time.perf_counter() - start
        print(f"bnfold --help: {elapsed:.3f} s wall")
        assert elapsed < 5, "bnfold --help should take well under a second on an idle machine"


# ------------------------------------------------------------------ fold


def test_fold_pt2_writes_beside_input_and_reports(tmp_path, capsys, pt2):
    code, out, err = run(
        capsys,
        "fold",
        pt2,
        "--json",
        tmp_path / "report.json",
        "--markdown",
        tmp_path / "report.md",
    )
    assert code == 0, err
    output = tmp_path / "model.folded.pt2"
    assert output.is_file()
    assert "folded 3 of 3 BatchNorms" in out and f"Wrote {output}" in out
    assert "BN kernels per forward: 3 → 0" in out and "\x1b[" not in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["command"] == "fold" and report["bn_kernels"] == {"before": 3, "after": 0}
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["bnfold"]
    assert report["outputs"][0]["path"] == str(output) and report["model"]["format"] == "pt2"
    assert report["inputs"] == [{"shape": [2, 3, 8, 8], "dtype": "float32"}]
    assert "| `bn1` |" in (tmp_path / "report.md").read_text()
    folded = torch.export.load(output).module()
    with torch.no_grad():
        torch.testing.assert_close(folded(X), torch.export.load(pt2).module()(X))


def test_fold_refuses_to_overwrite_without_force_and_never_the_input(tmp_path, capsys, pt2):
    output = tmp_path / "model.folded.pt2"
    output.write_bytes(b"an older fold")
    code, _, err = run(capsys, "fold", pt2)
    assert code == 2 and "--force" in err and "Traceback" not in err
    assert output.read_bytes() == b"an older fold"
    code, _, err = run(capsys, "fold", pt2, "--force")
    assert code == 0 and output.read_bytes() != b"an older fold"
    before = pt2.read_bytes()
    code, _, err = run(capsys, "fold", pt2, "-o", pt2, "--force")
    assert code == 2 and "never overwrites its input" in err
    assert pt2.read_bytes() == before


def test_fold_output_errors_are_usage_errors_and_write_nothing(tmp_path, capsys, pt2):
    code, _, err = run(capsys, "fold", pt2, "-o", tmp_path / "missing" / "out.pt2")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "fold", pt2, "-o", tmp_path / "out.onnx")
    assert code == 2 and "output format" in err
    code, _, err = run(capsys, "fold", pt2, "-o", tmp_path / "out.pt")
    assert code == 2 and "pickled module" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "userpkg"]


def test_dry_run_and_json_to_stdout_write_no_model(tmp_path, capsys, pt2):
    code, out, _ = run(capsys, "fold", pt2, "--dry-run")
    assert code == 0 and "Dry run" in out and "would write" in out
    code, out, _ = run(capsys, "fold", pt2, "--dry-run", "--json", "-")
    report = json.loads(out)
    assert code == 0 and report["dry_run"] is True and report["outputs"] == []
    assert not (tmp_path / "model.folded.pt2").exists()


def test_markdown_to_stdout_is_the_markdown_alone(tmp_path, capsys, pt2):
    code, out, _ = run(capsys, "inspect", pt2, "--markdown", "-")
    assert code == 0 and out.startswith("### bnfold inspect") and "\n| " in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "userpkg"]
    code, out, err = run(capsys, "inspect", pt2, "--markdown", "-", "--json", "-")
    assert code == 2 and "both write to stdout" in err and not out


def test_dry_run_notes_an_existing_output_instead_of_refusing(tmp_path, capsys, pt2):
    existing = tmp_path / "model.folded.pt2"
    existing.write_bytes(b"keep me")
    code, out, _ = run(capsys, "fold", pt2, "--dry-run")
    assert code == 0 and "exists: a real run needs --force" in " ".join(out.split())
    assert existing.read_bytes() == b"keep me"
    code, _, err = run(capsys, "fold", pt2)
    assert code == 2 and "--force" in err and existing.read_bytes() == b"keep me"


def test_fold_pickled_module_with_trust_writes_pickle_and_pt2(tmp_path, capsys, user):
    torch.save(user.build(), tmp_path / "net.pth")
    code, _, err = run(capsys, "fold", tmp_path / "net.pth")
    assert code == 3 and "--trust-pickle" in err and "runs code" in err
    code, out, err = run(
        capsys, "fold", tmp_path / "net.pth", "--trust-pickle", "--pt2", "--input-shape", "2x3x8x8"
    )
    assert code == 0, err
    assert (tmp_path / "net.folded.pth").is_file() and (tmp_path / "net.folded.pt2").is_file()
    assert out.index("net.folded.pt2") < out.index("net.folded.pth")


def test_fold_state_dict_with_arch_and_inspect_factory(tmp_path, capsys, user):
    torch.save(user.build().state_dict(), tmp_path / "weights.pt")
    args = ("--input-shape", "2x3x8x8")
    code, _, err = run(capsys, "fold", tmp_path / "weights.pt", *args)
    assert code == 2 and "--arch" in err
    code, out, err = run(
        capsys, "fold", tmp_path / "weights.pt", "--arch", f"{USER_MODULE}:Net", *args
    )
    assert code == 0, err
    assert (tmp_path / "weights.folded.pt2").is_file()
    code, out, err = run(capsys, "inspect", f"{USER_MODULE}:build", *args, "--json", "-")
    report = json.loads(out)
    assert code == 0 and report["command"] == "inspect"
    assert report["plan"]["bn_total"] == 3 and report["bn_kernels"]["before"] == 3


# ------------------------------------------------------------------ errors and exit codes


def test_usage_errors_exit_2(capsys, user):
    code, _, err = run(capsys, "inspect", f"{USER_MODULE}:build", "--input-shape", "2xthree")
    assert code == 2 and "not a shape" in err
    code, _, err = run(capsys, "inspect", f"{USER_MODULE}:build")
    assert code == 2 and "--input-shape" in err


def test_load_errors_exit_3_without_traceback_and_debug_shows_it(tmp_path, capsys, user):
    code, _, err = run(capsys, "inspect", tmp_path / "nope.pt2")
    assert code == 3 and err.startswith("error:") and "no such file" in err
    assert "Traceback" not in err
    code, _, err = run(capsys, "inspect", "no_such_pkg_xyz:build", "--input-shape", "1x3")
    assert code == 3 and "cannot import module 'no_such_pkg_xyz'" in err
    for argv in (
        ("inspect", tmp_path / "nope.pt2", "--debug"),
        ("--debug", "inspect", tmp_path / "nope.pt2"),
    ):
        code, _, err = run(capsys, *argv)  # the traceback, then the same line and exit code
        assert code == 3 and "Traceback" in err and "LoadError" in err
        assert err.rstrip().splitlines()[-1].startswith("error:") and "no such file" in err


def test_rejected_input_shape_names_the_layer(capsys, user):
    code, _, err = run(capsys, "fold", f"{USER_MODULE}:build", "--input-shape", "2x4x8x8")
    assert code == 3 and "layer 'conv1' (Conv2d)" in err and "2x4x8x8 float32" in err


def test_hostile_pickle_is_refused_and_not_executed(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    torch.save({"w": torch.ones(1), "x": MarkerOnLoad(marker)}, tmp_path / "evil.pt")
    code, _, err = run(
        capsys, "fold", tmp_path / "evil.pt", "--arch", "torch.nn:Identity", "--input-shape", "1x3"
    )
    assert code == 3 and "runs code from the file" in err
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]


def test_fold_onnx_and_verify_exit_0_then_1_when_outputs_differ(tmp_path, capsys, pt2, monkeypatch):
    code, out, err = run(
        capsys,
        "fold",
        pt2,
        "--onnx",
        tmp_path / "m.onnx",
        "--verify",
        "--json",
        tmp_path / "r.json",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["export"]["path"] == str(tmp_path / "m.onnx") and report["verification"]["passed"]
    assert "verification PASSED" in out

    from bnfold import pipeline

    real_fold = pipeline.fold

    def broken_fold(model, inputs, **kwargs):
        result = real_fold(model, inputs, **kwargs)
        with torch.no_grad():
            result.model.conv1.weight.mul_(1.5)  # a wrong fold
        return result

    monkeypatch.setattr(pipeline, "fold", broken_fold)
    code, out, err = run(capsys, "fold", pt2, "--verify", "--dry-run", "--force")
    assert code == 1, err
    assert "verification FAILED" in out and err.startswith("error:")
    code, out, err = run(
        capsys, "fold", pt2, "-o", tmp_path / "same.onnx", "--onnx", tmp_path / "same.onnx"
    )
    assert code == 2
