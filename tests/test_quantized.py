"""LoRA on 4-bit (NF4) and 8-bit bitsandbytes bases (QLoRA), on the CPU backend.

On a CPU with AVX-512 BF16, bitsandbytes' ``Linear4bit`` in eval repacks its weight for a bf16
kernel that needs out % 32 == 0 and in % 64 (the block size) == 0: the models here have those
shapes (``packable_llama``), except where a test is about shapes the kernel rejects.
"""

import copy
import json
import warnings

import pytest
import tiny
import torch
from peft import PeftModel
from torch import nn

from lorakit import LoraConfig, LoraError, add_lora, merge, save_adapter
from lorakit.layers import LoraLayer, LoraLinear, LoraQuantizedLinear
from lorakit.layers.quantized import dequantize, use_training_kernels
from lorakit.merge import dequantize_merge

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
HIDDEN = 64


def packable_llama(vocab: int = 64) -> nn.Module:
    """``tiny.llama``'s architecture at sizes bitsandbytes' AVX-512 BF16 eval kernel takes:
    q/o 64 -> 64, k/v 64 -> 32, gate/up 64 -> 128, down 128 -> 64."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    packable_llama().save_pretrained(folder)
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


def adapted(folder, kind: str, seed: int = 1, **options):
    model = quantized(folder, kind)
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS, **options))
    tiny.randomize_adapters(model, seed=seed)
    return model


def peft_model(folder, adapter, kind: str, training: bool):
    """PEFT on its own quantized base, in the mode given; trainable in training, so that the
    same layers see inputs that require grad as in lorakit's model (bitsandbytes picks its
    kernel by that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(quantized(folder, kind), adapter, is_trainable=training)
    return model.train(training)


def repack(layer: nn.Module) -> None:
    """What bitsandbytes' first eval forward does on an AVX-512 BF16 CPU, on any CPU: the
    weight repacked in place for its bf16 kernel."""
    weight = layer.weight
    weight.data, _ = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    assert weight.quant_state.packing_format_for_cpu


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_is_the_bases_own_output_plus_lora(base_folder, kind, training):
    """The base output is bitsandbytes' own (in eval on an AVX-512 BF16 CPU: its bf16 kernel,
    ~3e-3 off x · dequant(W)ᵀ); with autograd through x, nf4 runs the fused node, which
    computes bitsandbytes' training product x · dequant(W)ᵀ."""
    layer = adapted(base_folder, kind).train(training).model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQuantizedLinear)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x = torch.randn(3, 5, HIDDEN)
    with torch.no_grad():
        base = layer.base_layer(x)
        lora = 2.0 * (x @ A.T @ B.T)  # scale = alpha / r = 2; no bias in Llama
        torch.testing.assert_close(layer(x), base + lora, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), base + lora, rtol=1e-5, atol=1e-5)
    if training:
        W = dequantize(layer.base_layer).float()
        product = x @ W.T if kind == "nf4" else base  # int8: LLM.int8() in every mode
        y = layer(x.clone().requires_grad_(True))
        torch.testing.assert_close(y, product + lora, rtol=1e-5, atol=1e-5)


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
    x, g = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)
    layer.zero_grad()
    (layer(x) * g).sum().backward()
    W = dequantize(layer.base_layer).float()
    ((x @ W.T + 2.0 * x @ A.T @ B.T) * g).sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].grad, B.grad, rtol=1e-5, atol=1e-5)
    if kind == "nf4":  # x requiring grad: the fused node, ∂x = g W + 2 g B A
        x.requires_grad_(True)
        (layer(x) * g).sum().backward()
        torch.testing.assert_close(x.grad, g @ W + 2.0 * g @ B @ A, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("input_grad", [False, True])
def test_backward_keeps_only_the_quantized_weight(base_folder, kind, input_grad):
    # QLoRA's memory saving: no dequantized (out, in) weight is saved between the passes,
    # whether bitsandbytes' forward or (nf4, x requiring grad) the fused node runs.
    model = adapted(base_folder, kind).train()
    layer = model.model.layers[0].self_attn.q_proj
    weight_shape = (layer.base_layer.out_features, layer.base_layer.in_features)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    x = torch.randn(3, HIDDEN, requires_grad=input_grad)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).sum().backward()
    assert saved and all(not (s == weight_shape and d.is_floating_point) for s, d in saved)
    assert (layer.lora_B["default"].shape[0], layer.lora_A["default"].shape[1]) == weight_shape


