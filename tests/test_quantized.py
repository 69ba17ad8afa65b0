"""LoRA on 4-bit (NF4) and 8-bit bitsandbytes bases (QLoRA), on the CPU backend."""

import warnings

import pytest
import tiny
import torch
from peft import PeftModel

from lorakit import LoraConfig, LoraError, add_lora, merge, save_adapter
from lorakit.layers import LoraQuantizedLinear
from lorakit.layers.quantized import dequantize
from lorakit.merge import dequantize_merge

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny.llama().save_pretrained(folder)
    return folder


def quantized(folder, kind: str):
    config = (
        transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        if kind == "nf4"
        else transformers.BitsAndBytesConfig(load_in_8bit=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, device_map="cpu"
        )
    return model.eval()


def adapted(folder, kind: str, seed: int = 1):
    model = quantized(folder, kind)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    tiny.randomize_adapters(model, seed=seed)
    return model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_forward_is_dequantized_base_plus_lora(base_folder, kind):
    layer = adapted(base_folder, kind).model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantizedLinear)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x = torch.randn(3, 5, 32)
    W = dequantize(layer.base_layer).float()
    expected = x @ W.T + 2.0 * (x @ A.T @ B.T)  # scale = alpha / r = 2; no bias in Llama
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_gradients_reach_only_a_and_b_and_match_the_formula(base_folder, kind):
    model = adapted(base_folder, kind)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    layer = model.model.layers[0].self_attn.q_proj
    A = layer.lora_A["default"].detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].detach().clone().requires_grad_(True)
    x, g = torch.randn(4, 32), torch.randn(4, 32)
    layer.zero_grad()
    (layer(x) * g).sum().backward()
    W = dequantize(layer.base_layer).float()
    ((x @ W.T + 2.0 * x @ A.T @ B.T) * g).sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].grad, B.grad, rtol=1e-5, atol=1e-5)


def test_twenty_steps_on_an_nf4_base_lower_the_loss(base_folder):
    model = quantized(base_folder, "nf4")
    add_lora(model, LoraConfig(r=8, alpha=16, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < min(losses[:5])


@pytest.mark.parametrize(("kind", "tol"), [("nf4", 1e-5), ("int8", 1e-2)])
def test_peft_loads_the_adapter_onto_its_own_quantized_base(base_folder, tmp_path, kind, tol):
    """int8: bitsandbytes' own int8 product (PEFT's base path) casts inputs to fp16, ours
    multiplies the dequantized weight in fp32, so the two differ by fp16 rounding."""
    model = adapted(base_folder, kind)
    save_adapter(model, tmp_path)
    ours = model(input_ids=IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(quantized(base_folder, kind), tmp_path).eval()
        theirs = peft_model(input_ids=IDS).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tol)
    assert (ours - quantized(base_folder, kind)(input_ids=IDS).logits).abs().max() > 10 * tol


def test_merge_into_a_quantized_base_is_refused_and_changes_nothing(base_folder):
    model = adapted(base_folder, "nf4")
    before = model(input_ids=IDS).logits
    with pytest.raises(LoraError, match="would re-quantize it"):
        merge(model)
    torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "tol"), [("nf4", 1e-5), ("int8", 1e-2)])
def test_dequantize_merge_gives_a_float_model_with_the_same_outputs(base_folder, kind, tol):
    """int8: the unadapted layers ran bitsandbytes' fp16-input int8 product before and an
    fp32 product after, hence the wider tolerance (the adapter moves logits far more)."""
    model = adapted(base_folder, kind)
    expected = model(input_ids=IDS).logits
    dequantize_merge(model)
    layers = [type(m).__module__ for m in model.modules()]
    assert not any(name.startswith(("bitsandbytes", "lorakit")) for name in layers)
    merged = model(input_ids=IDS).logits
    torch.testing.assert_close(merged, expected, rtol=0, atol=tol)
    assert (merged - quantized(base_folder, kind)(input_ids=IDS).logits).abs().max() > 10 * tol


def test_dequantize_merge_from_the_original_float_weights(base_folder):
    model = adapted(base_folder, "nf4")
    original = tiny.llama()
    weights = {
        f"{n}": p
        for n, p in original.named_parameters()
        if n.endswith(tuple(f"{t}.weight" for t in TARGETS))
    }
    layer = model.model.layers[0].self_attn.q_proj
    delta = layer.delta_weight("default")
    dequantize_merge(model, base_weights=weights)
    merged = model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(merged, original.model.layers[0].self_attn.q_proj.weight + delta)


def test_dora_on_an_nf4_base_matches_peft(base_folder, tmp_path):
    model = quantized(base_folder, "nf4")
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    save_adapter(model, tmp_path)
    ours = model(input_ids=IDS).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(quantized(base_folder, "nf4"), tmp_path).eval()
        torch.testing.assert_close(theirs(input_ids=IDS).logits, ours, rtol=0, atol=1e-5)
