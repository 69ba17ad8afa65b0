"""Full trainable copies of a module, one per adapter (PEFT's ``modules_to_save``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .wrapper import Shape, Wrapper


class ModulesToSave(Wrapper):
    """A full trainable copy of a module per adapter (e.g. a new classification head).

    The original stays frozen in ``original_module``; forward uses the copy of the first
    active adapter that has one. PEFT's tensor names: ``<path>.<param>`` of the copy.
    """

    wrapped_attribute = "original_module"  # PEFT's name, kept for its state-dict keys
    whole_copy = True
    # PEFT with bias="all" also saves the biases inside its wrapper under these names.
    peft_duplicates = ("original_module.", "modules_to_save.")

    @classmethod
    def weight_shape(cls, module: nn.Module, **options: Any) -> Shape:
        return tuple(module.weight.shape) if hasattr(module, "weight") else ()

    @classmethod
    def peft_shapes(
        cls, module: nn.Module, settings: Mapping[str, Any], **options: Any
    ) -> dict[str, Shape]:
        return {name: tuple(p.shape) for name, p in module.named_parameters()}

    @classmethod
    def trainable_count(cls, module: nn.Module, settings: Mapping[str, Any], **options: Any) -> int:
        return sum(p.numel() for p in module.parameters())

    @classmethod
    def plan_label(cls, settings: Mapping[str, Any]) -> str:
        return "full copy"

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

    def load_peft_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Copy checked values into adapter ``name``'s copy, parameter by parameter."""
        copied = self.modules_to_save[name]
        with torch.no_grad():
            for key, value in tensors.items():
                copied.get_parameter(key).copy_(value)

    def base_shape(self) -> None:
        """None: a whole copy is not part of the fingerprint (it replaces the module)."""
        return None

    def extras(self, name: str) -> list[str]:
        return ["modules_to_save"]

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module that replaces this wrapper: the active copy if merging."""
        chosen = next((n for n in self._active if n in self.modules_to_save), None)
        return self.modules_to_save[chosen] if merge and chosen else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for name in self._active:
            if name in self.modules_to_save:
                return self.modules_to_save[name](*args, **kwargs)
        return self.original_module(*args, **kwargs)
