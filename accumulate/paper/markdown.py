"""What the reports share in markdown: the missing-value mark and tables."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MISSING", "table"]

MISSING = "—"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table's lines.

    Example:
        >>> print("\\n".join(table(["a", "b"], [["1", "2"]])))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
