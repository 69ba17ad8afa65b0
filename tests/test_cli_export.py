"""``lorakit export``'s run hints: where the base GGUF is, and the trained system prompt passed
to runtimes that do not read generation_settings.json."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import tiny

from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.cli import main
from lorakit.cli.export import _llama_cpp_hint
from lorakit.generate import GENERATION_FILE
from lorakit.models.gguf import bundled_gguf

SYSTEM = "Reply in JSON, 'quoted'."


def _adapter(tmp_path: Path, tokenizer) -> tuple[Path, Path]:
    """A tiny Llama folder, and an adapter for it saved with SYSTEM as its system prompt."""
    base = tmp_path / "base"
    model = tiny.llama()
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], base_model_name_or_path=str(base))
    adapter = save_adapter(add_lora(model, config), tmp_path / "adapter")
    (adapter / GENERATION_FILE).write_text(json.dumps({"system": SYSTEM, "chat_template": None}))
    return base, adapter


def test_gguf_hint_names_the_base_folder_and_passes_the_system_prompt(
    tmp_path, smollm2_tokenizer, capsys
):
    base, adapter = _adapter(tmp_path, smollm2_tokenizer)
    out = tmp_path / "a.gguf"
    assert main(["export", str(adapter), "--to", "gguf", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"llama.cpp adapter written to {out}",
        f"run it: llama-cli -m BASE.gguf --lora {out} -sys {shlex.quote(SYSTEM)}",
        f"  (BASE.gguf: the base model {base.resolve()} as GGUF, made by llama.cpp's "
        "convert_hf_to_gguf.py)",
        "  (-sys: the system prompt the adapter was trained with; for Ollama, --ollama writes a "
        "Modelfile that holds it)",
    ]


def test_vllm_hint_says_to_send_the_system_prompt(tmp_path, smollm2_tokenizer, capsys):
    _, adapter = _adapter(tmp_path, smollm2_tokenizer)
    assert main(["export", str(adapter), "--to", "vllm", "--output", str(tmp_path / "v")]) == 0
    printed = capsys.readouterr().out
    assert f"trained with the system prompt {SYSTEM!r}: send it as the first message" in printed


def test_a_gguf_base_is_named_by_its_file(tmp_path):
    hint = _llama_cpp_hint("smollm2-135m", Path("demo-lora.gguf"), None)
    assert hint == f"run it: llama-cli -m {shlex.quote(str(bundled_gguf()))} --lora demo-lora.gguf"
    gguf = tmp_path / "my base.gguf"
    gguf.write_bytes(b"")
    hint = _llama_cpp_hint(str(gguf), Path("a.gguf"), None)
    assert hint == f"run it: llama-cli -m '{gguf}' --lora a.gguf"


def test_a_damaged_settings_file_is_refused_before_the_load(tmp_path, smollm2_tokenizer, capsys):
    _, adapter = _adapter(tmp_path, smollm2_tokenizer)
    (adapter / GENERATION_FILE).write_text("[1, 2]")
    assert main(["export", str(adapter), "--to", "gguf", "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "is not a JSON object with keys system and chat_template" in err
    assert "loading" not in err and not (tmp_path / "a").exists()
