"""Training a VLM's language model: the vision tower stays bit-identical, the adapter round-trips
through PEFT (and lorakit) with equal outputs, and image runs refuse what they do not do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from vlm_tiny import FAMILIES, build

from lorakit.errors import LoraError
from lorakit.io import load_adapter
from lorakit.training.config import TrainConfig
from lorakit.vlm.collate import encode_vlm
from lorakit.vlm.data import read_vlm_data
from lorakit.vlm.targeting import find_parts
from lorakit.vlm.train import train_vlm


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four records, one image each, of two sizes."""
    folder = tmp_path_factory.mktemp("vlm_train")
    rows = []
    for i, (colour, size) in enumerate([("red", (32, 32)), ("blue", (48, 24))] * 2):
        Image.new("RGB", size, colour).save(folder / f"{i}.png")
        messages = [
            {"role": "user", "content": "<image>Which colour?"},
            {"role": "assistant", "content": f"{colour} {i}"},
        ]
        rows.append(json.dumps({"messages": messages, "images": [f"{i}.png"]}))
    path = folder / "train.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(data: Path, output: Path, **extra) -> TrainConfig:
    settings = dict(max_steps=2, batch_size=2, seq_len=256, lr=1e-2, rank=4, warmup_steps=0)
    return TrainConfig(data=str(data), output=str(output), dropout=0.0, **{**settings, **extra})


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_frozen_and_peft_round_trip(family, data, tmp_path, smollm2_tokenizer):
    from peft import PeftModel

    model, processor = build(family, smollm2_tokenizer)
    vision = find_parts(model).vision
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(vision)}
    projector = family != "qwen2_vl"  # Qwen2-VL's projector is inside its vision encoder
    result = train_vlm(_config(data, tmp_path, train_projector=projector), model, processor)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in before.items())  # bit-identical
    assert result.steps == 2 and all(
        torch.isfinite(torch.tensor(v)) for v in result.train_losses.values()
    )
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # it trained

    batch = encode_vlm(read_vlm_data(data), processor, 256).collate([0, 1, 2])
    model.eval()
    ours = _logits(model, batch)
    peft = PeftModel.from_pretrained(build(family, smollm2_tokenizer)[0], tmp_path).eval()
    base = _logits(build(family, smollm2_tokenizer)[0], batch)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter changes the outputs
    torch.testing.assert_close(_logits(peft, batch), ours, atol=1e-5, rtol=0)
    reloaded = build(family, smollm2_tokenizer)[0]
    load_adapter(reloaded, tmp_path)
    torch.testing.assert_close(_logits(reloaded.eval(), batch), ours, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"packing": True}, "Not implemented with image data: --packing"),
        ({"tasks": ["a=x.jsonl"], "data": None}, "--task"),
    ],
)
def test_refused_by_name(extra, message, data, tmp_path, smollm2_tokenizer):
    model, processor = build("llava", smollm2_tokenizer)
    settings = {"data": str(data), **extra}
    with pytest.raises(LoraError, match=message):
        train_vlm(TrainConfig(output=str(tmp_path), **settings), model, processor)
