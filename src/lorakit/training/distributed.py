"""Data-parallel training under ``torchrun``: process group, wrapping, collectives, gathering.

``train()`` has one loop for one process and for N; this module holds what differs::

    torchrun env (RANK, WORLD_SIZE, LOCAL_RANK)  ->  setup()  ->  Dist(rank, world, device)
    model  ->  wrap()  ->  DDP (default) or FSDP2 fully_shard (--fsdp)
    each step: all_reduce_sum(target tokens) before backward, all_reduce_sum(loss) for the log
    saving: whole_trainable_params() and full_optimizer_state() gather FSDP2's adapter shards

Only trainable (adapter) parameters get gradients, so only they are all-reduced: DDP buckets
parameters that require grad, and FSDP2 reduce-scatters only gradients that exist. The frozen
base sends nothing backwards; under FSDP2 it is sharded and all-gathered layer by layer in the
forward pass, which is what saves the memory.

Without ``torchrun`` (no ``WORLD_SIZE`` above 1) :func:`setup` returns a one-process
:class:`Dist` and every function here is a no-op, so single-process training is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from ..errors import LoraError, brief

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run: its rank, the world size, its device, the mode."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, progress bars, checkpoints and the adapter."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether there are other processes to talk to."""
        return self.world_size > 1


def setup(fsdp: bool = False, timeout_s: int = 600) -> Dist:
    """Join the process group ``torchrun`` describes in the environment (or run alone).

    The backend is nccl when CUDA is present (one GPU per local rank), gloo on CPU. The
    timeout bounds every collective: if a rank dies, the others fail after ``timeout_s``
    seconds with a message instead of hanging (``torchrun`` itself also stops the survivors
    when a worker exits with an error).

    One process (no ``torchrun``): nothing to join, and ``fsdp`` has nothing to shard.

    Raises:
        LoraError: more ranks on a node than it has GPUs; launcher variables that are
            malformed or missing (see :func:`launcher_int`).
    """
    world_size = launcher_int("WORLD_SIZE", 1)
    if world_size <= 1:
        _refuse_launch_without_ranks()
        return Dist(fsdp=fsdp)  # one process trains on the CPU, as it always has
    missing = [name for name in _LAUNCHER_SET if not os.environ.get(name)]
    if missing:
        raise LoraError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: launch with torchrun (it sets them "
            "all) or lorakit train --nproc N, or unset WORLD_SIZE to train in one process."
        )
    rank, local_rank = launcher_int("RANK", 0, minimum=0), launcher_int("LOCAL_RANK", 0, minimum=0)
    if launcher_int("MASTER_PORT", 0) > 65535:
        raise LoraError(
            f"MASTER_PORT={os.environ['MASTER_PORT']} is not a port (1 to 65535); launch with "
            "torchrun, which sets it."
        )
    if rank >= world_size:
        raise LoraError(
            f"RANK={rank} is not below WORLD_SIZE={world_size}: ranks run from 0 to "
            "WORLD_SIZE - 1. Launch with torchrun, which sets both."
        )
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise LoraError(
                f"Local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "set --nproc-per-node to at most the number of GPUs on each node."
            )
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        torch_dist.init_process_group(backend, timeout=timeout)
    return Dist(rank, world_size, local_rank, device, fsdp)


# What torchrun sets besides WORLD_SIZE, and torch's env:// rendezvous reads.
_LAUNCHER_SET = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def _refuse_launch_without_ranks() -> None:
    """``accelerate launch --num_processes N`` without ``--multi_gpu`` starts one process
    meant for MPI (a rendezvous address, no ranks): it would silently train alone on a
    fraction of the batch it was asked for."""
    if "ACCELERATE_USE_CPU" in os.environ and "MASTER_PORT" in os.environ:
        raise LoraError(
            "accelerate launch started this process for several processes without giving it "
            "a rank (its MPI road). Add --multi_gpu: accelerate then launches through "
            "torchrun, which lorakit joins (on the CPU, with gloo, when there is no GPU); "
            "see docs/distributed.md."
        )


