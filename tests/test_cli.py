"""End to end: ``lorakit train | eval | generate | merge`` on the bundled SmolLM2, a few steps."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli import build_parser, main
from lorakit.data.demo import demo_path
from lorakit.training.config import config_fields


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Six demo examples: enough for two steps of batch 2 and a quick exact-match check."""
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(demo_path("test").read_text().splitlines(keepends=True)[:6]))
    return path


@pytest.fixture(scope="module")
def trained_run(smollm2, small_data, tmp_path_factory) -> tuple[Path, str]:
    """The output folder of a two-step ``lorakit train`` run and what it printed; its data is
    ``small_data`` and one bad record, skipped."""
    out = tmp_path_factory.mktemp("run")
    data = out.parent / "small_and_bad.jsonl"
    data.write_text(
        small_data.read_text() + '{"messages": [{"role": "assistant", "content": "x"}]}\n'
    )
    argv = ["train", "--data", str(data), "--output", str(out), "--max-steps", "2"]
    argv += ["--batch-size", "2", "--seq-len", "80", "--save-every", "1", "--rank", "4"]
    argv += ["--lr", "1e-2", "--val-fraction", "0.34", "--skip-bad-records"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(argv) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def trained(trained_run) -> Path:
    return trained_run[0]


def test_train_writes_the_documented_layout(trained):
    names = {p.name for p in trained.iterdir()}
    expected = {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"}
    assert expected | {"train_config.yaml", "checkpoints"} <= names
    config = json.loads((trained / "adapter_config.json").read_text())
    # A folder transformers loads offline, which lorakit reads as the alias again.
    from lorakit.models.load import resolve_model_spec

    assert Path(config["base_model_name_or_path"]).is_dir()
    assert resolve_model_spec(config["base_model_name_or_path"]) == "smollm2-135m"
    assert config["r"] == 4 and config["lora_alpha"] == 32
    steps = sorted(p.name for p in (trained / "checkpoints").iterdir())
    assert steps == ["step-1", "step-2"]
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert records[-1]["step"] == 2 and "eval_loss" in records[-1]


def test_merge_gives_base_plus_adapter_logits(smollm2, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.io import load_adapter
    from lorakit.models.load import load_model

    out = tmp_path / "merged"
    # No --model: the base comes from the adapter's config.
    assert main(["merge", "--adapter", str(trained), "--output", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    model, tokenizer = load_model("smollm2-135m")
    load_adapter(model, trained).eval()  # new LoRA modules start in training mode (dropout)
    ids = tokenizer(["Two large pizzas to 5 Oak Road"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
        got = merged(ids).logits
        base = smollm2[0](ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # Tied embeddings: the output head still is the (unchanged) input embedding.
    assert merged.config.tie_word_embeddings == smollm2[0].config.tie_word_embeddings
    torch.testing.assert_close(
        merged.get_output_embeddings().weight, smollm2[0].get_output_embeddings().weight
    )


def test_eval_reports_loss_perplexity_exact_match(trained, small_data, tmp_path, capsys):
    two = tmp_path / "two.jsonl"  # generation is the slow part: two examples are enough
    two.write_text("".join(small_data.read_text().splitlines(keepends=True)[:2]))
    assert main(["eval", "--adapter", str(trained), "--data", str(two)]) == 0
    out = capsys.readouterr().out
    loss = float(out.split("loss:")[1].split()[0])
    perplexity = float(out.split("perplexity:")[1].split()[0])
    assert perplexity == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-3)
    assert "exact match:" in out


def test_generate_streams_a_reply(trained, capsys):
    argv = ["generate", "--adapter", str(trained), "--max-new-tokens", "5", "one", "small", "coke"]
    assert main(argv) == 0
    with_adapter = capsys.readouterr().out.strip()
    # --model given the output folder loads its adapter too: the same greedy reply.
    argv = ["generate", "--model", str(trained), "--max-new-tokens", "5", "one", "small", "coke"]
    assert main(argv) == 0
    assert with_adapter and capsys.readouterr().out.strip() == with_adapter


def test_help_documents_every_option_with_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # no line breaks inside "all-linear"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in config_fields():
        assert "--" + field.name.replace("_", "-") in text
    assert "(default: 0.0002)" in text and "(default: all-linear)" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "missing.jsonl", "--max-steps", "1"], "missing.jsonl"),
        (["train", "--model", "org/not-here", "--max-steps", "1"], "local-dir"),
        (["eval", "--model", "smollm2-135m", "--data", "nothing.json"], "nothing.json"),
        (["merge", "--adapter", "/nonexistent", "--output", "x"], "not an adapter folder"),
        (["train", "--nproc", "0"], "argument --nproc: must be a whole number of processes"),
        (["train", "--epochs", "inf"], "epochs must be a finite number, got inf"),
        (["train", "--weight-decay", "-1"], "weight_decay must be 0 or more, got -1.0"),
        (["train", "--lr", "inf"], "lr must be a finite number, got inf"),
    ],
)
def test_bad_input_exits_nonzero_with_a_message(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own refusals (a flag's type) exit from parsing
        code = stop.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_resume_from_another_config_is_refused(trained, tmp_path, capsys):
    data = trained.parent / "small_and_bad.jsonl"  # the run's own data and settings but two
    argv = ["train", "--data", str(data), "--output", str(tmp_path / "again")]
    argv += ["--max-steps", "3", "--batch-size", "2", "--seq-len", "80", "--rank", "8"]
    argv += ["--lr", "1e-2", "--val-fraction", "0.34", "--skip-bad-records"]
    argv += ["--resume", str(trained)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Each conflicting flag by name, with the run's own value; the allowed --output is not.
    assert f"Cannot resume {trained} with --rank 8 (the run has 4), --max-steps 3 (the run " in err
    assert "--output" not in err.split(": a resumed run")[0]
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_generate_picks_among_several_adapters(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    # Adapter "zero": the trained one with B = 0, i.e. exactly the base model.
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "adapter_config.json").write_text((trained / "adapter_config.json").read_text())
    tensors = load_file(trained / "adapter_model.safetensors")
    save_file(
        {k: v * 0 if "lora_B" in k else v for k, v in tensors.items()},
        zero / "adapter_model.safetensors",
    )
    prompt = ["--max-new-tokens", "5", "one", "small", "coke"]

    def reply(*argv):
        assert main(["generate", *argv, *prompt]) == 0
        return capsys.readouterr().out.strip()

    only_trained = reply("--adapter", str(trained))
    base = reply("--model", "smollm2-135m")
    both = ["--adapter", f"a={trained}", "--adapter", f"z={zero}"]
    assert reply(*both, "--use", "a") == only_trained
    assert reply(*both, "--use", "z") == base
    assert reply(*both, "--use", "a,z") == only_trained
    assert main(["generate", *both, "--use", "q", *prompt]) == 2
    assert "Unknown adapter(s) ['q']; this model has ['a', 'z']" in capsys.readouterr().err


def test_chat_keeps_the_conversation_and_streams_replies(trained, capsys, monkeypatch):
    import io
    from unittest import mock

    import lorakit.generate

    monkeypatch.setattr("sys.stdin", io.StringIO("one small coke\nmake it two\n\n"))
    seen = []
    real = lorakit.generate.stream_reply

    def spy(model, tokenizer, messages, max_new_tokens):
        seen.append([dict(m) for m in messages])
        return real(model, tokenizer, messages, max_new_tokens)

    with mock.patch.object(lorakit.generate, "stream_reply", spy):
        assert main(["chat", "--adapter", str(trained), "--max-new-tokens", "4"]) == 0
    first, second = seen
    # The demo records' system prompt, saved with the adapter, opens the conversation.
    system = json.loads((trained / "generation_settings.json").read_text())["system"]
    assert system and first == [
        {"role": "system", "content": system},
        {"role": "user", "content": "one small coke"},
    ]
    # The second turn sees the first question, the model's streamed answer, and the new one.
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[3]["content"] == "make it two"
    assert second[2]["content"] and second[2]["content"] in capsys.readouterr().out


def test_train_skips_and_reports_bad_records(trained_run):
    out, printed = trained_run
    # 6 good records and a bad one: 4 to train on, 2 held out for validation.
    train_line = next(line for line in printed.splitlines() if line.startswith("train: "))
    assert train_line.startswith("train: 4 examples -> 4 sequences")
    assert train_line.endswith(
        f"; skipped 1 bad records of 7 in {out.parent / 'small_and_bad.jsonl'}: 1 assistant-first"
    )


def test_eval_skips_and_reports_bad_records(trained, small_data, tmp_path, capsys):
    data = tmp_path / "two_and_bad.jsonl"
    good = small_data.read_text().splitlines(keepends=True)[:2]
    data.write_text("".join([good[0], '{"messages": []}\n', good[1]]))
    assert main(["eval", "--adapter", str(trained), "--data", str(data)]) == 2
    assert f"{data}, line 2: field 'messages' must be a non-empty list" in capsys.readouterr().err
    argv = ["eval", "--adapter", str(trained), "--data", str(data), "--skip-bad-records"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert f"skipped 1 bad records of 3 in {data}: 1 no turns" in captured.err
    assert "examples:    2\n" in captured.out


def _lorakit(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``lorakit ARGV`` in a fresh process, as a user runs it."""
    command = [sys.executable, "-m", "lorakit", *argv]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


BAD_FILES = {
    "assistant_first.jsonl": (
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
        b'{"messages": [{"role": "assistant", "content": "x"}]}\n'
    ),
    "latin1.jsonl": b'{"text": "caf\xe9"}\n',
    "broken.jinja": b"{% for m in messages %}{{ m.content }",
    "bad.yaml": b"lr: [1, 2\n",
}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["eval", "--data", "assistant_first.jsonl"],
            "lorakit eval: error: assistant_first.jsonl, line 2: field 'messages[0]' is the "
            "assistant's, before any user turn: add the user's turn it answers. Fix or remove "
            "the record (or skip bad records: --skip-bad-records).",
        ),
        (
            ["eval", "--data", "latin1.jsonl"],
            "lorakit eval: error: latin1.jsonl, line 1: not UTF-8 text (byte 14 of the file: "
            "invalid continuation byte). Save the file as UTF-8.",
        ),
        (
            ["generate", "--chat-template", "broken.jinja", "hi"],
            "lorakit generate: error: --chat-template broken.jinja: the chat template does not "
            "compile (template line 1: unexpected '}'). Fix the template.",
        ),
        (["train", "bad.yaml"], "lorakit train: error: bad.yaml is not valid YAML"),
    ],
)
def test_bad_input_shows_one_message_and_no_traceback(argv, message, tmp_path):
    for name, content in BAD_FILES.items():
        (tmp_path / name).write_bytes(content)
    result = _lorakit(*argv, cwd=tmp_path)
    assert (result.returncode, result.stdout) == (2, "")
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(BAD_FILES)  # nothing written


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(where, tmp_path):
    (tmp_path / "latin1.jsonl").write_bytes(BAD_FILES["latin1.jsonl"])
    argv = ["eval", "--data", "latin1.jsonl"]
    result = _lorakit(
        *(["--debug", *argv] if where == "before" else [*argv, "--debug"]), cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9" in result.stderr
    assert result.stderr.endswith(
        "lorakit eval: error: latin1.jsonl, line 1: not UTF-8 text "
        "(byte 14 of the file: invalid continuation byte). Save the file as UTF-8.\n"
    )