def test_training_after_bitsandbytes_repacked_the_weight_gets_the_formulas_gradients(
    base_folder,
):
    """An eval pass on an AVX-512 BF16 CPU leaves the 4-bit weight repacked (bf16 absmax,
    rows permuted in blocks); ``dequantize`` reads it back without changing it, so the fused
    node's training forward and gradients stay those of x · dequant(W)ᵀ (simulated on any CPU)."""
    layer = adapted(base_folder, "nf4").train().model.layers[0].self_attn.q_proj
    before = dequantize(layer.base_layer).float()
    repack(layer.base_layer)
    packed = layer.base_layer.weight.data.clone()
    W = dequantize(layer.base_layer).float()
    assert layer.base_layer.weight.quant_state.packing_format_for_cpu  # left as it was
    assert torch.equal(layer.base_layer.weight.data, packed)
    # bf16 absmax (8 significant bits): each weight within 2⁻⁸ of its fp32-absmax value
    torch.testing.assert_close(W, before, rtol=4e-3, atol=1e-7)
    A = layer.lora_A["default"].detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].detach().clone().requires_grad_(True)
    x = torch.randn(4, HIDDEN, requires_grad=True)
    g = torch.randn(4, HIDDEN)
    (layer(x) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    ((x_ref @ W.T + 2.0 * x_ref @ A.T @ B.T) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].grad, B.grad, rtol=1e-5, atol=1e-5)


