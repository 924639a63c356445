"""``--no-merge-branches`` on the commands that fold (and inspect): blocks of parallel branches
are merged by default and kept apart with the flag."""

from __future__ import annotations

import json
import sys

import pytest
from bnfold_cli.main import main

MODULE = "branchy_models"
SOURCE = """
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.dense(x) + self.one(x) + self.identity(x))


def build():
    return nn.Sequential(Block(), Block()).eval()
"""


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop(MODULE, None)
    yield f"{MODULE}:build"
    sys.modules.pop(MODULE, None)


def _json(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as caught:
        main([*args, "--input-shape", "2x8x9x9", "--json", "-"])
    out, err = capsys.readouterr()
    assert caught.value.code == 0, err
    return json.loads(out)


def test_fold_merges_branches_by_default(capsys, factory):
    report = _json(capsys, "fold", factory, "--dry-run")
    assert len(report["plan"]["merges"]) == 2 and not report["plan"]["skipped"]
    assert len(report["fold"]["merges"]) == 2
    assert report["bn_kernels"] == {"before": 6, "after": 0}
    assert "2 branch blocks merged into one conv each" in report["summary"]
    assert {p["pattern"] for p in report["plan"]["pairs"]} == {"branches→conv"}


@pytest.mark.parametrize("command", ["fold", "inspect"])
def test_no_merge_branches_keeps_the_blocks(capsys, factory, command):
    extra = ("--dry-run",) if command == "fold" else ()
    report = _json(capsys, command, factory, "--no-merge-branches", *extra)
    assert not report["plan"]["merges"]
    assert [s["reason"] for s in report["plan"]["skipped"]] == ["branch_merge_off"] * 2
    if command == "fold":
        assert report["bn_kernels"] == {"before": 6, "after": 2}


@pytest.mark.parametrize("command", ["fold", "export", "inspect"])
def test_help_names_the_flag(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--no-merge-branches" in capsys.readouterr().out


def test_text_report_lists_the_merged_blocks(capsys, factory):
    with pytest.raises(SystemExit) as caught:
        main(["fold", factory, "--dry-run", "--input-shape", "2x8x9x9"])
    out = capsys.readouterr().out
    assert caught.value.code == 0
    assert "0.dense.0→0.dense.1 + 0.one.0→0.one.1 + 0.identity → 0.merged (Conv2d 3x3)" in out
    assert "branches→conv" in out


def test_markdown_report_lists_the_merged_blocks(capsys, factory, tmp_path):
    with pytest.raises(SystemExit) as caught:
        main(["inspect", factory, "--input-shape", "2x8x9x9", "--markdown", "report.md"])
    assert caught.value.code == 0, capsys.readouterr().err
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "- merged: 0.dense.0→0.dense.1 + 0.one.0→0.one.1 + 0.identity → 0.merged" in text
    assert "branches→conv" in text
