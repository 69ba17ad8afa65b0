"""The training loop: ``train(TrainConfig(...))`` fine-tunes a LoRA adapter, top to bottom.

One optimizer step (its pieces are in :mod:`lorakit.training.step`)::

    k micro-batches of b sequences  ->  sum of token losses / target tokens in all k  ->  backward
    -> clip gradients -> AdamW step -> schedule step -> log, eval, checkpoint

Everything a run needs comes from :class:`TrainConfig`, whose fields are the YAML keys and the
CLI flags of ``lorakit train`` (their help text lives in the field metadata).

With ``--task NAME=FILE`` (repeated) the run trains one adapter per task on the same frozen
base: each micro-batch holds ``batch_size`` rows of every task, each row goes through its own
adapter (:func:`lorakit.route`), the loss is the sum over tasks of each task's token-normalised
loss and each adapter is clipped on its own, so every adapter gets exactly the updates it would
get trained alone; they are written to ``OUTPUT/NAME``.

Under ``torchrun`` the same loop runs in every process (see :mod:`lorakit.training.distributed`): the
model is wrapped with DDP or FSDP2, rank i trains on slice i of each global batch, the loss is
normalised by the target tokens of all ranks, and rank 0 alone writes files and prints.
"""

from __future__ import annotations

import copy
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import clean_leftovers
from ..data import EncodedDataset, load_datasets
from ..data.encode import TextCodec
from ..errors import LoraError
from ..generate import (
    exact_match_score,
    json_shape,
    shape_matches,
)
from ..inject import add_lora, moe_plan, trainable_parameters
from ..layers.quantized import use_training_kernels
from ..modality import Modality
from ..models.load import base_model_name
from ..vlm.modality import choose_modality
from . import distributed
from .checkpoint import check_resumable, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import Dist
from .inputs import DEFAULT, Inputs, check_inputs
from .loss import chunk_size
from .metrics import PLOT_FILE, Metrics
from .report import bar_label, describe, describe_parallel, log, print_table, short
from .run_folder import claim_output, clean_checkpoints, save_adapter_folder, start_run_folder
from .step import (
    BatchStream,
    adapter_parameters,
    build_optimizer,
    evaluate_loss,
    lr_factor,
    mixed_batch,
    step_loss,
    target_count,
)

SHAPE_CHECKS = 5  # test records prompted as `lorakit generate` does, for the final table


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
        model, tokenizer: an already loaded model and its tokenizer (a text model) or
            processor (a vision-language model); ``None`` loads ``config.model``. The road
            (text or images) is chosen once from them, or from the model folder and the data
            (:func:`lorakit.vlm.modality.choose_modality`).
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
    # Rank 0 writes: it alone holds the output, from before the model loads to the end.
    claim = claim_output(config.output, resume=config.resume, overwrite=config.overwrite)
    try:
        with distributed.lost_rank_message(dist), claim if dist.is_main else nullcontext():
            return _train(config, model, tokenizer, dist)
    finally:
        if joined:
            distributed.teardown(dist)


@dataclass
class _Run:
    """The state of a run between its set-up, its steps and its end."""

    config: TrainConfig
    dist: Dist
    inputs: Inputs
    modality: Modality
    model: nn.Module
    codec: TextCodec
    train_sets: dict[str, EncodedDataset]
    val_set: EncodedDataset | None
    before: dict[str, float] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def pad_id(self) -> int:
        return self.codec.tokenizer.pad_token_id

    def log(self, message: str) -> None:
        log(message, self.is_main)

    def folder(self, name: str) -> Path:
        """Where adapter ``name`` is written: the output itself, or OUTPUT/NAME for a task."""
        output = Path(self.config.output)
        return output if name == DEFAULT else output / name


