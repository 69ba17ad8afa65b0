"""LoRA on ``nn.Conv1d/2d/3d``, grouped convolutions included, and mergeable.

A is a convolution with the base kernel, stride, padding and dilation (in -> r); B is a
1×…×1 convolution (r -> out) with the base's ``groups``, as PEFT lays it out. As a matrix,
ΔW[o, i·k…] = scale · Σ_h B[o, h] A[h, i·k…].

Grouped convolutions (groups = g): PEFT's A mixes input channels across groups, so its ΔW
does not fit the grouped weight (out, in/g, k…) and PEFT cannot merge. lorakit gives A a block
structure instead: hidden unit h of group j = h // (r/g) sees only group j's input channels,
so A is itself a grouped convolution, A: (r, in/g, k…), and ΔW is block-diagonal::

    ΔW[o, i, k…] = scale · Σ_{h<r/g} B[o, h] A[j·r/g + h, i, k…],  j = o // (out/g)

which is exactly the grouped weight's layout: it merges. In PEFT's files A is dense,
(r, in, k…), with zeros off the blocks, and PEFT computes the same output from it. A dense A
from PEFT with values off the blocks is kept dense (``groups=1`` for A); it runs as in PEFT
and, as in PEFT, does not merge.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoraError
from .base import LoraLayer, lora_delta
from .registry import register
from .wrapper import Shape

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by number of spatial dims


def _block_to_dense(A: Tensor, groups: int) -> Tensor:
    """(r, in/g, k…) block A -> PEFT's dense (r, in, k…), zero off the diagonal blocks."""
    if groups == 1:
        return A
    r, per_group = A.shape[0], A.shape[1]
    dense = A.new_zeros(r, per_group * groups, *A.shape[2:])
    for j, block in enumerate(A.chunk(groups, dim=0)):  # hidden units of group j
        rows = slice(j * (r // groups), (j + 1) * (r // groups))
        dense[rows, j * per_group : (j + 1) * per_group] = block
    return dense


def _dense_to_block(A: Tensor, groups: int) -> Tensor | None:
    """Inverse of ``_block_to_dense``; None when A has values off the blocks."""
    if groups == 1:
        return A
    block = torch.cat(
        [chunk.chunk(groups, dim=1)[j] for j, chunk in enumerate(A.chunk(groups, dim=0))]
    )
    return block if torch.equal(_block_to_dense(block, groups), A) else None


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class LoraConv(LoraLayer):
    """A: (r, in/groups, k…) as a grouped conv, B: (out, r/groups, 1…); see the module doc."""

    supports_dora = True
    supports_lora_bias = True

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options: Any) -> tuple[int, int]:
        out_channels, per_group, *kernel = module.weight.shape
        return out_channels, per_group * math.prod(kernel)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int, **options: Any) -> tuple[Shape, Shape]:
        out_channels, per_group, *kernel = module.weight.shape
        ones = (1,) * len(kernel)
        return (r, per_group, *kernel), (out_channels, r // module.groups, *ones)

    @classmethod
    def problems(cls, path: str, module: nn.Module, r: int, **options: Any) -> list[str]:
        found = []
        if r % module.groups:
            found.append(
                f"{path}: rank {r} must be a multiple of the convolution's groups={module.groups}"
            )
        if module.padding_mode != "zeros":
            found.append(
                f"{path}: padding_mode={module.padding_mode!r} is not supported (the LoRA path "
                "pads with zeros); only 'zeros' convolutions can be adapted"
            )
        return found

    @classmethod
    def matrix_problem(cls, module: nn.Module, **options: Any) -> str | None:
        if module.groups > 1:
            return "a grouped convolution (its ΔW is one matrix per group)"
        return None

    @classmethod
    def magnitude_shape(cls, module: nn.Module, **options: Any) -> Shape:
        return (1, module.out_channels) + (1,) * (module.weight.dim() - 2)

    @classmethod
    def to_peft(cls, A: Tensor, B: Tensor, module: nn.Module, **options) -> tuple[Tensor, Tensor]:
        if A.shape[1] == module.in_channels:  # already dense (groups = 1, or a PEFT A)
            return A, B
        return _block_to_dense(A, module.groups), B

    @classmethod
    def from_peft(cls, A: Tensor, B: Tensor, module: nn.Module, r: int, **options):
        block = _dense_to_block(A, module.groups)
        return (A if block is None else block), B

    def __init__(self, base_layer: nn.Module, **options: Any) -> None:
        super().__init__(base_layer, **options)
        self.conv = _CONV_FUNCTIONS[base_layer.weight.dim() - 2]
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels

    def _a_groups(self, name: str) -> int:
        """Groups of A's convolution: g for the block layout, 1 for PEFT's dense A."""
        return self.base_layer.groups if self.lora_A[name].shape[1] != self.in_features else 1

    def channel(self, per_output: Tensor) -> Tensor:
        # (out,) -> (1, out, 1, …) against (N, out, spatial…)
        return per_output.view(1, -1, *([1] * (self.base_layer.weight.dim() - 2)))

    @classmethod
    def to_matrix(cls, module: nn.Module, weight: Tensor, **options: Any) -> Tensor:
        return weight.flatten(1)  # (out, in/g, k…) -> (out, in/g·k…)

    @classmethod
    def from_matrix(cls, module: nn.Module, matrix: Tensor, **options: Any) -> Tensor:
        return matrix.view(module.weight.shape)

    def delta_weight(self, name: str) -> Tensor:
        base, A, B = self.base_layer, self.lora_A[name], self.lora_B[name]
        groups = base.groups
        if self._a_groups(name) != groups:
            raise LoraError(
                f"Cannot merge adapter '{name}' into the grouped convolution {base}: its A "
                "(from a PEFT file) mixes channels across groups, which the grouped weight "
                "cannot hold. Keep it unmerged, or retrain with lorakit (block-structured A)."
            )
        # Per group j: (out/g, r/g) @ (r/g, in/g·k…) -> (out/g, in/g·k…), stacked over groups.
        Bg = B.flatten(1).unflatten(0, (groups, -1))  # (g, out/g, r/g)
        Ag = A.flatten(1).unflatten(0, (groups, -1))  # (g, r/g, in/g·k…)
        return lora_delta(Bg, Ag, self.scale[name]).reshape(base.weight.shape)

    def weight_norm(self, name: str) -> Tensor:
        """DoRA's norm per output channel; for groups > 1 it follows PEFT's formula.

        PEFT takes ΔW as ``B.view(-1, r) @ A_dense.view(r, -1)`` reshaped to the weight's
        shape. For groups = 1 that is the true ΔW; for grouped convolutions it is not, but
        adapters must give PEFT's outputs, and merging stays exact because the same norm is
        used there (see ``LoraLayer.merge``).
        """
        base, r = self.base_layer, self.r[name]
        if base.groups == 1:
            return super().weight_norm(name)
        with torch.no_grad():
            A, B = self.to_peft(self.lora_A[name], self.lora_B[name], base)
            peft_delta = lora_delta(B.reshape(-1, r), A.reshape(r, -1), self.scale[name])
            matrix = (base.weight.float() + peft_delta.reshape(base.weight.shape)).flatten(1)
            return torch.linalg.vector_norm(matrix, dim=1)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        problem = self.matrix_problem(self.base_layer)
        if problem:
            raise LoraError(f"{self.base_layer}: adapter '{name}' sits on {problem}.")
        # (out, r, 1…) -> (out, r);  (r, in, k…) -> (r, in·k…)
        return self.lora_B[name].flatten(1), self.lora_A[name].flatten(1)

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        base = self.base_layer
        after_a = self.conv(
            self._dropped(name, x),
            self.lora_A[name],
            None,
            base.stride,
            base.padding,
            base.dilation,
            self._a_groups(name),
        )
        bias = self.lora_bias.get(name)
        return self.conv(after_a, self.lora_B[name], bias, groups=base.groups) * self.scale[name]

    def load_peft_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        A = tensors[self.peft_keys[0]]
        if _dense_to_block(A, self.base_layer.groups) is None:  # PEFT's dense A: keep it so
            old = self.lora_A[name]
            self.lora_A[name] = nn.Parameter(A.to(old).clone(), old.requires_grad)
        super().load_peft_tensors(name, tensors)
