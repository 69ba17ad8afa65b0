"""Tiny models of every family lorakit exports as merged GGUFs, with exact weights.

Shared by tests/test_export_merged.py and scripts/make_gguf_reference.py, which ran llama.cpp's
``convert_hf_to_gguf.py`` on ``lorakit merge`` of the same models (tests/data/llamacpp_merged).

Every weight and adapter factor is a small multiple of 1/64 or 1/16 written by a formula, not
drawn from a generator, so the models are the same on every machine and every torch version,
and the merged weights ``W + scale · B A`` are exact in float32 whatever order a matrix product
sums in: both sides of the comparison hold the same bits.

Tokenizers: the bundled SmolLM2 tokenizer (byte-level BPE; its pre-tokenizer set back to the
one SmolLM2's own tokenizer.json has, digits split first, which the GGUF-converted copy lost),
and two SentencePiece models trained on the demo data (tests/data/llamacpp_merged/*.model):
Llama-style (dummy prefix, <s> </s>) and Gemma-style (no prefix, <bos> <eos> <pad> <mask>).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data" / "llamacpp_merged"
DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
    "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class Family:
    """A tiny model of one architecture, and the tokenizer it is saved with."""

    config: str  # transformers config class
    model: str  # transformers model class
    options: dict
    tokenizer: str  # "bundled", "llama-spm" or "gemma-spm"
    targets: tuple[str, ...] = tuple(DECODER)


_SMALL = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}
_GEMMA = {**_SMALL, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64}
FAMILIES = {
    "llama": Family("LlamaConfig", "LlamaForCausalLM", _SMALL, "bundled"),
    "llama-spm": Family("LlamaConfig", "LlamaForCausalLM", _SMALL, "llama-spm"),
    "mistral-spm": Family(
        "MistralConfig", "MistralForCausalLM", {**_SMALL, "sliding_window": None}, "llama-spm"
    ),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", _SMALL, "bundled"),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", {**_SMALL, "head_dim": 8}, "bundled"),
    "gpt2": Family(
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 256, "n_ctx": 256},  # as gpt2
        "bundled",
        ("c_attn", "c_proj", "c_fc"),
    ),
    "gemma2-spm": Family("Gemma2Config", "Gemma2ForCausalLM", _GEMMA, "gemma-spm"),
    "gemma3": Family("Gemma3TextConfig", "Gemma3ForCausalLM", _GEMMA, "bundled"),
    "gemma3-spm": Family("Gemma3TextConfig", "Gemma3ForCausalLM", _GEMMA, "gemma-spm"),
    "phi3-spm": Family(
        "Phi3Config",
        "Phi3ForCausalLM",
        _SMALL,
        "llama-spm",
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    ),
}


def exact_(tensor: torch.Tensor, salt: int, step: float) -> None:
    """Fill ``tensor`` with ((7k + salt) mod 31 - 15) · step: small exact multiples of step."""
    k = torch.arange(tensor.numel(), dtype=torch.int64)
    values = ((k * 7 + salt) % 31 - 15).to(torch.float32) * step
    with torch.no_grad():
        tensor.copy_(values.reshape(tensor.shape))


def smollm2_tokenizer_json(smollm2_tokenizer):
    """A copy of the bundled tokenizer splitting as SmolLM2's own tokenizer.json does."""
    import copy

    from tokenizers import pre_tokenizers

    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return tokenizer


def bundled_tokenizer(smollm2_tokenizer):
    """:func:`smollm2_tokenizer_json` with a plain ChatML template (no default system)."""
    tokenizer = smollm2_tokenizer_json(smollm2_tokenizer)
    tokenizer.chat_template = CHATML
    return tokenizer


def spm_tokenizer(name: str, folder: Path):
    """The SentencePiece tokenizer ``name`` ("llama-spm", "gemma-spm"), its tokenizer.model
    copied into ``folder`` (as a Hugging Face folder ships it)."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / f"{name}.model", folder / "tokenizer.model")
    llama = name == "llama-spm"
    config = {
        "tokenizer_class": "LlamaTokenizer" if llama else "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": LLAMA2_TEMPLATE if llama else GEMMA_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(folder)


def base_folder(name: str, folder: Path, smollm2_tokenizer) -> Path:
    """Family ``name``'s tiny model (exact weights) and tokenizer saved as a HF folder."""
    import transformers

    family = FAMILIES[name]
    if family.tokenizer == "bundled":
        tokenizer = bundled_tokenizer(smollm2_tokenizer)
    else:
        tokenizer = spm_tokenizer(family.tokenizer, folder)
    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    config = getattr(transformers, family.config)(
        vocab_size=len(tokenizer), **family.options, **ids
    )
    config.architectures = [family.model]
    model = getattr(transformers, family.model)(config).eval()
    for i, (_, param) in enumerate(sorted(model.named_parameters())):
        exact_(param, 13 * i, 1 / 64)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def adapter_folder(name: str, base: Path, folder: Path, **options) -> Path:
    """A rank-4 LoRA (alpha 8) on family ``name``'s projections, exact factors, saved."""
    from lorakit import LoraConfig, add_lora, save_adapter
    from lorakit.models.load import load_model
    from lorakit.targeting import lora_layers

    model, _ = load_model(str(base))
    config = {"r": 4, "alpha": 8, "target_modules": list(FAMILIES[name].targets), **options}
    add_lora(model, LoraConfig(**config, base_model_name_or_path=str(base)))
    for i, (_, layer) in enumerate(lora_layers(model)):
        exact_(layer.lora_A["default"], 5 * i, 1 / 16)
        exact_(layer.lora_B["default"], 5 * i + 3, 1 / 16)
    return save_adapter(model, folder)


def _value(kind, value) -> list:
    """[GGUF type, value]; an array of over 1000 items (a BPE vocabulary) as its length and
    digest, so the references stay small while SentencePiece's 400 pieces compare one by one."""
    if isinstance(value, list) and len(value) > 1000:
        digest = hashlib.sha256(json.dumps(value, ensure_ascii=False).encode()).hexdigest()
        value = {"len": len(value), "sha256": digest}
    return [kind.name, value]


def summarize(path: Path) -> dict:
    """A GGUF's keys (type and value) and tensors (type, shape, digest of its float32 values),
    in a form both lorakit's file and the converter's are compared in."""
    from lorakit.export.gguf_read import Header

    header = Header(path)
    keys = {k: _value(kind, v) for k, (kind, _, v) in header.fields.items()}
    tensors = {
        t.name: [
            t.qtype.name,
            list(t.shape),
            hashlib.sha256(header.tensor(t).tobytes()).hexdigest(),
        ]
        for t in header.tensors
    }
    return {"keys": keys, "tensors": tensors}
