"""LoRA layer kinds, one module each, found through a type -> class registry.

=====================  =============================  ============================
base module            layer class                    module
=====================  =============================  ============================
nn.Linear, Conv1D      ``LoraLinear``                  ``linear.py`` (fused fast path)
bnb Linear4bit/8bitLt  ``LoraQuantizedLinear``         ``quantized.py`` (QLoRA)
nn.Embedding           ``LoraEmbedding``               ``embedding.py``
nn.Conv1d/2d/3d        ``LoraConv``                    ``conv.py`` (groups that merge)
nn.MultiheadAttention  ``LoraMultiheadAttention``      ``attention.py``
fused slices (config)  ``LoraFused``                   ``fused.py``
a raw parameter        ``LoraParameter``               ``parameter.py``
=====================  =============================  ============================

``wrapper.py`` holds the contract every wrapper fulfils, LoRA or not (what ``inject``, ``io``,
``merge`` and ``export`` ask); ``kind.py`` what a LoRA kind says from its class (shapes,
options, PEFT layout), read before wrapping; ``base.py`` everything the LoRA kinds share at
run time (adapters, DoRA, merging, PEFT tensors); ``modules_to_save.py`` and ``tokens.py``
hold the two non-LoRA wrappers.
"""

from .attention import LoraMultiheadAttention
from .base import LoraLayer, lora_delta
from .conv import LoraConv
from .embedding import LoraEmbedding
from .fused import LoraFused
from .kind import LoraKind
from .linear import LoraLinear, is_gpt2_conv1d, principal_init
from .modules_to_save import ModulesToSave
from .parameter import LoraParameter
from .quantized import LoraQuantizedLinear
from .registry import layer_class_for, register, supported_types
from .tokens import TrainableTokens
from .wrapper import Wrapper, iter_adapter_modules, unwrap

__all__ = [
    "LoraConv",
    "LoraEmbedding",
    "LoraFused",
    "LoraKind",
    "LoraLayer",
    "LoraLinear",
    "LoraMultiheadAttention",
    "LoraParameter",
    "LoraQuantizedLinear",
    "ModulesToSave",
    "TrainableTokens",
    "Wrapper",
    "is_gpt2_conv1d",
    "iter_adapter_modules",
    "layer_class_for",
    "lora_delta",
    "principal_init",
    "register",
    "supported_types",
    "unwrap",
]
