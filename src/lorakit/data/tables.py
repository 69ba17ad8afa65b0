"""Data kept as tables: CSV, Parquet and ``datasets`` ``save_to_disk`` folders, read as records.

Each row is one record with the column names as keys, so the formats of
:mod:`lorakit.data.files` are detected and checked as for JSON: ``instruction`` / ``input`` /
``output`` columns are alpaca, a ``text`` column is text, a ``messages`` or ``conversations``
column is a conversation (a list of structs in Parquet and Arrow; in a CSV cell, the list as
JSON). An empty cell is a missing field. Problems are named by file and row (``data.csv, row
3``: the third data row, under the header).

The files are read by the ``datasets`` library (``pip install 'lorakit[data]'``),
imported only when such a file is given, with its own readers, so a table reads as
``load_dataset`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import LoraError
from .records import BadRecord

# File suffix -> the ``datasets`` packaged reader.
TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# Files ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` leave in their folder.
_SAVED = ("state.json", "dataset_dict.json")
# Columns whose value is a list of turns: a CSV cell holds it as JSON text.
_TURN_COLUMNS = ("messages", "conversations")


def is_table(path: str | Path) -> bool:
    """Whether ``path`` is read as a table: a CSV or Parquet file, or a ``save_to_disk``
    folder."""
    path = Path(path)
    return path.suffix.lower() in TABLE_SUFFIXES or is_saved_dataset(path)


def is_saved_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk``."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in _SAVED)


def read_table(path: str | Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs of a table's rows, ``where`` being ``"FILE, row N"``.

    A ``DatasetDict`` folder gives its ``train`` split. A CSV cell in a ``messages`` or
    ``conversations`` column that is not JSON gives a :class:`BadRecord` as its record.

    Raises:
        LoraError: ``datasets`` not installed, an unreadable file, or a ``DatasetDict``
            without a ``train`` split.
    """
    path = Path(path)
    rows, label = _rows(path)
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{label}, row {number}"
        records.append((where, _turns_from_json(_without_nulls(row), where)))
    return records


def _without_nulls(value: Any) -> Any:
    """``value`` with every null field left out: an empty cell, or a field Arrow adds to the
    turns of a row because another row's turns have it, is a missing field."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise LoraError(
            "CSV, Parquet and save_to_disk data are read by the datasets library: "
            "pip install 'lorakit[data]' (or pip install datasets)."
        ) from error
    return datasets


def _rows(path: Path) -> tuple[Any, str]:
    """The table's rows (dicts) and how messages name the table."""
    datasets = _datasets()
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a data file read is no long task to show
    try:
        if path.is_dir():
            return _saved_rows(datasets, path)
        kind = TABLE_SUFFIXES[path.suffix.lower()]
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
        return table, str(path)
    except LoraError:
        raise
    except Exception as error:  # each reader (pandas, pyarrow) raises its own error types
        raise LoraError(
            f"Cannot read {path} as {path.suffix.lstrip('.').upper() or 'a saved dataset'} "
            f"({type(error).__name__}: {error}). Fix the file, or convert it to JSONL."
        ) from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _saved_rows(datasets: Any, path: Path) -> tuple[Any, str]:
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        if "train" not in saved:
            raise LoraError(
                f"{path} holds the splits {', '.join(saved)} and no 'train': pass one split's "
                f"folder, e.g. {path / next(iter(saved))}."
            )
        return saved["train"], f"{path} [train]"
    return saved, str(path)


def _turns_from_json(record: dict[str, Any], where: str) -> Any:
    """``record`` with a turns column given as JSON text (a CSV cell) decoded."""
    for column in _TURN_COLUMNS:
        value = record.get(column)
        if isinstance(value, str):
            try:
                record[column] = json.loads(value)
            except json.JSONDecodeError as error:
                return BadRecord(
                    where,
                    "invalid JSON",
                    f"the {column} cell is not JSON ({error.msg}); a CSV cell holds the list "
                    'of turns as JSON, e.g. [{"role": "user", "content": "Hi"}, ...].',
                )
    return record