def _prepare(config: TrainConfig, model: nn.Module | None, processor: Any, dist: Dist) -> _Run:
    """Check the inputs, load the model and data, measure the base model: all before LoRA."""
    modality = choose_modality(config.model if model is None else None, config.data, processor)
    modality.refuse(config, dist.world_size)
    inputs = check_inputs(config, check_model=model is None)
    if inputs.resume_dir is not None:
        check_resumable(inputs.resume_dir, config, dist.world_size)
    log(describe(config), dist.is_main)
    if model is None:
        model, processor = modality.load(
            config.model, config.dtype, config.quantize, dist.device, config.trust_remote_code
        )
    if config.chat_template is not None:
        processor = copy.deepcopy(processor)  # the caller's tokenizer keeps its own template
        next(iter(inputs.settings.values())).apply_template(processor)
    codec = modality.codec(processor)

    # One adapter per task (``--task NAME=FILE``), or the adapter "default" on --data.
    train_sets: dict[str, EncodedDataset] = {}
    for name, path in (config.task_files() or {DEFAULT: config.data}).items():
        train_sets[name], val_set = load_datasets(
            path,
            codec,
            config.seq_len,
            val_path=config.val_data,
            val_fraction=config.val_fraction,
            data_format=config.format,
            train_on_prompt=config.train_on_prompt,
            pack=config.packing,
            seed=config.seed,
            system=config.system,
            skip_bad_records=config.skip_bad_records,
        )
        label = "" if name == DEFAULT else " " + name
        log(f"train{label}: {train_sets[name].summary()}", dist.is_main)
    if val_set is not None:
        log(f"val:   {val_set.summary()}", dist.is_main)
    run = _Run(config, dist, inputs, modality, model, codec, train_sets, val_set)
    if inputs.test_examples is not None and inputs.resume_dir is None:
        run.before["exact_match"] = exact_match_score(
            model,
            codec,
            inputs.test_examples,
            progress=bar_label(run.is_main, inputs.test_examples, "base model"),
        )
        run.log(f"base model exact match on {config.test_data}: {run.before['exact_match']:.1%}")
    return run


def _add_adapters(run: _Run) -> nn.Module:
    """Add one adapter per task, seeded as a run on that task alone; return the model to step."""
    config, model, dist = run.config, run.model, run.dist
    lora = run.modality.targets(
        model, config.lora_config(base_model_name(model, config.model)), config
    )
    plan = run.modality.describe(model, config)
    if plan:
        run.log(plan)
    # A mixture of experts: its parts in the plan, and the default dropout where PEFT takes it.
    lora, moe = moe_plan(model, lora, TrainConfig.dropout, next(iter(run.train_sets)))
    if moe:
        run.log("\n".join(moe))
    for name in run.train_sets:
        # LoRA's A init draws from the global generator: reseeding gives every task's adapter
        # the init a run on that task alone would draw.
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        add_lora(model, lora, name)
    if dist.rank:
        # The same init on every rank, then different dropout masks per rank (rank 0 keeps
        # the one-process stream).
        torch.manual_seed(config.seed + 1_000_003 * dist.rank)
        random.seed(config.seed + 1_000_003 * dist.rank)
    run.log(str(trainable_parameters(model)))
    use_training_kernels(model)  # bitsandbytes' packed eval kernel has no backward
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
    # ``model`` keeps the parameter names (checkpoints, adapter); the wrapper runs the steps,
    # compiled where asked (two graphs: the first forward finds the shared inputs).
    wrapped = distributed.wrap(model, dist)
    return torch.compile(wrapped) if config.compile else wrapped


@dataclass
class _Loop:
    """The optimisation state of a run: optimizer, schedule, data streams, position, logs."""

    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    schedule: Any  # step -> lr factor
    streams: dict[str, BatchStream]
    mine: slice  # this rank's rows of each global micro-batch
    metrics: Metrics | None = None
    step: int = 0
    last_saved: Path | None = None


def _train(config: TrainConfig, model: nn.Module | None, tokenizer: Any, dist: Dist) -> TrainResult:
    run = _prepare(config, model, tokenizer, dist)
    wrapped = _add_adapters(run)
    chunk_size(wrapped, config.loss_chunk_tokens)  # refuse a forced chunked loss up front
    loop = _start_loop(run)
    if run.val_set is not None and loop.step == 0 and config.eval_every:
        loop.metrics.eval(0, _val_loss(run))
    wrapped.train()
    _run_steps(run, wrapped, loop)
    return _finish(run, loop.metrics, loop.step)