def test_a_training_run_undoes_the_packing_so_unwrapped_layers_pass_gradients(base_folder):
    """After an eval pass repacked the weights (simulated on any CPU), bitsandbytes' packed
    kernel has no backward: ``use_training_kernels`` restores the differentiable one, so the
    adapter below an unwrapped 4-bit layer gets the gradient of x · dequant(W)ᵀ."""
    model = adapted(base_folder, "nf4").train()
    up = model.model.layers[0].mlp.up_proj  # not a target: bitsandbytes' own Linear4bit
    W = dequantize(up).float()
    up.support_avx512bf16_for_cpu = True
    repack(up)
    use_training_kernels(model)
    assert not up.support_avx512bf16_for_cpu
    assert not getattr(up.weight.quant_state, "packing_format_for_cpu", False)
    # Unpacked, the absmax is nested again: two roundings of it, each within 2⁻⁸
    torch.testing.assert_close(dequantize(up).float(), W, rtol=8e-3, atol=1e-7)
    x = torch.randn(3, HIDDEN, requires_grad=True)
    g = torch.randn(3, 128)
    (up(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ dequantize(up).float(), rtol=1e-4, atol=1e-5)


def test_shapes_the_bf16_eval_kernel_rejects_fall_back_to_the_generic_kernel(tmp_path):
    """tiny.llama's projections (in 32 < the 64 block, k/v out 16) are ones bitsandbytes'
    AVX-512 BF16 eval kernel asserts on; wrapped, they run bitsandbytes' generic kernel in
    eval as in training. The flag is forced on so the test does the same on every CPU."""
    tiny.llama().save_pretrained(tmp_path)
    model = quantized(tmp_path, "nf4")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    tiny.randomize_adapters(model)
    assert all(not layer.support_avx512bf16_for_cpu for layer in layers)
    with torch.no_grad():
        served = model(input_ids=IDS).logits
        trained = model.train()(input_ids=IDS).logits
    torch.testing.assert_close(served, trained, rtol=0, atol=1e-6)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_twenty_steps_on_a_quantized_base_lower_the_loss(base_folder, kind):
    model = quantized(base_folder, kind)
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


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(base_folder, kind):
    def loss_and_grads(checkpointing: bool):
        torch.manual_seed(0)  # the same A init in both models
        model = adapted(base_folder, kind)
        model.train()
        if checkpointing:
            # non-reentrant: no input of a block requires grad with a frozen embedding
            model.activation_checkpointing_enable({"use_reentrant": False})
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, model

    plain_loss, plain, _ = loss_and_grads(False)
    loss, grads, model = loss_and_grads(True)
    assert model.is_activation_checkpointing
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain.keys() and len(grads) == 2 * len(TARGETS) * 2  # A, B x 2 layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("training", [True, False])
def test_peft_loads_the_adapter_onto_its_own_quantized_base(base_folder, tmp_path, kind, training):
    """Equal to 1e-5 in both modes: in eval (no grad, as served) both run bitsandbytes' own
    forward, on an AVX-512 BF16 CPU its bf16 kernel; in training, with grad, both run
    x · dequant(W)ᵀ (lorakit's fused node, bitsandbytes' training product)."""
    model = adapted(base_folder, kind).train(training)
    save_adapter(model, tmp_path)
    theirs_model = peft_model(base_folder, tmp_path, kind, training)
    with torch.set_grad_enabled(training):
        ours = model(input_ids=IDS).logits
        theirs = theirs_model(input_ids=IDS).logits
        plain = quantized(base_folder, kind).train(training)(input_ids=IDS).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-4


def test_merge_into_a_quantized_base_is_refused_and_changes_nothing(base_folder):
    model = adapted(base_folder, "nf4")
    before = model(input_ids=IDS).logits
    with pytest.raises(LoraError, match="would re-quantize it"):
        merge(model)
    torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize(("kind", "tol"), [("nf4", 1e-5), ("int8", 1e-2)])
def test_dequantize_merge_gives_a_float_model_with_the_same_outputs(base_folder, kind, tol):
    """The same outputs as the quantized model's training forward, x · dequant(W)ᵀ (in eval
    on an AVX-512 BF16 CPU bitsandbytes runs a bf16 kernel instead, ~3e-3 off). int8: the
    unadapted layers ran bitsandbytes' fp16-input int8 product before and an fp32 product
    after, hence the wider tolerance (the adapter moves logits far more)."""
    model = adapted(base_folder, kind).train()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    dequantize_merge(model)
    layers = [type(m).__module__ for m in model.modules()]
    assert not any(name.startswith(("bitsandbytes", "lorakit")) for name in layers)
    with torch.no_grad():
        merged = model(input_ids=IDS).logits
    torch.testing.assert_close(merged, expected, rtol=0, atol=tol)
    plain = quantized(base_folder, kind).train()(input_ids=IDS).logits
    assert (merged - plain).abs().max() > 10 * tol


def test_dequantize_merge_after_bitsandbytes_repacked_the_weights(base_folder):
    """An eval pass first (on an AVX-512 BF16 CPU bitsandbytes repacks every 4-bit weight,
    simulated here on any CPU): the float model holds those weights, not a permutation."""
    model = adapted(base_folder, "nf4")
    layer = model.model.layers[1].mlp.down_proj
    before, delta = dequantize(layer.base_layer).float(), layer.delta_weight("default")
    repack(layer.base_layer)
    dequantize_merge(model)
    merged = model.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(merged - delta, before, rtol=4e-3, atol=1e-7)  # bf16 absmax


def test_dequantize_merge_from_the_original_float_weights(base_folder):
    model = adapted(base_folder, "nf4")
    original = packable_llama()
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


def dora_model(folder):
    model = quantized(folder, "nf4")
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    return model


def test_dora_on_an_nf4_base_matches_peft(base_folder, tmp_path):
    """In training. (In eval on an AVX-512 BF16 CPU, PEFT reads the weight bitsandbytes
    repacked as if it were not, so its DoRA norms are those of a permuted W; the next test
    checks lorakit's eval output by hand instead.)"""
    model = dora_model(base_folder).train()
    save_adapter(model, tmp_path)
    ours = model(input_ids=IDS).logits
    theirs = peft_model(base_folder, tmp_path, "nf4", training=True)
    torch.testing.assert_close(theirs(input_ids=IDS).logits, ours, rtol=0, atol=1e-5)


def test_dora_on_an_nf4_base_in_eval_is_the_bases_output_rescaled(base_folder):
    """y = g ⊙ base(x) + g ⊙ s B A x,  g = m / ‖dequant(W) + ΔW‖ per output channel."""
    layer = dora_model(base_folder).model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, HIDDEN)
    with torch.no_grad():
        base = layer.base_layer(x)  # on an AVX-512 BF16 CPU: repacks W, the bf16 kernel
        A, B, m = (s["default"] for s in (layer.lora_A, layer.lora_B, layer.lora_magnitude))
        W = dequantize(layer.base_layer).float() + 2.0 * B @ A
        g = m / torch.linalg.vector_norm(W, dim=1)
        expected = g * base + g * 2.0 * (x @ A.T @ B.T)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


# --- rewrapping: a quantized layer's adapters on a float base ----------------------------------


