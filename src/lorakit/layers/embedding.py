"""LoRA on ``nn.Embedding``: a lookup into A's columns, not a dense one-hot product."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LoraLayer, lora_delta
from .registry import register


@register(nn.Embedding)
class LoraEmbedding(LoraLayer):
    """A: (r, num_embeddings), B: (embedding_dim, r); ΔW = (scale · B A)ᵀ of shape (num, dim).

    As a matrix the embedding is (dim, num): an output channel is one embedding dimension,
    so DoRA's magnitude has one value per dimension (its norm over the vocabulary), as in PEFT.
    """

    peft_keys = ("lora_embedding_A", "lora_embedding_B")
    supports_dora = True
    dropout_mode = "ignored"  # the input is token ids: there is nothing to drop (as PEFT)

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options: Any) -> tuple[int, int]:
        num, dim = module.weight.shape
        return dim, num

    @property
    def fan_in(self) -> int:
        return 1  # the input is one-hot: each output of A sees a single column

    @classmethod
    def to_matrix(cls, module: nn.Module, weight: Tensor, **options: Any) -> Tensor:
        return weight.T  # (num, dim) -> (dim, num)

    from_matrix = to_matrix

    def delta_weight(self, name: str) -> Tensor:
        return lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name]).T

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        base = self.base_layer
        # (...,) ids -> (..., r) rows of Aᵀ -> (..., dim); dropout does not apply to ids.
        after_a = F.embedding(
            x,
            self.lora_A[name].T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        return F.linear(after_a, self.lora_B[name]) * self.scale[name]
