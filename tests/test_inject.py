"""Targeting: which modules get adapted, strict errors, freezing, parameter counts."""

import copy

import pytest
import tiny
import torch
from torch import nn

from lorakit import LoraConfig, LoraError, add_lora, plan, trainable_parameters
from lorakit.layers import (
    LoraEmbedding,
    LoraFused,
    LoraLayer,
    LoraLinear,
    LoraParameter,
    ModulesToSave,
)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))


def test_llama_seven_projections_and_rotary_untouched():
    model = tiny.llama()
    rotary = copy.deepcopy(model.model.rotary_emb)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=LLAMA_TARGETS))
    assert len(adapted(model)) == 7 * 2
    assert all(isinstance(m, LoraLinear) for n, m in model.named_modules() if n in adapted(model))
    assert type(model.model.rotary_emb) is type(rotary)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, rotary.inv_freq)


def test_only_lora_parameters_train_and_counts_match_hand_count():
    model = tiny.llama()
    total_before = sum(p.numel() for p in model.parameters())
    add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # q: 32->32, v: 32->16 per layer: r·(in + out) each.
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    counts = trainable_parameters(model)
    assert counts == (expected, total_before + expected)
    assert str(counts).startswith(f"trainable params: {expected:,} || all params:")


def test_optimizer_steps_change_only_adapter_parameters():
    model = tiny.llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        original = name.replace(".base_layer", "")
        if original in before:
            torch.testing.assert_close(p, before[original], rtol=0, atol=0)
        else:
            assert ".lora_" in name
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n), (
        "B never moved"
    )


def test_llava_language_model_only_with_exclusion():
    model = tiny.llava()
    cfg = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], exclude_modules=["vision_tower"])
    add_lora(model, cfg)
    names = adapted(model)
    assert names and all(".language_model." in n for n in names)
    assert len(names) == 4  # 2 layers × (q, v)
    assert not any(isinstance(m, LoraLayer) for m in model.model.vision_tower.modules())


def test_deepseek_low_rank_projections_and_fused_experts():
    model = tiny.deepseek_v2()
    cfg = LoraConfig(
        r=2,
        target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    ids = torch.randint(0, 64, (2, 6))
    ref = model(ids).logits
    add_lora(model, cfg)
    assert len([n for n in adapted(model) if "self_attn" in n]) == 4 * 2
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, LoraParameter) and experts.parameter_name == "down_proj"
    assert experts.base_layer.parameter_name == "gate_up_proj"
    assert experts.base_layer.lora_A["default"].shape == (4, 2, 32)  # (E, r, hidden)
    torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)
    tiny.randomize_adapters(model)
    assert not torch.allclose(model(ids).logits, ref, atol=1e-4)


def test_gpt2_fused_qv_slices():
    model = tiny.gpt2()
    cfg = LoraConfig(r=2, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]})
    add_lora(model, cfg)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraFused) and layer.fan_in_fan_out
    assert layer.lora_B["default"].shape == (2, 24, 2)


def test_cnn_conv_and_modules_to_save_head():
    model = tiny.cnn()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    add_lora(model, LoraConfig(r=2, target_modules=["conv1", "conv2"], modules_to_save=["head"]))
    assert isinstance(model.head, ModulesToSave)
    assert all(p.requires_grad for p in model.head.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in model.head.original_module.parameters())
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_all_linear_skips_output_head():
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules="all-linear"))
    names = adapted(model)
    assert "lm_head" not in names and len(names) == 14


def test_regex_target_and_layers_to_transform():
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=r".*\.layers\.1\.self_attn\.(q|v)_proj"))
    assert adapted(model) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0]))
    assert adapted(model) == ["model.layers.0.self_attn.q_proj"]