def _start_loop(run: _Run) -> _Loop:
    """Steps, optimizer, schedule and data streams; restored from the checkpoint on resume."""
    config, dist, model = run.config, run.dist, run.model
    # Rank i takes slice i of each global micro-batch of world * batch_size examples, so one
    # step sees the same examples as one process with batch world * batch_size.
    global_batch = config.batch_size * dist.world_size
    run.log(describe_parallel(config, dist, len(run.train_sets)))
    largest = max(len(dataset) for dataset in run.train_sets.values())
    steps_per_epoch = math.ceil(largest / (global_batch * config.grad_accum))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    if config.warmup_steps >= total_steps:
        run.log(
            f"warning: --warmup-steps {config.warmup_steps} is not shorter than the run "
            f"({total_steps} steps): the lr never reaches --lr {config.lr:g} and no "
            f"{config.schedule} decay follows. Lower --warmup-steps (e.g. to "
            f"{total_steps // 10})."
        )
    optimizer = build_optimizer(model, config)
    schedule = partial(
        lr_factor,
        warmup_steps=config.warmup_steps,
        total_steps=total_steps,
        schedule=config.schedule,
    )
    loop = _Loop(
        total_steps,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        schedule,
        # Each task has its own stream, as if trained alone; a micro-batch holds every task.
        {n: BatchStream(len(d), global_batch, config.seed) for n, d in run.train_sets.items()},
        slice(dist.rank * config.batch_size, (dist.rank + 1) * config.batch_size),
    )
    resume_dir = loop.last_saved = run.inputs.resume_dir
    if resume_dir is not None:
        stream = next(iter(loop.streams.values()))  # checkpoints: single-task runs only
        loop.step = load_checkpoint(
            resume_dir, model, optimizer, loop.scheduler, stream, config, dist
        )
        run.log(f"resumed from {resume_dir} at step {loop.step}")
    output = Path(config.output)
    if run.is_main:
        # --overwrite replaces the earlier run only now, once the inputs and the model passed.
        start_run_folder(output, config.to_dict(), replace=config.overwrite)
        # What a killed run left: hidden halves of checkpoints and of adapter folders.
        for path in clean_checkpoints(output) + [
            p for name in run.train_sets for p in clean_leftovers(run.folder(name))
        ]:
            run.log(f"removed {path}, left by an interrupted run")
    loop.metrics = Metrics(
        output, loop.step, config.tensorboard, run.is_main, config.report_to, config.to_dict()
    )
    return loop


def _run_steps(run: _Run, wrapped: nn.Module, loop: _Loop) -> None:
    """Optimizer steps up to ``loop.total_steps``: log, evaluate and save as configured."""
    from ..progress import bar as progress_bar

    config = run.config
    bar = progress_bar(
        loop.total_steps, "train", initial=loop.step, disable=not run.is_main, dynamic_ncols=True
    )
    while loop.step < loop.total_steps:
        t0 = time.perf_counter()
        losses, tokens, grad_norm = _step(run, wrapped, loop)
        lr = config.lr * loop.schedule(loop.step)  # the lr of this update (A under LoRA+)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad(set_to_none=True)
        loop.step += 1
        step = loop.step
        _check_finite(run, loop)

        loss = sum(losses.values())
        tok_per_s = tokens / (time.perf_counter() - t0)
        per_task = losses if len(losses) > 1 else None
        loop.metrics.train(step, loss, lr, grad_norm, tok_per_s, per_task)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_per_s:.0f}")
        bar.update(1)

        eval_due = config.eval_every and step % config.eval_every == 0
        if run.val_set is not None and eval_due and step != loop.total_steps:
            loop.metrics.eval(step, _val_loss(run))
        if config.save_every and step % config.save_every == 0:
            stream = next(iter(loop.streams.values()))
            loop.last_saved = save_checkpoint(
                Path(config.output),
                step,
                run.model,
                loop.optimizer,
                loop.scheduler,
                {"stream": stream.state_dict()},
                config,
                config.keep_checkpoints,
                run.dist,
                settings=run.inputs.settings[DEFAULT],
            )
    bar.close()


def _check_finite(run: _Run, loop: _Loop) -> None:
    """Stop before a non-finite adapter can be saved (an lr or a loss scale far too large).

    One sum per parameter and one sync: a NaN or inf anywhere makes the total non-finite.
    """
    params = [p for p in run.model.parameters() if p.requires_grad]
    with torch.no_grad():
        local = float(
            torch.stack([distributed.local_tensor(p).float().sum() for p in params]).sum()
        )
    (total,) = distributed.all_reduce_sum([local], run.dist)
    if math.isfinite(total):
        return
    kept = (
        f"the last good checkpoint, {loop.last_saved}, is kept"
        if loop.last_saved
        else "no checkpoint had been saved"
    )
    raise LoraError(
        f"The adapter's weights stopped being finite at step {loop.step} (lr "
        f"{run.config.lr * loop.schedule(loop.step - 1):.3g}); the adapter was not written, and "
        f"{kept}. Lower --lr (or keep --max-grad-norm on), then resume from the checkpoint or "
        "start again."
    )


