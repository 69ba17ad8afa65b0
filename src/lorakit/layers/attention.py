"""LoRA on ``nn.MultiheadAttention``: its fused input projection and its output projection.

``nn.MultiheadAttention`` never calls its submodules: ``F.multi_head_attention_forward`` reads
``in_proj_weight`` (3E, E) and ``out_proj.weight`` (E, E) directly. So both get a LoRA, as in
PEFT: the input projection's pair lives on this wrapper, the output projection's on a
``LoraLinear`` nested at ``base_layer.out_proj`` (PEFT's tensor names follow from that), and
forward runs the module with W + ΔW swapped in for both weights, differentiably.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LoraError, brief
from .base import LoraLayer, lora_delta
from .linear import LoraLinear
from .registry import register
from .wrapper import Shape


@register(nn.MultiheadAttention)
class LoraMultiheadAttention(LoraLayer):
    """A: (r, E), B: (3E, r) on ``in_proj_weight``; ``base_layer.out_proj`` a ``LoraLinear``."""

    supports_routing = False
    dropout_mode = "refused"  # the weights are swapped: there is no input of ours to drop
    owns_children = True  # out_proj is never called on its own: it is part of this kind

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options: Any) -> tuple[int, int]:
        return tuple(module.in_proj_weight.shape)

    @classmethod
    def weight_shape(cls, module: nn.Module, **options: Any) -> tuple[int, ...]:
        return tuple(module.in_proj_weight.shape)

    @classmethod
    def problems(cls, path: str, module: nn.Module, r: int, **options: Any) -> list[str]:
        if module._qkv_same_embed_dim and isinstance(module.out_proj, nn.Linear):
            return []
        return [
            f"{path}: MultiheadAttention with separate q/k/v projections (kdim/vdim != "
            "embed_dim) is not supported; only the fused in_proj_weight layout is"
        ]

    @classmethod
    def matrix_problem(cls, module: nn.Module, **options: Any) -> str | None:
        return "a MultiheadAttention (two projections, one of them nested)"

    @classmethod
    def peft_shapes(
        cls, module: nn.Module, settings: Mapping[str, Any], **options: Any
    ) -> dict[str, Shape]:
        shapes = super().peft_shapes(module, settings, **options)
        inner = LoraLinear.peft_shapes(module.out_proj, settings)
        return shapes | {f"base_layer.out_proj.{k}": v for k, v in inner.items()}

    def __init__(self, base_layer: nn.Module, **options: Any) -> None:
        super().__init__(base_layer, **options)
        if not isinstance(base_layer.out_proj, LoraLinear):
            base_layer.out_proj = LoraLinear(base_layer.out_proj)

    @property
    def base_weight(self) -> nn.Parameter:
        return self.base_layer.in_proj_weight

    @property
    def out_proj(self) -> LoraLinear:
        """The nested wrapper of the output projection (its adapters follow this layer's)."""
        return self.base_layer.out_proj

    def nested_layers(self) -> list[LoraLayer]:
        out_proj = self.base_layer.out_proj
        return [out_proj] if isinstance(out_proj, LoraLinear) else []

    def add_adapter(self, name: str, r: int, scale: float, *args: Any, **kwargs: Any) -> None:
        super().add_adapter(name, r, scale, *args, **kwargs)
        self.out_proj.add_adapter(name, r, scale, *args, **kwargs)

    def delta_weight(self, name: str) -> Tensor:
        return lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name])

    def peft_tensors(self, name: str) -> dict[str, Tensor]:
        inner = self.out_proj.peft_tensors(name)
        return super().peft_tensors(name) | {
            f"base_layer.out_proj.{k}": v for k, v in inner.items()
        }

    @classmethod
    def as_current_peft(cls, tensors: dict[str, Tensor], peft_version: str | None) -> dict:
        """PEFT before 0.22 applied out_proj's ΔW twice (huggingface/peft#3774); PEFT 0.22
        keeps such a file's outputs by doubling its out_proj B when it loads it, and so does
        lorakit, by PEFT's rule for which files those are."""
        key = "base_layer.out_proj.lora_B.weight"
        if key not in tensors or not _applied_out_proj_twice(peft_version):
            return tensors
        return tensors | {key: 2 * tensors[key]}

    def load_peft_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        prefix = "base_layer.out_proj."
        self.out_proj.load_peft_tensors(
            name, {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        )
        super().load_peft_tensors(
            name, {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The attention with W_in + ΔW_in and W_out + ΔW_out of the pending adapters."""
        swapped = {}
        for layer, key in ((self, "in_proj_weight"), (self.out_proj, "out_proj.base_layer.weight")):
            names = layer.pending()
            if names:
                weight = layer.base_weight
                swapped[key] = weight + sum(layer.delta_weight(n) for n in names).to(weight.dtype)
        if not swapped:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, swapped, args, kwargs, strict=False)


def _applied_out_proj_twice(peft_version: str | None) -> bool:
    """Whether the PEFT that wrote a file (``peft_version``: "0.21.0", "0.22.0.dev0@sha", None
    before PEFT 0.18 recorded it) had the doubled out_proj; main's 0.21.1 dev versions had the
    fix already."""
    from packaging.version import InvalidVersion, Version

    if peft_version is None:
        return True
    try:
        version = Version(str(peft_version).partition("@")[0])
    except InvalidVersion:
        raise LoraError(
            f"adapter_config.json has peft_version={brief(peft_version)}, not a version; "
            "PEFT reads a MultiheadAttention adapter by the release that wrote it. Set it to "
            'the PEFT version that saved the adapter (e.g. "0.22.0").'
        ) from None
    release = Version(version.base_version)
    return release < Version("0.21.1") or (not version.is_devrelease and release < Version("0.22"))
