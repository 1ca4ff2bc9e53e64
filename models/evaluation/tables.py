"""The one Markdown table writer of the project (benchmark reports, quality summaries, READMEs).

Every bench and every summary builds its tables here, so that alignment, escaping and empty cells
follow one rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["markdown_table"]

_ALIGN = {"left": "---", "right": "---:", "center": ":---:"}


def _cell(value: Any) -> str:
    """A value as one table cell: ``None`` as an en dash, ``|`` escaped, newlines as spaces."""
    if value is None:
        return "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(
    headers: Sequence[Any],
    rows: Sequence[Sequence[Any]],
    *,
    align: str | Sequence[str] = "left",
) -> list[str]:
    """A GitHub-flavoured Markdown table, as lines (no trailing blank line).

    Args:
      headers: the column titles.
      rows: one sequence of cells per row, each as long as ``headers``; a cell is any value
        (``str()`` of it; ``None`` is shown as ``–``).
      align: ``"left"``, ``"right"`` or ``"center"`` for every column, or one per column.

    Returns:
      The header line, the rule line and one line per row.

    Raises:
      ValueError: for a row of another length than ``headers`` or an unknown alignment.
    """
    aligns = [align] * len(headers) if isinstance(align, str) else list(align)
    if len(aligns) != len(headers):
        raise ValueError(f"align must give one alignment per column ({len(headers)}), got {len(aligns)}")
    unknown = sorted({a for a in aligns if a not in _ALIGN})
    if unknown:
        raise ValueError(f"align must be one of {sorted(_ALIGN)}, got {unknown}")
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "|".join(_ALIGN[a] for a in aligns) + "|"]
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"row {i} has {len(row)} cells, the table has {len(headers)} columns")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return lines
