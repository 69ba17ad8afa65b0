"""transformers' own saving and loading of a model with lorakit adapters (lorakit.hf.integration).

After ``add_lora``, ``model.save_pretrained`` writes a PEFT adapter folder (the road of
``Trainer.save_model`` and every Trainer checkpoint, tested with the trainers in
test_hf_trainer.py), which PEFT, lorakit and transformers' own ``from_pretrained`` load back
equal; the JSON records the base as the model's own folder and the task type from
transformers' auto-model mappings, so ``AutoPeftModelForCausalLM`` loads it offline.
"""

from __future__ import annotations

import copy
import json

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file

from lorakit import (
    LoraConfig,
    LoraError,
    add_lora,
    load_adapter,
    save_adapter,
    set_adapter,
    unload,
)
from lorakit.hf.peft_form import task_type


def _saved_base(folder, model):
    """``model`` saved to ``folder`` and loaded back, as a user's model is: by its folder."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture
def adapted(tmp_path):
    """(base folder, a tiny Llama loaded from it with a random-init adapter on all-linear)."""
    model = _saved_base(tmp_path / "base", tiny.llama())
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"))
    return tmp_path / "base", model


def test_save_pretrained_writes_a_peft_adapter_folder_every_loader_reads(adapted, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, model = adapted
    expected = tiny.logits(model)
    model.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "generation_config.json",
    ]
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base)
    assert saved["task_type"] == "CAUSAL_LM" and saved["r"] == 4 and saved["lora_alpha"] == 8
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert set(tensors) == set(save_adapter_tensors(model, tmp_path / "lorakit"))
    # transformers' adapter auto-detection: the base from the JSON, the adapter through PEFT.
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert tiny.max_diff(tiny.logits(auto), expected) < 1e-5
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "out"
    )
    assert tiny.max_diff(tiny.logits(peft_model.eval()), expected) < 1e-5
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), tmp_path / "out")
    assert tiny.max_diff(tiny.logits(ours), expected) < 1e-5
    assert (
        tiny.max_diff(tiny.logits(ours), tiny.logits(AutoModelForCausalLM.from_pretrained(base)))
        > 1e-3
    )


def save_adapter_tensors(model, folder):
    """The tensor names ``lorakit.save_adapter`` writes for ``model``."""
    save_adapter(model, folder)
    return load_file(folder / "adapter_model.safetensors")


def test_transformers_sees_the_adapters_while_there_are_some(adapted, tmp_path):
    _, model = adapted
    assert model._hf_peft_config_loaded and list(model.peft_config) == ["default"]
    assert model.active_adapters() == ["default"]
    assert model.peft_config["default"].target_modules == "all-linear"
    plain = unload(copy.deepcopy(model))
    assert not plain._hf_peft_config_loaded and list(plain.peft_config) == []
    assert model._hf_peft_config_loaded, "the copy's unload must leave the original alone"


def test_a_merged_plain_model_is_written_after_unload(adapted, tmp_path):
    from transformers import AutoModelForCausalLM

    _, model = adapted
    expected = tiny.logits(model)
    unload(model).save_pretrained(tmp_path / "merged")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "merged").iterdir()}
    keys = load_file(tmp_path / "merged" / "model.safetensors")
    assert not [k for k in keys if "lora" in k or "base_layer" in k]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert tiny.max_diff(tiny.logits(merged), expected) < 1e-5


def test_two_active_adapters_are_refused_naming_the_fix(adapted, tmp_path):
    _, model = adapted
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), "second")
    set_adapter(model, ["default", "second"])
    with pytest.raises(LoraError, match=r"2 active adapters \(default, second\).*set_adapter"):
        model.save_pretrained(tmp_path / "out")
    set_adapter(model, "second")
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2


def test_transformers_peft_calls_are_refused_naming_lorakits(adapted, tmp_path):
    _, model = adapted
    with pytest.raises(LoraError, match=r"lorakit\.load_adapter\(model, folder, name\)"):
        model.load_adapter(str(tmp_path))
    with pytest.raises(LoraError, match=r"lorakit\.set_adapter"):
        model.set_adapter("default")


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "qwen2"])
def test_auto_peft_model_loads_save_adapter_offline(family, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    model = _saved_base(tmp_path / "base", _family(family))
    add_lora(model, LoraConfig(r=2, alpha=4, target_modules="all-linear", init="random"))
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["task_type"], saved["base_model_name_or_path"]) == (
        "CAUSAL_LM",
        str(tmp_path / "base"),
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert tiny.max_diff(tiny.logits(peft_model), tiny.logits(model)) < 1e-5


def _family(name: str) -> torch.nn.Module:
    """A tiny causal LM of each family the CLI supports (random init, vocab 64)."""
    import transformers

    if name == "llama":
        return tiny.llama()
    if name == "gpt2":
        return tiny.gpt2()
    torch.manual_seed(0)
    shape = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    if name == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**shape, pad_token_id=0)).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).eval()


def test_task_type_follows_transformers_mappings_not_class_names():
    import transformers

    assert task_type(tiny.gpt2()) == "CAUSAL_LM"  # GPT2LMHeadModel: no "ForCausalLM" suffix
    assert task_type(transformers.LlamaModel(tiny.llama().config)) == "FEATURE_EXTRACTION"

    class MyLlama(transformers.LlamaForCausalLM):
        pass

    assert task_type(MyLlama(tiny.llama().config)) == "CAUSAL_LM"
    assert task_type(tiny.cnn()) is None


def test_a_folder_of_wrapped_keys_is_refused_saying_what_it_is_and_how_to_recover(
    adapted, tmp_path
):
    """What Trainer.save_model wrote before: config.json and the wrapped model's state dict."""
    from transformers import AutoModelForCausalLM

    base, model = adapted
    folder = tmp_path / "old"
    model.config.save_pretrained(folder)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    with pytest.raises(
        LoraError, match=r"whole model saved with lorakit's layers.*load_state_dict"
    ):
        load_adapter(AutoModelForCausalLM.from_pretrained(base), folder)
    # The recovery the message gives restores the adapter exactly.
    fresh = AutoModelForCausalLM.from_pretrained(base).eval()
    add_lora(fresh, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    fresh.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    assert tiny.max_diff(tiny.logits(fresh), tiny.logits(model)) == 0


def test_save_pretrained_refuses_full_instead_of_writing_the_adapter(adapted, tmp_path):
    _, model = adapted
    for full in (True, False):
        with pytest.raises(LoraError, match=r"lorakit\.unload\(model\)\.save_pretrained\(dir\)"):
            model.save_pretrained(tmp_path / "out", full=full)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    model.save_pretrained(tmp_path / "out")  # without full=: the adapter folder
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    plain = unload(copy.deepcopy(model))  # no adapters left: transformers' own method again
    plain.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file()
