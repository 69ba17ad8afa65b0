"""``lorakit train`` on image + text data: the training loop of :mod:`lorakit.train`, with a
vision-language model, its processor and :class:`~lorakit.vlm.collate.VlmDataset`.

What differs from a text run is set up here: the data (records with images), the model and
processor (:func:`~lorakit.vlm.models.load_vlm`), the adapter's targets (the language model
only, see :mod:`lorakit.vlm.targeting`) and exact match with images. The steps themselves,
checkpoints, metrics and the adapter's files are :mod:`lorakit.train`'s.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import split_examples, with_system
from ..errors import LoraError
from ..generate import GenerationSettings, print_table
from ..inject import add_lora, trainable_parameters
from ..training import distributed
from ..training.config import TrainConfig
from ..training.loop import (
    DEFAULT,
    Inputs,
    Loop,
    Run,
    TrainResult,
    base_name,
    run_steps,
    save_run_adapter,
    start_loop,
    val_loss,
)
from ..training.metrics import PLOT_FILE
from .collate import VlmDataset, encode_vlm
from .data import VlmExample, read_vlm_data
from .generate import vlm_exact_match
from .targeting import describe, vlm_lora_config

# Settings of a text run that image runs do not implement yet, refused by name.
_NOT_IMPLEMENTED = {
    "tasks": "--task",
    "packing": "--packing",
    "resume": "--resume",
    "quantize": "--quantize",
    "fsdp": "--fsdp",
    "chat_template": "--chat-template (the processor's template is used)",
    "format": "--format",
}


def check_vlm_config(config: TrainConfig) -> None:
    """Refuse, by name, the settings image runs do not implement."""
    used = [flag for key, flag in _NOT_IMPLEMENTED.items() if getattr(config, key)]
    if used:
        raise LoraError(
            f"Not implemented with image data: {', '.join(used)}. Drop them to train on images."
        )


def _read(path: str, flag: str, config: TrainConfig) -> list[VlmExample]:
    if not Path(path).is_file():
        raise LoraError(f"{flag} {path}: file not found; pass an existing JSON/JSONL file.")
    examples = read_vlm_data(path, skip_bad_records=config.skip_bad_records)
    for example in examples:
        example.messages = with_system(example.messages, config.system)
    return examples


def _datasets(
    config: TrainConfig, processor: Any
) -> tuple[VlmDataset, VlmDataset | None, list[VlmExample] | None]:
    """Train and validation data sets, encoded, and the test examples."""
    train = _read(config.data, "--data", config)
    val = _read(config.val_data, "--val-data", config) if config.val_data else None
    if config.val_fraction:
        train, val = split_examples(train, config.val_fraction, config.seed)
    test = _read(config.test_data, "--test-data", config) if config.test_data else None

    def encode(examples: list[VlmExample], path: str) -> VlmDataset:
        return encode_vlm(
            examples,
            processor,
            config.seq_len,
            train_on_prompt=config.train_on_prompt,
            source=path,
        )

    val_set = encode(val, config.val_data or config.data) if val else None
    return encode(train, config.data), val_set, test


def train_vlm(
    config: TrainConfig, model: nn.Module | None = None, processor: Any = None
) -> TrainResult:
    """Fine-tune a LoRA adapter on a VLM's language model per ``config``; see the module doc.

    Args:
        config: the run's settings; ``config.model`` is a VLM folder unless ``model`` is given.
        model, processor: an already loaded VLM and its processor.

    Raises:
        LoraError: a setting image runs do not implement, bad data (see
            :func:`~lorakit.vlm.data.read_vlm_data`), or a model that is not a VLM.
    """
    check_vlm_config(config)
    dist = distributed.setup(False, config.dist_timeout)
    try:
        if dist.enabled:
            raise LoraError(
                "Image data under torchrun (--nproc) is not implemented: run one process."
            )
        if model is None:
            from .models import load_vlm

            model, processor = load_vlm(config.model, config.dtype, config.trust_remote_code)
        train_set, val_set, test = _datasets(config, processor)
        settings = {DEFAULT: GenerationSettings(config.system or None, None)}
        run = Run(
            config,
            dist,
            Inputs(settings, None, None),
            model,
            processor.tokenizer,
            {DEFAULT: train_set},
            val_set,
        )
        run.log(f"train: {train_set.summary()}")
        if val_set is not None:
            run.log(f"val:   {val_set.summary()}")
        if test is not None:
            run.before["exact_match"] = vlm_exact_match(model, processor, test)
            run.log(
                f"base model exact match on {config.test_data}: {run.before['exact_match']:.1%}"
            )
        _add_adapter(run)
        loop = start_loop(run)
        if val_set is not None and config.eval_every:
            loop.metrics.eval(0, val_loss(run))
        model.train()
        run_steps(run, model, loop)
        return _finish(run, loop, processor, test)
    finally:
        distributed.teardown(dist)


def _add_adapter(run: Run) -> None:
    """LoRA on the language model (and what the flags add), seeded; the plan printed."""
    config, model = run.config, run.model
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    lora = vlm_lora_config(
        model,
        config.lora_config(base_name(model, config.model)),
        train_projector=config.train_projector,
        train_vision=config.train_vision,
    )
    run.log(describe(model, config.train_projector, config.train_vision))
    add_lora(model, lora, DEFAULT)
    run.log(str(trainable_parameters(model)))
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False


def _finish(run: Run, loop: Loop, processor: Any, test: list[VlmExample] | None) -> TrainResult:
    """Final validation loss and exact match, the adapter, the plot and the table."""
    config, model = run.config, run.model
    if run.val_set is not None:
        loop.metrics.eval(loop.step, val_loss(run))
    model.eval()
    after = {}
    if test is not None:
        after["exact_match"] = vlm_exact_match(model, processor, test)
    save_run_adapter(run, DEFAULT)
    loop.metrics.plot(Path(config.output) / PLOT_FILE)
    if run.before or after:
        print_table(run.before, after, loop.metrics.eval_losses)
    run.log(f"adapter written to {config.output}")
    loop.metrics.close()
    return TrainResult(
        Path(config.output),
        loop.step,
        loop.metrics.train_losses,
        loop.metrics.eval_losses,
        model,
        run.before,
        after,
    )
