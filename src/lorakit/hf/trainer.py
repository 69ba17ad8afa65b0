"""``AdapterCheckpoints``: transformers' ``Trainer`` (and TRL's trainers, its subclasses)
resuming from and loading the best of the adapter checkpoints a lorakit model writes.

``add_lora`` alone makes every checkpoint an adapter folder (``lorakit.hf.integration``), but
the Trainer reads adapter checkpoints back only for PEFT's own ``PeftModel`` (an
``isinstance`` check in ``_load_from_checkpoint`` and ``_load_best_model``); for any other
model it looks for the whole model's weights and stops. This mixin answers those two steps
for a model with lorakit adapters, copying the saved adapter into the training one in place
(``lorakit.io.reload_adapter``), and leaves every other case to the Trainer::

    class SFTTrainer(AdapterCheckpoints, trl.SFTTrainer): ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import LoraError
from ..io import CONFIG_NAME, reload_adapter
from ..state import adapter_configs
from .integration import active_names


def _adapter_model(model: nn.Module | None) -> nn.Module | None:
    """The model with lorakit adapters behind ``model`` (a DDP wrapper's ``module``), or None."""
    model = getattr(model, "module", model)
    return model if model is not None and adapter_configs(model) else None


def _reload(model: nn.Module, folder: str | os.PathLike) -> None:
    active = active_names(model)
    if len(active) != 1:
        raise LoraError(
            f"The model has {len(active)} active adapters ({', '.join(active)}); a Trainer "
            "checkpoint holds one. Activate the trained adapter (lorakit.set_adapter)."
        )
    reload_adapter(model, folder, active[0])


class AdapterCheckpoints:
    """Mix into a ``transformers.Trainer`` subclass, before it: ``resume_from_checkpoint``
    and ``load_best_model_at_end`` then work on a model trained with lorakit adapters."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        adapted = _adapter_model(model if model is not None else self.model)
        if adapted is not None and (Path(resume_from_checkpoint) / CONFIG_NAME).is_file():
            _reload(adapted, resume_from_checkpoint)
        else:
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        adapted = _adapter_model(self.model)
        if adapted is not None and best and (Path(best) / CONFIG_NAME).is_file():
            _reload(adapted, best)
        else:
            super()._load_best_model()
