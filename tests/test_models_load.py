"""Tests for lorakit.models.load: spec resolution, loading real models, saving model folders.

The GGUF conversion cache is tested in test_models_gguf.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorakit.errors import LoraError
from lorakit.models.load import DEFAULT_MODEL, load_model, resolve_model_spec


def _write_model_folder(folder: Path) -> Path:
    """A tiny random Llama and a four-word tokenizer without a pad token."""
    config = LlamaConfig(
        vocab_size=4,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(folder)
    return folder


def _write_adapter(folder: Path, base: object) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    return folder


# --- resolve_model_spec -------------------------------------------------------------------


def test_default_model_resolves_to_itself():
    assert resolve_model_spec(DEFAULT_MODEL) == DEFAULT_MODEL


def test_relative_gguf_path_resolves_to_absolute(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_spec("m.gguf") == str(tmp_path / "m.gguf")


def test_hub_id_says_lorakit_is_offline_and_how_to_pass_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraError, match="offline") as error:
        resolve_model_spec("meta-llama/Llama-3-8B")
    assert "--local-dir models/Llama-3-8B" in str(error.value)


@pytest.mark.parametrize("spec", ["./nope", "../nope", "runs/demo"])
def test_a_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, spec):
    """./x and ../x are paths, and so is runs/demo once runs/ exists (the README's path
    before the demo has run): not found, with no download advice."""
    (tmp_path / "work" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(LoraError, match="not found") as error:
        resolve_model_spec(spec)
    assert "hf download" not in str(error.value)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(LoraError, match="not found") as error:
        resolve_model_spec(str(missing))
    assert str(missing) in str(error.value)


def test_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LoraError, match=r"not a \.gguf file"):
        resolve_model_spec(str(tmp_path / "weights.bin"))


def test_folder_without_model_lists_its_gguf_files(tmp_path):
    (tmp_path / "b.gguf").write_bytes(b"")
    (tmp_path / "a.gguf").write_bytes(b"")
    with pytest.raises(LoraError, match=r"GGUF files \(a\.gguf, b\.gguf\)"):
        resolve_model_spec(str(tmp_path))


def test_adapter_folder_resolves_to_its_base_model(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter = _write_adapter(tmp_path / "run", str(base))
    assert resolve_model_spec(str(adapter)) == str(base)
    assert resolve_model_spec(str(_write_adapter(tmp_path / "run2", DEFAULT_MODEL))) == (
        DEFAULT_MODEL
    )


@pytest.mark.parametrize("base", [None, "", 3])
def test_adapter_folder_without_base_model_asks_for_one(tmp_path, base):
    adapter = _write_adapter(tmp_path / "run", base)
    with pytest.raises(LoraError, match="names no base_model_name_or_path"):
        resolve_model_spec(str(adapter))


def test_adapter_folders_naming_each_other_are_refused(tmp_path):
    _write_adapter(tmp_path / "a", str(tmp_path / "b"))
    _write_adapter(tmp_path / "b", str(tmp_path / "a"))
    with pytest.raises(LoraError, match="name each other"):
        resolve_model_spec(str(tmp_path / "a"))


# --- real models ------------------------------------------------------------------------------


def test_load_hugging_face_folder(tmp_path):
    folder = _write_model_folder(tmp_path / "tiny")
    model, tokenizer = load_model(str(folder), dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.name_or_path == model.config.name_or_path == str(folder.resolve())
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side) == (
        "</s>",
        1,
        "right",
    )


def test_load_through_adapter_folder_loads_the_base(tmp_path):
    folder = _write_model_folder(tmp_path / "tiny")
    adapter = _write_adapter(tmp_path / "run", str(folder))
    model, _ = load_model(str(adapter))
    assert model.name_or_path == str(folder.resolve())


def test_bundled_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.name_or_path == DEFAULT_MODEL
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # Tied: lm_head and the input embeddings are one tensor (LoRA on lm_head alters both).
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.padding_side) == (
        "<|im_end|>",
        "<|im_end|>",
        "right",
    )
    assert tokenizer.chat_template


def _break_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "x"}))


def _truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])


def _break_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("{ not json")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_break_config, r"Cannot load the model from .*hidden_size.* expected int"),
        (_truncate_weights, r"Cannot load the model from .*SafetensorError"),
        (_break_tokenizer, r"Cannot load the tokenizer from "),
    ],
)
def test_a_damaged_model_folder_is_a_lora_error_naming_it(tmp_path, damage, message):
    folder = _write_model_folder(tmp_path / "tiny")
    damage(folder)
    with pytest.raises(LoraError, match=message) as caught:
        load_model(str(folder))
    assert "check its files (config.json, weights, tokenizer) or pass another --model" in str(
        caught.value
    )


def test_save_model_folder_refuses_a_used_target_and_leaves_nothing_on_a_full_disk(
    tmp_path, monkeypatch
):
    from lorakit.models.load import save_model_folder

    model, tokenizer = load_model(str(_write_model_folder(tmp_path / "tiny")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraError, match="file exists and is a file"):
        save_model_folder(model, tokenizer, tmp_path / "file")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", full)
    with pytest.raises(LoraError, match=r"No space left on device\); nothing was left there"):
        save_model_folder(model, tokenizer, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "tiny"]


def test_generation_settings_are_part_of_the_model_folder_s_one_swap(tmp_path, monkeypatch):
    import lorakit.generate as generate
    from lorakit.generate import GenerationSettings, read_generation_settings
    from lorakit.models.load import save_model_folder

    model, tokenizer = load_model(str(_write_model_folder(tmp_path / "tiny")))
    settings = GenerationSettings(system="Answer in JSON.")
    save_model_folder(model, tokenizer, tmp_path / "merged", settings)
    assert read_generation_settings(tmp_path / "merged") == settings

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # The settings file comes last: failing there must not leave a folder without it.
    monkeypatch.setattr(generate, "save_generation_settings", full)
    with pytest.raises(LoraError, match="nothing was left there"):
        save_model_folder(model, tokenizer, tmp_path / "out", settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "tiny"]
