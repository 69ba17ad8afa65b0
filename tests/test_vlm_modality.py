"""Training a VLM's language model: the vision tower stays bit-identical, the adapter round-trips
through PEFT (and lorakit) with equal outputs, and image runs refuse what they do not do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from vlm_tiny import FAMILIES, build, template

from lorakit.data import read_data
from lorakit.errors import LoraError
from lorakit.io import load_adapter
from lorakit.models.load import save_model_folder
from lorakit.training.config import TrainConfig
from lorakit.training.loop import train
from lorakit.vlm.collate import ImageCodec
from lorakit.vlm.targeting import find_parts


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
    result = train(_config(data, tmp_path, train_projector=projector), model, processor)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in before.items())  # bit-identical
    assert result.steps == 2 and all(
        torch.isfinite(torch.tensor(v)) for v in result.train_losses.values()
    )
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # it trained

    dataset = ImageCodec(processor).encode(read_data(data).examples, 256)
    batch = dataset.collate([dataset[0], dataset[1], dataset[2]])
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
        train(TrainConfig(output=str(tmp_path), **settings), model, processor)


def _records(folder: Path, name: str, extra: list[dict], system: str | None = None) -> Path:
    """The four good records of ``data`` (their images copied beside), plus ``extra``."""
    rows = []
    for i, colour in enumerate(["red", "blue"] * 2):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
        messages = [
            {"role": "user", "content": "<image>Which colour?"},
            {"role": "assistant", "content": f"{colour} {i}"},
        ]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        rows.append({"messages": messages, "images": [f"{i}.png"]})
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + extra))
    return path


_MISSING_IMAGE = {
    "messages": [
        {"role": "user", "content": "<image>Which colour?"},
        {"role": "assistant", "content": "green"},
    ],
    "images": ["gone.png"],
}


def test_image_records_are_read_before_the_model_loads(tmp_path, smollm2_tokenizer, monkeypatch):
    import lorakit.vlm.modality as images_road

    model, processor = build("llava", smollm2_tokenizer)
    folder = tmp_path / "vlm"
    save_model_folder(model, processor, folder)
    bad = _records(tmp_path, "bad.jsonl", [_MISSING_IMAGE])

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was read")

    monkeypatch.setattr(images_road, "load_vlm", loaded)
    config = _config(bad, tmp_path / "out", model=str(folder))
    with pytest.raises(LoraError, match=r"bad\.jsonl, line 5: image gone\.png not found"):
        train(config)


def test_skipped_image_records_are_reported(tmp_path, smollm2_tokenizer, capsys):
    model, processor = build("llava", smollm2_tokenizer)
    data = _records(tmp_path, "data.jsonl", [_MISSING_IMAGE])
    train(_config(data, tmp_path / "out", skip_bad_records=True), model, processor)
    assert f"skipped 1 bad records of 5 in {data}: 1 missing image" in capsys.readouterr().out


# A template that refuses any user turn saying BAD (as a template's raise_exception does).
_REFUSING = (
    "{% for m in messages %}{% if m['role'] == 'user' and 'BAD' in "
    "(m['content'] if m['content'] is string else m['content'] | map(attribute='text') "
    "| select | join) %}{{ raise_exception('no BAD here') }}{% endif %}{% endfor %}"
)
_REFUSED = {
    "messages": [
        {"role": "user", "content": "<image>BAD colour?"},
        {"role": "assistant", "content": "red"},
    ],
    "images": ["0.png"],
}


def test_image_records_the_template_refuses_are_bad_records(tmp_path, smollm2_tokenizer):
    """As on the text road: named without skip_bad_records, skipped and counted with it."""
    _, processor = build("llava", smollm2_tokenizer)
    processor.chat_template = processor.tokenizer.chat_template = _REFUSING + template("<image>")
    data = read_data(_records(tmp_path, "data.jsonl", [_REFUSED]))
    codec = ImageCodec(processor)
    with pytest.raises(LoraError, match=r"data\.jsonl, line 5: the chat template refuses it"):
        codec.encode(data.examples, 256, sources=data.sources)
    encoded = codec.encode(data.examples, 256, sources=data.sources, skip_bad_records=True)
    assert (encoded.examples, len(encoded), encoded.skipped) == (
        4,
        4,
        {"refused by the chat template": 1},
    )
    assert encoded.refused == [4]
    with pytest.raises(LoraError, match="No example could be encoded: skipped 1 bad records"):
        codec.encode(data.examples[4:], 256, skip_bad_records=True)


def test_image_runs_save_the_system_prompt_their_records_share(tmp_path, smollm2_tokenizer):
    model, processor = build("llava", smollm2_tokenizer)
    data = _records(tmp_path, "data.jsonl", [], system="Name the colour.")
    out = tmp_path / "out"
    result = train(_config(data, out, test_data=str(data)), model, processor)
    assert json.loads((out / "generation_settings.json").read_text())["system"] == (
        "Name the colour."
    )
    # The test records are prompted before and after training, as in a text run.
    assert set(result.before) == set(result.after) == {"exact_match"}
