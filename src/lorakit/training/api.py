"""``lorakit.train(...)``: a whole run of ``lorakit train`` from Python, data in memory too.

The keyword arguments are the CLI's settings (``TrainConfig``'s fields: ``rank=8``,
``max_steps=100``, ...), checked as the CLI checks its flags; a YAML file may give them as
``config=``. Data is a file (JSON/JSONL, CSV, Parquet, a ``save_to_disk`` folder), a list of
records, or a ``datasets.Dataset``::

    result = lorakit.train([{"messages": [...]}, ...], model="smollm2-135m", max_steps=50)
    result.train_losses, result.output  # the adapter is in result.output

Records in memory are written once to lorakit's cache as JSONL, named by their content
(``$LORAKIT_CACHE/data/<hash>.jsonl``), and the run reads that file: its
``train_config.yaml`` names a file that exists, so the run resumes (``resume=``, or
``lorakit train --resume``) as any other, and the same records give the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import LoraError
from .config import resolve_config
from .loop import TrainResult

# Settings that may be data in memory, and what errors call them.
_DATA_SETTINGS = ("data", "val_data", "test_data")


def train(
    data: Any = None,
    *,
    model: str | nn.Module | None = None,
    tokenizer: Any = None,
    config: str | os.PathLike | None = None,
    **settings: Any,
) -> TrainResult:
    """Fine-tune a LoRA adapter as ``lorakit train`` does and return what the run produced.

    Args:
        data: the training data: a file or ``save_to_disk`` folder, a list of records
            (dicts in one of the formats of :mod:`lorakit.data.files`), or a
            ``datasets.Dataset``; ``None``: the bundled demo task (or ``config``'s data).
        model: a model spec as for ``--model`` (a folder, a ``.gguf``, ``smollm2-135m``), or
            a loaded model, then with its ``tokenizer`` (or processor).
        config: a YAML file of settings, as ``lorakit train CONFIG``; keyword arguments win.
        settings: any other ``lorakit train`` setting by its field name (``output``,
            ``rank``, ``max_steps``, ``val_data``, ``test_data``, ...); ``val_data`` and
            ``test_data`` take records in memory too.

    Returns:
        A :class:`~lorakit.training.loop.TrainResult`: the output folder, the steps, the
        logged losses and the model holding the trained adapter.

    Raises:
        LoraError: an unknown setting (naming the closest one), bad data (naming the record,
            ``data, record N`` counting from 1 for records in memory), or as the CLI's run.
    """
    from .loop import train as run

    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise LoraError("model= is a loaded model: pass its tokenizer= (or processor) too.")
        if "model" not in settings:
            settings["model"] = getattr(model, "name_or_path", None) or "(a model in memory)"
    elif model is not None:
        settings["model"] = str(model)
    if data is not None:
        settings["data"] = data
    memory = {}
    for key in _DATA_SETTINGS:
        if settings.get(key) is not None and not isinstance(settings[key], (str, os.PathLike)):
            memory[key] = cached_records(settings[key], key)
            settings[key] = str(memory[key])
        elif settings.get(key) is not None:
            settings[key] = str(settings[key])
    resolved = resolve_config(config, settings)
    try:
        return run(resolved, model if isinstance(model, nn.Module) else None, tokenizer)
    except LoraError as error:
        message = str(error)
        for key, path in memory.items():
            message = message.replace(f"{path}, line ", f"{key}, record ")
        if message == str(error):
            raise
        raise LoraError(message) from None


def cached_records(records: Any, name: str = "data") -> Path:
    """Records in memory (a list of dicts, or a ``datasets.Dataset``) as a JSONL file in
    lorakit's cache named by its content, written atomically; the file's path.

    Raises:
        LoraError: not a list of JSON-serialisable records, naming the first bad one.
    """
    from ..models.gguf import cache_dir

    rows = _rows(records, name)
    lines = []
    for number, row in enumerate(rows, start=1):
        try:
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        except (TypeError, ValueError) as error:
            raise LoraError(
                f"{name}, record {number}: {error}; records are JSON values (text, numbers, "
                "lists, dicts), as a JSONL file holds them."
            ) from None
    text = "".join(lines)
    folder = cache_dir() / "data"
    path = folder / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.jsonl"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # whole or absent: another run may read it at any moment
    return path


def _rows(records: Any, name: str) -> Sequence[Mapping[str, Any]]:
    """The records of a list or a ``datasets.Dataset`` (its rows as dicts)."""
    if type(records).__module__.startswith("datasets."):
        if hasattr(records, "to_list"):
            return records.to_list()
        fix = (
            f"pass one split, e.g. {name}=dataset['train']"
            if hasattr(records, "keys")
            else ("load it as a datasets.Dataset (not streaming)")
        )
        raise LoraError(f"{name}: a {type(records).__name__} cannot be read as rows; {fix}.")
    if isinstance(records, (str, bytes)) or not isinstance(records, Sequence):
        raise LoraError(
            f"{name} must be a file, a list of records or a datasets.Dataset, not a "
            f"{type(records).__name__}."
        )
    return records
