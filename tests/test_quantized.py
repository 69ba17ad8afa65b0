"""LoRA on 4-bit (NF4) and 8-bit bitsandbytes bases (QLoRA), on the CPU backend."""

import json
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
    # int8: bitsandbytes' LLM.int8() product (activations quantized too) is the base, as in PEFT
    with torch.no_grad():
        base = x @ W.T if kind == "nf4" else layer.base_layer(x)
    expected = base + 2.0 * (x @ A.T @ B.T)  # scale = alpha / r = 2; no bias in Llama
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


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_backward_keeps_only_the_quantized_weight(base_folder, kind):
    # QLoRA's memory saving: no dequantized (out, in) weight is saved between the passes.
    model = adapted(base_folder, kind).train()
    layer = model.model.layers[0].self_attn.q_proj
    weight_shape = (layer.base_layer.out_features, layer.base_layer.in_features)
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(torch.randn(3, 32)).sum().backward()
    assert saved and all(not (s == weight_shape and d.is_floating_point) for s, d in saved)
    assert (layer.lora_B["default"].shape[0], layer.lora_A["default"].shape[1]) == weight_shape


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


@pytest.mark.parametrize(("kind", "tol"), [("nf4", 1e-5), ("int8", 1e-5)])
def test_peft_loads_the_adapter_onto_its_own_quantized_base(base_folder, tmp_path, kind, tol):
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


# --- lorakit merge from a quantized run ------------------------------------------------------


@pytest.fixture(scope="module")
def tokenized_folder(tmp_path_factory, smollm2_tokenizer):
    """A tiny Llama folder with the SmolLM2 tokenizer (what ``lorakit`` commands load)."""
    folder = tmp_path_factory.mktemp("tokenized")
    tiny.llama(vocab=len(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def quantized_run(folder, run, kind):
    """What ``lorakit train --quantize KIND`` leaves: an adapter and its train_config.yaml."""
    from lorakit.models.load import load_model
    from lorakit.training.config import TrainConfig, write_config

    model, _ = load_model(str(folder), quantize=kind)
    config = LoraConfig(r=4, alpha=8, target_modules=TARGETS, base_model_name_or_path=str(folder))
    add_lora(model, config)
    tiny.randomize_adapters(model)
    save_adapter(model, run)
    write_config(TrainConfig(model=str(folder), data="train.jsonl", quantize=kind), run)
    return model


@pytest.mark.parametrize(("kind", "tol"), [("nf4", 1e-5), ("int8", 1e-2)])
def test_merge_from_a_quantized_run_writes_a_float_folder_plain_transformers_loads(
    tokenized_folder, tmp_path, capsys, kind, tol
):
    """Equal to the unmerged quantized model: fp32 throughout for nf4; int8's unadapted
    layers ran bitsandbytes' fp16-input product before the merge (see above)."""
    from lorakit.cli import main

    model = quantized_run(tokenized_folder, tmp_path / "run", kind)
    expected = model(input_ids=IDS).logits
    assert main(["merge", "--adapter", str(tmp_path / "run"), "--output", str(tmp_path / "m")]) == 0
    assert "the merged weights are the dequantized base" in capsys.readouterr().err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert {type(m).__name__ for m in merged.modules()} & {"Linear4bit", "Linear8bitLt"} == set()
    logits = merged(input_ids=IDS).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=tol)
    assert (logits - quantized(tokenized_folder, kind)(input_ids=IDS).logits).abs().max() > 10 * tol


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
