"""Fixed-width text tables, the one formatter behind explain, the component totals, the dump summary and
the site diff: columns joined by two spaces, each as wide as its widest cell."""

from __future__ import annotations

from typing import Sequence


def format_table(rows: Sequence[Sequence[str]], align: str = "", pad_last: bool = True) -> list[str]:
    """One line per row. ``align`` holds one letter per column, ``l`` (left, the default for columns it
    does not cover) or ``r`` (right). ``pad_last=False`` leaves the last column as it is (a free-text
    reason), so lines carry no padding after it."""
    if not rows:
        return []
    count = len(rows[0])
    if any(len(row) != count for row in rows):
        raise ValueError(f"every row needs {count} cells: {[len(row) for row in rows]}")
    padded = count if pad_last else count - 1
    widths = [max(len(row[i]) for row in rows) for i in range(padded)]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if align[i:i + 1] == "r" else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + list(row[padded:])))
    return lines
