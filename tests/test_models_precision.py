"""``--dtype`` and ``--quantize``: names, defaults and the errors around them."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import tiny
import torch

from lorakit import LoraConfig, LoraError, add_lora
from lorakit.models.load import load_model
from lorakit.models.precision import quantization_config, resolve_dtype
from lorakit.training.config import TrainConfig


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smollm2_tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    tiny.llama(vocab=len(smollm2_tokenizer)).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def test_auto_is_float32_on_the_cpu_and_bfloat16_on_a_cuda_device_that_has_it(monkeypatch):
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", "cuda") is torch.float32
    assert resolve_dtype("float16") is torch.float16  # this torch multiplies fp16 on the CPU


def test_a_dtype_this_torch_cannot_multiply_is_refused_by_name(monkeypatch):
    def no_kernel(dtype, device):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr("lorakit.models.precision._matmul_probe", no_kernel)
    with pytest.raises(LoraError, match=r"--dtype float16 is not supported on cpu .*use --dtype"):
        resolve_dtype("float16", "cpu")


def test_a_bfloat16_base_keeps_float32_adapters_and_trains(folder):
    model, _ = load_model(str(folder), dtype="bfloat16")
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert (trainable, frozen) == ({torch.float32}, {torch.bfloat16})
    tiny.randomize_adapters(model)  # B != 0, so A's gradient is not zero either
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_quantize_on_an_already_quantized_folder_is_refused(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "prequantized")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoraError, match=r"already quantized \(bitsandbytes.*drop --quantize int8"):
        load_model(str(copy), quantize="int8")


def test_quantize_without_bitsandbytes_says_how_to_install_it(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    with pytest.raises(LoraError, match="--quantize nf4 needs bitsandbytes.*pip install"):
        load_model(str(folder), quantize="nf4")


def test_nf4_is_qlora_double_quantized_and_computes_in_the_base_dtype(folder):
    pytest.importorskip("bitsandbytes")
    config = quantization_config("nf4", torch.bfloat16, folder)
    assert (config.load_in_4bit, config.bnb_4bit_quant_type) == (True, "nf4")
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype is torch.bfloat16
    assert quantization_config("int8", torch.float32, folder).load_in_8bit


def test_train_config_refuses_unknown_precisions_and_fsdp_with_quantize():
    with pytest.raises(LoraError) as error:
        TrainConfig(dtype="float64", quantize="nf3")
    assert "dtype must be one of auto, float32, bfloat16, float16, got 'float64'" in str(
        error.value
    )
    assert "quantize must be one of nf4, int8, got 'nf3'" in str(error.value)
    with pytest.raises(LoraError, match="--fsdp with --quantize is not implemented"):
        TrainConfig(quantize="nf4", fsdp=True)
