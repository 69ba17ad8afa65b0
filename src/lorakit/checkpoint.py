"""Training checkpoints: everything needed to continue a run as if it never stopped.

``OUTPUT/checkpoints/step-N/`` holds the adapter (PEFT format, usable on its own), the
resolved ``train_config.yaml`` and ``state.pt``: optimizer, scheduler, RNG states and the data
position. A checkpoint is written under a temporary name and renamed, so a crash never leaves a
folder that looks complete; only the last K are kept.

In a distributed run every rank calls :func:`save_checkpoint` (under FSDP2 the shards are
gathered, which needs all ranks) and rank 0 writes. The file holds whole tensors, as one process
would, plus each rank's RNG state, so it resumes with any number of processes as long as
processes x batch size stays the same.
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

from . import distributed
from .distributed import Dist
from .errors import LoraError
from .io import save_adapter
from .train_config import (
    CONFIG_FILE,
    RESUMABLE_CHANGES,
    TrainConfig,
    iter_config_help,
    write_config,
)

if TYPE_CHECKING:
    from .generate import GenerationSettings
    from .train import BatchStream

STATE_FILE = "state.pt"
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


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    output: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any],
    config: TrainConfig,
    keep: int,
    dist: Dist | None = None,
    settings: GenerationSettings | None = None,
) -> Path:
    """Write ``output/checkpoints/step-{step}`` atomically and prune to the last ``keep``.

    ``extra`` joins the state (the data position, under ``"stream"``); ``settings`` (the
    system prompt and chat template) go beside the adapter, so the checkpoint is usable as
    ``--adapter`` as it is. Every rank of a distributed run must call this; rank 0 writes,
    and all return the folder.
    """
    dist = dist or Dist()
    root = output / CHECKPOINTS
    target = root / f"step-{step}"
    # Collectives first, on every rank: whole tensors out of FSDP2 shards, every rank's RNG.
    trainable = distributed.trainable_state(model)
    optimizer_state = distributed.full_optimizer_state(optimizer)
    rng = distributed.all_gather(_rng_state(), dist)
    with distributed.whole_trainable_params(model, dist):
        if dist.is_main:
            state = {
                "step": step,
                # The exact trainable tensors, by parameter name, for a bit-exact restore.
                "trainable": trainable,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "torch_rng": rng[0]["torch"],
                "python_rng": rng[0]["python"],
                "rank_rng": rng,
                "world_size": dist.world_size,
                **extra,
            }
            _write(root, target, model, state, config, settings)
            for _, old in _steps(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    return target


def _write(
    root: Path,
    target: Path,
    model: nn.Module,
    state: dict,
    config: TrainConfig,
    settings: GenerationSettings | None,
) -> None:
    """Adapter, state and config into a temporary folder, then renamed to ``target``."""
    from .generate import save_generation_settings

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        save_adapter(model, tmp)
        if settings is not None:
            save_generation_settings(settings, tmp)
        torch.save(state, tmp / STATE_FILE)
        write_config(config, tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_resumable(
    folder: Path, config: TrainConfig, world_size: int, saved_world: int | None = None
) -> None:
    """Refuse to resume ``folder`` with a config that would train differently.

    Only :data:`RESUMABLE_CHANGES` may differ, and ``batch_size`` as long as processes x
    batch size stays the same. ``saved_world``: the processes the checkpoint ran with (read
    from its state file when ``None``). Cheap: no model is needed.

    Raises:
        LoraError: naming every setting that differs.
    """
    if saved_world is None:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        saved_world = int(state.get("world_size", 1))
    saved = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
    mine = config.to_dict()
    # A key the checkpoint lacks is a setting added since: it ran with that setting's default.
    defaults = {name: default for name, default, _ in iter_config_help()}
    same_global_batch = saved.get("batch_size", 0) * saved_world == mine["batch_size"] * world_size
    differ = sorted(
        key
        for key in set(saved) | set(mine)
        if key not in RESUMABLE_CHANGES
        and saved.get(key, defaults.get(key)) != mine.get(key)
        and not (key == "batch_size" and same_global_batch)
    )
    if not differ:
        return
    details = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {mine.get(k)!r}" for k in differ)
    if "batch_size" in differ and saved_world != world_size:
        details += (
            f" (the checkpoint ran {saved_world} process(es); keep processes x batch size "
            f"at {saved.get('batch_size', 0) * saved_world})"
        )
    raise LoraError(
        f"Cannot resume from {folder}: it was made with a different model or config "
        f"({details}). Resume with the same settings (see {folder / CONFIG_FILE}), or start "
        "a new run without --resume."
    )


def load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    stream: BatchStream,
    config: TrainConfig,
    dist: Dist | None = None,
) -> int:
    """Restore a checkpoint into a run set up from ``config``; return the step it was taken at.

    A checkpoint from N processes with batch b resumes with M processes and batch b * N / M:
    the global batch, and so the data order and the updates, stay the same. Each rank gets
    its own RNG state back when M = N; otherwise rank 0 gets rank 0's and the others keep
    their fresh seeds (dropout masks then differ from the uninterrupted run).

    Raises:
        LoraError: if the checkpoint was made with another model or a config that would train
            differently (settings such as ``max_steps`` or ``save_every`` may change).
    """

    dist = dist or Dist()
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    check_resumable(folder, config, dist.world_size, int(state.get("world_size", 1)))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(distributed.shard_like(value, params[name]))
    distributed.load_optimizer_state(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ranks = state.get("rank_rng") or [{"torch": state["torch_rng"], "python": state["python_rng"]}]
    if len(ranks) == dist.world_size or dist.rank == 0:
        _set_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else ranks[0])
    stream.load_state_dict(state["stream"])
    return int(state["step"])
