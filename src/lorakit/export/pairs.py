"""An adapter as the runtimes see it: one plain LoRA pair per adapted weight, and what is not.

llama.cpp and vLLM both apply ``y += scale · B (A x)`` to whole weights and nothing else. This
module collects, for adapter ``name`` of a model, each weight's pair in PEFT's layout with the
module's *true* scale (rsLoRA, ``rank_pattern``, ``alpha_pattern`` and fused slices
included), and everything a plain pair cannot express, by module path, so each exporter can
refuse it by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from ..config import LoraConfig
from ..io import top_level
from ..layers import LoraLayer, ModulesToSave, TrainableTokens
from ..merge import check_adapter_names
from ..state import adapter_configs


@dataclass
class Pair:
    """One adapted weight: ΔW (as the matrix (out, in)) = scale · B @ A.

    A: (rank, in), B: (out, rank), PEFT's layout; for an embedding "in" is the vocabulary
    and "out" the embedding size, so the weight (vocab, dim) changes by ΔWᵀ.
    """

    path: str  # the module's path in the model, e.g. model.layers.0.self_attn.q_proj
    A: Tensor
    B: Tensor
    scale: float  # the module's true scale
    keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")  # PEFT's names under path

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class Collected:
    """Adapter ``name`` split into plain pairs and the paths of everything else."""

    config: LoraConfig
    pairs: list[Pair] = field(default_factory=list)
    dora: list[str] = field(default_factory=list)  # a learned magnitude per output channel
    lora_bias: list[str] = field(default_factory=list)  # B's own bias
    saved: list[str] = field(default_factory=list)  # modules_to_save: full copies
    tokens: list[str] = field(default_factory=list)  # trainable_token_indices: replaced rows
    other: list[str] = field(default_factory=list)  # "path (what)": not one 2-D pair


def collect(model: nn.Module, name: str = "default") -> Collected:
    """Adapter ``name`` of ``model`` as plain pairs, plus what a plain pair cannot express.

    Works merged or not: the factors are read from the layers, never from the weights.
    """
    check_adapter_names(model, [name])
    found = Collected(adapter_configs(model)[name])
    for path, layer in top_level(model, name):
        if isinstance(layer, ModulesToSave):
            found.saved.append(path)
        elif isinstance(layer, TrainableTokens):
            found.tokens.append(path)
        elif isinstance(layer, LoraLayer):
            _add_layer(found, path, layer, name)
        else:
            found.other.append(f"{path} ({type(layer).__name__})")
    return found


def _add_layer(found: Collected, path: str, layer: LoraLayer, name: str) -> None:
    if layer.is_dora(name):
        found.dora.append(path)
    if name in layer.lora_bias:
        found.lora_bias.append(path)
    tensors = layer.peft_tensors(name)
    pair = [tensors.get(key) for key in layer.peft_keys]
    # A plain pair: exactly PEFT's two 2-D tensors (conv kernels, expert stacks and
    # MultiheadAttention's several pairs are not).
    extra = set(tensors) - set(layer.peft_keys) - {"lora_B.bias", "lora_magnitude_vector"}
    if extra or any(t is None or t.dim() != 2 for t in pair):
        kind = type(layer.base_layer).__name__
        found.other.append(f"{path} ({kind}: its LoRA is not one 2-D A/B pair)")
        return
    A, B = (t.detach().float().cpu() for t in pair)
    found.pairs.append(Pair(path, A, B, layer.scale[name], tuple(layer.peft_keys)))
