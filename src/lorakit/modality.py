"""The one road of every run: what differs between text and image runs, behind one object.

``train``, ``eval``, ``generate``, ``chat`` and ``merge`` run one code path; the few things
that differ for a vision-language model are methods of the :class:`Modality` chosen once
(:func:`lorakit.vlm.modality.choose_modality`) and passed down:

==================  ===============================  =======================================
                    text (:data:`TEXT`)              images (:data:`lorakit.vlm.modality.IMAGES`)
==================  ===============================  =======================================
loading             a causal LM and its tokenizer    a VLM and its processor
codec               :class:`~lorakit.data.encode.    :class:`~lorakit.vlm.collate.ImageCodec`
                    TextCodec` (tokenizer)           (processor: pixels, image tokens)
adapter targets     the config as given              the language model only (+ flags)
not implemented     (nothing)                        settings refused by name
==================  ===============================  =======================================

The data side needs no method here: image records are one more data format
(:mod:`lorakit.data.images`), read, checked and split like the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import LoraError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import LoraConfig
    from .data.encode import TextCodec


class Modality:
    """The text road; :class:`lorakit.vlm.modality.ImageModality` overrides what differs.

    Attributes:
        label: what the road is for, in messages.
        images: whether conversations may carry images (``--image``, ``/image``).
        not_implemented: settings (``TrainConfig`` field -> flag) this road refuses.
    """

    label = "a text model"
    images = False
    not_implemented: ClassVar[Mapping[str, str]] = {
        "train_projector": "--train-projector (for vision-language models)",
        "train_vision": "--train-vision (for vision-language models)",
    }

    def refuse(self, settings: Any, processes: int = 1) -> None:
        """Refuse, by name, the settings (a ``TrainConfig`` or the CLI's arguments) and the
        process count this road does not implement.

        Raises:
            LoraError: listing every such setting given.
        """
        used = [flag for key, flag in self.not_implemented.items() if getattr(settings, key, None)]
        if used:
            raise LoraError(f"Not implemented with {self.label}: {', '.join(used)}. Drop them.")

    def load(
        self,
        spec: str,
        dtype: str | torch.dtype = "auto",
        quantize: str | None = None,
        device: torch.device | str = "cpu",
        trust_remote_code: bool = False,
    ) -> tuple[nn.Module, Any]:
        """``(model, tokenizer)`` of ``spec`` (:func:`lorakit.models.load.load_model`)."""
        from .models.load import load_model

        return load_model(spec, dtype, quantize, device, trust_remote_code)

    def codec(self, processor: Any) -> TextCodec:
        """The codec over what :meth:`load` returned beside the model (here a tokenizer)."""
        from .data.encode import TextCodec

        return TextCodec(processor)

    def targets(self, model: nn.Module, lora: LoraConfig, settings: Any) -> LoraConfig:
        """The adapter config this road puts on ``model``: ``lora`` as given, for text."""
        return lora

    def describe(self, model: nn.Module, settings: Any) -> str | None:
        """A plan of the model's parts (adapted / trained / frozen), if this road has one."""
        return None


TEXT = Modality()
