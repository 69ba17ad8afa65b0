"""End to end: ``lorakit train | eval | generate | merge`` on the bundled SmolLM2, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.cli import build_parser, main
from lorakit.demo import demo_path
from lorakit.train_config import config_fields


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """Six demo examples: enough for two steps of batch 2 and a quick exact-match check."""
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(demo_path("test").read_text().splitlines(keepends=True)[:6]))
    return path


@pytest.fixture(scope="module")
def trained(smollm2, small_data, tmp_path_factory) -> Path:
    """The output folder of a two-step ``lorakit train`` run."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--data", str(small_data), "--output", str(out), "--max-steps", "2"]
    argv += ["--batch-size", "2", "--seq-len", "80", "--save-every", "1", "--rank", "4"]
    argv += ["--lr", "1e-2", "--val-fraction", "0.34"]
    assert main(argv) == 0
    return out


def test_train_writes_the_documented_layout(trained):
    names = {p.name for p in trained.iterdir()}
    expected = {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png"}
    assert expected | {"train_config.yaml", "checkpoints"} <= names
    config = json.loads((trained / "adapter_config.json").read_text())
    # A folder transformers loads offline, which lorakit reads as the alias again.
    from lorakit.models import resolve_model_spec

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
    from lorakit.models import load_model

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
    ],
)
def test_bad_input_exits_nonzero_with_a_message(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_resume_from_another_config_is_refused(trained, small_data, tmp_path, capsys):
    argv = ["train", "--data", str(small_data), "--output", str(tmp_path / "again")]
    argv += ["--max-steps", "3", "--batch-size", "2", "--seq-len", "80", "--rank", "8"]
    argv += ["--lr", "1e-2", "--val-fraction", "0.34", "--resume", str(trained)]
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
