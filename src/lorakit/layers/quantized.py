"""LoRA on bitsandbytes' 4-bit (NF4 / FP4) and 8-bit linear layers: QLoRA.

The base weight stays quantized; only A and B (fp32) train::

    y = x · dequant(W)ᵀ + b + s · B A x

On a 4-bit base the fused path (``LoraLinear._path``) dequantizes W for the forward product
and again in backward, so only the quantized weight lives between the two passes. An 8-bit
base runs bitsandbytes' own forward (LLM.int8(), which quantizes the activations too, so it
is not exactly x · dequant(W)ᵀ) with the LoRA term added, as PEFT does. The delta is never
added to the quantized weight: that would re-quantize it and round ΔW away, so merging
refuses and ``lorakit.merge.dequantize_merge`` writes float layers (dequant(W) + ΔW) instead.

bitsandbytes is imported only when a quantized layer is met, and the registry names its
classes by their import path, so ``import lorakit`` does not need it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .linear import LoraLinear
from .registry import layer_class_for, register


def dequantize(module: nn.Module) -> Tensor:
    """The (out, in) weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` as floats."""
    import bitsandbytes as bnb

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    # int8 rows times their absmax / 127
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)


def float_linear(
    module: nn.Module, dtype: torch.dtype = torch.float32, weight: Tensor | None = None
) -> nn.Linear:
    """A frozen float ``nn.Linear`` holding ``weight`` (default: dequant(W)) and the bias."""
    linear = nn.Linear(
        module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype
    )
    with torch.no_grad():
        linear.weight.copy_(dequantize(module) if weight is None else weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear.requires_grad_(False).train(module.training)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds a bitsandbytes 4-bit or 8-bit linear layer (wrapped or not)."""
    return any(layer_class_for(module) is LoraQuantizedLinear for module in model.modules())


class _Dequantized:
    """A function dtype -> W for ``LoraLinearFunction``: dequantized on each call."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, dtype: torch.dtype) -> Tensor:
        return dequantize(self.module).to(dtype)


@register("bitsandbytes.nn.modules.Linear4bit", "bitsandbytes.nn.modules.Linear8bitLt")
class LoraQuantizedLinear(LoraLinear):
    """LoRA on a quantized bitsandbytes Linear: A (r, in), B (out, r) in fp32."""

    supports_weight_init = False  # PiSSA / OLoRA would rewrite the quantized weight

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options: Any) -> tuple[int, int]:
        return module.out_features, module.in_features  # the weight itself is packed

    @classmethod
    def weight_shape(cls, module: nn.Module, **options: Any) -> tuple[int, ...]:
        return cls.matrix_shape(module)

    def base_shape(self) -> tuple[int, ...]:
        return self.matrix_shape(self.base_layer)  # not the packed storage's shape

    def _plain_base(self) -> bool:
        # 4-bit: bitsandbytes' forward is x · dequant(W)ᵀ + b, which the fused node computes.
        # 8-bit: LLM.int8() also quantizes the activations (rows by absmax, outliers apart),
        # about 1e-3 off x · dequant(W)ᵀ; bitsandbytes' own forward keeps lorakit's outputs
        # equal to PEFT's on the same base, so the adapter trains on the function it serves.
        return type(self.base_layer).__name__ == "Linear4bit"

    def _fused_weight(self) -> _Dequantized:
        return _Dequantized(self.base_layer)

    def dense_weight(self) -> Tensor:
        return dequantize(self.base_layer).float()

    def to_float(
        self, dtype: torch.dtype = torch.float32, weight: Tensor | None = None
    ) -> LoraLinear:
        """The same adapters on a float copy of the base (``float_linear``), unmerged."""
        layer = LoraLinear(float_linear(self.base_layer, dtype, weight))
        for store in ("lora_A", "lora_B", "lora_bias", "lora_magnitude"):
            getattr(layer, store).update(getattr(self, store))
        layer.r, layer.scale, layer.dropout = dict(self.r), dict(self.scale), dict(self.dropout)
        layer.set_active(self.active)
        return layer

    def merge_problem(self, names: list[str]) -> str | None:
        kind = type(self.base_layer).__name__
        return (
            f"the base is a quantized {kind}: adding ΔW would re-quantize it and round the "
            "adapter away. Merge into float weights instead: lorakit merge (or "
            "lorakit.merge.dequantize_merge), which writes dequant(W) + ΔW"
        )
