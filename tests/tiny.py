"""Tiny models built from configs (random init, no download) shared by the tests."""

from __future__ import annotations

import copy

import torch
from torch import nn


def llama(
    tie: bool = False, seed: int = 0, vocab: int = 64, hidden: int = 32, intermediate: int = 48
) -> nn.Module:
    """A 2-layer Llama-style causal LM (q/k/v/o, gate/up/down, rotary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def llava(seed: int = 0) -> nn.Module:
    """A LLaVA-style vision-language model whose vision tower also has q_proj/v_proj."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=63)
    return LlavaForConditionalGeneration(config).eval()


def deepseek_v2(seed: int = 0) -> nn.Module:
    """DeepSeek-V2 with MLA low-rank projections and fused MoE experts."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=12,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    )
    return DeepseekV2ForCausalLM(config).eval()


def gpt2(seed: int = 0) -> nn.Module:
    """GPT-2 (transformers' Conv1D layers, fused c_attn = [q | k | v])."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=64,
        n_embd=24,
        n_layer=2,
        n_head=3,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


class SmallCNN(nn.Module):
    """Conv1d/2d/3d, a grouped conv, and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def randomize_adapters(model: nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Give every B a non-zero value so adapters change the output (B starts at zero)."""
    from lorakit.layers import LoraLayer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for p in module.lora_B.values():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    """A causal LM's logits on ``ids`` (default: two fixed rows of 12 tokens), no grad."""
    with torch.no_grad():
        return model(input_ids=ids).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def full_finetune() -> tuple[nn.Module, nn.Module]:
    """(base, tuned): a tiny Llama and a copy trained for 5 AdamW steps on all its weights."""
    base = llama()
    tuned = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-2)
    data = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(5):
        tuned(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return base, tuned.eval().requires_grad_(False)


def spectrum_tail(singular_values: torch.Tensor, r: int) -> float:
    """Eckart–Young: ‖W − W_r‖_F / ‖W‖_F of the best rank-r W_r, from W's singular values."""
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    return float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())
