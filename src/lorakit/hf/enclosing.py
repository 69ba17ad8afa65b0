"""A model with lorakit adapters inside a bigger transformers model that saves itself whole.

``add_lora(model.model)`` or ``add_lora(vlm.model.language_model)`` adapts a part; the part
answers transformers' adapter questions (``hf.integration``), but the enclosing model does not,
so ``model.save_pretrained`` (and with it ``Trainer.save_model`` and every checkpoint) would
write the whole model with lorakit's wrapped names (``q_proj.base_layer.weight``,
``q_proj.lora_A.default``). ``from_pretrained`` loads such a folder without an error, with every
adapted weight reported missing and freshly initialised: a wrong model. A module cannot see
what encloses it, and transformers offers no hook between "save the whole model" and its
``state_dict()`` call, so :func:`guard` gives the adapted part a ``state_dict`` post-hook that
looks up the stack for ``PreTrainedModel.save_pretrained``: the part's state being taken under a
prefix inside that call is exactly the whole-model save, which is refused (naming the fixes)
before any weight is written. Every other use of an enclosing ``state_dict`` (``torch.save``,
copying into a twin, accelerate's state) reloads into the same wrapped model and is left alone.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from torch import nn

from ..config import ALL_LINEAR
from ..errors import LoraError
from ..layers import iter_adapter_modules
from ..state import adapter_configs

_MARK = "_lorakit_save_guard"
# What transformers' save_pretrained has written when it takes the state dict.
_WRITTEN_FIRST = {"config.json", "generation_config.json"}


def guard(model: nn.Module) -> None:
    """Refuse a whole-model ``save_pretrained`` of any transformers model enclosing ``model``
    while ``model`` holds lorakit adapters (idempotent)."""
    if not model.__dict__.get(_MARK):
        model.register_state_dict_post_hook(_refuse_enclosing_save)
        model.__dict__[_MARK] = True


def _save_frame() -> FrameType | None:
    """The innermost ``PreTrainedModel.save_pretrained`` call on the stack, if any."""
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None:  # transformers not imported: nothing of it is saving
        return None
    code = modeling.PreTrainedModel.save_pretrained.__code__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    return frame


def _refuse_enclosing_save(
    module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict[str, Any]
) -> None:
    """``state_dict`` post-hook: see the module docstring. ``prefix`` is the adapted part's
    path in the module whose state is taken ("" when it is the part itself)."""
    if not prefix or not adapter_configs(module):
        return
    frame = _save_frame()
    if frame is None:
        return
    saver, folder = frame.f_locals.get("self"), frame.f_locals.get("save_directory")
    _remove_partial(folder)
    raise LoraError(_message(type(saver).__name__, prefix.rstrip("."), module, folder))


def _remove_partial(folder: str | os.PathLike | None) -> None:
    """Remove what the refused save wrote before taking the state dict (its config files), if
    the folder holds nothing else: a folder that held a model keeps it."""
    path = Path(folder) if isinstance(folder, str | os.PathLike) else None
    if path is None or not path.is_dir():
        return
    names = {p.name for p in path.iterdir()}
    if names <= _WRITTEN_FIRST:
        for name in names:
            (path / name).unlink(missing_ok=True)
        path.rmdir()


def _message(saver: str, part: str, module: nn.Module, folder: Any) -> str:
    """The refusal: what would be written, why it is wrong, and the three ways on."""
    return (
        f"{saver}.save_pretrained({str(folder)!r}) would write the whole model with lorakit's "
        f"wrapped weights (base_layer, lora_A, ...) in its part {part!r}, where add_lora put "
        "the adapter; from_pretrained would load that folder without an error and with every "
        "adapted weight missing, so it is refused before any weight is written. To have "
        "save_pretrained and the Trainer write a PEFT adapter, give add_lora the whole model "
        f"and keep the adapter to that part: lorakit.add_lora(model, LoraConfig(..., "
        f"{_whole_model_targets(part, module)})); or save this part's adapter with "
        f"lorakit.save_adapter(model.{part}, folder); or merge it first with "
        f"lorakit.unload(model.{part})."
    )


def _whole_model_targets(part: str, module: nn.Module) -> str:
    """The ``target_modules=`` that adapts, in the whole model, what the part's adapters
    adapt: PEFT's regex (matched against the whole path) under ``part``. A regex target is
    kept; otherwise the names of the LoRA layers the part holds are listed, which also
    spells out what ``"all-linear"`` reached in it."""
    for config in adapter_configs(module).values():
        targets = config.target_modules
        if isinstance(targets, str) and targets != ALL_LINEAR:
            return f'target_modules=r"{re.escape(part)}\\.(?:{targets})"'
    names = sorted(
        {path.rsplit(".", 1)[-1] for path, w in iter_adapter_modules(module) if w.is_lora}
    )
    listed = "|".join(map(re.escape, names)) or "..."
    return f'target_modules=r"{re.escape(part)}\\..*\\.({listed})"'
