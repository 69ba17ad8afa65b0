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

    def add_extra(self, option: str, path: str) -> None:
        """Record that ``path`` uses config option ``option`` beyond plain pairs (a wrapper's
        ``extras``), in the list of that option."""
        lists = {
            "use_dora": self.dora,
            "lora_bias": self.lora_bias,
            "modules_to_save": self.saved,
            "trainable_token_indices": self.tokens,
        }
        lists[option].append(path)


def collect(model: nn.Module, name: str = "default") -> Collected:
    """Adapter ``name`` of ``model`` as plain pairs, plus what a plain pair cannot express.

    Works merged or not: the factors are read from the layers, never from the weights.
    """
    check_adapter_names(model, [name])
    found = Collected(adapter_configs(model)[name])
    for path, wrapper in top_level(model, name):
        for option in wrapper.extras(name):
            found.add_extra(option, path)
        if not wrapper.is_lora:
            continue  # a whole copy or trainable rows: named by its extras alone
        pair = wrapper.peft_pair(name)
        if pair is None:
            kind = type(wrapper.base_layer).__name__
            found.other.append(f"{path} ({kind}: its LoRA is not one 2-D A/B pair)")
        else:
            found.pairs.append(Pair(path, *pair, wrapper.scale[name], tuple(wrapper.peft_keys)))
    return found
