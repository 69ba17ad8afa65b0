"""PiSSA / OLoRA initialisation (SVD / QR of the base weight) against PEFT and by hand."""

import json
import math

import pytest
import tiny
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("make", [tiny.llama, tiny.gpt2])
def test_weight_inits_start_from_the_unchanged_output(init, make):
    model = make()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = tiny.logits(model)
    targets = "all-linear" if make is tiny.llama else ["c_attn", "c_fc"]
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets, init=init))
    assert tiny.max_diff(tiny.logits(model), before) < 1e-5
    layer = model.get_submodule(
        "model.layers.0.self_attn.q_proj" if make is tiny.llama else "transformer.h.0.attn.c_attn"
    )
    W = original[_weight_name(model, layer)]
    residual = layer.base_weight.detach()
    torch.testing.assert_close(residual + layer.delta_weight("default"), W, atol=1e-5, rtol=0)
    W = W.T if layer.fan_in_fan_out else W  # (out, in)
    B = layer.lora_B["default"].detach()
    if init == "pissa":  # the residual keeps W's spectrum minus its top 4 values
        tail = torch.linalg.svdvals(W)[4:]
        torch.testing.assert_close(
            torch.linalg.svdvals(residual)[: len(tail)], tail, atol=1e-5, rtol=0
        )
    else:  # B = Q_r of W = QR has orthonormal columns
        torch.testing.assert_close(B.T @ B, torch.eye(4), atol=1e-5, rtol=0)


def _weight_name(model, layer):
    return next(n for n, p in model.named_parameters() if p is layer.base_weight).replace(
        ".base_layer", ""
    )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_match_peft(init):
    ours = add_lora(tiny.llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init=init))
    peft_cfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init)
    theirs = get_peft_model(tiny.llama(), peft_cfg)
    mine = ours.get_submodule("model.layers.1.self_attn.q_proj")
    peft_layer = theirs.base_model.model.get_submodule("model.layers.1.self_attn.q_proj")
    torch.testing.assert_close(mine.lora_A["default"], peft_layer.lora_A["default"].weight)
    torch.testing.assert_close(mine.lora_B["default"], peft_layer.lora_B["default"].weight)
    torch.testing.assert_close(mine.base_weight, peft_layer.base_layer.weight)


@pytest.mark.parametrize(("init", "rslora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_saved_weight_init_adapter_is_a_plain_lora_on_the_original_base(init, rslora, tmp_path):
    model = tiny.llama()
    config = LoraConfig(r=4, alpha=8, target_modules="all-linear", init=init, use_rslora=rslora)
    add_lora(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=tiny.IDS, labels=tiny.IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = tiny.logits(model.eval())
    assert tiny.max_diff(trained, tiny.logits(tiny.llama())) > 1e-2  # training changed something
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["r"] == 8 and written["init_lora_weights"] is True
    assert written["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if rslora else 2))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (
        8,
        32,
    )
    peft_model = PeftModel.from_pretrained(tiny.llama(), tmp_path).eval()
    assert tiny.max_diff(tiny.logits(peft_model), trained) < 1e-4
    assert tiny.max_diff(tiny.logits(load_adapter(tiny.llama(), tmp_path)), trained) < 1e-4


def test_weight_init_on_unsupported_layers_raises_before_changes():
    model = tiny.llama()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(LoraError, match="embed_tokens: init='pissa' needs a Linear"):
        add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init="pissa"))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
    with pytest.raises(LoraError, match="lm_head: its weight is tied"):
        add_lora(tiny.llama(tie=True), LoraConfig(r=4, target_modules=["lm_head"], init="olora"))


def test_weight_init_names_follow_peft():
    assert (
        LoraConfig(target_modules=["q"], init="olora").to_peft_dict()["init_lora_weights"]
        == "olora"
    )
    for value, init in [
        ("pissa", "pissa"),
        ("pissa_niter_4", "pissa"),
        ("olora", "olora"),
        (True, "kaiming"),
    ]:
        assert (
            LoraConfig.from_peft_dict(
                {"r": 4, "target_modules": ["q"], "init_lora_weights": value}
            ).init
            == init
        )
