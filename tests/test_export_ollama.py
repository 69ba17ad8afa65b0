"""``--ollama``: a Modelfile beside the GGUF with the model, the chat template as Ollama's Go
TEMPLATE, the run's system prompt and greedy decoding; the merged GGUF's own Jinja template
carries the system prompt too."""

from __future__ import annotations

import json

import export_families as ef
import pytest

from lorakit import LoraError
from lorakit.cli import main
from lorakit.export.gguf_read import Header
from lorakit.export.ollama import Turns, go_template, modelfile, read_turns
from lorakit.generate import GENERATION_FILE, bake_system_prompt

SYSTEM = "Answer in JSON."
CHATML_GO = (
    "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    '{{ if eq $m.Role "system" }}<|im_start|>system\n{{ $m.Content }}<|im_end|>\n'
    '{{ else if eq $m.Role "user" }}<|im_start|>user\n{{ $m.Content }}<|im_end|>\n'
    "{{ if $last }}<|im_start|>assistant\n{{ end }}"
    '{{ else if eq $m.Role "assistant" }}<|im_start|>assistant\n{{ $m.Content }}'
    "{{ if not $last }}<|im_end|>\n{{ end }}{{ end }}{{ end }}"
)


@pytest.fixture
def adapter(tmp_path, smollm2_tokenizer):
    """A Qwen3 adapter (ChatML template) trained with SYSTEM as its system prompt."""
    base = ef.base_folder("qwen3", tmp_path / "base", smollm2_tokenizer)
    folder = ef.adapter_folder("qwen3", base, tmp_path / "adapter")
    (folder / GENERATION_FILE).write_text(json.dumps({"system": SYSTEM, "chat_template": None}))
    return folder


def test_merged_export_writes_the_modelfile_and_bakes_the_system_prompt(tmp_path, adapter, capsys):
    out = tmp_path / "tuned.gguf"
    argv = ["export", str(adapter), "--to", "gguf", "--merged", "--ollama"]
    assert main([*argv, "--output", str(out)]) == 0
    path = tmp_path / "tuned.Modelfile"
    assert f"Ollama Modelfile written to {path}" in capsys.readouterr().out
    assert path.read_text() == (
        "# Ollama Modelfile written by lorakit export: ollama create NAME -f THIS_FILE\n"
        "FROM ./tuned.gguf\n"
        f'TEMPLATE """{CHATML_GO}"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        f'SYSTEM """{SYSTEM}"""\n'
        "# greedy decoding, as lorakit generate answers\n"
        "PARAMETER temperature 0\n"
    )
    template = Header(out).get("tokenizer.chat_template")
    assert template == bake_system_prompt(ef.CHATML, SYSTEM)


def test_adapter_export_names_the_base_and_the_adapter(tmp_path, adapter):
    out = tmp_path / "lora.gguf"
    assert main(["export", str(adapter), "--to", "gguf", "--ollama", "--output", str(out)]) == 0
    lines = (tmp_path / "lora.Modelfile").read_text().splitlines()
    assert lines[1:3] == [f"FROM {(tmp_path / 'base').resolve()}", "ADAPTER ./lora.gguf"]


def test_the_go_template_replays_the_jinja_text(tmp_path, smollm2_tokenizer):
    """Llama 2's [INST] (assistant opened by a space, no generation prompt) and Gemma's turns
    (BOS first, system kept): the pieces read back give the Jinja text of a conversation."""
    llama = read_turns(ef.spm_tokenizer("llama-spm", tmp_path / "l"), ef.LLAMA2_TEMPLATE)
    assert llama == Turns("", ("<s>[INST] ", " [/INST]"), (" ", "</s>"), "", None)
    assert "{{ if $last }}" not in go_template(llama)  # no generation prompt to add
    gemma = read_turns(ef.spm_tokenizer("gemma-spm", tmp_path / "g"), ef.GEMMA_TEMPLATE)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "V"},
    ]
    assert gemma.render(messages) == (
        "<bos><start_of_turn>system\nS<end_of_turn>\n<start_of_turn>user\nU<end_of_turn>\n"
        "<start_of_turn>model\nA<end_of_turn>\n<start_of_turn>user\nV<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_templates_ollama_cannot_be_told_are_refused(tmp_path, smollm2_tokenizer):
    tokenizer = ef.bundled_tokenizer(smollm2_tokenizer)
    numbered = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(LoraError, match="not one fixed text around each message"):
        modelfile("./m.gguf", tokenizer=tokenizer, template=numbered)
    no_system = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        + ef.CHATML
    )
    text = modelfile("./m.gguf", tokenizer=tokenizer, template=no_system)
    assert 'eq $m.Role "system"' not in text
    with pytest.raises(LoraError, match="refuses system messages"):
        modelfile("./m.gguf", tokenizer=tokenizer, template=no_system, system=SYSTEM)
    with pytest.raises(LoraError, match='holds """'):
        modelfile("./m.gguf", tokenizer=tokenizer, template=ef.CHATML, system='say """hi"""')


def test_a_refused_template_writes_nothing(tmp_path, adapter, capsys):
    numbered = "{% for m in messages %}{{ loop.index }}:{{ m['content'] }}\n{% endfor %}"
    (adapter / GENERATION_FILE).write_text(json.dumps({"system": None, "chat_template": numbered}))
    out = tmp_path / "m.gguf"
    argv = ["export", str(adapter), "--to", "gguf", "--merged", "--ollama"]
    assert main([*argv, "--output", str(out)]) == 2
    assert "not one fixed text" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "m.Modelfile").exists()
