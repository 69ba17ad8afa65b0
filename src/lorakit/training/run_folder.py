"""The run folder ``lorakit train`` writes, and the one reader of the settings saved in it.

::

    OUTPUT/
      train_config.yaml        the run's resolved settings: write_run_config, read_run_config
      adapter_model.safetensors, adapter_config.json, ...   the adapter (OUTPUT/NAME per task)
      metrics.jsonl, loss.png
      checkpoints/step-N/      adapter, train_config.yaml, state (lorakit.training.checkpoint)
      checkpoints/.step-N.*    what a killed write left: clean_checkpoints

Every reader of a run's saved settings (``--resume``, the check before a resume, ``lorakit
merge`` looking up ``quantize``) calls :func:`read_run_config`, so a damaged file gives the
same error everywhere. This module knows the folder's layout, not :class:`TrainConfig`: it
reads and writes plain mappings, and ``lorakit.training.config`` (which imports this module,
never the other way) builds the config from them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..atomic import atomic_folder, clean_leftovers
from ..errors import LoraError
from ..generate import GenerationSettings, save_generation_settings
from ..io import write_adapter_files

CONFIG_FILE = "train_config.yaml"  # the resolved config, in the output and each checkpoint
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.safetensors"
# lorakit 0.1 wrote checkpoint states with torch.save (a pickle) to this name; they are still
# found, and read without unpickling code (lorakit.training.checkpoint._read_0_1_state).
STATE_FILE_0_1 = "state.pt"
# What killed writes leave in OUTPUT/checkpoints: atomic_folder's .step-N.new-*/.old-* and a
# pruned .step-N.pruned-*.
_LEFTOVER = re.compile(r"\.step-(\d+)(\.new-|\.old-|\.pruned-).*")
# lorakit 0.1 wrote each checkpoint to a temporary .step-N-* and renamed it; a killed 0.1 run
# can leave one behind, so the folders of runs started with 0.1 may still hold them.
_LEFTOVER_0_1 = re.compile(r"\.step-(\d+)-.*")

# The fix for a damaged settings file: every copy in a run holds the same settings.
_RESTORE = (
    f"It records the settings of a lorakit train run: restore it from another copy (the run's "
    f"OUTPUT/{CONFIG_FILE} and every checkpoint hold one)."
)


def read_yaml_mapping(path: Path, fix: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path``, keys with ``-`` read as ``_`` (an empty file: {}).

    Args:
        path: the file.
        fix: the sentence that ends each error, saying what to do.

    Raises:
        LoraError: the file cannot be read (or is not text), is not YAML, or does not hold
            a mapping.
    """
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError) as error:  # no permission; bytes that are not text
        reason = getattr(error, "strerror", None) or error
        raise LoraError(f"Cannot read {path} ({reason}). {fix}") from None
    except yaml.YAMLError as error:
        raise LoraError(f"{path} is not valid YAML: {error}\n{fix}") from None
    if not isinstance(loaded, dict):
        raise LoraError(f"{path} must hold a mapping of keys to values. {fix}")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def read_run_config(folder: str | Path, required: bool = True) -> dict[str, Any] | None:
    """The settings a run saved in ``folder/train_config.yaml``, as written (not validated).

    Args:
        folder: a run's output folder or one of its checkpoints.
        required: whether a missing file is an error; otherwise it gives ``None`` (a folder
            lorakit train did not write, such as a PEFT adapter's).

    Raises:
        LoraError: the file is damaged (unreadable, not YAML, not a mapping), or missing
            when ``required``.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        if not required:
            return None
        raise LoraError(
            f"{path} not found: {folder} holds no settings of a lorakit train run. Pass a "
            f"folder OUTPUT/{CHECKPOINTS}/step-N it wrote, or its OUTPUT folder."
        )
    return read_yaml_mapping(path, _RESTORE)


def write_run_config(settings: Mapping[str, Any], folder: Path) -> None:
    """``folder/train_config.yaml`` holding ``settings``, written to a temporary name and renamed.

    ``settings`` is a resolved config as a mapping (``TrainConfig.to_dict()``); keys keep
    their order, so the file reads like ``lorakit train --help``.
    """
    path = folder / CONFIG_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(dict(settings), sort_keys=False))
    tmp.replace(path)


def has_state(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint's training state (this format or lorakit 0.1's)."""
    return (folder / STATE_FILE).is_file() or (folder / STATE_FILE_0_1).is_file()


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """``(N, folder/step-N)`` for each complete checkpoint in ``folder``, oldest first."""
    found = []
    for path in folder.glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if path.is_dir() and suffix.isdigit() and has_state(path):
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the newest one inside an output folder.

    Raises:
        LoraError: if ``path`` holds no checkpoint.
    """
    path = Path(path)
    if has_state(path):
        return path
    for folder in (path / CHECKPOINTS, path):
        steps = checkpoint_steps(folder) if folder.is_dir() else []
        if steps:
            return steps[-1][1]
    raise LoraError(
        f"No checkpoint found in {path}: pass a folder OUTPUT/{CHECKPOINTS}/step-N written by "
        "lorakit train with --save-every, or its OUTPUT folder."
    )


def clean_checkpoints(output: str | Path) -> list[Path]:
    """Remove what killed runs left in ``output/checkpoints``; return what was removed.

    A checkpoint cut between the two renames of a non-atomic swap is put back first
    (``atomic.clean_leftovers``); every other hidden leftover, lorakit 0.1's included, is
    deleted.
    """
    root = Path(output) / CHECKPOINTS
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for step in sorted({m.group(1) for p in root.iterdir() if (m := _LEFTOVER.fullmatch(p.name))}):
        removed += clean_leftovers(root / f"step-{step}")
    for path in root.iterdir():
        if _LEFTOVER.fullmatch(path.name) or _LEFTOVER_0_1.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def save_adapter_folder(
    model: nn.Module, folder: Path, name: str, settings: GenerationSettings
) -> None:
    """Adapter ``name`` of ``model`` and its generation settings, swapped into ``folder`` as
    one unit (a kill leaves the old folder or the new one).

    Raises:
        LoraError: the folder cannot be written (a full disk, no permission); what was there
            before is unchanged.
    """
    try:
        with atomic_folder(folder) as new:
            write_adapter_files(model, new, name)
            save_generation_settings(settings, new)
    except OSError as err:  # a full disk, a read-only or vanished folder
        raise LoraError(
            f"Could not write the adapter to {folder} ({err.strerror or err}); what was there "
            "before is unchanged. Free space, then run again (with --resume OUTPUT if the run "
            "saved checkpoints)."
        ) from err
