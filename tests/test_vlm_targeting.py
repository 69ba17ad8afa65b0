"""Which parts of four VLM families get LoRA, are trained in full, or stay frozen."""

from __future__ import annotations

import pytest
from vlm_tiny import FAMILIES, build

from lorakit import add_lora
from lorakit.config import LoraConfig
from lorakit.errors import LoraError
from lorakit.targeting import lora_layers
from lorakit.vlm.targeting import describe, find_parts, vlm_lora_config

PARTS = {  # as each family's modeling code names them
    "llava": ("model.language_model", "model.vision_tower", ["model.multi_modal_projector"]),
    "qwen2_vl": ("model.language_model", "model.visual", []),
    "idefics3": ("model.text_model", "model.vision_model", ["model.connector"]),
    "internvl": ("model.language_model", "model.vision_tower", ["model.multi_modal_projector"]),
}


def _under(path: str, part: str) -> bool:
    return path == part or path.startswith(part + ".")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_lora_only_in_the_language_model(family, targets, smollm2_tokenizer):
    model, _ = build(family, smollm2_tokenizer)
    language, vision, projector = PARTS[family]
    assert find_parts(model) == (find_parts(model).__class__(language, vision, projector))
    linear_in_vision = [
        p for p, m in model.named_modules() if _under(p, vision) and "Linear" in type(m).__name__
    ]
    assert linear_in_vision  # the vision encoder has linear layers all-linear could take
    add_lora(model, vlm_lora_config(model, LoraConfig(r=2, target_modules=targets)))
    paths = [p for p, _ in lora_layers(model)]
    layers = model.config.get_text_config().num_hidden_layers
    assert len(paths) == layers * (7 if targets == "all-linear" else 2)
    assert all(_under(p, language) for p in paths)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("family", ["llava", "idefics3", "internvl"])
def test_train_projector_and_vision(family, smollm2_tokenizer):
    model, _ = build(family, smollm2_tokenizer)
    language, vision, (projector,) = PARTS[family]
    cfg = vlm_lora_config(
        model, LoraConfig(r=2, target_modules="all-linear"), train_projector=True, train_vision=True
    )
    assert cfg.modules_to_save == [projector]
    add_lora(model, cfg)
    paths = [p for p, _ in lora_layers(model)]
    assert any(_under(p, vision) for p in paths) and any(_under(p, language) for p in paths)
    assert not any(_under(p, projector) for p in paths)  # trained in full, never LoRA
    full = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert full and all(n.startswith(projector + ".modules_to_save.") for n in full)
    plan = describe(model, True, True)
    assert f"projector       {projector}: trained in full (--train-projector)" in plan
    assert f"vision encoder  {vision}: LoRA (--train-vision)" in plan


def test_qwen2_vl_has_no_projector_to_train(smollm2_tokenizer):
    model, _ = build("qwen2_vl", smollm2_tokenizer)
    assert "projector       none of its own (inside model.visual): frozen" in describe(
        model, False, False
    )
    with pytest.raises(
        LoraError, match="--train-projector: Qwen2VLForConditionalGeneration has no"
    ):
        vlm_lora_config(model, LoraConfig(target_modules="all-linear"), train_projector=True)


def test_a_text_model_is_refused():
    import tiny

    with pytest.raises(LoraError, match="no separate vision encoder and language model"):
        find_parts(tiny.llama())
