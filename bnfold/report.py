"""Rendering only: the human table, the JSON report and Markdown, from one ``Report`` record.

A ``Report`` gathers the records a command produced (the loaded model, the plan, the fold
result, the files written, and any later stage such as recalibration, export or verification as
named ``sections``). ``render_text``, ``render_json`` and ``render_markdown`` only read it: no
torch, no model, no side effects, so their output is stable and golden-file tested.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bnfold.io.models import ModelFormat
from bnfold.records import FoldResult, Plan, Skip, format_bytes

# A folded scale max |gamma / sqrt(var + eps)| above this amplifies the conv weights' rounding
# error by as much; the report flags it (the fold is still exact in float64).
LARGE_SCALE = 1e3


@dataclass(frozen=True)
class Report:
    """Everything one ``bnfold inspect``/``fold`` run reports.

    ``model`` is ``LoadedModel.to_dict()``; ``inputs`` is ``[{"shape", "dtype"}]``;
    ``outputs`` are ``SavedModel`` records; ``sections`` are ``(name, record)`` pairs appended
    by later stages (each record needs ``to_dict()``; ``summary()`` is shown in the text).
    """

    command: str
    versions: dict[str, str]
    model: dict[str, Any]
    inputs: list[dict[str, Any]]
    inputs_from: str
    plan: Plan
    result: FoldResult | None = None
    bn_kernels_before: int | None = None
    bn_kernels_after: int | None = None
    outputs: tuple[Any, ...] = ()
    dry_run: bool = False
    sections: tuple[tuple[str, Any], ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        return self.result.summary() if self.result is not None else self.plan.summary()

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "command": self.command,
            "versions": dict(self.versions),
            "model": self.model,
            "inputs": self.inputs,
            "inputs_from": self.inputs_from,
            "summary": self.summary(),
            "bn_kernels": {"before": self.bn_kernels_before, "after": self.bn_kernels_after},
            "plan": self.plan.to_dict(),
            "fold": _fold_dict(self.result),
            "outputs": [output.to_dict() for output in self.outputs],
            "dry_run": self.dry_run,
            "notes": list(self.notes),
        }
        for name, record in self.sections:
            data[name] = record.to_dict()
        return data


def _fold_dict(result: FoldResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    data = result.to_dict()
    data.pop("plan", None)  # already reported at the top level
    data["summary"] = result.summary()
    return data


# ------------------------------------------------------------------ JSON


def render_json(report: Report) -> str:
    """The JSON report: ``Report.to_dict()``, indented, keys in a stable order."""
    return json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n"


# ------------------------------------------------------------------ text


def render_text(report: Report, *, width: int | None = 100, color: bool = False) -> str:
    """The human report: a header, the table of BatchNorms, reasons, notes, summary, outputs.

    ``width`` is the line length to fit (None: no limit, nothing is wrapped). Identifiers in
    the table are never cut mid-word or folded across lines: when the table is too wide, the
    Reason column wraps between words and then the module paths (BatchNorm, Layer) are
    shortened from the left, keeping their tail, with the cut marked by "…" (never below
    ``MIN_PATH_WIDTH`` characters). Without ``color`` the text is plain (no escape codes, no
    trailing spaces).
    """
    buffer = io.StringIO()
    console = _console(buffer, width or UNLIMITED_WIDTH, color)
    console.print(_header(report))
    if report.plan.bn_total:
        table = _table(report, width)  # wider than ``width`` only when it cannot fit
        _console(buffer, max(width or UNLIMITED_WIDTH, table.min_width), color).print(table)
    else:
        console.print("No BatchNorm found in the model's dataflow.")
    reasons = _reason_rows(report.plan.skipped if report.result is None else report.result.skipped)
    if reasons:
        console.print("Why BatchNorms are kept:")
        console.print(_grid(reasons, indent=2))
    notes = [("note:", note) for note in _notes(report)]
    if notes:
        console.print(_grid(notes))
    console.print(report.summary(), style="bold")
    kernels = _kernel_line(report)
    if kernels:
        console.print(kernels)
    if report.outputs or report.dry_run:
        console.print(_grid(_output_rows(report)))
    for name, record in report.sections:  # later stages print their own pre-formatted text
        console.print(_section_text(name, record), soft_wrap=True)
    text = buffer.getvalue()
    if not color:
        text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
    return text


def _console(buffer: io.StringIO, width: int, color: bool):
    from rich.console import Console

    return Console(
        file=buffer,
        width=width,
        force_terminal=color,
        no_color=not color,
        color_system="standard" if color else None,
        highlight=False,
        emoji=False,
        markup=False,
        legacy_windows=False,
    )


def _section_text(name: str, record: Any) -> str:
    """A later stage's own text (``format_text()``), else its ``summary()``, else its name."""
    if hasattr(record, "format_text"):
        return record.format_text()
    if hasattr(record, "summary"):
        return f"{name}: {record.summary()}"
    return f"{name}: done"


