"""All rendering: the text report, the JSON document and Markdown, from a run's records.

``render_text``, ``render_json`` and ``render_markdown`` take a ``bnfold.jobs.Report`` (or,
for text and JSON, the demo's ``DemoResult``), chosen by the record's type. Each stage's record
lays out its own text (``CalibrationReport.format_text()``, ``ExportResult.format_text()``,
``VerificationReport.format_text()``), and every table goes through ``bnfold.text``. They only
read the records: no torch, no model, no side effects, so the output is golden-file tested.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bnfold.demo import DemoResult
from bnfold.folding.surgery import LARGE_SCALE
from bnfold.io.models import ModelFormat, SavedModel
from bnfold.jobs import Report
from bnfold.records import Branch, BranchKind, Pair, Skip, format_bytes
from bnfold.text import labelled, paint, table, wrap

#: ``width=None`` means no limit: module paths whole, nothing wrapped.
#: Module paths are shortened to no fewer characters than ``MIN_PATH_WIDTH`` on a narrow
#: terminal, and to no fewer than ``COMFORTABLE_PATH_WIDTH`` before the Reason column wraps.
MIN_PATH_WIDTH = 12
COMFORTABLE_PATH_WIDTH = 32
_PATH_COLUMNS = (0, 2)  # BatchNorm and Layer
_GAP = 3  # spaces between the columns of the BatchNorm table


def render_json(record: Report | DemoResult) -> str:
    """The JSON document of a run: for ``bnfold inspect``/``fold``/``export`` the plan, the
    fold and each later stage's record; for ``recalibrate`` and ``verify`` their stage's."""
    document = record.to_dict() if isinstance(record, DemoResult) else _document(record)
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _document(report: Report) -> dict[str, Any]:
    head = {"command": report.command, "versions": dict(report.versions or {})}
    if report.command == "verify":
        return {**head, "onnx": report.onnx, "reference": report.model} | _sections(report)
    outputs = [output.to_dict() for output in report.outputs]
    if report.plan is None:  # recalibrate
        head |= {"model": report.model, "data": report.data, **_sections(report)}
        return head | {"outputs": outputs}
    fold = report.result.to_dict() if report.result else None
    if fold is not None:
        del fold["plan"]  # already reported at the top level
        fold["summary"] = report.result.summary()
    return {
        **head,
        "model": report.model,
        "inputs": list(report.inputs),
        "inputs_from": report.inputs_from,
        "summary": _summary(report),
        "bn_kernels": {"before": report.bn_kernels_before, "after": report.bn_kernels_after},
        "plan": report.plan.to_dict(),
        "fold": fold,
        "outputs": outputs,
        "dry_run": report.dry_run,
        "notes": list(report.notes),
        **_sections(report),
    }


def _sections(report: Report) -> dict[str, Any]:
    """The later stages' records, under their names, in the order they ran."""
    stages = {
        "recalibration": report.calibration,
        "export": report.export,
        "verification": report.verification,
    }
    return {name: record.to_dict() for name, record in stages.items() if record is not None}


def _summary(report: Report) -> str:
    return report.result.summary() if report.result is not None else report.plan.summary()


def render_text(
    record: Report | DemoResult, *, width: int | None = 100, color: bool = False
) -> str:
    """The human report, fitted to ``width`` characters (None: no limit, nothing wrapped).

    For a plan: a header, the table of BatchNorms, why some are kept, notes, the summary, the
    BN kernels, the files written, then each later stage's own text. Identifiers in the table
    are never cut mid-word or folded across lines: when the table is too wide, the Reason
    column wraps between words and then the module paths (BatchNorm, Layer) are shortened
    from the left, keeping their tail, with the cut marked by "…" (never below
    ``MIN_PATH_WIDTH`` characters). Without ``color`` the text is plain (no escape codes).
    """
    if isinstance(record, DemoResult):
        return record.format_text() + "\n"
    report = record
    stages = [
        r.format_text() for r in (report.calibration, report.export, report.verification) if r
    ]
    if report.plan is None:  # recalibrate, verify: their stage's own text
        lines = [*stages, *(f"wrote {output.path}" for output in report.outputs)]
        return "\n".join(lines) + "\n"
    lines = wrap(_header(report), width)
    if report.plan.bn_total:
        rows, styles = _rows(report)
        widths = _column_widths(rows, width)
        rows = [_shortened(row, widths) for row in rows]
        lines += table(
            rows,
            gap=_GAP,
            right={rows[0].index("Scale")} if "Scale" in rows[0] else set(),
            widths=widths,
            rule="─",
            styles=styles if color else None,
        )
    else:
        lines.append("No BatchNorm found in the model's dataflow.")
    skipped = report.result.skipped if report.result is not None else report.plan.skipped
    if skipped:
        lines += ["Why BatchNorms are kept:", *labelled(_reason_rows(skipped), width, indent=2)]
    lines += labelled([("note:", note) for note in _notes(report)], width)
    lines += labelled(_merge_rows(report), width)
    lines += [paint(line, "bold" if color else None) for line in wrap(_summary(report), width)]
    lines += [_kernel_line(report)] if report.bn_kernels_before is not None else []
    lines += labelled(_output_rows(report), width)
    text = "\n".join([*lines, *stages])
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def _header(report: Report) -> str:
    model = report.model
    arch = f", architecture {model['arch']}" if model.get("arch") else ""
    fmt = _format_label(model.get("format"))
    return f"{model.get('source')} ({fmt}{arch}); inputs {_inputs_text(report)}"


