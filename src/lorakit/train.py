"""The training loop: ``train(TrainConfig(...))`` fine-tunes a LoRA adapter, top to bottom.

One optimizer step::

    k micro-batches of b sequences  ->  sum of token losses / target tokens in all k  ->  backward
    -> clip gradients -> AdamW step -> schedule step -> log, eval, checkpoint

The loss is normalised by the number of target tokens in the whole step, not per micro-batch,
so batch ``b`` with ``k`` accumulation steps gives the same update as one batch of ``b * k``.

Everything a run needs comes from :class:`TrainConfig`, whose fields are the YAML keys and the
CLI flags of ``lorakit train`` (their help text lives in the field metadata). Data comes as an
endless stream of shuffled indices (:class:`BatchStream`) whose position is two integers, so a
resumed run sees the same batches as an uninterrupted one. Writing files is done by the main
process only (``is_main``): a distributed run would wrap the model and shard the stream, and
leave the rest unchanged.
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

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ALL_LINEAR, LoraConfig
from .data import IGNORE_INDEX, EncodedDataset, collate, load_datasets, read_examples
from .errors import LoraError
from .inject import add_lora, trainable_parameters
from .io import save_adapter
from .models import DEFAULT_MODEL, resolve_model_spec

SCHEDULES = ("cosine", "linear", "constant")
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

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        problems = []
        positive = ("seq_len", "rank", "batch_size", "grad_accum", "keep_checkpoints")
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
    if values.get("data") is None:
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
def target_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: labels shifted by one, as the model predicts the next token."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the target tokens of ``batch``."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # (B, T-1, V) predicts labels (B, T-1): position t predicts token t + 1.
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


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
    is_main: bool = True,
) -> TrainResult:
    """Fine-tune a LoRA adapter per ``config`` and write it to ``config.output``.

    Args:
        config: the run's settings.
        model, tokenizer: an already loaded model and tokenizer; ``None`` loads
            ``config.model`` with :func:`lorakit.models.load_model`.
        is_main: whether this process writes files and prints (rank 0 of a distributed run).

    Returns:
        A :class:`TrainResult`; the model holds the trained adapter.

    Raises:
        LoraError: bad data or targets, a resume folder from another model or config, or a
            loss that is not finite (the last good checkpoint is kept).
    """
    from tqdm import tqdm

    from .generate import exact_match_score, print_table

    output = Path(config.output)
    resume_dir = latest_checkpoint(config.resume) if config.resume else None
    if model is None:
        from .models import load_model

        model, tokenizer = load_model(config.model)
    base_model = _base_name(model, config.model)
    _log(_describe(config), is_main)

    train_set, val_set = load_datasets(
        config.data,
        tokenizer,
        config.seq_len,
        val_path=config.val_data,
        val_fraction=config.val_fraction,
        data_format=config.format,
        train_on_prompt=config.train_on_prompt,
        pack=config.packing,
        seed=config.seed,
    )
    _log(f"train: {train_set.summary()}", is_main)
    if val_set is not None:
        _log(f"val:   {val_set.summary()}", is_main)
    test_examples = read_examples(config.test_data, config.format) if config.test_data else None
    pad_id = tokenizer.pad_token_id

    before: dict[str, float] = {}
    if test_examples is not None and not resume_dir:
        before["exact_match"] = exact_match_score(model, tokenizer, test_examples)
        _log(f"base model exact match on {config.test_data}: {before['exact_match']:.1%}", is_main)

    torch.manual_seed(config.seed)  # LoRA's A init draws from the global generator
    random.seed(config.seed)
    add_lora(model, config.lora_config(base_model))
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

    steps_per_epoch = math.ceil(len(train_set) / (config.batch_size * config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer = build_optimizer(model, config)
    schedule = partial(
        lr_factor,
        warmup_steps=config.warmup_steps,
        total_steps=total_steps,
        schedule=config.schedule,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    stream = BatchStream(len(train_set), config.batch_size, config.seed)

    start_step = 0
    if resume_dir is not None:
        start_step = load_checkpoint(resume_dir, model, optimizer, scheduler, stream, config)
        _log(f"resumed from {resume_dir} at step {start_step}", is_main)

    metrics = _Metrics(output, start_step, config.tensorboard, is_main)
    if is_main:
        output.mkdir(parents=True, exist_ok=True)
        _write_yaml(output / CONFIG_FILE, config.to_dict())
    if val_set is not None and start_step == 0 and config.eval_every:
        metrics.eval(0, evaluate_loss(model, val_set, config.batch_size, pad_id))

    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)
    bar = tqdm(
        total=total_steps, initial=start_step, disable=not is_main, desc="train", dynamic_ncols=True
    )
    last_saved: Path | None = resume_dir
    step = start_step
    while step < total_steps:
        t0 = time.perf_counter()
        micro = [
            collate([train_set[i] for i in stream.next_batch()], pad_id)
            for _ in range(config.grad_accum)
        ]
        # Normalise by the targets of the whole step, so accumulation equals a bigger batch.
        targets = sum(target_count(batch) for batch in micro)
        loss_sum = 0.0
        for batch in micro:
            with autocast:
                loss = summed_loss(model, batch) / max(targets, 1)
            loss.backward()
            loss_sum += loss.item()
        if not math.isfinite(loss_sum):
            where = f"; the last good checkpoint is {last_saved}" if last_saved else ""
            raise LoraError(
                f"The loss is not finite at step {step + 1} ({loss_sum}){where}. Lower --lr, "
                "keep --max-grad-norm on, or turn off --bf16, and resume from a checkpoint."
            )
        if config.max_grad_norm > 0:
            trainable = [p for p in model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        lr = config.lr * schedule(step)  # the lr of this update (A matrices under LoRA+)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        tokens = sum(int(batch["attention_mask"].sum()) for batch in micro)
        tok_per_s = tokens / (time.perf_counter() - t0)
        metrics.train(step, loss_sum, lr, tok_per_s)
        bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_per_s:.0f}")
        bar.update(1)

        eval_due = config.eval_every and step % config.eval_every == 0 and step != total_steps
        if val_set is not None and eval_due:
            metrics.eval(step, evaluate_loss(model, val_set, config.batch_size, pad_id))
        if config.save_every and step % config.save_every == 0 and is_main:
            state = {"stream": stream.state_dict()}
            last_saved = save_checkpoint(
                output, step, model, optimizer, scheduler, state, config, config.keep_checkpoints
            )
    bar.close()

    if val_set is not None:
        metrics.eval(step, evaluate_loss(model, val_set, config.batch_size, pad_id))
    model.eval()
    after: dict[str, float] = {}
    if test_examples is not None:
        after["exact_match"] = exact_match_score(model, tokenizer, test_examples)
    if is_main:
        save_adapter(model, output)
        metrics.plot(output / PLOT_FILE)
        if before or after:
            print_table(before, after, metrics.eval_losses)
        _log(f"adapter written to {output}", is_main)
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

    def train(self, step: int, loss: float, lr: float, tok_per_s: float) -> None:
        self.train_losses[step] = loss
        self._write({"step": step, "loss": loss, "lr": lr, "tokens_per_s": round(tok_per_s, 1)})
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
