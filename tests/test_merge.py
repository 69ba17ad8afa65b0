"""Merge, unmerge, unload: the same function as the unmerged model, and exact inverses."""

import pytest
import tiny
import torch
from test_moe import build as moe_build
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, LoraError, add_lora, merge, unload, unmerge
from lorakit.layers import LoraLayer
from lorakit.state import adapter_configs

CASES = {
    "llama": (
        lambda: tiny.llama(),
        LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
        lambda: {"input_ids": torch.randint(0, 64, (2, 7))},
    ),
    "gpt2-fused": (
        lambda: tiny.gpt2(),
        LoraConfig(
            r=2,
            alpha=4,
            target_modules=["c_attn", "c_fc"],
            fused_slices={"c_attn": [True, False, True]},
        ),
        lambda: {"input_ids": torch.randint(0, 64, (2, 7))},
    ),
    "cnn": (
        lambda: tiny.cnn(),
        LoraConfig(r=2, alpha=2, target_modules=["conv1"], modules_to_save=["head"]),
        lambda: {"x": torch.randn(2, 3, 8, 8)},
    ),
    "deepseek-experts": (
        lambda: tiny.deepseek_v2(),
        LoraConfig(
            r=2, target_modules=["q_b_proj"], target_parameters=["mlp.experts.gate_up_proj"]
        ),
        lambda: {"input_ids": torch.randint(0, 64, (2, 7))},
    ),
    # Routed experts folded into their 3D weights: (E, in, out) applied as x @ W (GPT-OSS
    # declares is_transposed; Llama-4 does not), with all-linear's attention and MLPs too.
    "gpt-oss-experts": (
        lambda: moe_build("gpt_oss"),
        LoraConfig(r=2, alpha=4, target_modules="all-linear"),
        lambda: {"input_ids": torch.randint(0, 64, (2, 7))},
    ),
    "llama4-experts": (
        lambda: moe_build("llama4_text"),
        LoraConfig(r=2, alpha=4, target_modules="all-linear"),
        lambda: {"input_ids": torch.randint(0, 64, (2, 7))},
    ),
}


def _out(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_unmerged_equals_unloaded(case):
    make, cfg, inputs = CASES[case]
    torch.manual_seed(0)
    x = inputs()
    model = make()
    base_out = _out(model, x)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, cfg)
    tiny.randomize_adapters(model)
    if case == "cnn":
        with torch.no_grad():
            model.head.modules_to_save["default"].weight.add_(0.5)
    unmerged = _out(model, x)
    assert _rel(unmerged, base_out) > 1e-3  # the adapter does something
    merge(model)
    assert _rel(_out(model, x), unmerged) < 1e-5
    merge(model)  # idempotent
    assert _rel(_out(model, x), unmerged) < 1e-5
    unmerge(model)
    assert _rel(_out(model, x), unmerged) < 1e-5
    for name, p in model.named_parameters():
        key = name.replace(".base_layer", "")
        if key in base_weights and ".original_module." not in name:
            torch.testing.assert_close(p, base_weights[key], rtol=0, atol=1e-6)
    unload(model, merge=True)
    assert _rel(_out(model, x), unmerged) < 1e-5
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_parameters())


def test_unload_types_are_plain_torch():
    model = tiny.gpt2()
    add_lora(model, LoraConfig(r=2, target_modules=["c_attn", "c_proj", "wte"]))
    unload(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert type(model.transformer.wte) is nn.Embedding
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules="all-linear"))
    unload(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert not adapter_configs(model)


def test_unload_without_merge_restores_base():
    model = tiny.llama()
    ids = torch.randint(0, 64, (1, 5))
    ref = model(ids).logits
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    tiny.randomize_adapters(model)
    merge(model)
    unload(model, merge=False)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-6)


def test_nan_adapter_refuses_to_merge_and_changes_nothing():
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    tiny.randomize_adapters(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["default"][0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(LoraError, match=r"non-finite.*layers\.1\.self_attn\.v_proj"):
        merge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0, equal_nan=True)
    assert all(not m.merged for m in model.modules() if isinstance(m, LoraLayer))


def test_tied_embedding_merge_keeps_head_correct():
    model = tiny.llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 6))
    add_lora(model, LoraConfig(r=2, target_modules=["embed_tokens"]))
    tiny.randomize_adapters(model)
    unmerged = model(ids).logits
    with pytest.warns(UserWarning, match="unties its weight from 'lm_head.weight'"):
        merge(model)
    assert model.lm_head.weight is not model.model.embed_tokens.base_layer.weight
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    assert model.config.tie_word_embeddings is False


def test_grouped_conv_merges_exactly():
    model = tiny.cnn()
    add_lora(model, LoraConfig(r=2, target_modules=["conv1", "conv2"]))
    tiny.randomize_adapters(model)
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    merge(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)


def test_merge_with_peft_grouped_a_raises_before_any_write():
    model = tiny.cnn()
    add_lora(model, LoraConfig(r=2, target_modules=["conv1", "conv2"]))
    tiny.randomize_adapters(model)
    grouped = model.conv2 if model.conv2.base_layer.groups > 1 else model.conv1
    dense = torch.randn(2, grouped.base_layer.in_channels, *grouped.base_layer.kernel_size)
    tensors = grouped.peft_tensors("default") | {"lora_A.weight": dense}
    grouped.load_peft_tensors("default", tensors)
    w1 = model.conv1.base_layer.weight.detach().clone()
    with pytest.raises(LoraError, match="mixes channels across groups"):
        merge(model)
    assert torch.equal(model.conv1.base_layer.weight, w1) and not model.conv1.merged


def test_half_precision_merge_rounds_once():
    layer_model = nn.Sequential(nn.Linear(16, 16)).to(torch.bfloat16)
    add_lora(layer_model, LoraConfig(r=2, target_modules=["0"]))
    tiny.randomize_adapters(layer_model)
    w0 = layer_model[0].base_layer.weight.detach().clone()
    delta = layer_model[0].delta_weight("default")
    merge(layer_model)
    expected = (w0.float() + delta).to(torch.bfloat16)
    assert torch.equal(layer_model[0].base_layer.weight, expected)


def test_unknown_adapter_name():
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    with pytest.raises(LoraError, match=r"Unknown adapter\(s\) \['b'\]; this model has \['a'\]"):
        merge(model, ["b"])


def test_unload_without_merge_gives_back_a_pissa_residual():
    model = tiny.llama()
    ids = torch.randint(0, 64, (2, 6))
    ref = model(ids).logits
    add_lora(model, LoraConfig(r=4, init="pissa", target_modules=["q_proj", "down_proj"]))
    assert not torch.allclose(
        model.model.layers[0].self_attn.q_proj.base_layer.weight,
        tiny.llama().model.layers[0].self_attn.q_proj.weight,
    )
    unload(model, merge=False)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
