"""Helpers shared by the subcommands: cheap input checks, status lines, adapter loading.

Everything here that runs before a model loads stays cheap (file system and JSON only), so a
wrong path or flag is reported in a second, not after the model has loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoraError

if TYPE_CHECKING:
    from torch import nn

    from ..data import DataFile

ADAPTER_CONFIG = "adapter_config.json"


def status(message: str) -> None:
    """A line on stderr saying what is happening (results go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def check_adapter_folder(folder: str | Path, flag: str = "--adapter") -> Path:
    """``folder`` if it holds an adapter (``adapter_config.json``), else a ``LoraError``."""
    path = Path(folder)
    if not (path / ADAPTER_CONFIG).is_file():
        raise LoraError(
            f"{flag} {folder}: not an adapter folder (no {ADAPTER_CONFIG}). Pass the --output "
            "folder of lorakit train, a checkpoint folder, or a PEFT adapter folder."
        )
    return path


def check_model_spec(spec: str, flag: str = "--model") -> str:
    """The resolved model spec (see ``lorakit.models.resolve_model_spec``); the flag is named."""
    from ..models import resolve_model_spec

    try:
        return resolve_model_spec(spec)
    except LoraError as error:
        raise LoraError(f"{flag} {spec}: {error}") from None


def check_data_file(
    path: str | Path,
    data_format: str | None = None,
    flag: str = "--data",
    skip_bad_records: bool = False,
) -> DataFile:
    """A data file, read and checked before any model loads (see ``lorakit.data.read_data``)."""
    from ..data import read_data

    if not Path(path).is_file():
        raise LoraError(f"{flag} {path}: file not found; pass an existing JSON/JSONL file.")
    return read_data(path, data_format, skip_bad_records=skip_bad_records)


def check_empty_output(path: str | Path, flag: str = "--output") -> Path:
    """``path`` if it does not exist or is an empty folder (a new model folder goes there)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"{flag} {out} exists and is not empty; pass a new folder.")
    return out


def check_size(rank: int | None, energy: float | None) -> None:
    """``--rank`` a positive integer, ``--energy`` in (0, 1]."""
    if rank is not None and rank <= 0:
        raise LoraError(f"--rank must be a positive integer, got {rank}.")
    if energy is not None and not 0 < energy <= 1:
        raise LoraError(f"--energy must be in (0, 1], e.g. 0.9, got {energy}.")


def recorded_base(folder: str | Path) -> str | None:
    """The base model an adapter folder records (``base_model_name_or_path``), if any."""
    try:
        config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def load_adapters(model: nn.Module, adapters: dict[str, str], model_name: str) -> None:
    """Load each ``name -> folder`` adapter onto ``model``, saying so when ``model`` is not the
    base it records (``load_adapter`` refuses, in a few lines, a base that does not fit)."""
    from ..io import load_adapter

    for name, folder in adapters.items():
        note_other_base(folder, model_name)
        load_adapter(model, folder, adapter_name=name)


def note_other_base(folder: str | Path, model_name: str) -> None:
    """A status line when an adapter records a base model other than ``model_name``."""
    base = recorded_base(folder)
    if base and base != model_name and _as_spec(base) != model_name:
        status(f"note: adapter {folder} records base model {base}; loading it onto {model_name}")


def _as_spec(base: str) -> str:
    """A recorded base as lorakit names it once loaded (a GGUF's converted folder: the GGUF)."""
    from ..models import resolve_model_spec

    try:
        return resolve_model_spec(base)
    except LoraError:
        return base


def model_name(model: Any, spec: str) -> str:
    """How to name a loaded model in messages: the spec it resolved to."""
    return str(getattr(model, "name_or_path", None) or spec)
