"""Export from an adapter folder: check it, load its base model, load the adapter, write.

What the CLI's ``lorakit export`` calls. Order, so that each problem shows before the next one
costs anything: the folder and what the target runtime cannot apply, read from the adapter's
files alone (DoRA, ``modules_to_save`` copies, trainable tokens, expert LoRA: no base needed,
so an adapter that records no base hears about those first); then the base, the one the
adapter records unless ``model`` is given; then lorakit's own checks on loading (right base
model, finite values).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import LoraConfig
from ..errors import LoraError
from ..io import CONFIG_NAME, PREFIX, adapter_state_dict, read_adapter
from ..layers import ModulesToSave
from ..targeting import matches
from .pairs import Collected

TARGETS = ("gguf", "vllm")
_LORA_KEYS = (".lora_", ".base_layer.", ".token_adapter.")  # not a whole saved module's


def full_weights(model: nn.Module, tensors: dict) -> list[str]:
    """Whole base weights the adapter file replaced on loading: PEFT saves an adapted
    embedding (and the head) in full when its rows changed, e.g. a resized vocabulary."""
    held = set(adapter_state_dict(model))
    copies = tuple(f".{p}" for p in ModulesToSave.peft_duplicates)  # PEFT's copies of saved ones
    return sorted(
        k.removeprefix(PREFIX) for k in tensors if k not in held and not any(c in k for c in copies)
    )


def _paths(tensors: dict, marker: str) -> list[str]:
    """Module paths of the keys holding ``marker`` (``...q_proj.lora_magnitude_vector...``)."""
    return sorted({k.removeprefix(PREFIX).split(marker)[0] for k in tensors if marker in k})


def file_problems(config: LoraConfig, tensors: dict) -> Collected:
    """What adapter files hold beyond plain LoRA pairs, by module path, with no model: a
    :class:`Collected` without pairs, for the same refusals as a loaded adapter gets."""
    saved = sorted(
        {
            k.removeprefix(PREFIX).rsplit(".", 1)[0]
            for k in tensors
            if not any(m in k for m in _LORA_KEYS)
            and matches(config.modules_to_save, k.removeprefix(PREFIX).rsplit(".", 1)[0])
        }
    )
    found = Collected(config)
    found.dora = _paths(tensors, ".lora_magnitude_vector")
    found.lora_bias = _paths(tensors, ".lora_B.bias")
    found.saved = saved or list(config.modules_to_save or [])
    tokens = config.trainable_token_indices
    found.tokens = _paths(tensors, ".token_adapter.") or (
        sorted(tokens) if isinstance(tokens, dict) else ["embed_tokens"] if tokens else []
    )
    found.other = [
        f"{entry} (target_parameters: expert LoRA, one pair per expert)"
        for entry in config.target_parameters or []
    ]
    return found


def _vllm_refusals(found: Collected) -> list[str]:
    """What vLLM's loader refuses, in the words of ``vllm.check_vllm``'s rules."""
    lines = [f"{p}: modules_to_save (vLLM refuses full copies)" for p in found.saved]
    lines += [f"{p}: DoRA (vLLM has no DoRA)" for p in found.dora]
    lines += [f"{p}: trainable token rows (not every vLLM loads them)" for p in found.tokens]
    lines += [f"{p}: lora_bias (vLLM loads no adapter biases)" for p in found.lora_bias]
    if found.config.bias != "none":
        lines.append(f"bias={found.config.bias!r}: vLLM loads no adapter biases")
    return lines


def check_before_base(folder: Path, config: LoraConfig, tensors: dict, to: str) -> None:
    """Refuse, from the files alone, an adapter the runtime ``to`` cannot apply as an adapter.

    Raises:
        LoraError: every such module named, and whether the adapter records its base.
    """
    from .gguf_adapter import MERGED_HINT, refusals

    found = file_problems(config, tensors)
    lines = refusals(found) if to == "gguf" else _vllm_refusals(found)
    if not lines:
        return
    runtime = "a llama.cpp LoRA" if to == "gguf" else "a vLLM adapter"
    fix = MERGED_HINT if to == "gguf" else "or merge it (lorakit merge) and serve the merged model"
    base = "" if config.base_model_name_or_path else " It records no base model: pass --model."
    raise LoraError(
        f"Cannot export {folder} as {runtime}; it holds what the runtime cannot apply:\n  - "
        + "\n  - ".join(lines)
        + f"\nRetrain without these options, {fix}.{base}"
    )


@dataclass
class ForExport:
    """The base model with the adapter loaded, its tokenizer, and the folder's run settings."""

    model: nn.Module
    tokenizer: Any
    settings: Any  # lorakit.generate.GenerationSettings


