"""Trainable rows of an embedding (PEFT's ``trainable_token_indices``).

For new or retuned tokens a full LoRA of the embedding is too coarse and ``modules_to_save``
(a full copy) too large: only the listed rows train. Adapter ``name`` holds the new values of
rows ``indices`` (n, dim), and forward looks tokens up in W with those rows replaced::

    W'[i] = values[j]  if i = indices[j],  else W[i]

PEFT's file holds the values as ``<path>.token_adapter.trainable_tokens_delta`` (n, dim).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoraError
from .wrapper import Shape, Wrapper

PEFT_KEY = "token_adapter.trainable_tokens_delta"


class TrainableTokens(Wrapper):
    """Wraps an ``nn.Embedding``; each adapter replaces a few of its rows with trainable ones."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.training = base_layer.training
        self.token_values = nn.ParameterDict()  # adapter -> (n, dim) new rows
        self.indices: dict[str, list[int]] = {}
        self._active: list[str] = []
        self._merged: list[str] = []
        self._replaced: dict[str, Tensor] = {}  # rows a merge overwrote, to give them back

    @classmethod
    def problems(cls, path: str, module: nn.Module, indices: Sequence[int]) -> list[str]:
        """Why ``indices`` cannot be trained on ``module`` (empty when fine)."""
        if not isinstance(module, nn.Embedding):
            return [
                f"trainable_token_indices: {path} is a {type(module).__name__}, not an Embedding"
            ]
        bad = [i for i in indices if not 0 <= i < module.num_embeddings]
        if bad:
            return [
                f"trainable_token_indices[{path!r}]: {bad} outside 0..{module.num_embeddings - 1}"
            ]
        return []

    @classmethod
    def peft_shapes(
        cls, module: nn.Module, settings: Mapping[str, Any], **options: Any
    ) -> dict[str, Shape]:
        return {PEFT_KEY: (len(settings["indices"]), module.weight.shape[1])}

    @classmethod
    def trainable_count(cls, module: nn.Module, settings: Mapping[str, Any], **options: Any) -> int:
        return len(settings["indices"]) * module.weight.shape[1]

    @classmethod
    def plan_label(cls, settings: Mapping[str, Any]) -> str:
        return f"{len(settings['indices'])} rows"

    @property
    def base_weight(self) -> nn.Parameter:
        """The embedding's (num_embeddings, dim) weight, whose rows a merge replaces."""
        return self.base_layer.weight

    @property
    def merged(self) -> list[str]:
        return list(self._merged)

    def add_adapter(self, name: str, indices: Sequence[int]) -> None:
        """Adapter ``name`` trains rows ``indices``, starting from their current values."""
        weight = self.base_weight
        rows = torch.tensor(list(indices), device=weight.device)
        self.token_values[name] = nn.Parameter(weight.detach()[rows].float().clone())
        self.indices[name] = list(indices)
        self._active.append(name)

    def delete_adapter(self, name: str) -> None:
        del self.token_values[name], self.indices[name]
        if name in self._active:
            self._active.remove(name)

    def adapter_names(self) -> list[str]:
        return list(self.token_values.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.token_values[name]]

    def extras(self, name: str) -> list[str]:
        return ["trainable_token_indices"]

    def pending(self) -> list[str]:
        return [n for n in self._active if n not in self._merged]

    def _rows(self, name: str) -> Tensor:
        return torch.tensor(self.indices[name], device=self.base_weight.device)

    def adapted_weight(self, names: Sequence[str]) -> Tensor:
        """W with the rows of ``names`` replaced, later adapters winning; differentiable."""
        weight = self.base_weight
        for name in names:
            weight = weight.index_copy(
                0, self._rows(name), self.token_values[name].to(weight.dtype)
            )
        return weight

    def forward(self, x: Tensor) -> Tensor:
        names = self.pending()
        if not names:
            return self.base_layer(x)
        base = self.base_layer
        return F.embedding(
            x,
            self.adapted_weight(names),
            base.padding_idx,
            base.max_norm,
            base.norm_type,
            base.scale_grad_by_freq,
            base.sparse,
        )

    # --- merging: the same protocol as LoraLayer ---------------------------------------------
    def merged_weight(self, name: str) -> tuple[Tensor, None]:
        return self.adapted_weight([name]).detach().float(), None

    def merge(self, name: str, weight: Tensor, bias: None) -> None:
        self._replaced[name] = self.base_weight.detach()[self._rows(name)].clone()
        with torch.no_grad():
            self.base_weight.copy_(weight.to(self.base_weight.dtype))
        self._merged.append(name)

    def unmerge(self, name: str) -> None:
        with torch.no_grad():
            self.base_weight.index_copy_(0, self._rows(name), self._replaced.pop(name))
        self._merged.remove(name)

    def delta_weight(self, name: str) -> Tensor:
        """W' − W for adapter ``name`` (non-zero on its rows only), in fp32."""
        return self.merged_weight(name)[0] - self.base_weight.float()

    # --- PEFT's file layout ------------------------------------------------------------------
    def peft_tensors(self, name: str) -> dict[str, Tensor]:
        return {PEFT_KEY: self.token_values[name]}

    def load_peft_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        values = tensors[PEFT_KEY]
        if values.shape != self.token_values[name].shape:
            raise LoraError(
                f"{PEFT_KEY}: shape {tuple(values.shape)}, expected {tuple(self.token_values[name].shape)}"
            )
        with torch.no_grad():
            self.token_values[name].copy_(values)
