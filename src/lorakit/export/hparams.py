"""A Hugging Face config as llama.cpp's hyperparameter keys (``<arch>.*`` in a GGUF).

What each family's keys mean is llama.cpp's (``src/llama-model.cpp`` reads them; its converter
``convert_hf_to_gguf.py`` writes them). lorakit writes the same keys from the model's own
config; a key llama.cpp would otherwise default is written only when the config differs from
that default (Gemma 2's rope base, say), so a standard model's file carries what the converter
writes::

    every family   block_count, context_length, embedding_length, feed_forward_length,
                   attention.head_count(_kv), attention.layer_norm_(rms_)epsilon
    Llama/Mistral  + vocab_size, rope.dimension_count, rope.freq_base, key/value_length
                     (config.head_dim), rope scaling (linear, yarn; llama3 as rope_freqs)
    Qwen2/3        + rope.freq_base, key/value_length (config.head_dim), rope scaling
    GPT-2          (learned positions, LayerNorm epsilon)
    Gemma 2        + key/value_length, attn/final logit softcapping, sliding_window
    Gemma 3        + rope.freq_base (global) and _swa (local), sliding_window, softcapping
    Phi-3          + rope.dimension_count, rope.scaling.original_context_length,
                     sliding_window (0: none), LongRoPE factors as tensors

RoPE scalings llama.cpp does not implement (``dynamic`` NTK, say), and a Gemma query scale
other than the one llama.cpp assumes, are refused by name rather than written: the GGUF would
run, and answer differently from the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import gguf
import torch
from torch import Tensor, nn

from ..errors import LoraError
from .archs import ArchMap

A = gguf.MODEL_ARCH
Writer = gguf.GGUFWriter
DEFAULT_ROPE_BASE = 10000.0  # llama.cpp's when a file has no rope.freq_base


def _get(config, *names: str, default=None):
    """The first of ``names`` the config has and sets (configs name fields differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def rope_parameters(config) -> tuple[dict, dict]:
    """(global, local) RoPE settings: transformers 5's ``rope_parameters`` (per layer type
    for Gemma 3) or 4's ``rope_theta`` + ``rope_scaling``; local is {} without sliding layers."""
    params = dict(_get(config, "rope_parameters", "rope_scaling", default={}))
    full = dict(params.get("full_attention", params))
    local = dict(params.get("sliding_attention", {}))
    if "rope_theta" not in full and getattr(config, "rope_theta", None) is not None:
        full["rope_theta"] = config.rope_theta
    if "rope_type" not in full and "type" in full:
        full["rope_type"] = full["type"]
    if not local and getattr(config, "rope_local_base_freq", None) is not None:
        local = {"rope_theta": config.rope_local_base_freq}
    return full, local


def _common(w: Writer, config, arch: ArchMap) -> None:
    """The keys every family but GPT-2 writes from the usual config names."""
    w.add_block_count(arch.n_blocks)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(arch.n_head)
    w.add_head_count_kv(arch.n_head_kv)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _head_dim(w: Writer, config) -> None:
    """key/value_length where the config sets ``head_dim`` (else llama.cpp's hidden / heads)."""
    head_dim = config.to_dict().get("head_dim")
    if head_dim is not None:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))


def _rope_scaling(w: Writer, config, allowed: tuple[str, ...] = ()) -> None:
    """The global RoPE base and scaling keys; ``allowed``: types handled elsewhere (tensors)."""
    full, _ = rope_parameters(config)
    kind = str(full.get("rope_type") or "default").lower()
    factor = full.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
        for key, add in (
            ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
        ):
            if full.get(key) is not None:
                add(float(full[key]))
    elif kind not in ("default", *allowed):
        raise LoraError(
            f"RoPE scaling {kind!r}: llama.cpp's {type(config).__name__.removesuffix('Config')} "
            "does not implement it, so the GGUF would answer differently from the model. "
            "Export the adapter for vLLM (--to vllm) or use the merged folder (lorakit merge)."
        )
    if full.get("rope_theta") is not None:
        w.add_rope_freq_base(float(full["rope_theta"]))


def _llama(w: Writer, config, arch: ArchMap) -> None:
    _common(w, config, arch)
    _rope_scaling(w, config, allowed=("llama3",))
    _head_dim(w, config)
    w.add_vocab_size(int(config.vocab_size))
    head_dim = config.to_dict().get("head_dim") or config.hidden_size // arch.n_head
    w.add_rope_dimension_count(int(head_dim))


def _qwen(w: Writer, config, arch: ArchMap) -> None:
    _common(w, config, arch)
    _rope_scaling(w, config)
    _head_dim(w, config)


def _gpt2(w: Writer, config, arch: ArchMap) -> None:
    w.add_block_count(arch.n_blocks)
    w.add_context_length(int(config.n_positions))
    w.add_embedding_length(int(config.n_embd))
    w.add_feed_forward_length(int(config.n_inner or 4 * config.n_embd))
    w.add_head_count(arch.n_head)
    w.add_layer_norm_eps(float(config.layer_norm_epsilon))


# llama.cpp scales Gemma's queries by 1/sqrt(head_dim), or for the 27B models (told by their
# layer count) by 1/sqrt(hidden / heads): it reads no scale from the file (models/gemma*.cpp).
_GEMMA_27B_LAYERS = {A.GEMMA2: 46, A.GEMMA3: 62}


def _check_query_scale(config, arch: ArchMap) -> None:
    """Refuse a Gemma whose ``query_pre_attn_scalar`` is not the one llama.cpp assumes."""
    if arch.n_blocks == _GEMMA_27B_LAYERS[arch.spec.arch]:
        assumed = config.hidden_size // arch.n_head
    else:
        assumed = config.head_dim
    if config.query_pre_attn_scalar != assumed:
        raise LoraError(
            f"query_pre_attn_scalar {config.query_pre_attn_scalar}: llama.cpp's "
            f"{arch.arch_name} scales queries by 1/sqrt({assumed}) whatever the file says, so "
            "the GGUF would answer differently from the model."
        )


