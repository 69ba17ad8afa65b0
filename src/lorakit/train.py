"""The training loop: ``train(TrainConfig(...))`` fine-tunes a LoRA adapter, top to bottom.

One optimizer step::

    k micro-batches of b sequences  ->  sum of token losses / target tokens in all k  ->  backward
    -> clip gradients -> AdamW step -> schedule step -> log, eval, checkpoint

The loss is normalised by the number of target tokens in the whole step, not per micro-batch,
so batch ``b`` with ``k`` accumulation steps gives the same update as one batch of ``b * k``.

Everything a run needs comes from :class:`TrainConfig`, whose fields are the YAML keys and the
CLI flags of ``lorakit train`` (their help text lives in the field metadata). Data comes as an
endless stream of shuffled indices (:class:`BatchStream`) whose position is two integers, so a
resumed run sees the same batches as an uninterrupted one.

With ``--task NAME=FILE`` (repeated) the run trains one adapter per task on the same frozen
base: each micro-batch holds ``batch_size`` rows of every task, each row goes through its own
adapter (:func:`lorakit.route`), the loss is the sum over tasks of each task's token-normalised
loss and each adapter is clipped on its own, so every adapter gets exactly the updates it would
get trained alone; they are written to ``OUTPUT/NAME``.

Under ``torchrun`` the same loop runs in every process (see :mod:`lorakit.distributed`): the
model is wrapped with DDP or FSDP2, rank i trains on slice i of each global batch, the loss is
normalised by the target tokens of all ranks, and rank 0 alone writes files and prints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ALL_LINEAR, LoraConfig
from .data import IGNORE_INDEX, EncodedDataset, collate, load_datasets, read_examples
from .distributed import Dist
from .errors import LoraError
from .inject import add_lora, trainable_parameters
from .io import save_adapter
from .models import DEFAULT_MODEL, resolve_model_spec

SCHEDULES = ("cosine", "linear", "constant")
DEFAULT = "default"  # the adapter's name in a single-task run
CONFIG_FILE = "train_config.yaml"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def _opt(default: Any, help: str) -> Any:
    """A config field whose ``help`` becomes its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything ``lorakit train`` needs; the fields are its YAML keys and flags."""

    # --- model and data
    model: str = _opt(DEFAULT_MODEL, "base model: HF folder, .gguf file or smollm2-135m")
    data: str | None = _opt(None, "training data (JSON/JSONL); none = the bundled demo task")
    tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=FILE, repeated: one adapter per task, batches mix the tasks"},
    )
    val_data: str | None = _opt(None, "validation data file")
    val_fraction: float = _opt(0.0, "hold out this fraction of --data for validation")
    test_data: str | None = _opt(None, "chat/alpaca file for the before/after exact-match table")
    format: str | None = _opt(None, "data format: alpaca, chat, sharegpt or text (auto)")
    seq_len: int = _opt(512, "cut sequences to this many tokens")
    train_on_prompt: bool = _opt(False, "put loss on prompt tokens too")
    packing: bool = _opt(False, "pack several examples into each sequence")
    output: str = _opt("runs/lorakit", "output folder: adapter, metrics, plot, checkpoints")
    # --- LoRA
    rank: int = _opt(16, "LoRA rank r")
    alpha: float = _opt(32.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = _opt(0.05, "dropout on the LoRA input")
    targets: list[str] = field(
        default_factory=lambda: [ALL_LINEAR], metadata={"help": "modules to adapt, comma-separated"}
    )
    # --- optimisation
    max_steps: int = _opt(0, "optimizer steps; 0 = from --epochs")
    epochs: float = _opt(1.0, "passes over the data when --max-steps is 0")
    batch_size: int = _opt(8, "sequences per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(2e-4, "peak learning rate")
    loraplus_ratio: float = _opt(1.0, "LoRA+: lr of B / lr of A (1 = plain LoRA, 16 typical)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (never on biases and norms)")
    schedule: str = _opt("cosine", "lr after warmup: cosine, linear or constant")
    warmup_steps: int = _opt(10, "steps of linear warmup from 0")
    max_grad_norm: float = _opt(1.0, "clip gradients to this norm (0 = off)")
    gradient_checkpointing: bool = _opt(False, "recompute activations to save memory")
    bf16: bool = _opt(False, "bf16 autocast")
    seed: int = _opt(0, "seed for init, shuffling and dropout")
    # --- evaluation, checkpoints, logging
    eval_every: int = _opt(0, "validation loss every N steps (0 = at the end only)")
    save_every: int = _opt(0, "checkpoint every N steps (0 = none)")
    keep_checkpoints: int = _opt(2, "keep the last K checkpoints")
    resume: str | None = _opt(None, "continue from a checkpoint folder (or an output folder)")
    tensorboard: bool = _opt(False, "also write TensorBoard logs to OUTPUT/tensorboard")
    # --- several processes (under torchrun; see docs/distributed.md)
    fsdp: bool = _opt(False, "under torchrun: shard the frozen base with FSDP2 instead of DDP")
    dist_timeout: int = _opt(600, "under torchrun: seconds to wait for another rank, then stop")

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        self.tasks = [t.strip() for entry in self.tasks for t in entry.split(",") if t.strip()]
        problems = _task_problems(self)
        positive = ("seq_len", "rank", "batch_size", "grad_accum", "keep_checkpoints")
        positive += ("dist_timeout",)
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "warmup_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr!r}")
        if not self.max_steps and not self.epochs > 0:
            problems.append("give --max-steps or a positive --epochs")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.loraplus_ratio > 0:
            problems.append(f"loraplus_ratio must be positive, got {self.loraplus_ratio!r}")
        if self.schedule not in SCHEDULES:
            problems.append(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if not self.targets:
            problems.append("targets is empty: name modules to adapt, e.g. q_proj,v_proj")
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if problems:
            raise LoraError("Invalid training config:\n  - " + "\n  - ".join(problems))

    def task_files(self) -> dict[str, str]:
        """Task name -> data file for ``--task NAME=FILE`` (empty: one adapter on ``data``)."""
        return dict(entry.split("=", 1) for entry in self.tasks)

    def lora_config(self, base_model: str | None) -> LoraConfig:
        """The adapter's config; ``base_model`` is recorded so the adapter finds its base."""
        targets = ALL_LINEAR if self.targets == [ALL_LINEAR] else list(self.targets)
        return LoraConfig(
            r=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=targets,
            base_model_name_or_path=base_model,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings whose files or state are per adapter; multi-task runs do not support them yet.
_SINGLE_TASK_ONLY = ("data", "val_data", "test_data", "resume")


def _task_problems(config: TrainConfig) -> list[str]:
    """What is wrong with ``config.tasks`` (NAME=FILE entries, unique names, no --data)."""
    if not config.tasks:
        return []
    problems = []
    names = []
    for entry in config.tasks:
        name, _, path = entry.partition("=")
        if not name.strip() or not path.strip() or not name.replace("_", "").isalnum():
            problems.append(f"--task takes NAME=FILE with a letters/digits/_ name, got {entry!r}")
        names.append(name)
    if len(set(names)) < len(names):
        problems.append(f"task names must be unique, got {names}")
    for key in _SINGLE_TASK_ONLY:
        if getattr(config, key):
            problems.append(f"--{key.replace('_', '-')} cannot be combined with --task yet")
    if config.save_every or config.val_fraction:
        problems.append("--save-every and --val-fraction cannot be combined with --task yet")
    return problems


# The demo's settings (no --data): tuned so `lorakit train` meets its accuracy target within
# its time budget on a 2-core CPU. A higher lr than the general default: 40 steps is short.
DEMO_DEFAULTS: dict[str, Any] = {
    "max_steps": 40,
    "lr": 1e-3,
    "batch_size": 8,
    "seq_len": 256,
    "warmup_steps": 5,
    "dropout": 0.0,
    "eval_every": 20,
    "save_every": 20,
}

# Settings a resumed run may change without breaking equality with an uninterrupted one.
_RESUMABLE_CHANGES = {
    "resume",
    "output",
    "max_steps",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "tensorboard",
    "fsdp",
    "dist_timeout",
}


def config_fields() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig`, in order (for the CLI and YAML)."""
    return list(dataclasses.fields(TrainConfig))


def resolve_config(
    yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A config from a YAML file (optional) with ``overrides`` (the flags) on top.

    Without data in either, the bundled demo task is used with :data:`DEMO_DEFAULTS` for the
    keys neither sets.

    Raises:
        LoraError: a missing or malformed YAML file, or unknown keys.
    """
    values: dict[str, Any] = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise LoraError(f"Config file {path} not found; pass an existing YAML file.")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise LoraError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise LoraError(f"{path} must hold a mapping of keys to values.")
        values.update({key.replace("-", "_"): value for key, value in loaded.items()})
    values.update(overrides or {})
    names = {f.name for f in config_fields()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise LoraError(
            f"Unknown config keys: {', '.join(unknown)}. Valid keys: {', '.join(sorted(names))}."
        )
    if values.get("data") is None and not values.get("tasks"):
        from .demo import demo_path

        demo = {"data": str(demo_path("train")), "val_data": str(demo_path("val"))}
        demo["test_data"] = str(demo_path("test"))
        for key, value in {**demo, **DEMO_DEFAULTS}.items():
            values.setdefault(key, value)
        values["data"] = demo["data"]
    return TrainConfig(**values)


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
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
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


def row_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the sum of next-token cross-entropy over its target tokens: shape (B,).

    The batch moves to the device of the model's parameters (a GPU under ``torchrun``).
    """
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # (B, T-1, V) predicts labels (B, T-1): position t predicts token t + 1.
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return token_loss.view(labels.shape).sum(dim=1)  # ignored tokens count 0


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the target tokens of ``batch``."""
    return row_losses(model, batch).sum()


def step_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], rows: list[str], targets: dict[str, float]
) -> torch.Tensor:
    """This micro-batch's share of the step loss: sum over tasks of loss / the task's targets.

    ``rows`` names each row's task and ``targets`` each task's target tokens in the whole step.
    One task: the summed loss over ``targets``. Several: rows are routed to their task's
    adapter (:func:`lorakit.route`), so each adapter's gradient is its own task's mean-loss
    gradient, exactly as if it were trained alone.
    """
    if len(targets) == 1:
        (count,) = targets.values()
        return summed_loss(model, batch) / max(count, 1)
    from .adapters import route

    # Adapters are found on the model itself, not on a DDP wrapper around it.
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with route(inner, rows):
        per_row = row_losses(model, batch)
    total = per_row.new_zeros(())
    for name, count in targets.items():
        mine = [i for i, task in enumerate(rows) if task == name]
        total = total + per_row[mine].sum() / max(count, 1)
    return total


def _mixed_batch(
    train_sets: dict[str, EncodedDataset],
    streams: dict[str, BatchStream],
    mine: slice,
    pad_id: int,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One micro-batch: this rank's slice of every task's next batch, and each row's task."""
    rows = [(name, i) for name, stream in streams.items() for i in stream.next_batch()[mine]]
    batch = collate([train_sets[name][i] for name, i in rows], pad_id)
    return batch, [name for name, _ in rows]


def _adapter_parameters(model: nn.Module, names: list[str]) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by adapter: all of them for one adapter, else each LoRA's A and B."""
    if len(names) == 1:
        return {names[0]: [p for p in model.parameters() if p.requires_grad]}
    from .layers import LoraLayer

    groups: dict[str, list[nn.Parameter]] = {name: [] for name in names}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in names:
                if name in module.lora_A:
                    groups[name] += [module.lora_A[name], module.lora_B[name]]
    return groups


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset: EncodedDataset, batch_size: int, pad_id: int) -> float:
    """Mean next-token loss over every target token of ``dataset`` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collate(
            [dataset[i] for i in range(start, start + batch_size) if i < len(dataset)], pad_id
        )
        total += float(summed_loss(model, batch))
        count += target_count(batch)
    model.train(was_training)
    return total / max(count, 1)


# --- optimizer ------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only, in up to four groups.

    Weight decay applies to matrices only (never biases and norms, which are 1-D). With LoRA+
    the B matrices learn ``loraplus_ratio`` times faster than the rest.
    """
    from .layers import LoraLayer

    b_params = {
        id(p)
        for module in model.modules()
        if isinstance(module, LoraLayer)
        for p in module.lora_B.values()
    }
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
    return torch.optim.AdamW(param_groups, lr=config.lr)


# --- the run --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What a run produced: the output folder, the last step and the logged losses."""

    output: Path
    steps: int
    train_losses: dict[int, float]
    eval_losses: dict[int, float]
    model: nn.Module
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)


def _log(message: str, is_main: bool) -> None:
    if is_main:
        from tqdm import tqdm

        tqdm.write(message)


def train(
    config: TrainConfig,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    dist: Dist | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter per ``config`` and write it to ``config.output``.

    Under ``torchrun`` every process calls this; it joins the process group (unless ``dist``
    is given), trains its slice of each batch and, on rank 0 only, writes the files.

    Args:
        config: the run's settings.
        model, tokenizer: an already loaded model and tokenizer; ``None`` loads
            ``config.model`` with :func:`lorakit.models.load_model`.
        dist: this process's place in a distributed run; ``None`` reads it from the
            ``torchrun`` environment (one process without it) and leaves the group at the end.

    Returns:
        A :class:`TrainResult`; the model holds the trained adapter.

    Raises:
        LoraError: bad data or targets, a resume folder from another model or config, a
            loss that is not finite (the last good checkpoint is kept), or a lost rank.
    """
    joined = dist is None
    dist = dist or distributed.setup(config.fsdp, config.dist_timeout)
    try:
        with distributed.lost_rank_message(dist):
            return _train(config, model, tokenizer, dist)
    finally:
        if joined:
            distributed.teardown(dist)


def _train(config: TrainConfig, model: nn.Module | None, tokenizer: Any, dist: Dist) -> TrainResult:
    from tqdm import tqdm

    from .generate import exact_match_score, print_table

    is_main = dist.is_main
    output = Path(config.output)
    resume_dir = latest_checkpoint(config.resume) if config.resume else None
    if model is None:
        from .models import load_model

        model, tokenizer = load_model(config.model)
    base_model = _base_name(model, config.model)
    _log(_describe(config), is_main)

    # One adapter per task (``--task NAME=FILE``), or the adapter "default" on --data.
    train_sets: dict[str, EncodedDataset] = {}
    for name, path in (config.task_files() or {DEFAULT: config.data}).items():
        train_sets[name], val_set = load_datasets(
            path,
            tokenizer,
            config.seq_len,
            val_path=config.val_data,
            val_fraction=config.val_fraction,
            data_format=config.format,
            train_on_prompt=config.train_on_prompt,
            pack=config.packing,
            seed=config.seed,
        )
        _log(f"train{'' if name == DEFAULT else ' ' + name}: {train_sets[name].summary()}", is_main)
    if val_set is not None:
        _log(f"val:   {val_set.summary()}", is_main)
    test_examples = read_examples(config.test_data, config.format) if config.test_data else None
    pad_id = tokenizer.pad_token_id

    before: dict[str, float] = {}
    if test_examples is not None and not resume_dir:
        before["exact_match"] = exact_match_score(model, tokenizer, test_examples)
        _log(f"base model exact match on {config.test_data}: {before['exact_match']:.1%}", is_main)

    for name in train_sets:
        # LoRA's A init draws from the global generator: reseeding gives every task's adapter
        # the init a run on that task alone would draw.
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        add_lora(model, config.lora_config(base_model), name)
    if dist.rank:
        # The same init on every rank, then different dropout masks per rank (rank 0 keeps
        # the one-process stream).
        torch.manual_seed(config.seed + 1_000_003 * dist.rank)
        random.seed(config.seed + 1_000_003 * dist.rank)
    _log(str(trainable_parameters(model)), is_main)
    if config.gradient_checkpointing:
        # With a frozen embedding no input of a checkpointed block requires grad, and
        # reentrant checkpointing would then drop the adapters' gradients.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    # ``model`` keeps the parameter names (checkpoints, adapter); ``wrapped`` runs the steps.
    wrapped = distributed.wrap(model, dist)

    # Rank i takes slice i of each global micro-batch of world * batch_size examples, so one
    # step sees the same examples as one process with batch world * batch_size.
    global_batch = config.batch_size * dist.world_size
    _log(_describe_parallel(config, dist), is_main)
    largest = max(len(dataset) for dataset in train_sets.values())
    steps_per_epoch = math.ceil(largest / (global_batch * config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer = build_optimizer(model, config)
    schedule = partial(
        lr_factor,
        warmup_steps=config.warmup_steps,
        total_steps=total_steps,
        schedule=config.schedule,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    # Each task has its own stream, as if trained alone; a micro-batch holds rows of every task.
    streams = {
        name: BatchStream(len(d), global_batch, config.seed) for name, d in train_sets.items()
    }
    stream = streams[next(iter(streams))]  # checkpoints: single-task runs only
    mine = slice(dist.rank * config.batch_size, (dist.rank + 1) * config.batch_size)

    start_step = 0
    if resume_dir is not None:
        start_step = load_checkpoint(resume_dir, model, optimizer, scheduler, stream, config, dist)
        _log(f"resumed from {resume_dir} at step {start_step}", is_main)

    metrics = _Metrics(output, start_step, config.tensorboard, is_main)
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        _write_yaml(output / CONFIG_FILE, config.to_dict())
    if val_set is not None and start_step == 0 and config.eval_every:
        metrics.eval(0, evaluate_loss(model, val_set, config.batch_size, pad_id))

    wrapped.train()
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=config.bf16)
    bar = tqdm(
        total=total_steps, initial=start_step, disable=not is_main, desc="train", dynamic_ncols=True
    )
    last_saved: Path | None = resume_dir
    step = start_step
    while step < total_steps:
        t0 = time.perf_counter()
        micro = [_mixed_batch(train_sets, streams, mine, pad_id) for _ in range(config.grad_accum)]
        # Normalise each task by its targets in the whole step on all ranks, so accumulation
        # and more processes both equal one bigger batch.
        local = [sum(target_count(b, rows, name) for b, rows in micro) for name in train_sets]
        targets = dict(zip(train_sets, distributed.all_reduce_sum(local, dist), strict=True))
        loss_sum = 0.0
        for index, (batch, rows) in enumerate(micro):
            with distributed.no_grad_sync(wrapped, dist, sync=index == len(micro) - 1):
                with autocast:
                    loss = step_loss(wrapped, batch, rows, targets)
                # DDP and FSDP2 average gradients over the N ranks: (1/N) sum_r g_r. Rank r's
                # loss is its share of the global mean, so N times it makes that average
                # sum_r g_r, the gradient of the global mean loss.
                (loss * dist.world_size).backward()
            loss_sum += loss.item()
        tokens = sum(int(batch["attention_mask"].sum()) for batch, _ in micro)
        loss_sum, tokens = distributed.all_reduce_sum([loss_sum, tokens], dist)
        if not math.isfinite(loss_sum):
            where = f"; the last good checkpoint is {last_saved}" if last_saved else ""
            raise LoraError(
                f"The loss is not finite at step {step + 1} ({loss_sum}){where}. Lower --lr, "
                "keep --max-grad-norm on, or turn off --bf16, and resume from a checkpoint."
            )
        # Each task's adapter is clipped on its own, as if trained alone. The norm before
        # clipping is logged (inf = measure only): equal norms across world sizes show the
        # gradient's scale is right, which Adam's updates alone would hide.
        max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
        norms = [
            float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
            for params in _adapter_parameters(model, list(train_sets)).values()
        ]
        grad_norm = math.sqrt(sum(n * n for n in norms))
        lr = config.lr * schedule(step)  # the lr of this update (A matrices under LoRA+)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        tok_per_s = tokens / (time.perf_counter() - t0)
        metrics.train(step, loss_sum, lr, grad_norm, tok_per_s)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_per_s:.0f}")
        bar.update(1)

        eval_due = config.eval_every and step % config.eval_every == 0 and step != total_steps
        if val_set is not None and eval_due:
            metrics.eval(step, evaluate_loss(model, val_set, config.batch_size, pad_id))
        if config.save_every and step % config.save_every == 0:
            state = {"stream": stream.state_dict()}
            last_saved = save_checkpoint(
                output,
                step,
                model,
                optimizer,
                scheduler,
                state,
                config,
                config.keep_checkpoints,
                dist,
            )
    bar.close()

    if val_set is not None:
        metrics.eval(step, evaluate_loss(model, val_set, config.batch_size, pad_id))
    model.eval()
    after: dict[str, float] = {}
    if test_examples is not None:
        after["exact_match"] = exact_match_score(model, tokenizer, test_examples)
    with distributed.whole_trainable_params(model, dist):
        if is_main:
            for name in train_sets:
                save_adapter(model, output if name == DEFAULT else output / name, name)
    if is_main:
        metrics.plot(output / PLOT_FILE)
        if before or after:
            print_table(before, after, metrics.eval_losses)
        folders = [output if name == DEFAULT else output / name for name in train_sets]
        _log(f"adapter written to {', '.join(map(str, folders))}", is_main)
    metrics.close()
    return TrainResult(
        output, step, metrics.train_losses, metrics.eval_losses, model, before, after
    )


def _base_name(model: nn.Module, spec: str) -> str | None:
    """The base model spec to record in the adapter, resolvable again by ``load_model``."""
    name = getattr(model, "name_or_path", None) or getattr(model.config, "name_or_path", None)
    if name:
        return str(name)
    try:
        return resolve_model_spec(spec)
    except LoraError:
        return None


def _describe_parallel(config: TrainConfig, dist: Dist) -> str:
    """The effective batch: processes x batch x accumulation, and how the model is spread."""
    mode = "FSDP2 (fully_shard)" if dist.fsdp else "DDP"
    if not dist.enabled:
        mode = "one process"
    per_step = dist.world_size * config.batch_size * config.grad_accum
    return (
        f"{mode}: {dist.world_size} process(es) x batch {config.batch_size} x grad-accum "
        f"{config.grad_accum} = {per_step} sequences per step, on {dist.device}"
    )


def _describe(config: TrainConfig) -> str:
    keys = ("model", "data", "max_steps", "epochs", "batch_size", "grad_accum", "seq_len")
    keys += ("lr", "schedule", "warmup_steps", "rank", "alpha", "dropout", "targets", "seed")
    values = config.to_dict()
    return "config: " + ", ".join(f"{k}={values[k]}" for k in keys)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


class _Metrics:
    """Train and eval losses: kept in memory, appended to metrics.jsonl, optionally TensorBoard."""

    def __init__(self, output: Path, start_step: int, tensorboard: bool, is_main: bool) -> None:
        self.path = output / METRICS_FILE
        self.is_main = is_main
        self.train_losses: dict[int, float] = {}
        self.eval_losses: dict[int, float] = {}
        self.writer = None
        if not is_main:
            return
        if self.path.is_file():
            # A resumed run keeps the records up to its start and replaces the rest.
            kept = []
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if record["step"] <= start_step:
                    kept.append(line)
                    losses = self.train_losses if "loss" in record else self.eval_losses
                    losses[record["step"]] = record.get("loss", record.get("eval_loss"))
            self.path.write_text("".join(f"{line}\n" for line in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise LoraError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from error
            self.writer = SummaryWriter(str(output / "tensorboard"))

    def _write(self, record: dict[str, Any]) -> None:
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def train(self, step: int, loss: float, lr: float, grad_norm: float, tok_per_s: float) -> None:
        self.train_losses[step] = loss
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        self._write({**record, "tokens_per_s": round(tok_per_s, 1)})
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def eval(self, step: int, loss: float) -> None:
        self.eval_losses[step] = loss
        self._write({"step": step, "eval_loss": loss, "perplexity": math.exp(min(loss, 50))})
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", loss, step)
        _log(f"step {step}: eval loss {loss:.4f}", self.is_main)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(list(self.train_losses), list(self.train_losses.values()), label="train")
        if self.eval_losses:
            ax.plot(list(self.eval_losses), list(self.eval_losses.values()), "o-", label="eval")
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="lorakit train")
        ax.legend()
        fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def iter_config_help() -> Iterator[tuple[str, Any, str]]:
    """(name, default, help) for each config field, for the CLI."""
    for f in config_fields():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        yield f.name, default, f.metadata["help"]