def load_for_export(
    adapter_dir: str | os.PathLike,
    model: str | None = None,
    *,
    to: str = "gguf",
    merged: bool = False,
) -> ForExport:
    """The base model (``model``, or the one the adapter records) with the adapter loaded.

    Raises:
        LoraError: no adapter in the folder; what ``to`` cannot apply (unless ``merged``),
            before a missing base is reported; no base model known; an adapter with whole
            embedding weights (extra rows) unless ``merged``; or a wrong base.
    """
    from .. import load_adapter
    from ..generate import read_generation_settings
    from ..models.load import load_model

    folder = Path(adapter_dir)
    if not (folder / CONFIG_NAME).is_file():
        raise LoraError(f"{folder}: not an adapter folder (no {CONFIG_NAME}).")
    config, tensors, _ = read_adapter(folder)
    settings = read_generation_settings(folder)
    if not merged:
        check_before_base(folder, config, tensors, to)
    spec = model or config.base_model_name_or_path
    if not spec:
        raise LoraError(f"{folder} records no base model; pass --model.")
    base, tokenizer = load_model(spec)
    load_adapter(base, folder)
    extra = full_weights(base, tensors)
    if extra and not merged:
        raise LoraError(
            f"{folder} holds whole weights ({', '.join(extra[:4])}), e.g. embedding rows for "
            "new tokens: a runtime's adapter holds LoRA pairs only. Export the model merged "
            "(--merged), with a GGUF whose tokenizer has any new tokens."
        )
    return ForExport(base, tokenizer, settings)


def export_adapter(
    adapter_dir: str | os.PathLike,
    to: str,
    output: str | os.PathLike,
    *,
    merged: bool = False,
    outtype: str | None = None,
    model: str | None = None,
    gguf_metadata: str | os.PathLike | None = None,
    max_lora_rank: int = 16,
) -> Path:
    """Export the adapter in ``adapter_dir`` to ``to`` ("gguf" or "vllm") at ``output``.

    ``gguf``: a llama.cpp LoRA adapter (outtype default f32), or with ``merged`` the whole
    merged model (outtype default f16; tokenizer and hyperparameters from the base model's
    folder, or from ``gguf_metadata`` or the GGUF the base was loaded from; the chat template
    with the run's system prompt baked in). ``vllm``: a PEFT folder that passes vLLM's rules.
    """
    from .gguf_adapter import to_gguf
    from .gguf_model import to_gguf_model
    from .vllm import to_vllm

    if to not in TARGETS:
        raise LoraError(f"export target {to!r} is not one of {', '.join(TARGETS)}.")
    if merged and to != "gguf":
        raise LoraError("merged export is for --to gguf; for vLLM use lorakit merge.")
    loaded = load_for_export(adapter_dir, model, to=to, merged=merged)
    if to == "vllm":
        to_vllm(loaded.model, output, max_lora_rank=max_lora_rank)
        return Path(output)
    if merged:
        return to_gguf_model(
            loaded.model,
            output,
            outtype=outtype or "f16",
            source=gguf_metadata,
            in_place=True,
            tokenizer=loaded.tokenizer,
            chat_template=chat_template_for(loaded),
            metadata_dir=adapter_dir,
        )
    return to_gguf(loaded.model, output, outtype=outtype or "f32", metadata_dir=adapter_dir)


def chat_template_for(loaded: ForExport) -> str | None:
    """The template a runtime should prompt the export with: the run's (else the tokenizer's),
    with the run's system prompt baked in as the default (``GenerationSettings.template_for``).
    ``None``: keep the model's own (named templates, or none at all)."""
    own = getattr(loaded.tokenizer, "chat_template", None)
    if not isinstance(own, str | None):
        return None
    return loaded.settings.template_for(own)
