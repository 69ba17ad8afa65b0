"""Plain-text tables for the terminal: columns padded, numbers right-aligned, rows in natural
order."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^[-+]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?(%|x)?$")
_DIGITS = re.compile(r"(\d+)")


def _numeric(cells: list[str]) -> bool:
    """A column of numbers (or of space-separated numbers), so its digits line up."""
    values = [c for c in cells if c not in ("", "-")]
    return bool(values) and all(all(_NUMBER.match(p) for p in c.split()) for c in values)


def format_table(rows: list[tuple[str, ...]]) -> list[str]:
    """``rows[0]`` is the header: columns padded to their widest cell, a rule under the
    header, numeric columns right-aligned and the rest left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = [_numeric([row[i] for row in rows[1:]]) for i in range(len(widths))]
    lines = [
        "  ".join(
            (c.rjust(w) if r else c.ljust(w)) for c, w, r in zip(row, widths, right, strict=True)
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def align_parts(cells: list[str]) -> list[str]:
    """Cells of space-separated values (``"3.1 0.52 0.0071"``) with each value right-aligned
    in a sub-column of its own, so that a column of them lines up value under value.

    Every cell comes back as wide as the widest, a row with fewer values padded on the right.
    """
    parts = [cell.split() for cell in cells]
    count = max((len(p) for p in parts), default=0)
    widths = [max(len(p[i]) for p in parts if len(p) > i) for i in range(count)]
    total = sum(widths) + count - 1
    return [
        " ".join(v.rjust(w) for v, w in zip(p, widths, strict=False)).ljust(total) for p in parts
    ]


def natural_key(text: str) -> tuple[str | int, ...]:
    """A sort key that reads runs of digits as numbers: ``layers.2`` before ``layers.10``."""
    # split with a group alternates text and digits, so equal positions compare like types
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(text))
