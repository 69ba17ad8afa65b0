"""Training checkpoints: everything needed to continue a run as if it never stopped.

``OUTPUT/checkpoints/step-N/`` holds the adapter (PEFT format, usable on its own), the
resolved ``train_config.yaml`` and ``state.pt``: optimizer, scheduler, RNG states and the data
position. A checkpoint is written under a temporary name and renamed, so a crash never leaves a
folder that looks complete; only the last K are kept.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from .errors import LoraError
from .io import save_adapter

if TYPE_CHECKING:
    from .train import BatchStream, TrainConfig

STATE_FILE = "state.pt"
CONFIG_FILE = "train_config.yaml"
CHECKPOINTS = "checkpoints"


def _steps(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if path.is_dir() and suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the newest one inside an output folder.

    Raises:
        LoraError: if ``path`` holds no checkpoint.
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for folder in (path / CHECKPOINTS, path):
        steps = _steps(folder) if folder.is_dir() else []
        if steps:
            return steps[-1][1]
    raise LoraError(
        f"No checkpoint found in {path}: pass a folder OUTPUT/checkpoints/step-N written by "
        "lorakit train with --save-every, or its OUTPUT folder."
    )


def save_checkpoint(
    output: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    config: TrainConfig,
    keep: int,
) -> Path:
    """Write ``output/checkpoints/step-{step}`` atomically and prune to the last ``keep``.

    ``extra`` joins the state (the data position, under ``"stream"``).
    """
    root = output / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=root))
    try:
        save_adapter(model, tmp)
        state = {
            "step": step,
            # The exact trainable tensors, by parameter name, for a bit-exact restore.
            "trainable": {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            },
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            **extra,
        }
        torch.save(state, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in _steps(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    stream: BatchStream,
    config: TrainConfig,
) -> int:
    """Restore a checkpoint into a run set up from ``config``; return the step it was taken at.

    Raises:
        LoraError: if the checkpoint was made with another model or a config that would train
            differently (settings such as ``max_steps`` or ``save_every`` may change).
    """
    from .train import _RESUMABLE_CHANGES

    saved = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
    mine = config.to_dict()
    differ = sorted(
        key
        for key in set(saved) | set(mine)
        if key not in _RESUMABLE_CHANGES and saved.get(key) != mine.get(key)
    )
    if differ:
        details = "; ".join(
            f"{k}: checkpoint {saved.get(k)!r}, now {mine.get(k)!r}" for k in differ
        )
        raise LoraError(
            f"Cannot resume from {folder}: it was made with a different model or config "
            f"({details}). Resume with the same settings (see {folder / CONFIG_FILE}), or start "
            "a new run without --resume."
        )
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    stream.load_state_dict(state["stream"])
    return int(state["step"])
