"""Training checkpoints: everything needed to continue a run as if it never stopped.

``OUTPUT/checkpoints/step-N/`` holds the adapter (PEFT format, usable on its own), the
resolved ``train_config.yaml`` and ``state.safetensors``: optimizer, scheduler, RNG states, the
data position and the base model's fingerprint (no pickle: see ``lorakit.treefile``). Each
checkpoint folder is written as one unit (``lorakit.atomic``), so a kill -9 or a full disk at
any moment leaves it complete-old or complete-new; only the last K are kept, and a pruned one
is renamed away before it is deleted, so no half-deleted checkpoint ever looks complete.

In a distributed run every rank calls :func:`save_checkpoint` (under FSDP2 the shards are
gathered, which needs all ranks) and rank 0 writes. The file holds whole tensors, as one process
would, plus each rank's RNG state, so it resumes with any number of processes as long as
processes x batch size stays the same.
"""

from __future__ import annotations

import random
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from ..atomic import atomic_folder, clean_leftovers
from ..errors import LoraError
from ..io import write_adapter_files
from . import distributed
from .config import (
    CONFIG_FILE,
    RESUMABLE_CHANGES,
    TrainConfig,
    iter_config_help,
    write_config,
)
from .distributed import Dist
from .statefile import load_tree, save_tree

if TYPE_CHECKING:
    from ..generate import GenerationSettings
    from .step import BatchStream

STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # lorakit 0.1: torch.save, read with weights_only=True
CHECKPOINTS = "checkpoints"
# What killed writes leave in OUTPUT/checkpoints: atomic_folder's .step-N.new-*/.old-*, a
# pruned .step-N.pruned-*, and lorakit 0.1's temporary .step-N-*.
_LEFTOVER = re.compile(r"\.step-(\d+)(\.new-|\.old-|\.pruned-|-).*")


def _has_state(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() or (folder / LEGACY_STATE_FILE).is_file()


def _steps(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if path.is_dir() and suffix.isdigit() and _has_state(path):
            found.append((int(suffix), path))
    return sorted(found)


def clean_checkpoints(output: str | Path) -> list[Path]:
    """Remove what killed runs left in ``output/checkpoints``; return what was removed.

    A checkpoint cut between the two renames of a non-atomic swap is put back first
    (``atomic.clean_leftovers``); every other hidden leftover is deleted.
    """
    root = Path(output) / CHECKPOINTS
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for step in sorted({m.group(1) for p in root.iterdir() if (m := _LEFTOVER.fullmatch(p.name))}):
        removed += clean_leftovers(root / f"step-{step}")
    for path in root.iterdir():
        if _LEFTOVER.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's training state; never unpickles code.

    Raises:
        LoraError: the state file is missing, corrupt, or (legacy ``state.pt``) holds more
            than plain tensors and containers.
    """
    if (folder / STATE_FILE).is_file() or not (folder / LEGACY_STATE_FILE).is_file():
        state = load_tree(folder / STATE_FILE)
    else:
        try:
            state = torch.load(folder / LEGACY_STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle errors vary by torch version
            raise LoraError(
                f"Refusing to read {folder / LEGACY_STATE_FILE}: it is corrupt or holds more "
                f"than plain tensors ({type(err).__name__}), and lorakit never unpickles code. "
                "Resume from another checkpoint, or start the run again."
            ) from None
    if not isinstance(state, dict) or not {"step", "trainable", "optimizer"} <= set(state):
        raise LoraError(f"{folder} does not hold a lorakit training state; resume from another.")
    return state


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the newest one inside an output folder.

    Raises:
        LoraError: if ``path`` holds no checkpoint.
    """
    path = Path(path)
    if _has_state(path):
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
                "base": base_fingerprint(model),
                **extra,
            }
            _write(target, model, state, config, settings)
            for _, old in _steps(root)[:-keep]:
                # Renamed away first: a kill mid-delete must not leave a partial step-N.
                pruned = old.with_name(f".{old.name}.pruned-{uuid.uuid4().hex[:12]}")
                old.rename(pruned)
                shutil.rmtree(pruned, ignore_errors=True)
    return target


def base_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Frozen parameter name -> shape: which base model a run trains (not where it lives)."""
    return {n: list(p.shape) for n, p in model.named_parameters() if not p.requires_grad}


def _write(
    target: Path,
    model: nn.Module,
    state: dict,
    config: TrainConfig,
    settings: GenerationSettings | None,
) -> None:
    """Adapter, state and config written as one unit to ``target``."""
    from ..generate import save_generation_settings

    try:
        with atomic_folder(target) as new:
            write_adapter_files(model, new)
            if settings is not None:
                save_generation_settings(settings, new)
            save_tree(state, new / STATE_FILE)
            write_config(config, new)
    except OSError as err:  # a full disk, a read-only or vanished folder
        previous = [path for _, path in _steps(target.parent) if path != target]
        kept = f"; the last good checkpoint is {previous[-1]}" if previous else ""
        raise LoraError(
            f"Could not write the checkpoint {target} ({err.strerror or err}){kept}. Free "
            f"space, then continue with --resume {target.parent.parent}."
        ) from err


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
        saved_world = int(read_state(folder).get("world_size", 1))
    try:
        saved = yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise LoraError(
            f"Cannot read {folder / CONFIG_FILE} ({err}); resume from another checkpoint."
        ) from None
    if not isinstance(saved, dict):
        raise LoraError(f"{folder / CONFIG_FILE} must hold a mapping; resume from another.")
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
    state = read_state(folder)
    check_resumable(folder, config, dist.world_size, int(state.get("world_size", 1)))
    params = dict(model.named_parameters())
    _check_base(folder, state.get("base"), base_fingerprint(model))
    _check_base(
        folder,
        {n: list(t.shape) for n, t in state["trainable"].items()},
        {n: list(p.shape) for n, p in params.items() if p.requires_grad},
    )
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


def _check_base(folder: Path, saved: dict | None, mine: dict[str, list[int]]) -> None:
    """Refuse a checkpoint whose parameters (names and shapes) differ from this model's."""
    if saved is None:
        return  # a lorakit 0.1 checkpoint: it recorded no fingerprint
    differ = [
        f"{name}: checkpoint {saved.get(name, 'absent')}, this model {mine.get(name, 'absent')}"
        for name in sorted(set(saved) | set(mine))
        if saved.get(name) != mine.get(name)
    ]
    if differ:
        raise LoraError(
            f"Cannot resume from {folder}: it was trained on a different base model "
            f"({len(differ)} parameter(s) differ; first: {'; '.join(differ[:3])}). Point "
            "--model at the base the run was trained on, or start a new run without --resume."
        )
