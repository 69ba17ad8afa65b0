"""The model-level adapter state: which adapters a model holds and the config of each.

One ``AdapterState`` hangs off a model (``model.lorakit_adapters``) and is the only writer of
that mapping; per-layer state (active, merged, routed adapters) belongs to each layer and
changes only through the layer's own methods. Everything else reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from torch import nn

from .config import LoraConfig
from .errors import LoraError

_ATTR = "lorakit_adapters"


class AdapterState:
    """Adapter name -> ``LoraConfig`` for one model, in the order the adapters were added."""

    def __init__(self) -> None:
        self._configs: dict[str, LoraConfig] = {}

    @classmethod
    def of(cls, model: nn.Module) -> AdapterState:
        """The model's state, created (empty) on first use."""
        state = model.__dict__.get(_ATTR)
        if state is None:
            state = cls()
            model.__dict__[_ATTR] = state  # a plain attribute: not a module, not saved
        return state

    @staticmethod
    def drop(model: nn.Module) -> None:
        """Forget every adapter (after ``unload`` removed them from the model)."""
        model.__dict__.pop(_ATTR, None)

    @property
    def configs(self) -> Mapping[str, LoraConfig]:
        """A read-only view of adapter name -> config."""
        return MappingProxyType(self._configs)

    def names(self) -> list[str]:
        """Adapter names in the order they were added."""
        return list(self._configs)

    def check(self, names: list[str]) -> None:
        """Raise ``LoraError`` naming every unknown adapter and listing the known ones."""
        unknown = [n for n in names if n not in self._configs]
        if unknown:
            raise LoraError(f"Unknown adapter(s) {unknown}; this model has {self.names()}.")

    def add(self, name: str, config: LoraConfig) -> None:
        """Record a new adapter (``add_lora`` calls this once its layers hold it)."""
        if name in self._configs:
            raise LoraError(f"adapter '{name}' already exists; pick another name.")
        self._configs[name] = config

    def update(self, name: str, config: LoraConfig) -> None:
        """Replace adapter ``name``'s config (its ranks changed, say)."""
        self.check([name])
        self._configs[name] = config

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` (``delete_adapter`` calls this once its layers dropped it)."""
        self.check([name])
        del self._configs[name]


def adapter_configs(model: nn.Module) -> Mapping[str, LoraConfig]:
    """Adapter name -> the config it was added with (empty for a model without adapters)."""
    state = model.__dict__.get(_ATTR)
    return state.configs if state is not None else MappingProxyType({})