def _grid(rows: list[tuple[str, str]], indent: int = 0):
    """Two columns: a label, and text that wraps under itself (hanging indent)."""
    from rich.table import Table

    grid = Table.grid(padding=(0, 1, 0, 0))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for label, text in rows:
        grid.add_row(" " * indent + label, text)
    return grid


def _header(report: Report) -> str:
    model = report.model
    fmt = _format_label(model.get("format"))
    arch = f", architecture {model['arch']}" if model.get("arch") else ""
    inputs = ", ".join(_input_text(item) for item in report.inputs) or "none"
    return f"{model.get('source')} ({fmt}{arch}); inputs {inputs} ({report.inputs_from})"


def _table(report: Report, width: int | None):
    from rich import box
    from rich.table import Table

    folding = report.result is not None
    has_reasons = bool(report.result.skipped if folding else report.plan.skipped)
    head = ["BatchNorm", "Type", "Layer", "Pattern", "Status"]
    head += ["Scale"] if folding else []
    head += ["Reason"] if has_reasons else []
    rows = [(row if has_reasons else row[:-1], style) for row, style in _rows(report)]
    widths = _column_widths(head, [row for row, _ in rows], width)
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        min_width=sum(widths) + _GAP * (len(widths) - 1),
    )
    for index, column in enumerate(head):
        wraps = column == "Reason"  # between words only: the column is as wide as its words
        table.add_column(
            column,
            justify="right" if column == "Scale" else "left",
            no_wrap=not wraps,
            overflow="fold" if wraps else "ellipsis",
            width=widths[index] if wraps else None,
        )
    for row, style in rows:
        cells = [
            _shorten_left(cell, widths[i]) if i in _PATH_COLUMNS else cell
            for i, cell in enumerate(row)
        ]
        table.add_row(*cells, style=style)
    return table


#: ``width=None`` renders at this width: in effect no limit, so nothing wraps.
UNLIMITED_WIDTH = 10_000
#: Module paths are shortened to no fewer characters than this on a narrow terminal, and to
#: no fewer than ``COMFORTABLE_PATH_WIDTH`` before the Reason column wraps.
MIN_PATH_WIDTH = 12
COMFORTABLE_PATH_WIDTH = 32
_PATH_COLUMNS = (0, 2)  # BatchNorm and Layer
_GAP = 3  # columns of the SIMPLE_HEAD table are separated by three spaces


def _column_widths(head: list[str], rows: list[list[str]], width: int | None) -> list[int]:
    """Each column's width: its widest cell; then, while the table is wider than ``width``, the
    path columns (widest first) down to ``COMFORTABLE_PATH_WIDTH``, the Reason column down to
    its longest word, and the path columns down to ``MIN_PATH_WIDTH``. A table that still does
    not fit is printed wider than ``width`` rather than cutting more."""
    widths = [
        max(len(cell) for cell in [name, *(row[i] for row in rows)]) for i, name in enumerate(head)
    ]
    if width is None:
        return widths
    excess = sum(widths) + _GAP * (len(widths) - 1) - width
    excess = _narrow_paths(widths, head, excess, COMFORTABLE_PATH_WIDTH)
    if excess > 0 and head[-1] == "Reason":
        words = [len(word) for row in rows for word in row[-1].split()] + [len(head[-1])]
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


def _rows(report: Report):
    """(cells, style) per BatchNorm: folded/foldable first, then kept, each in plan order."""
    if report.result is not None:
        for item in report.result.folded:
            pair = item.pair
            cells = [
                pair.bn,
                pair.bn_type,
                pair.producer,
                pair.pattern,
                "folded",
                _scale_text(item.max_abs_scale),
                "",
            ]
            yield cells, "green" if item.max_abs_scale <= LARGE_SCALE else "magenta"
        skipped = report.result.skipped
    else:
        for pair in report.plan.pairs:
            yield [pair.bn, pair.bn_type, pair.producer, pair.pattern, "foldable", ""], "green"
        skipped = report.plan.skipped
    for skip in skipped:
        cells = [skip.bn, skip.bn_type, skip.producer or "-", skip.pattern or "-", "kept"]
        if report.result is not None:
            cells.append("")
        cells.append(skip.reason.label)
        yield cells, "yellow"