def _rows(report: Report) -> tuple[list[list[str]], list[str]]:
    """The BatchNorm table (header first) and each row's colour: folded (or foldable) first,
    then kept, each in plan order. Scale only after folding; Reason only when one is kept."""
    folding = report.result is not None
    skipped = report.result.skipped if folding else report.plan.skipped
    scale = ["Scale"] if folding else []
    rows = [["BatchNorm", "Type", "Layer", "Pattern", "Status", *scale, "Reason"]]
    styles = []
    if folding:
        for item in report.result.folded:
            pair = item.pair
            cells = [pair.bn, pair.bn_type, pair.producer, _pattern(pair), "folded"]
            rows.append([*cells, f"{item.max_abs_scale:.3g}", ""])
            styles.append("green" if item.max_abs_scale <= LARGE_SCALE else "magenta")
    else:
        for pair in report.plan.pairs:
            rows.append([pair.bn, pair.bn_type, pair.producer, _pattern(pair), "foldable", ""])
            styles.append("green")
    for skip in skipped:
        cells = [skip.bn, skip.bn_type, skip.producer or "-", skip.pattern or "-", "kept"]
        rows.append([*cells, *([""] if folding else []), skip.reason.label])
        styles.append("yellow")
    return ([row[:-1] for row in rows] if not skipped else rows), styles


def _pattern(pair: Pair) -> str:
    """The pattern, with the ops between the norm and its layers: ``bn→linear via flatten``."""
    return f"{pair.pattern} via {', '.join(pair.via)}" if pair.via else pair.pattern


def _column_widths(rows: list[list[str]], width: int | None) -> list[int]:
    """Each column's width: its widest cell; then, while the table is wider than ``width``, the
    path columns (widest first) down to ``COMFORTABLE_PATH_WIDTH``, the Reason column down to
    its longest word, and the path columns down to ``MIN_PATH_WIDTH``. A table that still does
    not fit is printed wider than ``width`` rather than cutting more."""
    head = rows[0]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    if width is None:
        return widths
    excess = sum(widths) + _GAP * (len(widths) - 1) - width
    excess = _narrow_paths(widths, head, excess, COMFORTABLE_PATH_WIDTH)
    if excess > 0 and head[-1] == "Reason":
        words = [len(word) for row in rows for word in row[-1].split()]
        cut = min(excess, widths[-1] - max(words))
        widths[-1] -= cut
        excess -= cut
    _narrow_paths(widths, head, excess, MIN_PATH_WIDTH)
    return widths


def _narrow_paths(widths: list[int], head: list[str], excess: int, floor: int) -> int:
    """Take up to ``excess`` characters off the path columns, widest first, none below
    ``floor``; return what is left of ``excess``."""
    floors = {i: max(len(head[i]), floor) for i in _PATH_COLUMNS}
    while excess > 0:
        index = max(_PATH_COLUMNS, key=lambda i: widths[i] - floors[i])
        if widths[index] <= floors[index]:
            break
        widths[index] -= 1
        excess -= 1
    return excess


def _shortened(row: list[str], widths: list[int]) -> list[str]:
    return [_shorten_left(c, widths[i]) if i in _PATH_COLUMNS else c for i, c in enumerate(row)]


def _shorten_left(path: str, width: int) -> str:
    """``path`` if it fits in ``width``, else "…" and its tail: whole trailing segments (cut at
    a "."), or the last characters when even the last segment is too long."""
    if len(path) <= width:
        return path
    start = len(path) - (width - 1)
    tail = path[start:]
    dot = tail.find(".")
    if path[start - 1] != "." and 0 <= dot < len(tail) - 1:  # starts mid-segment
        tail = tail[dot + 1 :]
    return "…" + tail