def launcher_int(name: str, default: int, minimum: int = 1) -> int:
    """The whole number in environment variable ``name`` (``default`` when unset or empty).

    torchrun sets these (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); a
    hand-set one that is not a number, or below ``minimum``, is refused by name rather than
    ending in a ``ValueError`` or a division by zero.

    Raises:
        LoraError: naming the variable, its value and what it must be.
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise LoraError(
            f"The environment variable {name} is {brief(text)}: it must be a whole number, "
            f"{minimum} or more. torchrun sets it; unset it to run one process."
        )
    return value


def teardown(dist: Dist) -> None:
    """Leave the process group (a no-op for one process)."""
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap(model: nn.Module, dist: Dist) -> nn.Module:
    """Move ``model`` to the device and wrap it for data parallelism; return what to call.

    DDP keeps a full copy of the model per rank and all-reduces the adapter gradients. FSDP2
    shards each decoder layer (the classes in Hugging Face's ``_no_split_modules``), then the
    rest, so one layer's full weights exist at a time; ``model`` itself is changed in place and
    returned. One process: the model itself, on its device.
    """
    model.to(dist.device)
    if not dist.enabled:
        return model
    if dist.fsdp:
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextmanager
def no_grad_sync(wrapped: nn.Module, dist: Dist, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for a micro-batch that is not the last of its step.

    Accumulated gradients are then reduced once, in the last backward pass, instead of once per
    micro-batch; the result is the same.
    """
    if not dist.enabled or sync:
        yield
    elif dist.fsdp:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        with wrapped.no_sync():
            yield


def all_reduce_sum(values: list[float], dist: Dist) -> list[float]:
    """The sum over ranks of each number in ``values`` (float64, so token counts stay exact)."""
    if not dist.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(value: Any, dist: Dist) -> list[Any]:
    """``value`` from every rank, in rank order (any picklable object)."""
    if not dist.enabled:
        return [value]
    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, value)
    return gathered


# Gloo and NCCL report a lost peer as a plain RuntimeError; these words identify it.
_LOST_PEER = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout")


@contextmanager
def lost_rank_message(dist: Dist) -> Iterator[None]:
    """Turn a collective that failed (a rank died or hung past the timeout) into a LoraError.

    Raises:
        LoraError: naming this rank, the cause, and how to continue.
    """
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        lost = isinstance(error, torch_dist.DistError) or any(
            word in text.lower() for word in _LOST_PEER
        )
        if not (dist.enabled and lost):
            raise
        first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise LoraError(
            f"Rank {dist.rank} stopped: another process of this {dist.world_size}-process run "
            f"died or did not answer within --dist-timeout ({first_line}). Find the first "
            "error in the other ranks' output, fix it, and continue with --resume OUTPUT (the "
            "last checkpoint)."
        ) from error


# --- whole tensors for saving, shards for loading -------------------------------------------
def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part: an FSDP2 shard's local tensor (no communication); else ``tensor``."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensor(tensor: Tensor) -> Tensor:
    """A whole tensor: an FSDP2 shard (DTensor) is all-gathered; anything else is returned.

    A collective under FSDP2: every rank must call it, in the same order.
    """
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(value: Tensor, param: Tensor) -> Tensor:
    """``value`` (a whole tensor) laid out like ``param``: sharded if ``param`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.ndim:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
    return value


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by name as whole CPU tensors (all ranks must call it)."""
    return {
        name: full_tensor(p.detach()).cpu().clone()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with FSDP2-sharded state (Adam moments) gathered whole.

    The result is what a one-process run would hold, so a checkpoint from N processes resumes
    with any number of processes.
    """
    state = optimizer.state_dict()
    state["state"] = {
        index: {k: full_tensor(v).cpu() if isinstance(v, Tensor) else v for k, v in s.items()}
        for index, s in state["state"].items()
    }
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole-tensor optimizer state, sharding each entry like its parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = dict(state)
    state["state"] = {
        index: {
            k: shard_like(v, params[int(index)]) if isinstance(v, Tensor) else v
            for k, v in s.items()
        }
        for index, s in state["state"].items()
    }
    optimizer.load_state_dict(state)


@contextmanager
def whole_trainable_params(model: nn.Module, dist: Dist) -> Iterator[None]:
    """Inside the block the trainable parameters are whole tensors (for ``save_adapter``).

    Under FSDP2 each sharded trainable parameter is all-gathered (all ranks must enter the
    block) and put in its module's place; the shards go back on exit. Only the adapter is
    gathered, never the frozen base. Otherwise nothing happens.
    """
    if not (dist.enabled and dist.fsdp):
        yield
        return
    from torch.distributed.tensor import DTensor

    swapped = []
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and isinstance(param, DTensor):
                whole = nn.Parameter(param.detach().full_tensor())
                module.register_parameter(name, whole)
                swapped.append((module, name, param))
    try:
        yield
    finally:
        for module, name, param in swapped:
            module.register_parameter(name, param)
