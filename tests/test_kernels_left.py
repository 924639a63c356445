"""benchmarks/kernels_left.py: a short run names the bnfold it measured, counts each model's
batch norms before and after folding, and totals them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("monai")  # the script lists the MONAI suite's models

import bnfold

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels_left.py"


def test_short_run_counts_and_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("kernels_left", SCRIPT)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script appends tests/ to it
    spec.loader.exec_module(script)
    out_json = tmp_path / "left.json"
    rows = script.main(["--models", "repvgg", "shared_conv", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert f"from {bnfold.__file__}" in out
    by_name = {row["model"]: row for row in rows}
    assert by_name["shared_conv"]["bn_before"] == by_name["shared_conv"]["bn_left"] == 2
    assert by_name["shared_conv"]["skips"] == {"producer_shared": 2}
    assert by_name["repvgg"]["bn_before"] == 3
    left = sum(row["bn_left"] for row in rows)
    assert f"| **total all** (2 models) | | | 5 | {left} | |" in out
    assert json.loads(out_json.read_text())["rows"] == json.loads(json.dumps(rows))