def test_to_float_keeps_every_adapter_its_outputs_and_its_merges(base_folder):
    """DoRA and a second, inactive adapter with dropout: the float layer (dequant(W)) gives
    the quantized layer's training outputs and merges into the same weight."""
    model = dora_model(base_folder).train()
    layer = model.model.layers[0].self_attn.q_proj
    layer.add_adapter("other", r=2, scale=1.0, dropout=0.1)
    layer.set_active(["default"])
    x = torch.randn(3, HIDDEN)
    float_layer = layer.to_float()
    assert type(float_layer) is LoraLinear and float_layer.training
    assert float_layer.active == ["default"] and float_layer.dropout["other"] == 0.1
    for store in ("lora_A", "lora_B", "lora_magnitude"):
        ours, theirs = getattr(layer, store), getattr(float_layer, store)
        assert ours.keys() == theirs.keys() and all(ours[n] is theirs[n] for n in ours)
    with torch.no_grad():
        torch.testing.assert_close(float_layer(x), layer(x), rtol=1e-5, atol=1e-5)
        for name in ("default", "other"):
            weight, _ = float_layer.merged_weight(name)
            torch.testing.assert_close(weight, layer.merged_weight(name)[0], rtol=0, atol=0)


def test_to_float_moves_the_state_no_store_lists(base_folder):
    """Buffers and merge records move too: PiSSA / OLoRA's starting factors and DoRA's merge
    norms (refused on a quantized layer, so set here as a float layer holds them), which a
    copy of named stores dropped."""
    layer = dora_model(base_folder).model.layers[0].self_attn.q_proj
    A0, B0 = torch.randn(4, HIDDEN), torch.randn(HIDDEN, 4)
    layer.register_buffer("lora_A0_default", A0, persistent=False)
    layer.register_buffer("lora_B0_default", B0, persistent=False)
    layer._merge_norms["default"] = torch.ones(HIDDEN)
    float_layer = layer.to_float()
    assert float_layer.initial_lora("default") == (A0, B0)
    assert "lora_A0_default" in float_layer._non_persistent_buffers_set
    torch.testing.assert_close(
        float_layer.original_weight_pair("default"), layer.original_weight_pair("default")
    )
    assert float_layer._merge_norms.keys() == {"default"}


def test_every_attribute_of_a_layer_moves_or_belongs_to_its_base(base_folder):
    """A new piece of layer state must be listed in ``LoraLayer.moved_state`` (or here, if a
    wrapper derives it from its own base): otherwise rewrapping would silently drop it."""
    layer = adapted(base_folder, "nf4").model.layers[0].self_attn.q_proj
    torch_own = set(vars(nn.Module()))
    per_base = {"options", "fan_in_fan_out", "out_features", "in_features"}
    per_call = {"_route", "_route_batch", "_route_stack"}
    per_model = {"_shared"}  # remade by LoraLinear.link_shared_inputs at every add_lora
    found = set(vars(layer)) - torch_own - per_base - per_call - per_model
    assert found == set(LoraLayer.moved_state)


