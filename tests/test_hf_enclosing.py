"""A transformers model enclosing an adapted part is refused its whole-model save_pretrained
(lorakit.hf.enclosing): the folder it would write (lorakit's wrapped names) is one that
``from_pretrained`` loads without an error as a wrong model."""

from __future__ import annotations

import re

import pytest
import tiny

from lorakit import LoraConfig, LoraError, add_lora, unload
from lorakit.targeting import iter_adapter_modules

CONFIG = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="random")


def _parts():
    """(model, the part given to add_lora, its path): a causal LM's decoder, a VLM's LM."""
    llama, llava = tiny.llama(), tiny.llava()
    return [
        (llama, llama.model, "model"),
        (llava, llava.model.language_model, "model.language_model"),
    ]


@pytest.mark.parametrize("case", [0, 1], ids=["llama.model", "llava.language_model"])
def test_a_whole_model_save_around_an_adapted_part_is_refused_and_writes_nothing(case, tmp_path):
    model, part, path = _parts()[case]
    add_lora(part, CONFIG)
    with pytest.raises(LoraError) as error:
        model.save_pretrained(tmp_path / "out")
    message = str(error.value)
    assert f"its part '{path}'" in message
    assert f"lorakit.save_adapter(model.{path}, folder)" in message
    assert f"lorakit.unload(model.{path})" in message
    assert not (tmp_path / "out").exists()  # config.json, written first, is taken back


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj"], r".*\.q_proj", "all-linear"],
    ids=["list", "regex", "all-linear"],
)
def test_the_suggested_target_adapts_the_same_layers_on_the_whole_model(targets, tmp_path):
    model, part, path = _parts()[1]
    add_lora(part, LoraConfig(r=4, alpha=8, target_modules=targets, init="random"))
    with pytest.raises(LoraError) as error:
        model.save_pretrained(tmp_path / "out")
    regex = re.search(r'target_modules=r"([^"]+)"', str(error.value)).group(1)
    whole = tiny.llava()
    add_lora(whole, LoraConfig(r=4, alpha=8, target_modules=regex, init="random"))
    adapted = {p for p, _ in iter_adapter_modules(whole)}
    assert adapted == {f"{path}.{p}" for p, _ in iter_adapter_modules(part)}
    assert not any(p.startswith("model.vision_tower") for p in adapted)  # it has q/v_proj too
    whole.save_pretrained(tmp_path / "whole")
    assert (tmp_path / "whole" / "adapter_config.json").is_file()


def test_a_folder_that_held_a_model_keeps_it(tmp_path):
    from transformers import AutoModelForCausalLM

    old = tiny.llama(seed=3)
    old.save_pretrained(tmp_path / "out")
    model, part, _ = _parts()[0]
    add_lora(part, CONFIG)
    with pytest.raises(LoraError):
        model.save_pretrained(tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert tiny.max_diff(tiny.logits(loaded), tiny.logits(old)) == 0


def test_other_uses_of_the_enclosing_state_are_left_alone(tmp_path):
    from transformers import AutoModelForCausalLM

    model, part, _ = _parts()[0]
    add_lora(part, CONFIG)
    expected = tiny.logits(model)
    twin = tiny.llama(seed=9)
    add_lora(twin.model, CONFIG)
    twin.load_state_dict(model.state_dict())  # strict: the same wrapped names
    assert tiny.max_diff(tiny.logits(twin), expected) == 0
    part.save_pretrained(tmp_path / "part")  # the part itself writes its adapter
    assert (tmp_path / "part" / "adapter_config.json").is_file()
    unload(part)  # no adapters left: the whole model saves, merged and right
    model.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert tiny.max_diff(tiny.logits(merged), expected) < 1e-5


def test_a_trainer_checkpoint_of_the_enclosing_model_is_refused(tmp_path):
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model, part, _ = _parts()[0]
    add_lora(part, CONFIG)
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(5)).tolist()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="steps",
        save_steps=1,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
    )
    with pytest.raises(LoraError, match=r"LlamaForCausalLM\.save_pretrained\(.*checkpoint-1"):
        trainer.train()
    assert not (tmp_path / "run" / "checkpoint-1" / "model.safetensors").exists()
