"""Export from an adapter folder: load its base model, load the adapter, write the target.

What the CLI's ``lorakit export`` calls. The folder is checked before any model loads; the
adapter is loaded with lorakit's own checks (right base model, finite values).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import LoraError
from ..io import CONFIG_NAME, PREFIX, adapter_state_dict, read_adapter
from ..layers import ModulesToSave

TARGETS = ("gguf", "vllm")


def full_weights(model: nn.Module, tensors: dict) -> list[str]:
    """Whole base weights the adapter file replaced on loading: PEFT saves an adapted
    embedding (and the head) in full when its rows changed, e.g. a resized vocabulary."""
    held = set(adapter_state_dict(model))
    copies = tuple(f".{p}" for p in ModulesToSave.peft_duplicates)  # PEFT's copies of saved ones
    return sorted(
        k.removeprefix(PREFIX) for k in tensors if k not in held and not any(c in k for c in copies)
    )


def load_for_export(
    adapter_dir: str | os.PathLike, model: str | None = None, allow_extra_rows: bool = False
) -> nn.Module:
    """The base model (``model``, or the one the adapter records) with the adapter loaded.

    Raises:
        LoraError: no adapter in the folder, no base model known, an adapter with whole
            embedding weights (extra rows) unless ``allow_extra_rows``, or a wrong base.
    """
    from .. import load_adapter
    from ..models.load import load_model

    folder = Path(adapter_dir)
    if not (folder / CONFIG_NAME).is_file():
        raise LoraError(f"{folder}: not an adapter folder (no {CONFIG_NAME}).")
    config, tensors, _ = read_adapter(folder)
    spec = model or config.base_model_name_or_path
    if not spec:
        raise LoraError(f"{folder} records no base model; pass --model.")
    base, _ = load_model(spec)
    load_adapter(base, folder)
    extra = full_weights(base, tensors)
    if extra and not allow_extra_rows:
        raise LoraError(
            f"{folder} holds whole weights ({', '.join(extra[:4])}), e.g. embedding rows for "
            "new tokens: a runtime's adapter holds LoRA pairs only. Export the model merged "
            "(--merged), with a GGUF whose tokenizer has any new tokens."
        )
    return base


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
    merged model (outtype default f16; tokenizer and hyperparameters from ``gguf_metadata``
    or the GGUF the base was loaded from). ``vllm``: a PEFT folder that passes vLLM's rules.
    """
    from .gguf_adapter import to_gguf
    from .gguf_model import to_gguf_model
    from .vllm import to_vllm

    if to not in TARGETS:
        raise LoraError(f"export target {to!r} is not one of {', '.join(TARGETS)}.")
    if merged and to != "gguf":
        raise LoraError("merged export is for --to gguf; for vLLM use lorakit merge.")
    base = load_for_export(adapter_dir, model, allow_extra_rows=merged)
    if to == "vllm":
        to_vllm(base, output, max_lora_rank=max_lora_rank)
        return Path(output)
    if merged:
        return to_gguf_model(
            base, output, outtype=outtype or "f16", source=gguf_metadata, in_place=True
        )
    return to_gguf(base, output, outtype=outtype or "f32", metadata_dir=adapter_dir)
