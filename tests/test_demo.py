"""`bnfold demo`: stale statistics drop accuracy, recalibration restores it, fold + export +
verify pass, files land in --out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_shows_the_whole_story(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    report = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bnfold_cli.main", "demo", "--out", str(out), "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[5/5] exporting to ONNX" in proc.stderr
    assert "eval accuracy dropped" in proc.stdout
    assert "folded 4 of 6 BatchNorms" in proc.stdout
    assert "verification PASSED" in proc.stdout
    assert (out / "demo.onnx").is_file()
    data = json.loads(report.read_text())
    assert data["accuracy_stale"] < data["accuracy_train_mode"] - 0.2  # the drop
    assert data["accuracy_recalibrated"] > data["accuracy_train_mode"] - 0.03  # the recovery
    assert abs(data["accuracy_folded"] - data["accuracy_recalibrated"]) < 0.01
    assert data["bn_kernels_before"] == 6 and data["bn_kernels_after"] == 2
    assert {s["reason"] for s in data["fold"]["skipped"]} == {"no_producer", "non_affine_between"}
