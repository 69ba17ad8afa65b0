"""Training checkpoints: everything needed to continue a run as if it never stopped.

``OUTPUT/checkpoints/step-N/`` holds the adapter (PEFT format, usable on its own), the
resolved ``train_config.yaml`` and ``state.safetensors``: optimizer, scheduler, RNG states, the
data position and the base model's fingerprint (no pickle: see :mod:`.statefile`). Each
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
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_folder, write_errors
from ..errors import LoraError, brief
from ..generate import GenerationSettings, save_generation_settings
from ..io import write_adapter_files
from . import distributed
from .config import TrainConfig, resume_conflicts
from .distributed import Dist
from .run_folder import (
    CHECKPOINTS,
    CONFIG_FILE,
    STATE_FILE,
    STATE_FILE_0_1,
    checkpoint_steps,
    read_run_config,
    write_run_config,
)
from .statefile import load_tree, save_tree
from .step import BatchStream


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's training state; never unpickles code.

    Raises:
        LoraError: the state file is missing, corrupt, or (lorakit 0.1's ``state.pt``) holds
            more than plain tensors and containers.
    """
    if (folder / STATE_FILE).is_file() or not (folder / STATE_FILE_0_1).is_file():
        state = load_tree(folder / STATE_FILE)
    else:
        state = _read_0_1_state(folder / STATE_FILE_0_1)
    if not isinstance(state, dict) or not {"step", "trainable", "optimizer"} <= set(state):
        raise LoraError(f"{folder} does not hold a lorakit training state; resume from another.")
    return state


def _read_0_1_state(path: Path) -> Any:
    """A lorakit 0.1 checkpoint's ``state.pt`` (a ``torch.save`` pickle), without running code.

    ``weights_only=True`` rebuilds plain tensors and containers only; anything else (a class,
    a function: what a tampered file would carry) is refused, never executed.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors vary by torch version
        raise LoraError(
            f"Refusing to read {path}: it is corrupt or holds more than plain tensors "
            f"({type(err).__name__}), and lorakit never unpickles code. Resume from another "
            "checkpoint, or start the run again."
        ) from None


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
            for _, old in checkpoint_steps(root)[:-keep]:
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
    """Adapter, state and config written as one unit to ``target``.

    Raises:
        LoraError: a full disk, a read-only or vanished folder; nothing of ``target`` is left.
    """
    previous = [path for _, path in checkpoint_steps(target.parent) if path != target]
    kept = f"; the last good checkpoint is {previous[-1]}" if previous else ""
    then = f"{kept}. Free space, then continue with --resume {target.parent.parent}."
    with write_errors(f"the checkpoint {target}", then), atomic_folder(target) as new:
        write_adapter_files(model, new)
        if settings is not None:
            save_generation_settings(settings, new)
        save_tree(state, new / STATE_FILE)
        write_run_config(config.to_dict(), new)


def check_resumable(
    folder: Path, config: TrainConfig, world_size: int, saved_world: int | None = None
) -> None:
    """Refuse to resume ``folder`` with a config that would train differently.

    The rule is :func:`~.config.resume_conflicts`; ``batch_size`` may differ as long as
    processes x batch size stays the same. ``saved_world``: the processes the checkpoint ran
    with (read from its state file when ``None``). Cheap: no model is needed.

    Raises:
        LoraError: naming every setting that differs, or a missing or damaged
            ``train_config.yaml``.
    """
    if saved_world is None:
        saved_world = int(read_state(folder).get("world_size", 1))
    saved = read_run_config(folder)
    mine = config.to_dict()
    saved_global = saved.get("batch_size", 0) * saved_world
    same_global_batch = saved_global == mine["batch_size"] * world_size
    differ = sorted(resume_conflicts(saved, mine, batch_size_free=same_global_batch))
    if not differ:
        return
    details = "; ".join(
        f"{k}: checkpoint {brief(saved.get(k))}, now {brief(mine.get(k))}" for k in differ
    )
    if "batch_size" in differ and saved_world != world_size:
        details += (
            f" (the checkpoint ran {saved_world} process(es); keep processes x batch size "
            f"at {saved_global})"
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
    # Checkpoints of lorakit 0.1 from before distributed runs hold one RNG state, rank 0's.
    ranks = state.get("rank_rng") or [{"torch": state["torch_rng"], "python": state["python_rng"]}]
    if len(ranks) == dist.world_size or dist.rank == 0:
        _set_rng_state(ranks[dist.rank] if len(ranks) == dist.world_size else ranks[0])
    stream.load_state_dict(state["stream"])
    return int(state["step"])


def _check_base(folder: Path, saved: dict | None, mine: dict[str, list[int]]) -> None:
    """Refuse a checkpoint whose parameters (names and shapes) differ from this model's."""
    if saved is None:
        return  # an early lorakit 0.1 checkpoint: it recorded no fingerprint
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
