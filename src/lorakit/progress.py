"""Progress bars for long work (training, evaluation, SVDs over every layer, conversions): rate
and ETA on stderr, and transformers' own bars switched off on the command line.

tqdm is imported on first use, so ``import lorakit`` stays light. On a terminal a bar opened
inside another (a validation pass during training) is drawn on the line below it. In a file or
a pipe every bar is drawn on the first line instead: tqdm would otherwise move the cursor up
with an ``ESC[A`` escape at each redraw of the inner bar, which a log file keeps as ``^[[A``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def bar(total: int | None, desc: str | None, unit: str = "it", **options: Any) -> Any:
    """A tqdm bar on stderr labelled ``desc``, with lorakit's placement (see the module).

    Args:
        options: more of tqdm's arguments (``disable``, ``leave``, ``initial``, ...);
            ``disable`` defaults to ``desc is None``.
    """
    from tqdm import tqdm

    options.setdefault("disable", desc is None)
    if not sys.stderr.isatty():
        options["position"] = 0  # no cursor movement in a log
    return tqdm(total=total, desc=desc, unit=unit, **options)


def progress(
    items: Iterable[T], desc: str, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """``items`` with a progress bar labelled ``desc`` (removed when done), shown on a
    terminal only (tqdm's ``disable=None``)."""
    with bar(total, desc, unit, iterable=items, leave=False, disable=None) as shown:
        yield from shown


def quiet_transformers() -> None:
    """Switch off transformers' and huggingface_hub's own progress bars ("Loading weights",
    "Writing model shards", a GGUF's conversion) for this process: lorakit's commands say
    what they load and write in lines and bars of their own.

    Before transformers is imported the environment says it (importing it here would slow
    every command's checks down by seconds); after, its logging API does.
    """
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
