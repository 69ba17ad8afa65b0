"""Progress bars for long loops (SVDs over every layer, conversions): rate and ETA on stderr.

tqdm is imported on first use, so ``import lorakit`` stays light. Bars show on a terminal and
stay silent in logs and pipes (tqdm's ``disable=None``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """``items`` with a progress bar labelled ``desc`` (removed when done)."""
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, leave=False, disable=None)