def _reason_rows(skipped: Sequence[Skip]) -> list[tuple[str, str]]:
    counts = Counter(skip.reason for skip in skipped)
    return [(f"{reason.label} ({n}):", reason.advice()) for reason, n in counts.most_common()]


def _notes(report: Report) -> list[str]:
    notes = list(report.model.get("notes") or ()) + list(report.plan.notes) + list(report.notes)
    if report.result is not None:
        for item in report.result.folded:
            if item.max_abs_scale > LARGE_SCALE:
                notes.append(
                    f"{item.pair.bn}: large scale {_scale_text(item.max_abs_scale)} (smallest "
                    f"running_var {item.min_running_var:.3g}); the folded weights amplify "
                    "rounding error by as much: verify the folded model"
                )
            notes.extend(f"{item.pair.bn}: {note}" for note in item.notes)
    return notes


def _kernel_line(report: Report) -> str | None:
    before, after = report.bn_kernels_before, report.bn_kernels_after
    if before is None:
        return None
    if after is None:
        return f"BN kernels per forward: {before}"
    return f"BN kernels per forward: {before} → {after}"


def _output_rows(report: Report) -> list[tuple[str, str]]:
    rows = []
    for output in report.outputs:
        detail = f"{_format_label(output.format)}, {format_bytes(output.bytes)}"
        notes = "".join(f"; {note}" for note in output.notes)
        rows.append(("Wrote", f"{output.path} ({detail}){notes}"))
    if report.dry_run:
        rows.append(("Dry run:", "no model file written"))
    return rows


# ------------------------------------------------------------------ Markdown


def render_markdown(report: Report) -> str:
    """A Markdown section: header, a table with each kept BatchNorm's detail, the summary."""
    folding = report.result is not None
    lines = [f"### bnfold {report.command}: `{report.model.get('source')}`", ""]
    lines.append(
        f"Inputs: {', '.join(_input_text(i) for i in report.inputs) or 'none'} "
        f"({report.inputs_from})."
    )
    lines.append("")
    head = ["BatchNorm", "Type", "Layer", "Pattern", "Status"]
    head += ["Scale"] if folding else []
    head += ["Reason"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join("---" for _ in head) + "|")
    for cells, _style in _rows(report):
        lines.append("| " + " | ".join(_md_cells(cells)) + " |")
    skipped = report.result.skipped if folding else report.plan.skipped
    if skipped:
        lines += ["", "Kept:", ""]
        lines += [f"- `{skip.bn}`: {skip.reason.label}: {skip.detail}" for skip in skipped]
    lines += ["", f"**{report.summary()}**"]
    kernels = _kernel_line(report)
    if kernels:
        lines += ["", kernels + "."]
    notes = _notes(report)
    if notes:
        lines += ["", *(f"- note: {note}" for note in notes)]
    for output in report.outputs:
        notes = "".join(f"; {note}" for note in output.notes)
        lines += [
            "",
            f"Wrote `{output.path}` ({_format_label(output.format)}, "
            f"{format_bytes(output.bytes)}{notes}).",
        ]
    if report.dry_run:
        lines += ["", "Dry run: no model file written."]
    return "\n".join(lines) + "\n"


def _md_cells(cells: list[str]) -> list[str]:
    """Escape pipes; module paths (BatchNorm and Layer columns) as code."""
    escaped = [cell.replace("|", "\\|") for cell in cells]
    for index in (0, 2):
        if escaped[index] not in ("", "-"):
            escaped[index] = f"`{escaped[index]}`"
    return escaped


# ------------------------------------------------------------------ small helpers


def _format_label(value: Any) -> str:

    try:
        return ModelFormat(value).label
    except ValueError:
        return str(value)


def _input_text(item: dict[str, Any]) -> str:
    shape = item.get("shape")
    dims = "x".join(str(size) for size in shape) if shape is not None else "?"
    return f"{dims} {item.get('dtype')}"


def _scale_text(value: float) -> str:
    return f"{value:.3g}"


__all__ = [
    "LARGE_SCALE",
    "MIN_PATH_WIDTH",
    "Report",
    "render_json",
    "render_markdown",
    "render_text",
]
