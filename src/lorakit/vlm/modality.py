"""The image road (:class:`ImageModality`), and the one place a run's road is chosen.

What differs from a text run: the model and processor (:func:`~lorakit.vlm.models.load_vlm`),
the codec (:class:`~lorakit.vlm.collate.ImageCodec`), the adapter's targets (the language
model only, see :mod:`lorakit.vlm.targeting`) and the settings not implemented with images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import LoraConfig
from ..data.files import has_images
from ..errors import LoraError
from ..modality import TEXT, Modality
from .collate import ImageCodec
from .models import is_vlm_folder, load_vlm
from .targeting import describe, vlm_lora_config


class ImageModality(Modality):
    """A vision-language model, its processor, and LoRA on its language model."""

    label = "image data"
    images = True
    not_implemented: ClassVar[dict[str, str]] = {
        "tasks": "--task",
        "packing": "--packing",
        "resume": "--resume",
        "quantize": "--quantize",
        "fsdp": "--fsdp",
        "chat_template": "--chat-template (the processor's template places the images)",
    }

    def refuse(self, settings: Any, processes: int = 1) -> None:
        """See :meth:`Modality.refuse`; one process only."""
        super().refuse(settings)
        if processes > 1:
            raise LoraError(
                "Image data in several processes (--nproc, torchrun) is not implemented: run "
                "one process."
            )

    def load(
        self,
        spec: str,
        dtype: str | torch.dtype = "auto",
        quantize: str | None = None,
        device: torch.device | str = "cpu",
        trust_remote_code: bool = False,
    ) -> tuple[nn.Module, Any]:
        """``(model, processor)`` of a VLM folder (or an adapter's base), on the CPU.

        Raises:
            LoraError: ``quantize`` (not implemented), or see :func:`load_vlm`.
        """
        if quantize:
            raise LoraError("--quantize with a vision-language model is not implemented.")
        return load_vlm(_resolved(spec), dtype, trust_remote_code)

    def codec(self, processor: Any) -> ImageCodec:
        """The processor's codec."""
        return ImageCodec(processor)

    def targets(self, model: nn.Module, lora: LoraConfig, settings: Any) -> LoraConfig:
        """``lora`` on the language model, and what ``--train-projector`` and
        ``--train-vision`` add (:func:`~lorakit.vlm.targeting.vlm_lora_config`)."""
        return vlm_lora_config(
            model,
            lora,
            train_projector=getattr(settings, "train_projector", False),
            train_vision=getattr(settings, "train_vision", False),
        )

    def describe(self, model: nn.Module, settings: Any) -> str | None:
        """Which part is adapted, trained in full or frozen."""
        return describe(
            model,
            getattr(settings, "train_projector", False),
            getattr(settings, "train_vision", False),
        )


IMAGES = ImageModality()


def choose_modality(
    model: str | None, data: str | Path | None = None, processor: Any = None
) -> Modality:
    """The road of a run: :data:`IMAGES` for a vision-language model, else :data:`TEXT`.

    Args:
        model: the model spec (a folder is a VLM when its config has a vision part; an
            adapter folder stands for its base); ``None`` when the model is already loaded
            and ``processor`` tells.
        data: a data file; image records need a VLM.
        processor: what was loaded beside an already loaded model (a processor has an
            image processor, a tokenizer has not).

    Raises:
        LoraError: image data with a text model.
    """
    if processor is not None:
        vlm = hasattr(processor, "image_processor")
    else:
        vlm = model is not None and is_vlm_folder(_resolved(model))
    if not vlm and data is not None and Path(data).is_file() and has_images(data):
        raise LoraError(
            f"--data {data} has images but --model {model} is not a vision-language model: "
            "pass a VLM folder (AutoModelForImageTextToText), or try `lorakit train --demo vlm`."
        )
    return IMAGES if vlm else TEXT


def _resolved(spec: str) -> str:
    """The folder ``spec`` loads; unresolvable specs are reported by the loader, not here."""
    from ..models.load import resolve_model_spec

    try:
        return resolve_model_spec(spec)
    except LoraError:
        return spec
