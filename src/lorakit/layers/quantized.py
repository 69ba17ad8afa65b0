"""LoRA on bitsandbytes' 4-bit (NF4 / FP4) and 8-bit linear layers: QLoRA.

The base weight stays quantized; only A and B (fp32) train::

    y = base(x) + b + s · B A x,        base(x) ≈ x · dequant(W)ᵀ

The base output is bitsandbytes' own forward, so lorakit's outputs equal PEFT's on the same
base in every mode. Where autograd needs the base product's backward (training, x requiring
grad), a 4-bit base runs the fused path (``LoraLinear._path``) instead: it dequantizes W for
the forward product and again in backward, so only the quantized weight lives between the two
passes. (bitsandbytes' training forward computes the same x · dequant(W)ᵀ; its eval kernel on
CPUs with AVX-512 BF16 repacks W and multiplies in bf16, about 3e-3 relative off.) An 8-bit
base always runs bitsandbytes' LLM.int8(), which quantizes the activations too.

The delta is never added to the quantized weight: that would re-quantize it and round ΔW
away, so merging refuses and ``lorakit.merge.dequantize_merge`` writes float layers
(dequant(W) + ΔW) instead.

bitsandbytes is imported only when a quantized layer is met, and the registry names its
classes by their import path, so ``import lorakit`` does not need it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .linear import LoraLinear
from .registry import layer_class_for, register

# bitsandbytes' AVX-512 BF16 eval kernel repacks W (out, in) in blocks of this many rows.
_PACKED_ROWS = 32


def dequantize(module: nn.Module) -> Tensor:
    """The (out, in) weight of a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` as floats.

    Reads the weight in whichever layout bitsandbytes holds it (see ``_standard_layout``) and
    leaves the module as it is.
    """
    import bitsandbytes as bnb

    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        return bnb.functional.dequantize_4bit(*_standard_layout(weight))
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    # int8 rows times their absmax / 127
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)


def _standard_layout(weight: nn.Parameter) -> tuple[Tensor, Any]:
    """(4-bit data, quant state) of a ``Params4bit`` in the layout ``dequantize_4bit`` reads.

    On a CPU with AVX-512 BF16, bitsandbytes' first eval forward repacks the weight for its
    kernel in place (``packing_format_for_cpu``): rows in blocks of 32, the per-block absmax
    un-nested and rounded to bf16, stored (in / blocksize, out). Read as it stands that is a
    permuted weight; this unpacks a copy with bitsandbytes' own inverse, keeping the bf16
    absmax as floats (the weight the kernel multiplies by) rather than re-quantizing it.
    """
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = copy.copy(state)  # the inverse rewrites the state it is given
    state.original_nested = False  # keep the float absmax: no second rounding
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    # (in / blocksize, out) -> (out, in / blocksize) -> one absmax per block, row by row
    state.absmax = state.absmax.T.reshape(-1).float()
    return data, state


def _packing_rejects(module: nn.Module) -> bool:
    """Whether bitsandbytes would repack this 4-bit layer for its AVX-512 BF16 eval kernel
    and cannot: the repacking needs out % 32 == 0 and in % blocksize == 0, and asserts
    (``N must be divisible by block_n``) otherwise."""
    state = getattr(module.weight, "quant_state", None)  # None: not quantized yet
    if not getattr(module, "support_avx512bf16_for_cpu", False) or state is None:
        return False
    return module.out_features % _PACKED_ROWS != 0 or module.in_features % state.blocksize != 0


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


def use_training_kernels(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer of ``model`` on its differentiable kernel.

    On a CPU with AVX-512 BF16, bitsandbytes repacks a 4-bit weight at its first eval
    forward without grad (a validation loss, an exact-match pass) and from then on runs its
    packed kernel in training too, which has no backward: the layers lorakit does not wrap
    would pass no gradient to the adapters below them. A training run therefore turns the
    packing off and undoes it where it happened (bitsandbytes' own inverse, the one it uses
    to save such a weight), so every pass computes x · dequant(W)ᵀ.
    """
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )


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

    def __init__(self, base_layer: nn.Module, **options: Any) -> None:
        super().__init__(base_layer, **options)
        if _packing_rejects(base_layer):
            # Its eval forward would assert: bitsandbytes' generic kernel instead, the one it
            # runs in training and on every other CPU (x · dequant(W)ᵀ, as the fused node).
            base_layer.support_avx512bf16_for_cpu = False

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options: Any) -> tuple[int, int]:
        return module.out_features, module.in_features  # the weight itself is packed

    @classmethod
    def weight_shape(cls, module: nn.Module, **options: Any) -> tuple[int, ...]:
        return cls.matrix_shape(module)

    def base_shape(self) -> tuple[int, ...]:
        return self.matrix_shape(self.base_layer)  # not the packed storage's shape

    def _fusable_base(self) -> bool:
        # 4-bit: bitsandbytes' training forward is x · dequant(W)ᵀ + b, which the fused node
        # computes. 8-bit: LLM.int8() also quantizes the activations (rows by absmax,
        # outliers apart), about 1e-3 off x · dequant(W)ᵀ, so it always runs itself.
        return type(self.base_layer).__name__ == "Linear4bit"

    def _path(self, x: Tensor, extra_args: bool) -> str:
        """``LoraLinear._path``, with the fused node only where autograd needs the base
        product's backward: elsewhere bitsandbytes' own forward (its eval kernel included)
        gives the base output, as it does under PEFT."""
        path = super()._path(x, extra_args)
        if path == "fused" and not (torch.is_grad_enabled() and x.requires_grad):
            return "generic"
        return path

    def _fused_weight(self) -> _Dequantized:
        return _Dequantized(self.base_layer)

    def dense_weight(self) -> Tensor:
        return dequantize(self.base_layer).float()

    def to_float(
        self, dtype: torch.dtype = torch.float32, weight: Tensor | None = None
    ) -> LoraLinear:
        """This layer's adapters and all its state (``move_state_to``) on a float copy of the
        base (``float_linear``: ``weight``, default dequant(W)), unmerged."""
        return self.move_state_to(LoraLinear(float_linear(self.base_layer, dtype, weight)))

    def merge_problem(self, names: list[str]) -> str | None:
        kind = type(self.base_layer).__name__
        return (
            f"the base is a quantized {kind}: adding ΔW would re-quantize it and round the "
            "adapter away. Merge into float weights instead: lorakit merge (or "
            "lorakit.merge.dequantize_merge), which writes dequant(W) + ΔW"
        )