def test_a_float_layer_rewrapped_keeps_pissa_and_a_merged_dora_adapter():
    """``move_state_to`` on the float side: PiSSA's starting factors and a merged DoRA
    adapter's norm move to a wrapper of a copy of the base; outputs, unmerge and the pair
    saved (on the weight before PiSSA) stay the same."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12))
    layer.add_adapter("pissa", r=2, scale=2.0, init="pissa")
    layer.add_adapter("dora", r=2, scale=2.0, use_dora=True)
    with torch.no_grad():
        layer.lora_B["dora"].normal_()
        layer.lora_magnitude["dora"].mul_(1.5)
    layer.set_active(["pissa", "dora"])
    layer.merge("dora", *layer.merged_weight("dora"))
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = layer(x)
    moved = layer.move_state_to(LoraLinear(copy.deepcopy(layer.base_layer)))
    assert moved.merged == ["dora"] and moved.active == ["pissa", "dora"]
    with torch.no_grad():
        torch.testing.assert_close(moved(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(
        moved.original_weight_pair("pissa"), layer.original_weight_pair("pissa")
    )
    layer.unmerge("dora")
    moved.unmerge("dora")
    torch.testing.assert_close(moved.base_layer.weight, layer.base_layer.weight, rtol=0, atol=0)


# --- lorakit merge from a quantized run ------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized_folder(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama folder with the SmolLM2 tokenizer (what ``lorakit`` commands load)."""
    folder = tmp_path_factory.mktemp("tokenized")
    packable_llama(vocab=len(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def quantized_run(folder, run, kind):
    """What ``lorakit train --quantize KIND`` leaves: an adapter and its train_config.yaml."""
    from lorakit.models.load import load_model
    from lorakit.training.config import TrainConfig
    from lorakit.training.run_folder import write_run_config

    model, _ = load_model(str(folder), quantize=kind)
    config = LoraConfig(r=4, alpha=8, target_modules=TARGETS, base_model_name_or_path=str(folder))
    add_lora(model, config)
    tiny.randomize_adapters(model)
    save_adapter(model, run)
    config = TrainConfig(model=str(folder), data="train.jsonl", quantize=kind)
    write_run_config(config.to_dict(), run)
    return model


@pytest.mark.parametrize(("kind", "tol"), [("nf4", 1e-5), ("int8", 1e-2)])
def test_merge_from_a_quantized_run_writes_a_float_folder_plain_transformers_loads(
    tokenized_folder, tmp_path, capsys, kind, tol
):
    """Equal to the unmerged quantized model's training forward (x · dequant(W)ᵀ): fp32
    throughout for nf4; int8's unadapted layers ran bitsandbytes' fp16-input product before
    the merge (see above)."""
    from lorakit.cli import main

    model = quantized_run(tokenized_folder, tmp_path / "run", kind)
    with torch.no_grad():
        expected = model.train()(input_ids=IDS).logits
    assert main(["merge", "--adapter", str(tmp_path / "run"), "--output", str(tmp_path / "m")]) == 0
    assert "the merged weights are the dequantized base" in capsys.readouterr().err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert {type(m).__name__ for m in merged.modules()} & {"Linear4bit", "Linear8bitLt"} == set()
    logits = merged(input_ids=IDS).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=tol)
    plain = quantized(tokenized_folder, kind).train()(input_ids=IDS).logits
    assert (logits - plain).abs().max() > 10 * tol


def test_merge_base_weights_adds_the_delta_to_the_original_float_weights(
    tokenized_folder, tmp_path, capsys
):
    from lorakit.cli import main

    model = quantized_run(tokenized_folder, tmp_path / "run", "nf4")
    out = tmp_path / "m"
    argv = ["merge", "--adapter", str(tmp_path / "run"), "--output", str(out)]
    assert main([*argv, "--base-weights", str(tokenized_folder)]) == 0
    assert f"merged into the float weights of {tokenized_folder}" in capsys.readouterr().err
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    original = transformers.AutoModelForCausalLM.from_pretrained(tokenized_folder)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        delta = model.get_submodule(path).delta_weight("default")
        W = original.get_submodule(path).weight
        got = merged.get_submodule(path).weight
        torch.testing.assert_close(got, W + delta, rtol=1e-5, atol=1e-5)
        # not the dequantized base: nf4 rounding is far above the tolerance
        assert (got - dequantize(model.get_submodule(path).base_layer) - delta).abs().max() > 1e-3
    k = "model.layers.0.self_attn.k_proj.weight"  # not adapted: the original, untouched
    torch.testing.assert_close(merged.state_dict()[k], original.state_dict()[k], rtol=0, atol=0)


def test_merge_base_weights_with_quantize_is_refused(tokenized_folder, tmp_path, capsys):
    from lorakit.cli import main

    quantized_run(tokenized_folder, tmp_path / "run", "nf4")
    argv = ["merge", "--adapter", str(tmp_path / "run"), "--output", str(tmp_path / "m")]
    assert main([*argv, "--base-weights", str(tokenized_folder), "--quantize", "nf4"]) == 2
    assert "--base-weights merges into float weights; drop --quantize." in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# --- DDP on a quantized base (2 CPU processes, gloo) ------------------------------------------


def test_ddp_on_an_nf4_base_equals_one_process_with_double_batch(
    tokenized_folder, data_file, tmp_path
):
    """``lorakit train --quantize nf4`` under torchrun: 2 processes x batch 2 give the losses
    and adapter of 1 process x batch 4 (DDP averages the adapters' gradients only)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from lorakit.training.config import TrainConfig
    from lorakit.training.loop import train

    settings = dict(max_steps=2, grad_accum=1, seq_len=48, lr=1e-2, warmup_steps=1, rank=4)
    settings |= dict(alpha=8, dropout=0.0, targets=["q_proj", "v_proj"], quantize="nf4")
    common = dict(model=str(tokenized_folder), data=str(data_file), **settings)
    one = train(TrainConfig(output=str(tmp_path / "one"), batch_size=4, **common))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "lorakit", "train", "--batch-size=2"]
    command += [f"--output={tmp_path / 'two'}", "--targets=q_proj,v_proj"]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in common.items() if k != "targets"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es) x batch 2" in done.stdout + done.stderr
    records = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    two = {r["step"]: r["loss"] for r in map(json.loads, records) if "loss" in r}
    assert two == pytest.approx(one.train_losses, rel=1e-5)
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-5)
    assert max(float(v.abs().max()) for k, v in ours.items() if "lora_B" in k) > 1e-3
