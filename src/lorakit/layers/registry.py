"""The table from a base module type to the LoRA layer class that wraps it.

Layer classes register themselves (``@register(nn.Linear)``); ``layer_class_for`` walks a
module's type hierarchy, most specific first, so a subclass registered on its own (a quantized
Linear, say) wins over its parent. Types from optional libraries are named by their import
path, so registering them imports nothing::

    @register(nn.Linear, "transformers.pytorch_utils.Conv1D")
    class LoraLinear(LoraLayer): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .base import LoraLayer

_LAYERS: dict[type | str, type[LoraLayer]] = {}


def register(*base_types: type | str) -> Callable[[type[LoraLayer]], type[LoraLayer]]:
    """Class decorator: ``cls`` wraps modules of ``base_types`` (types or dotted names)."""

    def add(cls: type[LoraLayer]) -> type[LoraLayer]:
        for base in base_types:
            _LAYERS[base] = cls
        return cls

    return add


def layer_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class for ``module``'s type, or None when no kind handles it."""
    for cls in type(module).__mro__:
        found = _LAYERS.get(cls) or _LAYERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    return None


def supported_types() -> list[str]:
    """Names of the registered base module types, for error messages."""
    return sorted(t if isinstance(t, str) else t.__name__ for t in _LAYERS)
