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


def test_a_vlm_asked_without_an_image_warns(trained, demo_data, monkeypatch, capsys):
    out, _ = trained
    argv = ["generate", "--adapter", str(out), "--max-new-tokens", "1"]
    assert main([*argv, "What is in the picture?"]) == 0
    warning = "warning: this is a vision-language model and the prompt has no image"
    assert warning in capsys.readouterr().err
    image = str(images_of(read_data(demo_data["test"]).examples[0])[0])
    assert main([*argv, "--image", image, "What is in the picture?"]) == 0
    assert "warning" not in capsys.readouterr().err
    # chat: once for a first message without an image; a follow-up on an image is fine.
    lines = iter(["hello", "/image " + image, "What is in it?", "And now?", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert main(["chat", "--adapter", str(out), "--max-new-tokens", "1"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith(
        "(an empty line, /quit or Ctrl-D ends the chat; /image PATH attaches an image to your "
        "next message)\n"
    )
    assert printed.err.count("warning: this is a vision-language model and this message") == 1


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


def test_vlm_demo_says_what_it_prepares_then_its_config(vlm_folder, tmp_path, capsys, monkeypatch):
    import lorakit.models.load
    from lorakit.vlm import demo

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "SPLITS", {"train": 4, "val": 2, "test": 2})
    told = []

    def assembled(*args, **kwargs):  # the demo's base: the tiny VLM instead of SmolLM2's
        told.append(capsys.readouterr().err)  # what the user read before the slow part
        raise KeyboardInterrupt

    monkeypatch.setattr(lorakit.models.load, "load_model", assembled)
    argv = ["train", "--demo", "vlm", "--max-steps", "1", "--output", str(tmp_path / "run")]
    assert main(argv) == 130
    cache = tmp_path / "cache"
    (data,) = cache.glob("vlm-demo-data-*")
    assert told[0].splitlines() == [
        f"drawing the demo's 8 images, once; cached at {data}",
        "assembling the demo's base model, once: SmolLM2-135M with a 2-layer vision encoder and "
        f"a projector; cached at {cache / demo._cache_name('smolvlm-demo')}",
    ]
    monkeypatch.setattr(demo, "demo_base", lambda: vlm_folder)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(argv) == 0
    assert printed.getvalue().startswith(f"config: model={vlm_folder}, data={data / 'train.jsonl'}")
    assert "drawing" not in capsys.readouterr().err  # drawn once, then cached


def test_bad_input(demo_data, tmp_path, capsys):
    image = str(images_of(read_data(demo_data["test"]).examples[0])[0])
    assert main(["generate", "--image", image, "hi"]) == 2
    assert "--image needs a vision-language model" in capsys.readouterr().err
    argv = ["train", "--data", str(demo_data["train"]), "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "has images but --model smollm2-135m is not a vision-language model" in (
        capsys.readouterr().err
    )


def test_a_damaged_image_flag_is_named_as_a_flag(vlm_folder, tmp_path, capsys):
    damaged = tmp_path / "notes.png"
    damaged.write_text("not an image")
    argv = ["generate", "--model", str(vlm_folder), "--image", str(damaged), "hi"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--image {damaged}" in err and "Pass another image file." in err
    assert "record" not in err and "--skip-bad-records" not in err
