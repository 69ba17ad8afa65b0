"""Exporting from an adapter folder: what the runtime cannot apply is named from the files
alone, before a missing base is reported, and the base comes from the adapter when recorded."""

from __future__ import annotations

import pytest
import tiny

from lorakit import LoraConfig, LoraError, add_lora, save_adapter
from lorakit.cli import main
from lorakit.export.folder import export_adapter, file_problems
from lorakit.io import read_adapter

PROJECTIONS = ["q_proj", "v_proj"]


def library_adapter(tmp_path, model=None, **options):
    """An adapter saved with the library API and no base recorded."""
    model = model if model is not None else tiny.llama()
    options.setdefault("target_modules", PROJECTIONS)
    add_lora(model, LoraConfig(r=2, **options))
    tiny.randomize_adapters(model)
    return save_adapter(model, tmp_path / "adapter")


CASES = {
    "modules_to_save": (
        {"modules_to_save": ["lm_head"]},
        ["lm_head: modules_to_save (a full trained copy of the module)"],
        ["lm_head: modules_to_save (vLLM refuses full copies)"],
    ),
    "dora": (
        {"use_dora": True},
        ["model.layers.0.self_attn.q_proj: DoRA", "model.layers.1.self_attn.v_proj: DoRA"],
        ["model.layers.0.self_attn.q_proj: DoRA (vLLM has no DoRA)"],
    ),
    "trainable tokens": (
        {"trainable_token_indices": [1, 2]},
        ["model.embed_tokens: trainable_token_indices"],
        ["model.embed_tokens: trainable token rows"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_what_the_runtime_cannot_apply_is_named_before_the_missing_base(tmp_path, case, capsys):
    options, gguf_lines, vllm_lines = CASES[case]
    adapter = library_adapter(tmp_path, **options)
    for to, lines in (("gguf", gguf_lines), ("vllm", vllm_lines)):
        out = tmp_path / f"out-{to}"
        assert main(["export", str(adapter), "--to", to, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        for line in lines:
            assert line in err, err
        assert "It records no base model: pass --model." in err
        assert "Traceback" not in err and not out.exists()


def test_expert_lora_is_named_from_the_config(tmp_path):
    adapter = library_adapter(
        tmp_path,
        tiny.deepseek_v2(),
        target_modules=None,
        target_parameters=["mlp.experts.gate_up_proj"],
    )
    with pytest.raises(LoraError) as err:
        export_adapter(adapter, "gguf", tmp_path / "a.gguf")
    message = str(err.value)
    assert (
        "mlp.experts.gate_up_proj (target_parameters: expert LoRA, one pair per expert)" in message
    )
    assert "llama.cpp applies LoRA to 2-D weights only" in message
    assert "--merged" in message and "records no base model" in message


def test_file_problems_find_the_same_paths_as_the_loaded_adapter(tmp_path):
    """The files-only reading agrees with what the layers say once loaded (pairs.collect)."""
    from lorakit.export.pairs import collect

    model = tiny.llama()
    options = {"use_dora": True, "modules_to_save": ["lm_head"], "trainable_token_indices": [3]}
    adapter = library_adapter(tmp_path, model, **options)
    config, tensors, _ = read_adapter(adapter)
    from_files, loaded = file_problems(config, tensors), collect(model)
    assert from_files.dora == sorted(loaded.dora) and len(from_files.dora) == 4
    assert from_files.saved == sorted(loaded.saved) == ["lm_head"]
    assert from_files.tokens == sorted(loaded.tokens) == ["model.embed_tokens"]


def test_merged_export_needs_no_refusal_but_a_base(tmp_path, capsys):
    adapter = library_adapter(tmp_path, modules_to_save=["lm_head"])
    out = tmp_path / "m.gguf"
    assert main(["export", str(adapter), "--to", "gguf", "--merged", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "records no base model; pass --model" in err and "modules_to_save" not in err


def test_flags_that_need_another_flag(tmp_path, capsys):
    adapter = library_adapter(tmp_path)
    for extra, phrase in (
        (["--to", "gguf", "--verify"], "--verify reads a merged GGUF back; add --merged"),
        (["--to", "vllm", "--ollama"], "--ollama writes a Modelfile for a GGUF; use --to gguf"),
    ):
        assert main(["export", str(adapter), "--output", str(tmp_path / "x"), *extra]) == 2
        assert phrase in capsys.readouterr().err
