"""Full trainable copies of a module, one per adapter (PEFT's ``modules_to_save``)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .wrapper import Wrapper


class ModulesToSave(Wrapper):
    """A full trainable copy of a module per adapter (e.g. a new classification head).

    The original stays frozen in ``original_module``; forward uses the copy of the first
    active adapter that has one. PEFT's tensor names: ``<path>.<param>`` of the copy.
    """

    wrapped_attribute = "original_module"  # PEFT's name, kept for its state-dict keys

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.training = original_module.training
        self.modules_to_save = nn.ModuleDict()
        self._active: list[str] = []

    @property
    def base_layer(self) -> nn.Module:
        """The user's module (named like ``LoraLayer.base_layer`` for unwrapping)."""
        return self.original_module

    @property
    def active(self) -> list[str]:
        """Adapters whose copy may serve the forward (the first one does)."""
        return list(self._active)

    def set_active(self, names: Sequence[str]) -> None:
        """Make exactly ``names`` (those with a copy here) active."""
        self._active = [n for n in names if n in self.modules_to_save]

    def add_adapter(self, name: str) -> None:
        """Copy the original module as adapter ``name``'s trainable module."""
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone
        self._active.append(name)

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy."""
        del self.modules_to_save[name]
        if name in self._active:
            self._active.remove(name)

    def adapter_names(self) -> list[str]:
        """Names of the adapters with a copy here."""
        return list(self.modules_to_save.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Every parameter of adapter ``name``'s copy."""
        return list(self.modules_to_save[name].parameters())

    def peft_tensors(self, name: str) -> dict[str, Tensor]:
        """The copy's parameters under PEFT's names (relative to this module's path)."""
        return dict(self.modules_to_save[name].named_parameters())

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module that replaces this wrapper: the active copy if merging."""
        chosen = next((n for n in self._active if n in self.modules_to_save), None)
        return self.modules_to_save[chosen] if merge and chosen else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name in self._active:
            if name in self.modules_to_save:
                return self.modules_to_save[name](*args, **kwargs)
        return self.original_module(*args, **kwargs)
