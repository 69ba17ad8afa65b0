"""Encoding image + text conversations with four families' processors: image-token expansion,
labels, truncation that never cuts an image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from vlm_tiny import FAMILIES, build

from lorakit.data import IGNORE_INDEX, read_data
from lorakit.errors import LoraError
from lorakit.vlm.collate import ImageCodec, image_token_ids

# Image tokens per image, by hand, for a 32x32 and a 48x24 image:
#  LLaVA: CLIP resizes and crops to 8x8, patches of 4 -> 2*2 = 4 (the CLS token dropped).
#  Qwen2-VL: smart_resize to multiples of patch 4 * merge 2 = 8 within 64..1024 pixels:
#    32x32 stays (8*8 patches / merge 2*2 = 16); 48x24 has 1152 > 1024 pixels, so both sides
#    shrink by sqrt(1152/1024) and floor to multiples of 8: 40x16 -> (10*4)/4 = 10.
#  Idefics3 (the demo's assembly): resized to 64x64, patches of 16 -> 4*4, pixel shuffle 2 -> 4.
#  InternVL: tiles of 16x16 (patches of 4 -> 4*4, downsample 0.5 -> 4 tokens each). Its
#    processor crops to tiles: the grid of the image's aspect with the most tiles whose area
#    is under twice the image's, plus a thumbnail: 32x32 -> 2x2 + 1 = 5 tiles (20 tokens),
#    48x24 -> 4x2 + 1 = 9 tiles (36 tokens).
EXPECTED = {"llava": [4, 4], "qwen2_vl": [16, 10], "idefics3": [4, 4], "internvl": [20, 36]}
IMAGE_TOKEN = {"llava": "<image>", "qwen2_vl": "<|image_pad|>", "idefics3": "<image>"}
IMAGE_TOKEN["internvl"] = "<IMG_CONTEXT>"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vlm_data")
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "square.png")
    Image.new("RGB", (48, 24), (0, 0, 255)).save(folder / "wide.png")
    rows = [
        {  # two images of different sizes in one record, a two-turn conversation
            "messages": [
                {"role": "user", "content": "<image>On the left, and on the right: <image>?"},
                {"role": "assistant", "content": "red and blue"},
                {"role": "user", "content": "Sure?"},
                {"role": "assistant", "content": "yes"},
            ],
            "images": ["square.png", "wide.png"],
        },
        {
            "messages": [
                {"role": "user", "content": "<image>Colour?"},
                {"role": "assistant", "content": "blue"},
            ],
            "images": ["wide.png"],
        },
    ]
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_expansion_and_labels(family, data, smollm2_tokenizer):
    model, processor = build(family, smollm2_tokenizer)
    dataset = ImageCodec(processor).encode(read_data(data).examples, 512)
    batch = dataset.collate([dataset[0], dataset[1]])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[family])
    # Expansion: the processor's count per image, both records in one batch.
    assert int((ids[0] == image_id).sum()) == sum(EXPECTED[family])
    assert int((ids[1] == image_id).sum()) == EXPECTED[family][1]
    # Labels: exactly the reply tokens ("<reply><|im_end|>", as tokenized alone), in order;
    # -100 on every image token, prompt token and padding.
    for row, replies in enumerate([["red and blue", "yes"], ["blue"]]):
        wanted = [
            tokenizer(r + "<|im_end|>", add_special_tokens=False)["input_ids"] for r in replies
        ]
        kept = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert kept == [t for reply in wanted for t in reply]
        on = labels[row] != IGNORE_INDEX
        assert torch.equal(ids[row][on], labels[row][on])
        assert not on[mask[row] == 0].any()  # padding
        assert not on[torch.isin(ids[row], torch.tensor(sorted(image_token_ids(processor))))].any()
    assert mask[1].sum() < mask[0].sum()  # the second row is padded
    # Every input the model takes comes from the processor, and the model accepts them.
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape[:2] == ids.shape


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_truncation_never_cuts_an_image(family, data, smollm2_tokenizer):
    _, processor = build(family, smollm2_tokenizer)
    examples = read_data(data).examples
    full = ImageCodec(processor).encode(examples, 512)
    lengths = [len(labels) for labels in full.labels]
    ids = full.collate([full[0], full[1]])["input_ids"]
    image_ids = torch.tensor(sorted(image_token_ids(processor)))
    last_image = [int(torch.isin(row, image_ids).nonzero().max()) for row in ids]
    # One token short of record 1: its end-of-turn newline goes (truncated, kept), while the
    # limit falls inside record 0's second image, so record 0 is dropped (counted).
    limit = lengths[1] - 1
    assert last_image[1] < limit <= last_image[0]
    cut = ImageCodec(processor).encode(examples, limit)
    assert (len(cut), cut.dropped, cut.truncated) == (1, 1, 1)
    assert "1 truncated, 1 dropped" in cut.summary()
    batch = cut.collate([cut[0]])
    assert batch["input_ids"].shape[1] == limit
    assert torch.equal(batch["input_ids"][0], ids[1][:limit])
    # A limit that cuts every record through an image: refused, naming the flag.
    with pytest.raises(LoraError, match="every example was dropped at --seq-len 3"):
        ImageCodec(processor).encode(examples, 3)


def test_a_huge_record_is_cut_before_the_processor_and_encodes_the_same(
    data, smollm2_tokenizer, monkeypatch
):
    import lorakit.vlm.collate as collate

    _, processor = build("llava", smollm2_tokenizer)
    (example,) = read_data(data).examples[1:2]  # one image, then a reply
    huge = [*example[:-1], {"role": "assistant", "content": "blue " * 50_000}]
    seen = []
    real = collate.process

    def spy(processor, texts, images, side="right"):
        seen.append(max(map(len, texts)))
        return real(processor, texts, images, side)

    monkeypatch.setattr(collate, "process", spy)
    cut = ImageCodec(processor).encode([huge], 64)
    assert max(seen) < 20_000  # the processor never saw the 250,000 characters
    # An image placed past the budget cannot fit: the record is dropped, not cut through it.
    images = example[0]["images"]
    late = [
        {"role": "user", "content": "x" * 100_000 + "<image>", "images": images},
        {"role": "assistant", "content": "blue"},
    ]
    with pytest.raises(LoraError, match="every example was dropped"):
        ImageCodec(processor).encode([late], 64)
    monkeypatch.setattr(collate, "char_budget", lambda tokenizer, seq_len: 10**9)
    whole = ImageCodec(processor).encode([huge], 64)
    assert (cut.input_ids, cut.labels, cut.truncated) == (whole.input_ids, whole.labels, 1)
