"""The pieces of one optimizer step: data order, loss, learning-rate schedule, optimizer.

The loss of a step is the sum of next-token cross-entropy over the target tokens of all its
micro-batches divided by their count (:func:`step_loss`), so batch ``b`` with ``k``
accumulation steps gives the same update as one batch of ``b * k``. Data comes as an endless
stream of shuffled indices (:class:`BatchStream`) whose position is two integers, so a resumed
run sees the same batches as an uninterrupted one. Where the output head is frozen and plain,
the cross-entropy comes from the hidden states a chunk of tokens at a time, never the whole
(tokens, vocab) logits (:mod:`.loss`). :mod:`.loop` runs the loop.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data import IGNORE_INDEX, EncodedDataset
from ..targeting import lora_layers
from .config import TrainConfig
from .loss import token_losses


# --- learning-rate schedule -------------------------------------------------------------------
def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr for the update made at ``step`` (0-based).

    Linear warmup ``(step + 1) / (warmup + 1)`` for ``step < warmup_steps``, then
    ``progress = (step - warmup) / (total - warmup)`` in [0, 1) maps to
    ``0.5 (1 + cos(pi progress))`` (cosine), ``1 - progress`` (linear) or 1 (constant).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0


# --- data order ---------------------------------------------------------------------------------
class BatchStream:
    """Endless micro-batches of indices: a fresh seeded shuffle each epoch.

    The position is ``(epoch, offset)``: restoring it replays exactly the same batches, which is
    what makes resume exact. A batch may straddle two epochs, so every batch is full.
    """

    def __init__(self, size: int, batch_size: int, seed: int) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.epoch, self.offset = 0, 0

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices, moving into the next epoch's order when one ends."""
        indices: list[int] = []
        while len(indices) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.offset : self.offset + self.batch_size - len(indices)]
            indices += take
            self.offset += len(take)
            if self.offset >= self.size:
                self.epoch, self.offset = self.epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, int]:
        """The position, ``{"epoch", "offset"}``: all a checkpoint needs to replay the stream."""
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Go back to a position :meth:`state_dict` gave."""
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


# --- loss -----------------------------------------------------------------------------------------
def target_count(
    batch: dict[str, torch.Tensor], rows: list[str] | None = None, task: str | None = None
) -> int:
    """Tokens that carry loss: labels shifted by one, as the model predicts the next token.

    With ``rows`` (the task of each row) and ``task``: only the rows of that task.
    """
    per_row = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1)  # (B,)
    if rows is not None:
        per_row = per_row[[i for i, name in enumerate(rows) if name == task]]
    return int(per_row.sum())


def row_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None
) -> torch.Tensor:
    """Per row, the sum of next-token cross-entropy over its target tokens: shape (B,).

    The batch moves to the device of the model's parameters (a GPU under ``torchrun``).
    ``chunk_tokens``: how the loss is computed (:func:`lorakit.training.loss.token_losses`:
    ``None`` = chunked from the hidden states where exact, 0 = over full logits).
    """
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    # Every input but the labels: a VLM's batch also holds pixel_values, image_grid_thw, ...
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return token_losses(model, inputs, batch["labels"], chunk_tokens).sum(dim=1)


def summed_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int | None = None
) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the target tokens of ``batch``."""
    return row_losses(model, batch, chunk_tokens).sum()


