"""Smoke test of benchmarks/recalibrate_bench.py at tiny sizes (the numbers are not checked,
except that bnfold is exact where update_bn is not)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "recalibrate_bench.py"


def _load(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("recalibrate_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "recalibrate_bench", bench)  # dataclasses look it up
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_runs_and_prints_a_table(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = _load(monkeypatch)
    rows = bench.main(["--smoke"])
    table = capsys.readouterr().out
    assert "| model |" in table and "throughput ratio, longer run" in table
    (row,) = rows
    assert row.long_batches == 2 * row.batches and row.long_throughput_ratio is not None
    assert row.long_throughput_ratio > 0
    assert row.bnfold_var_error < 1e-5 < 1e-2 < row.update_bn_var_error
    assert row.bnfold_peak_mb >= 0 and row.memory_ratio > 0


def test_a_model_is_measured_in_a_fresh_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """What several models' runs use: the child measures the case and hands its row back."""
    bench = _load(monkeypatch)
    args = argparse.Namespace(
        repeat=1, batches=3, long=0, sizes="4,3", device="cpu", threads=1, smoke=True
    )
    row = bench.in_fresh_process(0, args)
    assert row.model == bench.SMOKE_CASES[0].name
    assert row.batches == 3 and row.long_batches == 6  # --smoke sizes
    assert row.bnfold_var_error < 1e-5 < 1e-2 < row.update_bn_var_error
