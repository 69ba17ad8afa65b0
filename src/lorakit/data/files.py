"""Reading a data file: its format, detected or given, and every record parsed and checked.

A data file is JSON (a list of records), JSONL (one record a line), or a table (CSV, Parquet,
a ``datasets`` ``save_to_disk`` folder: :mod:`lorakit.data.tables`, one record a row) in one
format, detected from its first record or forced with ``data_format``:

============  ====================================================================
``alpaca``    ``{"instruction": str, "input": str (optional), "output": str}``
``chat``      ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}]}``
``sharegpt``  ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}]}``
``text``      ``{"text": str}``
``images``    ``chat`` or ``sharegpt`` with images (:mod:`lorakit.data.images`)
============  ====================================================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import LoraError, brief
from .images import is_image_record, parse_image_record
from .records import (
    BadRecord,
    DataFile,
    Example,
    parse_alpaca,
    parse_chat,
    parse_sharegpt,
    parse_text,
    read_records,
    show,
)
from .tables import is_table, read_table

FORMATS = ("alpaca", "chat", "sharegpt", "text", "images")
# The key that gives each format away in a file's first record, checked in this order.
_FORMAT_KEYS = {
    "messages": "chat",
    "conversations": "sharegpt",
    "instruction": "alpaca",
    "text": "text",
}


def read_examples(path: str | Path, data_format: str | None = None) -> list[Example]:
    """The examples of a data file (see :func:`read_data`); any bad record raises."""
    return read_data(path, data_format).examples


def read_data(
    path: str | Path, data_format: str | None = None, *, skip_bad_records: bool = False
) -> DataFile:
    """Read a JSON or JSONL data file into conversations (or texts, for the ``text`` format).

    Every record is checked here, so a bad one is named by file and line before it can reach
    a chat template: a conversation needs a user turn before the first reply, a non-empty
    reply, at most one system turn (the first), and strings of valid Unicode.

    Args:
        path: the file; JSON when its first character is ``[``, JSONL otherwise.
        data_format: one of :data:`FORMATS`; ``None`` detects it from the first record (with
            ``skip_bad_records``, from the first record that gives it away).
        skip_bad_records: skip bad records (counted in ``skipped``) instead of raising.

    Raises:
        LoraError: unreadable or empty file, unknown format, a bad record (the message names
            the file, the line or list index, the field and the fix), or no usable record.
    """
    path = Path(path)
    if data_format is not None and data_format not in FORMATS:
        raise LoraError(f"Unknown data format {data_format!r}; choose one of {', '.join(FORMATS)}.")
    records = _records(path)
    if not records:
        raise LoraError(
            f"{path} holds no examples: write one JSON object a line (JSONL) or a JSON list."
        )
    parse = _parser(data_format or _detect_format(records, skip_bad_records), path)
    data = DataFile(path, [], [], len(records), Counter())
    for where, record in records:
        try:
            if isinstance(record, BadRecord):
                raise record
            data.examples.append(parse(record, where))
            data.sources.append(where)
        except BadRecord as bad:
            if not skip_bad_records:
                raise
            data.skipped[bad.reason] += 1
    if not data.examples:
        raise LoraError(f"{path}: no usable record ({data.skip_report()}). Fix the records.")
    return data


def _detect_format(records: list[tuple[str, Any]], skip_bad_records: bool) -> str:
    """The format the first record gives away (any record, when bad ones are skipped)."""
    for _, record in records if skip_bad_records else records[:1]:
        if is_image_record(record):
            return "images"
        if isinstance(record, dict):
            for key, fmt in _FORMAT_KEYS.items():
                if key in record:
                    return fmt
    where, first = records[0]
    if isinstance(first, BadRecord):
        raise first
    keys = ", ".join(map(brief, list(first)[:8])) if isinstance(first, dict) else show(first)
    raise LoraError(
        f"{where}: cannot tell the data format from the first record ({keys}). Expected keys: "
        "alpaca (instruction, input, output), chat (messages), sharegpt (conversations) or "
        "text (text). Rename the fields, or pass the format explicitly."
    )


def _parser(data_format: str, path: Path) -> Callable[[Any, str], Example]:
    """The parser of one format; image records resolve their paths against the file's folder."""
    if data_format == "images":
        return lambda record, where: parse_image_record(record, where, path.parent)
    return {
        "alpaca": parse_alpaca,
        "chat": parse_chat,
        "sharegpt": parse_sharegpt,
        "text": parse_text,
    }[data_format]


def _records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs: a table's rows (:mod:`lorakit.data.tables`) or JSON's."""
    return read_table(path) if is_table(path) else read_records(path)


def has_images(path: str | Path) -> bool:
    """Whether a data file holds image records (its first record has images)."""
    records = _records(Path(path))
    return bool(records) and is_image_record(records[0][1])
