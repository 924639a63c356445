"""Plain-text layout for every renderer: aligned tables, labelled lines, wrapped paragraphs.

Strings in, lines out; no terminal and no torch. The command reports (``bnfold.report``) and the
stage records' own ``format_text()`` both lay their text out here, so this module sits at the
bottom of the layers, where every stage may import it.
"""

from __future__ import annotations

import textwrap
from collections.abc import Collection, Sequence

#: ANSI colour codes a table row may be painted in (``table(styles=...)``).
COLORS = {"bold": "1", "green": "32", "yellow": "33", "magenta": "35"}


def table(
    rows: Sequence[Sequence[str]],
    *,
    gap: int = 2,
    right: Collection[int] = (),
    widths: Sequence[int] | None = None,
    rule: str | None = None,
    styles: Sequence[str] | None = None,
) -> list[str]:
    """The lines of a table whose first row is the header.

    Each column is as wide as its widest cell, or ``widths[i]``: a longer cell then wraps
    between words onto more lines (a word longer than the column is kept whole). Columns are
    ``gap`` spaces apart; those in ``right`` are right-aligned. ``rule`` (one character) draws a
    line under the header across the table. ``styles`` paints each data row in a colour of
    ``COLORS`` (and the header bold). Trailing spaces are dropped.
    """
    widths = list(widths or [max(len(row[i]) for row in rows) for i in range(len(rows[0]))])
    lines = []
    for number, row in enumerate(rows):
        cells = [_wrap_cell(cell, width) for cell, width in zip(row, widths, strict=True)]
        style = None if not styles else (styles[number - 1] if number else "bold")
        for depth in range(max(len(cell) for cell in cells)):
            parts = []
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True)):
                text = cell[depth] if depth < len(cell) else ""
                parts.append(text.rjust(width) if index in right else text.ljust(width))
            lines.append(paint((" " * gap).join(parts).rstrip(), style))
        if number == 0 and rule:
            lines.append(rule * (sum(widths) + gap * (len(widths) - 1)))
    return lines


def labelled(rows: Sequence[tuple[str, str]], width: int | None, indent: int = 0) -> list[str]:
    """Two columns: each label (indented), then its text wrapped to ``width`` under itself."""
    if not rows:
        return []
    column = indent + max(len(label) for label, _ in rows) + 1
    lines = []
    for label, text in rows:
        wrapped = wrap(text, None if width is None else max(width - column, 1))
        lines.append(f"{' ' * indent}{label}".ljust(column) + wrapped[0])
        lines.extend(" " * column + line for line in wrapped[1:])
    return lines


def wrap(text: str, width: int | None) -> list[str]:
    """``text`` as lines of at most ``width`` characters, broken between words (a longer word
    is cut); one line when ``width`` is None."""
    if width is None or len(text) <= width:
        return [text]
    return textwrap.wrap(text, width, break_on_hyphens=False) or [""]


def paint(text: str, style: str | None) -> str:
    """``text`` in the colour ``style`` names (``COLORS``); as it is when ``style`` is None."""
    return f"\x1b[{COLORS[style]}m{text}\x1b[0m" if style and text else text


def _wrap_cell(cell: str, width: int) -> list[str]:
    if len(cell) <= width:
        return [cell]
    return textwrap.wrap(cell, width, break_long_words=False, break_on_hyphens=False) or [""]
