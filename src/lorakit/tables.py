"""Plain-text tables for the terminal: columns padded, numbers right-aligned."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"^[-+]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?(%|x)?$")


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