def _reason_rows(skipped: Sequence[Skip]) -> list[tuple[str, str]]:
    counts = Counter(skip.reason for skip in skipped)
    return [(f"{reason.label} ({n}):", reason.advice()) for reason, n in counts.most_common()]


def _notes(report: Report) -> list[str]:
    notes = [*(report.model.get("notes") or ()), *report.plan.notes, *report.notes]
    folded = report.result.folded if report.result is not None else ()
    return notes + [f"{item.pair.bn}: {note}" for item in folded for note in item.notes]


def _merge_rows(report: Report) -> list[tuple[str, str]]:
    """One row per block of parallel branches merged (or to merge) into one conv."""
    merges = report.result.merges if report.result is not None else report.plan.merges
    rows = []
    for merge in merges:
        kernel = "x".join(str(size) for size in merge.kernel)
        branches = " + ".join(_branch_text(branch) for branch in merge.branches)
        rows.append(("merged:", f"{branches} → {merge.conv} ({merge.conv_type} {kernel})"))
    return rows


def _branch_text(branch: Branch) -> str:
    if branch.kind == BranchKind.IDENTITY:
        return "identity"
    return "→".join(name for name in (branch.conv, branch.bn) if name)


def _kernel_line(report: Report) -> str:
    after = report.bn_kernels_after
    return f"BN kernels per forward: {report.bn_kernels_before}" + (
        f" → {after}" if after is not None else ""
    )


def _output_rows(report: Report) -> list[tuple[str, str]]:
    rows = [("Wrote", f"{o.path} ({_output_detail(o)}){_output_notes(o)}") for o in report.outputs]
    return rows + ([("Dry run:", "no model file written")] if report.dry_run else [])


def _output_detail(output: SavedModel) -> str:
    return f"{_format_label(output.format)}, {format_bytes(output.bytes)}"


def _output_notes(output: SavedModel) -> str:
    return "".join(f"; {note}" for note in output.notes)


def render_markdown(report: Report) -> str:
    """A Markdown section: header, a table with each kept BatchNorm's detail, the summary."""
    rows, _ = _rows(report)
    if rows[0][-1] != "Reason":  # the Markdown table always has the column
        rows = [[*row, "Reason" if number == 0 else ""] for number, row in enumerate(rows)]
    lines = [
        f"### bnfold {report.command}: `{report.model.get('source')}`",
        "",
        f"Inputs: {_inputs_text(report)}.",
        "",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" for _ in rows[0]) + "|",
        *("| " + " | ".join(_md_cells(cells)) + " |" for cells in rows[1:]),
    ]
    skipped = report.result.skipped if report.result is not None else report.plan.skipped
    if skipped:
        lines += ["", "Kept:", ""]
        lines += [f"- `{skip.bn}`: {skip.reason.label}: {skip.detail}" for skip in skipped]
    lines += ["", f"**{_summary(report)}**"]
    if report.bn_kernels_before is not None:
        lines += ["", _kernel_line(report) + "."]
    notes = _notes(report)
    if notes:
        lines += ["", *(f"- note: {note}" for note in notes)]
    merges = _merge_rows(report)
    if merges:
        lines += ["", *(f"- merged: {text}" for _, text in merges)]
    for o in report.outputs:
        lines += ["", f"Wrote `{o.path}` ({_output_detail(o)}{_output_notes(o)})."]
    if report.dry_run:
        lines += ["", "Dry run: no model file written."]
    return "\n".join(lines) + "\n"


def _md_cells(cells: list[str]) -> list[str]:
    """Escape pipes; module paths (BatchNorm and Layer columns) as code."""
    escaped = [cell.replace("|", "\\|") for cell in cells]
    for index in _PATH_COLUMNS:
        if escaped[index] not in ("", "-"):
            escaped[index] = f"`{escaped[index]}`"
    return escaped


def _format_label(value: Any) -> str:
    try:
        return ModelFormat(value).label
    except ValueError:
        return str(value)


def _inputs_text(report: Report) -> str:
    """``1x3x224x224 float32, ... (where they come from)``."""
    texts = []
    for item in report.inputs:
        shape = item.get("shape")
        dims = "x".join(str(size) for size in shape) if shape is not None else "?"
        texts.append(f"{dims} {item.get('dtype')}")
    return f"{', '.join(texts) or 'none'} ({report.inputs_from})"