def _gemma2(w: Writer, config, arch: ArchMap) -> None:
    _check_query_scale(config, arch)
    _common(w, config, arch)
    w.add_key_length(int(config.head_dim))
    w.add_value_length(int(config.head_dim))
    w.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    w.add_final_logit_softcapping(float(config.final_logit_softcapping))
    w.add_sliding_window(int(config.sliding_window))
    theta = rope_parameters(config)[0].get("rope_theta")
    if theta is not None and float(theta) != DEFAULT_ROPE_BASE:
        w.add_rope_freq_base(float(theta))


def _gemma3(w: Writer, config, arch: ArchMap) -> None:
    _check_query_scale(config, arch)
    _common(w, config, arch)
    _rope_scaling(w, config)
    local = rope_parameters(config)[1]
    if local.get("rope_theta") is not None:
        w.add_rope_freq_base_swa(float(local["rope_theta"]))
    w.add_key_length(int(config.head_dim))
    w.add_value_length(int(config.head_dim))
    if config.final_logit_softcapping:
        w.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if getattr(config, "sliding_window_pattern", None) != 1:
        w.add_sliding_window(int(config.sliding_window))


def _phi3(w: Writer, config, arch: ArchMap) -> None:
    full, _ = rope_parameters(config)
    w.add_context_length(int(config.max_position_embeddings))
    w.add_rope_scaling_orig_ctx_len(int(_original_context(config)))
    w.add_embedding_length(int(config.hidden_size))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_block_count(arch.n_blocks)
    w.add_head_count(arch.n_head)
    w.add_head_count_kv(arch.n_head_kv)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_dimension_count(_phi3_rope_dims(config))
    w.add_rope_freq_base(float(full["rope_theta"]))
    w.add_sliding_window(int(config.sliding_window or 0))  # 0: no window (llama.cpp's test)
    kind = str(full.get("rope_type") or "default").lower()
    if kind not in ("default", "longrope", "su"):
        _rope_scaling(w, config)  # refuses what llama.cpp's Phi-3 cannot run
    if full.get("long_factor"):
        w.add_rope_scaling_attn_factors(_longrope_attention_factor(config))


def _original_context(config) -> int:
    full, _ = rope_parameters(config)
    return int(
        full.get("original_max_position_embeddings") or config.original_max_position_embeddings
    )


def _phi3_rope_dims(config) -> int:
    factor = rope_parameters(config)[0].get("partial_rotary_factor", 1.0)
    return int(factor * config.hidden_size) // int(config.num_attention_heads)


def _longrope_attention_factor(config) -> float:
    """LongRoPE's attention scale for a context stretched beyond the trained one (HF's
    ``_compute_longrope_parameters``: sqrt(1 + ln(scale) / ln(original)), 1 unstretched)."""
    original = _original_context(config)
    scale = config.max_position_embeddings / original
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0


WRITERS: dict[A, Callable[[Writer, object, ArchMap], None]] = {
    A.LLAMA: _llama,
    A.QWEN2: _qwen,
    A.QWEN3: _qwen,
    A.GPT2: _gpt2,
    A.GEMMA2: _gemma2,
    A.GEMMA3: _gemma3,
    A.PHI3: _phi3,
}


def write_hparams(writer: Writer, model: nn.Module, arch: ArchMap) -> None:
    """Add the ``<arch>.*`` hyperparameters of ``model``'s config to ``writer``.

    Raises:
        LoraError: a RoPE scaling llama.cpp does not implement for this family.
    """
    WRITERS[arch.spec.arch](writer, model.config, arch)


def extra_tensors(model: nn.Module, arch: ArchMap) -> dict[str, Tensor]:
    """Tensors llama.cpp needs that are no parameter of the model: Llama 3's RoPE frequency
    factors (``rope_freqs``) and Phi-3's LongRoPE factors (``rope_factors_long/short``)."""
    config = model.config
    full, _ = rope_parameters(config)
    kind = str(full.get("rope_type") or "default").lower()
    if arch.spec.arch == A.LLAMA and kind == "llama3":
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": _llama3_factors(model)}
    if arch.spec.arch == A.PHI3 and full.get("long_factor"):
        long = torch.tensor(full["long_factor"], dtype=torch.float32)
        short = torch.tensor(full["short_factor"], dtype=torch.float32)
        if long.numel() != _phi3_rope_dims(config) // 2 or short.shape != long.shape:
            raise LoraError(
                f"rope long/short factors hold {long.numel()} and {short.numel()} values; "
                f"llama.cpp needs {_phi3_rope_dims(config) // 2} each (rotary dims / 2)."
            )
        names = gguf.TENSOR_NAMES
        return {
            names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": long,
            names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": short,
        }
    return {}


def _llama3_factors(model: nn.Module) -> Tensor:
    """llama.cpp divides each rotary frequency by its factor: the plain frequencies
    base^(-2i/d) over the ones the model rotates by (its ``rotary_emb.inv_freq``)."""
    config = model.config
    full, _ = rope_parameters(config)
    scaled = next(
        (b for name, b in model.named_buffers() if name.endswith("rotary_emb.inv_freq")), None
    )
    if scaled is None:
        raise LoraError(f"{type(model).__name__} has no rotary_emb.inv_freq to read RoPE from.")
    dim = 2 * scaled.numel()  # (d/2,) frequencies
    base = float(full.get("rope_theta", DEFAULT_ROPE_BASE))
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return (plain / scaled.float().cpu()).to(torch.float32)
