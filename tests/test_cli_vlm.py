"""End to end with images: ``lorakit train | eval | generate --image | chat | merge`` on a tiny
Idefics3 (SmolVLM-shaped) folder, and the demo's data pipeline."""

from __future__ import annotations

import builtins
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from vlm_tiny import build

from lorakit.cli import main
from lorakit.data import images_of, read_data
from lorakit.models.load import save_model_folder
from lorakit.vlm.collate import ImageCodec
from lorakit.vlm.demo import COLOURS, PLACES, SHAPES, write_demo_data


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """A few records of the demo task (coloured shapes in quadrants)."""
    return write_demo_data(tmp_path_factory.mktemp("shapes"), splits={"train": 4, "test": 2})


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory, smollm2_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny-idefics3"
    model, processor = build("idefics3", smollm2_tokenizer)
    save_model_folder(model, processor, folder)
    return folder


@pytest.fixture(scope="module")
def trained(vlm_folder, demo_data, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--model", str(vlm_folder), "--data", str(demo_data["train"])]
    argv += ["--test-data", str(demo_data["test"]), "--output", str(out), "--max-steps", "2"]
    argv += ["--batch-size", "2", "--rank", "4", "--lr", "1e-2", "--train-projector"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(argv) == 0
    return out, printed.getvalue()


def test_demo_records(demo_data):
    examples = read_data(demo_data["train"]).examples
    for example in examples:
        (user, reply) = example
        assert user["content"] == "<image>What is in the picture?"
        words = reply["content"].split()  # "a red circle at the top left"
        assert words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES
        assert " ".join(words[5:]) in PLACES
        assert images_of(example)[0].is_file()


def test_train_prints_the_plan_and_table(trained, capsys):
    out, printed = trained
    assert "done: 2 steps" in printed
    assert "exact match (test)" in printed
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.connector"]


def test_eval_generate_chat(trained, demo_data, monkeypatch, capsys):
    out, _ = trained
    assert main(["eval", "--adapter", str(out), "--data", str(demo_data["test"])]) == 0
    printed = capsys.readouterr().out
    assert "loss:" in printed and "exact match:" in printed
    image = str(images_of(read_data(demo_data["test"]).examples[0])[0])
    argv = ["generate", "--adapter", str(out), "--image", image, "--max-new-tokens", "2"]
    assert main([*argv, "What is in the picture?"]) == 0
    lines = iter(["/image " + image, "What is in the picture?", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert main(["chat", "--adapter", str(out), "--max-new-tokens", "2"]) == 0


def test_merge_loads_in_plain_transformers(trained, vlm_folder, demo_data, tmp_path):
    from transformers import AutoModelForImageTextToText

    from lorakit.io import load_adapter
    from lorakit.vlm.models import load_vlm

    out, _ = trained
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    model, processor = load_vlm(vlm_folder)
    load_adapter(model, out)
    dataset = ImageCodec(processor).encode(read_data(demo_data["test"]).examples, 128)
    batch = dataset.collate([dataset[0], dataset[1]])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    plain = AutoModelForImageTextToText.from_pretrained(merged, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            plain(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=0
        )


def test_bad_input(demo_data, tmp_path, capsys):
    image = str(images_of(read_data(demo_data["test"]).examples[0])[0])
    assert main(["generate", "--image", image, "hi"]) == 2
    assert "--image needs a vision-language model" in capsys.readouterr().err
    argv = ["train", "--data", str(demo_data["train"]), "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "has images but --model smollm2-135m is not a vision-language model" in (
        capsys.readouterr().err
    )
