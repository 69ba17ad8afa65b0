"""What lorakit knows of llama.cpp's architectures: tensor names, and layouts that differ from HF.

Names come from the ``gguf`` package (``gguf.get_tensor_name_map``: the table llama.cpp's own
converters use). Layout changes are those of llama.cpp's converter (``convert_hf_to_gguf.py``
and ``conversion/<arch>.py`` in llama.cpp), reproduced here per architecture:

- Llama / Mistral (``conversion/llama.py``, ``LlamaModel.permute``): HF stores the rows of
  ``q_proj`` / ``k_proj`` with each head's rotary pairs split in halves, llama.cpp interleaves
  them; rows (heads, 2, d/2) -> (heads, d/2, 2). A LoRA pair permutes B's rows only.
- GPT-2 (``conversion/gpt2.py``): ``Conv1D`` weights are (in, out) in HF, (out, in) in GGUF.
- Qwen2 / Qwen3 (``conversion/qwen.py``), Phi-3 (``conversion/phi.py``: its fused
  ``qkv_proj`` and ``gate_up_proj`` are llama.cpp's ``attn_qkv`` and ``ffn_up``): names only.
- Gemma 2 / 3 (``conversion/gemma.py``): HF's RMSNorm scales by ``1 + w``, llama.cpp's by
  ``w``, so every ``*norm.weight`` is written as ``w + 1``.

Every 2-D weight in GGUF is then the matrix (out, in) that ``B @ A`` gives, except the token
embedding, (vocab, dim), whose LoRA llama.cpp applies as a row lookup (see ``gguf_adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from torch import Tensor, nn

from ..errors import LoraError


@dataclass(frozen=True)
class Arch:
    """One HF architecture as llama.cpp's converter writes it."""

    classes: tuple[str, ...]  # HF model classes (config.architectures)
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # Llama's rotary row order (see the module docstring)
    transposed: tuple[str, ...] = ()  # weight-name suffixes HF stores as (in, out)
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma: HF scales by 1 + w)


ARCHS = (
    Arch(("LlamaForCausalLM", "MistralForCausalLM"), gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    Arch(("Qwen2ForCausalLM",), gguf.MODEL_ARCH.QWEN2),
    Arch(("Qwen3ForCausalLM",), gguf.MODEL_ARCH.QWEN3),
    Arch(("Gemma2ForCausalLM",), gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0),
    Arch(("Gemma3ForCausalLM",), gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0),
    Arch(("Phi3ForCausalLM",), gguf.MODEL_ARCH.PHI3),
    Arch(
        ("GPT2LMHeadModel",),
        gguf.MODEL_ARCH.GPT2,
        transposed=(".c_attn.weight", ".c_proj.weight", ".c_fc.weight"),
    ),
)
SUPPORTED = tuple(c for a in ARCHS for c in a.classes)


def model_class(model: nn.Module) -> str:
    """The HF architecture name of ``model`` (its class; lorakit wraps layers, not the model)."""
    return type(model).__name__


class ArchMap:
    """HF tensor name -> GGUF name and layout, for one model."""

    def __init__(self, model: nn.Module) -> None:
        name = model_class(model)
        spec = next((a for a in ARCHS if name in a.classes), None)
        if spec is None:
            raise LoraError(
                f"{name}: lorakit's GGUF export does not know how llama.cpp lays out this "
                f"architecture (it knows {', '.join(SUPPORTED)}). Export with --to vllm, or "
                "merge (lorakit merge) and convert the merged folder with llama.cpp's "
                "convert_hf_to_gguf.py if llama.cpp supports it."
            )
        config = model.config
        self.spec = spec
        self.arch_name = gguf.MODEL_ARCH_NAMES[spec.arch]
        self.n_blocks = int(config.num_hidden_layers)
        self.n_head = int(config.num_attention_heads)
        self.n_head_kv = int(getattr(config, "num_key_value_heads", None) or self.n_head)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self._names = gguf.get_tensor_name_map(spec.arch, self.n_blocks)

    def gguf_name(self, hf_name: str) -> str | None:
        """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight`` (None: unmapped)."""
        return self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def transposed(self, hf_name: str) -> bool:
        """Whether HF stores this weight as (in, out), the transpose of GGUF's (out, in)."""
        return hf_name.endswith(self.spec.transposed)

    def _heads(self, hf_name: str) -> int | None:
        """Heads whose rotary rows llama.cpp reorders in this tensor (None: not reordered)."""
        if not self.spec.permute_qk:
            return None
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return self.n_head
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return self.n_head_kv
        return None

    def permute_rows(self, hf_name: str, rows: Tensor) -> Tensor:
        """Reorder the output rows (dim 0) of a q/k weight, bias or LoRA B as llama.cpp does.

        rows: (out, ...) with out = heads · d; (heads, 2, d/2, ...) -> (heads, d/2, 2, ...).
        Other tensors are returned unchanged.
        """
        heads = self._heads(hf_name)
        if heads is None:
            return rows
        split = rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        return split.swapaxes(1, 2).reshape(rows.shape)

    def unpermute_rows(self, hf_name: str, rows: Tensor) -> Tensor:
        """The inverse of :meth:`permute_rows`: (heads, d/2, 2, ...) -> (heads, 2, d/2, ...)."""
        heads = self._heads(hf_name)
        if heads is None:
            return rows
        split = rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:])
        return split.swapaxes(1, 2).reshape(rows.shape)

    def _shift(self, hf_name: str) -> float:
        return self.spec.norm_shift if hf_name.endswith("norm.weight") else 0.0

    def to_gguf(self, hf_name: str, value: Tensor) -> Tensor:
        """A parameter of the HF model in GGUF's layout: transposed, q/k rows permuted, norms
        shifted, as the module docstring says for this architecture."""
        value = value.T if self.transposed(hf_name) else value
        value = self.permute_rows(hf_name, value)
        shift = self._shift(hf_name)
        return value + shift if shift else value

    def to_hf(self, hf_name: str, value: Tensor) -> Tensor:
        """The inverse of :meth:`to_gguf`: a GGUF tensor back in the HF parameter's layout."""
        shift = self._shift(hf_name)
        value = value - shift if shift else value
        value = self.unpermute_rows(hf_name, value)
        return value.T if self.transposed(hf_name) else value
