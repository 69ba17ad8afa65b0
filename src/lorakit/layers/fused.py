"""LoRA on chosen equal output slices of a fused projection (loralib's ``MergedLinear``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LoraLayer, lora_delta
from .linear import LoraLinear
from .registry import layer_class_for
from .wrapper import Shape


class LoraFused(LoraLayer):
    """Per-slice LoRA on a fused Linear / GPT-2 Conv1D, built with ``slices=[...]``.

    For a qkv projection with ``slices=[True, False, True]``, q and v get their own rank-r
    pair and k none. A: (n_on, r, in), B: (n_on, out/n, r).

    PEFT has no such layout; its file holds the equivalent plain LoRA of rank n_on · r on the
    whole projection, A stacked (n_on · r, in) and B block-structured (out, n_on · r): block j
    of B's columns feeds only the rows of the j-th enabled slice (``to_peft``).
    """

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options: Any) -> tuple[int, int]:
        out_features, in_features = LoraLinear.matrix_shape(module)
        return out_features // len(options["slices"]), in_features

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int, **options: Any) -> tuple[Shape, Shape]:
        n_on = sum(options["slices"])
        slice_size, in_features = cls.matrix_shape(module, **options)
        return (n_on, r, in_features), (n_on, slice_size, r)

    @classmethod
    def problems(cls, path: str, module: nn.Module, r: int, **options: Any) -> list[str]:
        slices = options["slices"]
        if layer_class_for(module) is not LoraLinear:
            return [f"{path}: fused_slices needs a Linear or Conv1D, not {type(module).__name__}"]
        out_features = LoraLinear.matrix_shape(module)[0]
        if out_features % len(slices):
            return [
                f"{path}: {len(slices)} fused slices do not divide its {out_features} outputs; "
                "give one flag per equal slice"
            ]
        return []

    @classmethod
    def to_matrix(cls, module: nn.Module, weight: Tensor, **options: Any) -> Tensor:
        return LoraLinear.to_matrix(module, weight)  # (in, out) of a GPT-2 Conv1D -> (out, in)

    from_matrix = to_matrix  # a transpose is its own inverse

    @classmethod
    def matrix_problem(cls, module: nn.Module, **options: Any) -> str | None:
        return "fused slices (one matrix per enabled slice)"

    @classmethod
    def to_peft(cls, A: Tensor, B: Tensor, module: nn.Module, **options) -> tuple[Tensor, Tensor]:
        slices = options["slices"]
        n_on, r, _ = A.shape
        full = B.new_zeros(len(slices), B.shape[1], n_on * r)  # (n, s, n_on·r)
        for j, s in enumerate(i for i, on in enumerate(slices) if on):
            full[s, :, j * r : (j + 1) * r] = B[j]
        return A.reshape(n_on * r, -1), full.reshape(-1, n_on * r)

    @classmethod
    def from_peft(cls, A: Tensor, B: Tensor, module: nn.Module, r: int, **options):
        slices = options["slices"]
        enabled = [i for i, on in enumerate(slices) if on]
        blocks = B.reshape(len(slices), -1, len(enabled) * r)  # (n, s, n_on·r)
        B = torch.stack([blocks[s, :, j * r : (j + 1) * r] for j, s in enumerate(enabled)])
        return A.reshape(len(enabled), r, -1), B

    def __init__(self, base_layer: nn.Module, **options: Any) -> None:
        super().__init__(base_layer, **options)
        self.fan_in_fan_out = LoraLinear.matrix_shape(base_layer) != tuple(base_layer.weight.shape)
        self.enabled = list(options["slices"])
        self.slice_size, self.in_features = self.matrix_shape(base_layer, **options)
        self.register_buffer(
            "slice_index",
            torch.tensor(
                [i for i, on in enumerate(self.enabled) if on], device=base_layer.weight.device
            ),
            persistent=False,
        )

    def peft_rank(self, name: str) -> int:
        return len(self.slice_index) * self.r[name]

    def _scatter(self, per_slice: Tensor) -> Tensor:
        # (..., n_on, s) -> (..., n, s) with zeros on disabled slices -> (..., n·s)
        shape = (*per_slice.shape[:-2], len(self.enabled), self.slice_size)
        full = per_slice.new_zeros(shape).index_copy(-2, self.slice_index, per_slice)
        return full.flatten(-2)

    def delta_weight(self, name: str) -> Tensor:
        # (n_on, s, r) @ (n_on, r, in) -> (n_on, s, in), placed as rows of (out, in)
        per_slice = lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name])
        full = per_slice.new_zeros(len(self.enabled), *per_slice.shape[1:])
        delta = full.index_copy(0, self.slice_index, per_slice).flatten(0, 1)
        return delta.T if self.fan_in_fan_out else delta

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        n_on, r, _ = A.shape
        # (..., in) -> (..., n_on·r) -> (..., n_on, r) -> (..., n_on, s)
        after_a = F.linear(self._dropped(name, x), A.reshape(n_on * r, -1)).unflatten(-1, (n_on, r))
        per_slice = torch.einsum("...nr,nsr->...ns", after_a, B)
        return self._scatter(per_slice) * self.scale[name]