def step_loss(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    rows: list[str],
    targets: dict[str, float],
    chunk_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """This micro-batch's share of each task's step loss: its loss / the task's target tokens.

    ``rows`` names each row's task and ``targets`` each task's target tokens in the whole step;
    the loss to minimise is the sum of the values. One task: the summed loss over ``targets``.
    Several: rows are routed to their task's adapter (:func:`lorakit.route`), so each adapter's
    gradient is its own task's mean-loss gradient, exactly as if it were trained alone.
    ``chunk_tokens``: as for :func:`row_losses` (``TrainConfig.loss_chunk_tokens``).
    """
    if len(targets) == 1:
        ((name, count),) = targets.items()
        return {name: summed_loss(model, batch, chunk_tokens) / max(count, 1)}
    from ..adapters import route

    # Adapters are found on the model itself, not on a DDP wrapper around it.
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with route(inner, rows):
        per_row = row_losses(model, batch, chunk_tokens)
    losses = {}
    for name, count in targets.items():
        mine = [i for i, task in enumerate(rows) if task == name]
        losses[name] = per_row[mine].sum() / max(count, 1)
    return losses


def mixed_batch(
    train_sets: dict[str, EncodedDataset],
    streams: dict[str, BatchStream],
    mine: slice,
    pad_id: int,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One micro-batch: this rank's slice of every task's next batch, and each row's task."""
    rows = [(name, i) for name, stream in streams.items() for i in stream.next_batch()[mine]]
    # The first data set's collate: token lists are padded, image records run the processor.
    batch = next(iter(train_sets.values())).collate(
        [train_sets[name][i] for name, i in rows], pad_id
    )
    return batch, [name for name, _ in rows]


def adapter_parameters(model: nn.Module, names: list[str]) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by adapter: all of them for one adapter, else each LoRA's A and B."""
    if len(names) == 1:
        return {names[0]: [p for p in model.parameters() if p.requires_grad]}
    from ..targeting import iter_adapter_modules

    groups: dict[str, list[nn.Parameter]] = {name: [] for name in names}
    for _, module in iter_adapter_modules(model):
        for name in names:
            if name in module.adapter_names():
                groups[name] += module.adapter_parameters(name)
    return groups


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    dataset: EncodedDataset,
    batch_size: int,
    pad_id: int,
    progress: str | None = None,
    chunk_tokens: int | None = None,
) -> float:
    """Mean next-token loss over every target token of ``dataset`` (eval mode, no dropout).

    ``progress``: the label of a progress bar (rate, ETA) over the sequences; ``None``: none.
    ``chunk_tokens``: as for :func:`row_losses`; without gradients the chunked loss keeps
    nothing for a backward, so it only saves the (tokens, vocab) logits.
    """
    from ..progress import bar as progress_bar

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = progress_bar(len(dataset), progress, "seq", leave=False)
    for start in range(0, len(dataset), batch_size):
        batch = dataset.collate(
            [dataset[i] for i in range(start, start + batch_size) if i < len(dataset)], pad_id
        )
        total += float(summed_loss(model, batch, chunk_tokens))
        count += target_count(batch)
        bar.update(len(batch["input_ids"]))
    bar.close()
    model.train(was_training)
    return total / max(count, 1)


# --- optimizer ------------------------------------------------------------------------------------
# Devices with torch's fused AdamW kernel (torch checks this only at the first step, too late
# to fall back, so it is checked here).
FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only, in up to four groups.

    Weight decay applies to matrices only (never biases and norms, which are 1-D). With LoRA+
    the B matrices learn ``loraplus_ratio`` times faster than the rest. The update is torch's
    fused kernel (one call for every tensor) where all parameters allow it, else ``foreach``
    (a few batched calls): the same AdamW maths as the default per-tensor loop, which on a CPU
    is what torch picks without being asked, and costs one Python round per tensor.
    """
    b_params = {id(p) for _, layer in lora_layers(model) for p in layer.lora_B.values()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault((param.ndim >= 2, id(param) in b_params), []).append(param)
    param_groups = [
        {
            "params": params,
            "weight_decay": config.weight_decay if decay else 0.0,
            "lr": config.lr * (config.loraplus_ratio if is_b else 1.0),
        }
        for (decay, is_b), params in sorted(groups.items())
    ]
    params = [p for group in param_groups for p in group["params"]]
    if all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params):
        return torch.optim.AdamW(param_groups, lr=config.lr, fused=True)
    return torch.optim.AdamW(param_groups, lr=config.lr, foreach=True)
