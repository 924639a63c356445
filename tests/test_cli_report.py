"""Golden-file tests of the report renderings (text table, JSON, Markdown) on hand-built records.

The records are fixed here, so the goldens change only when the rendering does. To accept a
deliberate change: ``BNFOLD_UPDATE_GOLDEN=1 pytest tests/test_cli_report.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bnfold import CalibrationReport
from bnfold.io.models import ModelFormat, SavedModel
from bnfold.jobs import Report
from bnfold.records import BnKind, FoldedPair, FoldResult, Pair, Plan, Skip, SkipReason
from bnfold.report import render_json, render_markdown, render_text

GOLDEN = Path(__file__).parent / "golden"
VERSIONS = {"bnfold": "X.Y.Z", "torch": "X.Y.Z", "python": "X.Y.Z"}
MODEL = {
    "format": "pt2",
    "source": "models/resnet.pt2",
    "arch": None,
    "dynamic_dims": [[0]],
    "notes": ["rebuilt layer modules from the program's aten graph: 3 BatchNorm2d, 3 Conv2d"],
}
INPUTS = [{"shape": [2, 3, 64, 64], "dtype": "float32"}]


def _pair(bn: str, producer: str, pattern: str = "conv→bn") -> Pair:
    return Pair(
        bn=bn,
        bn_type="BatchNorm2d",
        bn_kind=BnKind.MODULE,
        producer=producer,
        producer_type="Conv2d",
        pattern=pattern,
        channels=64,
    )


PAIRS = (
    _pair("bn1", "conv1"),
    _pair("layer1.0.bn1", "layer1.0.conv1"),
    _pair("stem.bn0", "stem.conv", pattern="bn→conv"),
)
SKIPS = (
    Skip(
        bn="layer1.0.bn2",
        bn_type="BatchNorm2d",
        reason=SkipReason.PRODUCER_FANOUT,
        detail="layer1.0.conv2's output also feeds add_1",
        producer="layer1.0.conv2",
        pattern="conv→bn",
    ),
    Skip(
        bn="head.norm",
        bn_type="BatchNorm2d",
        reason=SkipReason.ZERO_PADDING,
        detail="head.conv pads with zeros (padding=1)",
        producer="head.conv",
        pattern="bn→conv",
    ),
)
PLAN = Plan(pairs=PAIRS, skipped=SKIPS, method="fx", model_was_training=False)
RESULT = FoldResult(
    model=None,
    plan=PLAN,
    folded=(
        FoldedPair(PAIRS[0], max_abs_scale=1.74, min_running_var=0.51),
        FoldedPair(
            PAIRS[1],
            max_abs_scale=31622.8,
            min_running_var=1e-9,
            notes=(
                "large scale 3.16e+04 (tiny running_var): weight rounding error is amplified by "
                "this factor",
            ),
        ),
        FoldedPair(PAIRS[2], max_abs_scale=0.5, min_running_var=4.0),
    ),
    skipped=SKIPS,
    graph_rewritten=False,
    inplace=False,
)


def _inspect_report() -> Report:
    return Report(
        command="inspect",
        versions=VERSIONS,
        model=MODEL,
        inputs=INPUTS,
        inputs_from="the program's example inputs",
        plan=PLAN,
        bn_kernels_before=5,
    )


def _fold_report() -> Report:
    output = SavedModel(
        path="models/resnet.folded.pt2",
        format=ModelFormat.EXPORTED_PROGRAM,
        bytes=102_571_480,
        notes=("dynamic dims kept: input 0 dim 0",),
    )
    return Report(
        command="fold",
        versions=VERSIONS,
        model=MODEL,
        inputs=INPUTS,
        inputs_from="the program's example inputs",
        plan=PLAN,
        result=RESULT,
        bn_kernels_before=5,
        bn_kernels_after=2,
        outputs=(output,),
    )


CASES = {
    "inspect.txt": lambda: render_text(_inspect_report(), width=100),
    "inspect.json": lambda: render_json(_inspect_report()),
    "fold.txt": lambda: render_text(_fold_report(), width=100),
    "fold.json": lambda: render_json(_fold_report()),
    "fold.md": lambda: render_markdown(_fold_report()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rendering_matches_golden(name):
    rendered = CASES[name]()
    path = GOLDEN / name
    if os.environ.get("BNFOLD_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(rendered, encoding="utf-8")
    assert rendered == path.read_text(encoding="utf-8"), f"rendering of {name} changed"


def test_json_report_has_the_promised_content():
    data = json.loads(render_json(_fold_report()))
    assert data["versions"].keys() >= {"bnfold", "torch"}
    assert data["bn_kernels"] == {"before": 5, "after": 2}
    assert data["plan"]["bn_total"] == 5 and len(data["plan"]["pairs"]) == 3
    assert data["fold"]["skipped"][0]["reason"] == "producer_fanout"
    assert "plan" not in data["fold"]
    assert data["outputs"][0]["format"] == "pt2"
    assert (
        data["summary"] == "folded 3 of 5 BatchNorms; 2 left: 1 residual fan-out, "
        "1 zero-padded BN→Conv"
    )


def test_text_is_plain_without_a_terminal_and_coloured_with_one():
    plain = render_text(_fold_report(), width=100, color=False)
    assert "\x1b[" not in plain
    assert "\x1b[" in render_text(_fold_report(), width=100, color=True)


def test_later_stages_reach_json_and_text_after_the_fold():
    calibration = CalibrationReport(layers=(), batches=2, samples=64, world_size=1, seconds=0.5)
    report = Report(
        command="fold",
        versions=VERSIONS,
        model=MODEL,
        inputs=INPUTS,
        inputs_from="--input-shape",
        plan=PLAN,
        result=RESULT,
        calibration=calibration,
    )
    data = json.loads(render_json(report))
    assert data["recalibration"] == json.loads(json.dumps(calibration.to_dict()))
    assert list(data)[-1] == "recalibration"
    text = render_text(report)
    assert calibration.format_text() in text
    assert text.index(RESULT.summary()) < text.index(calibration.summary())


def test_names_with_brackets_are_printed_literally():
    skip = Skip(
        bn="blocks[0]",
        bn_type="BatchNorm2d",
        reason=SkipReason.NO_PRODUCER,
        detail="padding [1, 1]",
    )
    plan = Plan(
        pairs=(),
        skipped=(skip,),
        method="fx",
        model_was_training=False,
        notes=("[bold]not markup[/bold]",),
    )
    report = Report(
        command="inspect",
        versions=VERSIONS,
        model=MODEL,
        inputs=INPUTS,
        inputs_from="--input-shape",
        plan=plan,
    )
    text = render_text(report)
    assert "blocks[0]" in text and "[bold]not markup[/bold]" in text


# ------------------------------------------------------------------ widths

LONG_BN = "encoder.stages.3.residual_blocks.7.batch_normalisation_with_a_long_name"
LONG_CONV = "encoder.stages.3.residual_blocks.7.conv_before_the_norm"
KEPT_BN = "decoder.upsampling_path.4.norm_after_the_skip_connection"


def _long_report() -> Report:
    pair = _pair(LONG_BN, LONG_CONV)
    skip = Skip(
        bn=KEPT_BN,
        bn_type="BatchNorm2d",
        reason=SkipReason.PRODUCER_FANOUT,
        detail="fan-out",
        producer="decoder.upsampling_path.4.conv",
        pattern="conv→bn",
    )
    plan = Plan(pairs=(pair,), skipped=(skip,), method="fx", model_was_training=False)
    result = FoldResult(
        model=None,
        plan=plan,
        folded=(FoldedPair(pair, 1.5, 0.5),),
        skipped=(skip,),
        graph_rewritten=False,
        inplace=False,
    )
    return Report(
        command="fold",
        versions=VERSIONS,
        model=MODEL,
        inputs=INPUTS,
        inputs_from="--input-shape",
        plan=plan,
        result=result,
    )


def _table_rows(text: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("───")) + 1
    rows = []
    for line in lines[start:]:
        if line.startswith("Why BatchNorms"):
            break
        rows.append([cell for cell in line.split("   ") if cell.strip()])
    return rows


def _is_tail(cell: str, full: str) -> bool:
    """``cell`` is ``full``, or "…" and whole trailing segments of ``full``, or "…" and the end
    of its last segment when that alone is longer than the cell."""
    if cell == full:
        return True
    tail, last = cell[1:], full.rsplit(".", 1)[-1]
    whole = full.endswith("." + tail)
    return cell.startswith("…") and (whole or (len(last) > len(tail) and last.endswith(tail)))


@pytest.mark.parametrize("width", [100, 80])
def test_a_narrow_table_shortens_paths_from_the_left_and_never_folds_them(width):
    text = render_text(_long_report(), width=width)
    assert all(len(line) <= width for line in text.splitlines()), text
    rows = _table_rows(text)
    folded, kept = rows[0], rows[1]
    assert _is_tail(folded[0].strip(), LONG_BN) and _is_tail(folded[2].strip(), LONG_CONV)
    assert _is_tail(kept[0].strip(), KEPT_BN)
    assert folded[0].startswith("…") and kept[0].startswith("…")
    for row in rows[2:]:  # only the Reason column may wrap, between its words
        assert len(row) == 1 and row[0].strip() in ("residual", "fan-out"), text


def test_a_table_too_wide_for_the_width_is_printed_wider_rather_than_cut_more():
    text = render_text(_long_report(), width=50)
    rows = _table_rows(text)
    assert all(_is_tail(rows[0][i].strip(), name) for i, name in ((0, LONG_BN), (2, LONG_CONV)))
    assert all(len(rows[0][i].strip()) >= 12 for i in (0, 2))  # MIN_PATH_WIDTH


def test_without_a_width_names_are_printed_whole_and_nothing_wraps():
    text = render_text(_long_report(), width=None)
    assert "…" not in text
    assert any(line.startswith(LONG_BN) and LONG_CONV in line for line in text.splitlines())
    assert any(
        line.startswith(KEPT_BN) and "residual fan-out" in line for line in text.splitlines()
    )
