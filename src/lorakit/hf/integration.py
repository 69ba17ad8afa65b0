"""What a transformers model with lorakit adapters shows transformers, so that its own
``save_pretrained`` (and with it ``Trainer.save_model``, every Trainer checkpoint and TRL's
trainers) writes a PEFT adapter folder instead of the whole wrapped model.

transformers' ``PreTrainedModel.save_pretrained`` asks the model whether adapters are attached
(``_hf_peft_config_loaded``, from its ``PeftAdapterMixin``); if so it writes only
``get_adapter_state_dict()`` under ``base_model.model.`` as ``adapter_model.safetensors``, and
``peft_config[active_adapters()[0]].save_pretrained(folder)`` as ``adapter_config.json``,
no ``config.json``: PEFT's folder. The same flag lets the ``Trainer`` train a quantized base
that carries adapters and makes gradient checkpointing give the embeddings' output a gradient.
transformers answers these from PEFT's layers; :func:`attach` (called by ``add_lora``) gives
the model lorakit's answers instead, per instance: the tensors and JSON of ``lorakit.io``
(``hf.peft_form``). The answers are read from the model's adapters when asked, so after
``unload`` (no adapters left) the model is plain again for transformers and PEFT: the flag is
false, ``save_pretrained`` writes the whole merged model, and every method answers as
transformers' own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import LoraError
from ..state import adapter_configs
from ..targeting import iter_adapter_modules
from .peft_form import PREFIX, adapter_state_dict, file_facts, is_transformers_model

# PeftAdapterMixin's methods that would run PEFT's own layers on lorakit's: each is refused,
# naming lorakit's equivalent, while the model holds lorakit adapters.
_REFUSED = {
    "add_adapter": "lorakit.add_lora(model, config, name)",
    "load_adapter": "lorakit.load_adapter(model, folder, name)",
    "set_adapter": "lorakit.set_adapter(model, name)",
    "delete_adapter": "lorakit.delete_adapter(model, name)",
    "enable_adapters": "lorakit.set_adapter(model, names)",
    "disable_adapters": "`with lorakit.disable_adapters(model):`",
}


def _holds_adapters(model: nn.Module) -> bool:
    return bool(adapter_configs(model))


class _HasAdapters:
    """``_hf_peft_config_loaded``: true while the model holds lorakit adapters."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __bool__(self) -> bool:
        return _holds_adapters(self.model)

    def __repr__(self) -> str:
        return repr(bool(self))


class AdapterConfigFile:
    """``peft_config[name]``: what transformers asks of PEFT's config of adapter ``name``.

    ``save_pretrained`` writes the ``adapter_config.json`` that ``lorakit.save_adapter``
    writes; the JSON's fields read as attributes (``.r``, ``.lora_alpha``, ``.task_type``).
    """

    peft_type = "LORA"
    is_prompt_learning = False

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` of the adapter as it stands."""
        saved = adapter_configs(self.model)[self.name].on_original_weight()
        return saved.to_peft_file(file_facts(self.model, self.name))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` into ``save_directory``."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_") or key in ("model", "name"):
            raise AttributeError(key)
        data = self.to_dict()
        if key not in data:
            raise AttributeError(f"adapter_config.json has no field {key!r}")
        return data[key]

    def __repr__(self) -> str:
        return f"AdapterConfigFile({self.name!r}, {self.to_dict()})"


class _PeftConfigs(Mapping):
    """``peft_config``: adapter name -> :class:`AdapterConfigFile`, read when asked."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __getitem__(self, name: str) -> AdapterConfigFile:
        if name not in adapter_configs(self.model):
            raise KeyError(name)
        return AdapterConfigFile(self.model, name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(adapter_configs(self.model)))

    def __len__(self) -> int:
        return len(adapter_configs(self.model))


class _Method:
    """One of ``PeftAdapterMixin``'s methods answered for lorakit's adapters; the class's own
    method while the model holds none (PEFT's adapters added after an ``unload``).
    ``save_pretrained`` is the class's own but refuses ``full=``, which it would drop."""

    def __init__(self, model: nn.Module, name: str) -> None:
        self.model = model
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not _holds_adapters(self.model) or self.name == "save_pretrained":
            if "full" in kwargs and _holds_adapters(self.model):
                raise LoraError(
                    f"model.save_pretrained(..., full={kwargs['full']!r}): transformers' "
                    "save_pretrained has no full= and would ignore it, writing the adapter. "
                    "For the whole merged model use lorakit.unload(model).save_pretrained(dir) "
                    "(on a copy.deepcopy(model) to keep the adapter); without full= it writes "
                    "the adapter folder."
                )
            return getattr(type(self.model), self.name)(self.model, *args, **kwargs)
        if self.name == "active_adapters":
            return active_names(self.model)
        if self.name == "get_adapter_state_dict":
            return _state_dict(self.model, *args, **kwargs)
        raise LoraError(
            f"model.{self.name}() is transformers' call into PEFT's layers, and this model's "
            f"adapters are lorakit's; use {_REFUSED[self.name]}."
        )


def active_names(model: nn.Module) -> list[str]:
    """Names of the adapters whose deltas add to the output, in the order they were added."""
    wrappers = [m for _, m in iter_adapter_modules(model)]
    return [n for n in adapter_configs(model) if any(n in m.active for m in wrappers)]


def _state_dict(
    model: nn.Module, adapter_name: str | None = None, state_dict: dict | None = None
) -> dict[str, Tensor]:
    """``get_adapter_state_dict``: the adapter's tensors under PEFT's names without
    ``base_model.model.`` (``save_pretrained`` adds it). ``state_dict`` (a gathered copy of
    the weights) is not needed: the adapter's tensors are read from the model itself."""
    if adapter_name is None:
        active = active_names(model) or list(adapter_configs(model))
        if len(active) != 1:
            raise LoraError(
                f"The model has {len(active)} active adapters ({', '.join(active)}) and "
                "save_pretrained writes one: activate it first (lorakit.set_adapter(model, "
                "name)), or write each with lorakit.save_adapter(model, folder, name)."
            )
        adapter_name = active[0]
    return {k.removeprefix(PREFIX): v for k, v in adapter_state_dict(model, adapter_name).items()}


def attach(model: nn.Module) -> None:
    """Give a transformers model lorakit's answers to transformers' adapter integration
    (see the module docstring); other models, and models already answering, are left alone."""
    if not is_transformers_model(model) or isinstance(
        model.__dict__.get("_hf_peft_config_loaded"), _HasAdapters
    ):
        return
    if model.__dict__.get("_hf_peft_config_loaded"):
        raise LoraError(
            "This model already holds PEFT adapters added through transformers "
            "(model.add_adapter / load_adapter); save or unload them before adding lorakit's."
        )
    model.__dict__["_hf_peft_config_loaded"] = _HasAdapters(model)
    model.__dict__["peft_config"] = _PeftConfigs(model)
    for name in ("active_adapters", "get_adapter_state_dict", "save_pretrained", *_REFUSED):
        model.__dict__[name] = _Method(model, name)
