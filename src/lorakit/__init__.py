"""lorakit: Low-Rank Adaptation for PyTorch and Hugging Face models.

    from lorakit import LoraConfig, add_lora, merge, save_adapter
    add_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))

The core (this namespace) needs only torch and safetensors; the CLI's model loading, data and
training live in their own modules and import transformers when used. ``lorakit.train`` (a
whole run, as ``lorakit train``) and ``lorakit.AdapterCheckpoints`` (the Trainer mixin) are
such: they are imported on first use.
"""

from typing import Any

from .adapters import (
    active_adapters,
    combine,
    delete_adapter,
    disable_adapters,
    route,
    set_adapter,
)
from .config import LoraConfig
from .errors import LoraError
from .inject import Plan, add_lora, plan, trainable_parameters
from .io import load_adapter, save_adapter
from .layers import lora_delta
from .merge import merge, unload, unmerge

__version__ = "0.2.0"


def __getattr__(name: str) -> Any:
    """The public names whose modules import transformers, loaded when first asked for."""
    if name == "train":
        from .training.api import train

        return train
    if name == "AdapterCheckpoints":
        from .hf.trainer import AdapterCheckpoints

        return AdapterCheckpoints
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


__all__ = [
    "AdapterCheckpoints",
    "LoraConfig",
    "LoraError",
    "Plan",
    "active_adapters",
    "add_lora",
    "combine",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "lora_delta",
    "merge",
    "plan",
    "route",
    "save_adapter",
    "set_adapter",
    "train",
    "trainable_parameters",
    "unload",
    "unmerge",
]
