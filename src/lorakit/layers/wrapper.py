"""The base of every module lorakit puts into a model in place of the user's module."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn


class Wrapper(nn.Module):
    """Stands in for the wrapped module (``base_layer``); attributes it lacks are read from
    that module, so model code that reads ``.weight``, ``.in_features``, ... keeps working."""

    wrapped_attribute: ClassVar[str] = "base_layer"  # where the user's module is kept

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wrapped_attribute:
                raise
            return getattr(super().__getattr__(self.wrapped_attribute), name)
