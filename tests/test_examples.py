"""Every script in examples/ runs as a user would run it (a subprocess of this Python), exits as
documented, prints its key lines, and writes only into the folder given by --out.

The runs are started together by one module fixture (they are independent processes), so the
module costs about as long as the slowest example on two cores rather than their sum.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TIMEOUT = 300
# Several examples run at once: one thread each, so they share the cores instead of fighting.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    out: Path  # the --out folder
    cwd: Path  # the working directory, which must stay empty

    def check(self, code: int = 0) -> None:
        assert self.code == code, (
            f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )
        assert list(self.cwd.iterdir()) == [], "an example wrote into the working directory"


# name -> (script, extra arguments)
RUNS = {
    "fold_and_save": ("fold_and_save.py", []),
    "recalibrate": ("recalibrate_after_finetuning.py", []),
    "ci_gate": ("export_and_verify_ci_gate.py", []),
    "ci_gate_bug": ("export_and_verify_ci_gate.py", ["--simulate-bug"]),
    "custom_blocks": ("custom_blocks.py", []),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("examples")
    started = {}
    for name, (script, extra) in RUNS.items():
        out, cwd = root / name / "out", root / name / "cwd"
        cwd.mkdir(parents=True)
        command = [sys.executable, str(EXAMPLES / script), "--out", str(out), *extra]
        process = subprocess.Popen(
            command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started[name] = (process, out, cwd)
    results = {}
    for name, (process, out, cwd) in started.items():
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        results[name] = Run(process.returncode, stdout, stderr, out, cwd)
    return results


def test_every_example_is_tested() -> None:
    scripts = {path.name for path in EXAMPLES.glob("*.py")}
    assert scripts == {script for script, _ in RUNS.values()}


def test_fold_and_save(runs: dict[str, Run]) -> None:
    run = runs["fold_and_save"]
    run.check()
    assert "plan: 5 of 6 BatchNorms foldable; 1 skipped: 1 zero-padded BN→Conv" in run.stdout
    assert "keep input_norm: zero_padding" in run.stdout
    assert "what to do: " in run.stdout
    assert "batch-norm kernels per forward: 6 -> 1" in run.stdout
    assert "OK: the saved folded model computes what the original computes" in run.stdout
    assert (run.out / "model.folded.pt2").is_file()


def _accuracy(text: str, label: str) -> float:
    match = re.search(label + r".*?accuracy ([\d.]+)%", text)
    assert match, f"no '{label}' accuracy line in:\n{text}"
    return float(match.group(1)) / 100


def test_recalibrate_after_finetuning(runs: dict[str, Run]) -> None:
    run = runs["recalibrate"]
    run.check()
    stale = _accuracy(run.stdout, "fine-tuned on the new camera")
    recovered = _accuracy(run.stdout, "after bnfold.recalibrate")
    folded = _accuracy(run.stdout, "fold: ")
    assert stale < recovered - 0.10  # the drop, and the recovery
    assert recovered > 0.95
    assert folded == recovered
    assert "recalibrated 5 of 5 BatchNorms" in run.stdout
    assert "fold: folded 5 of 5 BatchNorms" in run.stdout
    assert (run.out / "recalibrated.folded.pt2").is_file()


def test_ci_gate_passes(runs: dict[str, Run]) -> None:
    run = runs["ci_gate"]
    run.check()
    assert "GATE PASSED: verification PASSED" in run.stdout
    assert re.search(r"onnx:ort-cpu\s+passed", run.stdout)
    assert re.search(r"onnx:ort-cpu-noopt\s+passed", run.stdout)
    assert re.search(r"folded:torch-cpu\s+passed", run.stdout)
    assert (run.out / "model.onnx").is_file()
    report = json.loads((run.out / "verification.json").read_text())
    assert report["passed"] is True


def test_ci_gate_fails_on_a_wrong_fold(runs: dict[str, Run]) -> None:
    run = runs["ci_gate_bug"]
    run.check(code=1)
    assert "GATE FAILED: verification failed" in run.stderr
    assert "first diverging layer: block1.0" in run.stderr
    assert "GATE PASSED" not in run.stdout
    assert json.loads((run.out / "verification.json").read_text())["passed"] is False


def test_custom_blocks(runs: dict[str, Run]) -> None:
    run = runs["custom_blocks"]
    run.check()
    text = run.stdout
    assert "stem_bn: BatchNormAct2d" in text
    assert "FOLD into stem (conv→bn, subclass)" in text
    for bn, reason in [
        ("res_bn", "producer_fanout"),
        ("shared_bn_a", "producer_shared"),
        ("shared_bn_b", "producer_shared"),
        ("pre_bn", "non_affine_between"),
        ("ws_bn", "unsupported_forward"),
    ]:
        assert re.search(rf"^{bn}: .*\n  KEEP: {reason} ", text, re.MULTILINE), bn
    assert text.count("why/what to do: ") == 5
    assert "batch-norm kernels per forward: 6 -> 5" in text
    assert "(its ReLU is kept)" in text
    plan = json.loads((run.out / "plan.json").read_text())
    assert (len(plan["pairs"]), len(plan["skipped"])) == (1, 5)