def _val_loss(run: _Run) -> float:
    """Mean next-token loss over the validation set (a progress bar on rank 0)."""
    label = "val loss" if run.is_main else None
    config = run.config
    return evaluate_loss(
        run.model, run.val_set, config.batch_size, run.pad_id, label, config.loss_chunk_tokens
    )


def _step(run: _Run, wrapped: nn.Module, loop: _Loop) -> tuple[dict[str, float], int, float]:
    """Forward and backward over the step's micro-batches, then clip.

    Returns each task's loss, the tokens of the step (all ranks) and the gradient norm.
    """
    config, dist, names = run.config, run.dist, list(run.train_sets)
    micro = [
        mixed_batch(run.train_sets, loop.streams, loop.mine, run.pad_id)
        for _ in range(config.grad_accum)
    ]
    # Normalise each task by its targets in the whole step on all ranks, so accumulation
    # and more processes both equal one bigger batch.
    local = [sum(target_count(b, rows, name) for b, rows in micro) for name in names]
    targets = dict(zip(names, distributed.all_reduce_sum(local, dist), strict=True))
    losses = dict.fromkeys(names, 0.0)
    for index, (batch, rows) in enumerate(micro):
        with distributed.no_grad_sync(wrapped, dist, sync=index == len(micro) - 1):
            with torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=config.bf16):
                shares = step_loss(wrapped, batch, rows, targets, config.loss_chunk_tokens)
            # DDP and FSDP2 average gradients over the N ranks: (1/N) sum_r g_r. Rank r's
            # loss is its share of the global mean, so N times it makes that average
            # sum_r g_r, the gradient of the global mean loss.
            (sum(shares.values()) * dist.world_size).backward()
        for name, share in shares.items():
            losses[name] += share.item()
    tokens = sum(int(batch["attention_mask"].sum()) for batch, _ in micro)
    *task_losses, tokens = distributed.all_reduce_sum([*losses.values(), tokens], dist)
    losses = dict(zip(names, task_losses, strict=True))
    total = sum(losses.values())
    if not math.isfinite(total):
        where = f"; the last good checkpoint is {loop.last_saved}" if loop.last_saved else ""
        raise LoraError(
            f"The loss is not finite at step {loop.step + 1} ({total}){where}. Lower --lr, "
            "keep --max-grad-norm on, or turn off --bf16, and resume from a checkpoint."
        )
    # Each task's adapter is clipped on its own, as if trained alone. The norm before
    # clipping is logged (inf = measure only): equal norms across world sizes show the
    # gradient's scale is right, which Adam's updates alone would hide.
    max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf
    norms = [
        float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        for params in adapter_parameters(run.model, names).values()
    ]
    return losses, int(tokens), math.sqrt(sum(n * n for n in norms))


def _finish(run: _Run, metrics: Metrics, step: int) -> TrainResult:
    """Final evaluation, the adapters with their generation settings, the plot and the table."""
    config, model, dist = run.config, run.model, run.dist
    if run.val_set is not None:
        metrics.eval(step, _val_loss(run))
    model.eval()
    after: dict[str, float] = {}
    shape = None
    test = run.inputs.test_examples
    if test is not None:
        after["exact_match"] = exact_match_score(
            model, run.codec, test, progress=bar_label(run.is_main, test, "trained")
        )
        settings = run.inputs.settings[next(iter(run.train_sets))]
        if len(run.train_sets) == 1 and settings.system and json_shape(test[0][-1]["content"]):
            shape = shape_matches(model, run.codec, test[:SHAPE_CHECKS], settings)
    with distributed.whole_trainable_params(model, dist):
        if run.is_main:
            for name in run.train_sets:
                save_adapter_folder(run.model, run.folder(name), name, run.inputs.settings[name])
    if run.is_main:
        metrics.plot(Path(config.output) / PLOT_FILE)
        if run.before or after:
            print_table(run.before, after, metrics.eval_losses, shape)
        folders = ", ".join(str(run.folder(name)) for name in run.train_sets)
        run.log(f"adapter written to {folders}")
        for name, settings in run.inputs.settings.items():
            if settings.system:
                label = "" if name == DEFAULT else f" ({name})"
                run.log(f"saved with it{label}: the system prompt {short(settings.system)}")
    metrics.close()
    return TrainResult(
        Path(config.output),
        step,
        metrics.train_losses,
        metrics.eval_losses,
        model,
        run.before,
        after,
    )