def test_rank_and_alpha_patterns_and_rslora_scale():
    model = tiny.llama()
    cfg = LoraConfig(
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2},
    )
    add_lora(model, cfg)
    attn0, attn1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    assert attn0.v_proj.r["default"] == 2 and attn0.v_proj.scale["default"] == 4.0
    assert attn0.q_proj.scale["default"] == 2.0 and attn1.q_proj.scale["default"] == 0.5
    model = tiny.llama()
    add_lora(model, LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert model.model.layers[0].self_attn.q_proj.scale["default"] == 8 / 4


def test_embedding_target():
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, alpha=6, target_modules=["embed_tokens"]))
    layer = model.model.embed_tokens
    assert isinstance(layer, LoraEmbedding)
    tiny.randomize_adapters(model)
    ids = torch.tensor([[1, 5, 63]])
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = layer.base_layer.weight[ids] + 3.0 * (B @ A).T[ids]
    torch.testing.assert_close(layer(ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias,expected", [("all", 3), ("lora_only", 2)])
def test_bias_modes(bias, expected):
    model = tiny.cnn()
    add_lora(model, LoraConfig(r=2, target_modules=["conv1", "conv2"], bias=bias))
    trainable_bias = [n for n, p in model.named_parameters() if p.requires_grad and "bias" in n]
    assert len(trainable_bias) == expected


def test_unmatched_target_names_closest_modules_and_changes_nothing():
    model = tiny.llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoraError) as err:
        add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "qproj", "v_prj"]))
    message = str(err.value)
    assert "'qproj' matched no module" in message and "'v_prj' matched no module" in message
    assert "q_proj" in message.split("'qproj'")[1] and "v_proj" in message.split("'v_prj'")[1]
    assert "'q_proj' matched" not in message
    assert not adapted(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_every_problem_reported_once():
    model = tiny.gpt2()
    cfg = LoraConfig(
        r=30,
        target_modules=["c_attn", "ln_f"],
        fused_slices={"c_attn": [True, False, True, True, True]},
    )
    with pytest.raises(LoraError) as err:
        plan(model, cfg)
    message = str(err.value)
    assert "ln_f: LayerNorm is not a supported module type" in message
    assert "5 fused slices do not divide its 72 outputs" in message


def test_rank_above_min_dimension_warns_as_peft_allows_it():
    model = tiny.llama()
    with pytest.warns(UserWarning, match=r"rank 40 exceeds min\(in, out\) = 32"):
        add_lora(model, LoraConfig(r=40, target_modules=["q_proj"]))
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].shape == (40, 32)


def test_duplicate_adapter_name_and_unknown_parameter():
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LoraError, match="adapter 'default' already exists"):
        add_lora(model, LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(LoraError, match="target_parameters entry 'mlp.expert.weight' matched no"):
        add_lora(model, LoraConfig(r=2, target_parameters=["mlp.expert.weight"]), "b")


def test_grouped_conv_rank_must_divide_groups():
    with pytest.raises(LoraError, match="multiple of the convolution's groups=2"):
        add_lora(tiny.cnn(), LoraConfig(r=3, target_modules=["conv2"]))


def test_plan_is_a_dry_run_with_a_table():
    model = tiny.llama()
    result = plan(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert not adapted(model)
    assert result.lora_params == 2 * 4 * (32 + 32)
    table = str(result)
    assert "model.layers.0.self_attn.q_proj" in table and "32x32" in table
    assert f"{result.lora_params:,} trainable params" in table


def test_second_adapter_wraps_same_layer():
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    add_lora(model, LoraConfig(r=3, target_modules=["q_proj", "v_proj"]), "b")
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, nn.Linear)
    assert q.adapter_names() == ["a", "b"] and q.active == ["b"]


def test_wrappers_keep_the_models_train_or_eval_mode():
    model = tiny.cnn().eval()
    add_lora(
        model, LoraConfig(r=2, dropout=0.5, target_modules=["conv1"], modules_to_save=["head"])
    )
    assert not model.conv1.training and not model.head.training
    x = torch.randn(1, 3, 8, 8)
    tiny.randomize_adapters(model)
    torch.testing.assert_close(model(x), model(x))  # no dropout at inference
    model.train()
    assert model.conv1.training
