"""Which parts of a vision-language model are adapted, trained in full, or frozen.

The parts are found from the model itself, not from a table of families: the language model
is ``model.get_decoder()``, the vision encoder ``model.get_encoder("image")`` (transformers'
own lookups), and the projector is whatever else the multimodal base model holds beside them
(LLaVA's and InternVL's ``multi_modal_projector``, Idefics3's ``connector``). Qwen2-VL keeps
its projector (``visual.merger``) inside the vision encoder, so it has none of its own.

By default LoRA goes on the language model only (``all-linear`` or named modules, both kept
out of the vision encoder and the projector); ``train_projector`` makes the projector fully
trainable (PEFT's ``modules_to_save``), ``train_vision`` lets LoRA targets match inside the
vision encoder too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from ..config import LoraConfig
from ..errors import LoraError


@dataclass
class VlmParts:
    """Module paths of a VLM's parts (as ``named_modules`` spells them)."""

    language: str
    vision: str
    projector: list[str]


def _path_of(model: nn.Module, module: nn.Module) -> str | None:
    return next((path for path, m in model.named_modules() if m is module), None)


def find_parts(model: nn.Module) -> VlmParts:
    """The language model, vision encoder and projector of ``model``.

    Raises:
        LoraError: ``model`` has no separate vision encoder or language model.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    encoder = model.get_encoder("image") if hasattr(model, "get_encoder") else None
    language = _path_of(model, decoder) if decoder is not None else None
    vision = _path_of(model, encoder) if encoder is not None else None
    if not language or not vision or encoder is model or decoder is model:
        raise LoraError(
            f"{type(model).__name__} has no separate vision encoder and language model "
            "(get_encoder('image') / get_decoder()); it is not a vision-language model lorakit "
            "can target."
        )
    parent = language.rpartition(".")[0]
    holder = model.get_submodule(parent) if parent else model
    projector = [
        f"{parent}.{name}" if parent else name
        for name, child in holder.named_children()
        if child is not decoder and child is not encoder and any(True for _ in child.parameters())
    ]
    return VlmParts(language, vision, projector)


def vlm_lora_config(
    model: nn.Module,
    config: LoraConfig,
    *,
    train_projector: bool = False,
    train_vision: bool = False,
) -> LoraConfig:
    """``config`` restricted to the language model (plus the vision encoder with
    ``train_vision``), with the projector in ``modules_to_save`` when ``train_projector``.

    Raises:
        LoraError: ``train_projector`` on a model whose projector lives inside its vision
            encoder (Qwen2-VL), or see :func:`find_parts`.
    """
    parts = find_parts(model)
    if train_projector and not parts.projector:
        raise LoraError(
            f"--train-projector: {type(model).__name__} has no projector beside its vision "
            f"encoder ({parts.vision}) and language model; its projector is part of the vision "
            "encoder. Drop --train-projector, or adapt the encoder with --train-vision."
        )
    if isinstance(config.exclude_modules, str):
        raise LoraError(
            "A regex exclude_modules on a vision-language model is not implemented: give a list "
            "of module names."
        )
    exclude = list(parts.projector) + ([] if train_vision else [parts.vision])
    saved = list(config.modules_to_save or []) + (parts.projector if train_projector else [])
    return dataclasses.replace(
        config,
        exclude_modules=list(config.exclude_modules or []) + exclude,
        modules_to_save=saved or None,
    )


def describe(model: nn.Module, train_projector: bool, train_vision: bool) -> str:
    """The plan in words: which part is adapted (LoRA), trained in full, or frozen."""
    parts = find_parts(model)
    projector = ", ".join(parts.projector) or f"none of its own (inside {parts.vision})"
    lines = [
        f"language model  {parts.language}: LoRA",
        f"vision encoder  {parts.vision}: {'LoRA (--train-vision)' if train_vision else 'frozen'}",
        f"projector       {projector}: "
        + ("trained in full (--train-projector)" if train_projector else "frozen"),
    ]
    return "plan:\n  " + "\n  ".join(lines)
