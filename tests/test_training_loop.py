"""The training loop on a tiny random Llama with the SmolLM2 tokenizer: the schedule it drives,
gradient accumulation, resume, config handling and errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorakit import LoraError, add_lora
from lorakit.data.encode import TextCodec
from lorakit.training.config import DEMO_DEFAULTS, TrainConfig, resolve_config
from lorakit.training.loop import train
from lorakit.training.step import lr_factor


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return copy.deepcopy(smollm2_tokenizer)


def run(tokenizer, data_file: Path, output: Path, **changes):
    settings = dict(
        data=str(data_file),
        output=str(output),
        max_steps=4,
        batch_size=4,
        seq_len=64,
        lr=1e-2,
        warmup_steps=1,
        rank=4,
        alpha=8,
        dropout=0.0,
    )
    settings.update(changes)
    model = tiny_llama(len(tokenizer))
    return train(TrainConfig(**settings), model, tokenizer)


# --- schedule ---------------------------------------------------------------------------------


def test_scheduler_drives_optimizer_lr(tokenizer, data_file, tmp_path):
    result = run(tokenizer, data_file, tmp_path, max_steps=5, warmup_steps=2, lr=0.1)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    expected = [0.1 * lr_factor(s, 2, 5, "cosine") for s in range(5)]
    assert lrs == pytest.approx(expected)
    assert result.steps == 5


# --- gradient accumulation and resume ----------------------------------------------------------


def _adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_accumulation_equals_bigger_batch(tokenizer, data_file, tmp_path):
    big = run(tokenizer, data_file, tmp_path / "big", batch_size=4, grad_accum=1)
    accum = run(tokenizer, data_file, tmp_path / "acc", batch_size=2, grad_accum=2)
    steps = sorted(big.train_losses)
    assert steps == [1, 2, 3, 4]
    for step in steps:
        assert accum.train_losses[step] == pytest.approx(big.train_losses[step], abs=1e-5)
    a, b = _adapter(big.model), _adapter(accum.model)
    # The adapters moved (lr 1e-2, four steps) and moved the same way.
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


def test_resume_continues_exactly(tokenizer, data_file, tmp_path):
    # Dropout on: the restored RNG state must reproduce the same masks.
    whole = run(tokenizer, data_file, tmp_path / "whole", max_steps=6, save_every=3, dropout=0.1)
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    resumed = run(
        tokenizer,
        data_file,
        tmp_path / "resumed",
        max_steps=6,
        save_every=3,
        dropout=0.1,
        resume=str(checkpoint),
    )
    assert sorted(resumed.train_losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.train_losses[step] == pytest.approx(whole.train_losses[step], abs=1e-5)
    a, b = _adapter(whole.model), _adapter(resumed.model)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


def test_resume_refuses_a_different_config(tokenizer, data_file, tmp_path):
    run(tokenizer, data_file, tmp_path / "a", max_steps=2, save_every=2)
    with pytest.raises(LoraError, match=r"different model or config.*rank"):
        run(tokenizer, data_file, tmp_path / "b", rank=8, resume=str(tmp_path / "a"))


def test_checkpoints_keep_the_last_k(tokenizer, data_file, tmp_path):
    run(tokenizer, data_file, tmp_path, max_steps=4, save_every=1, keep_checkpoints=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-3", "step-4"]


def test_nan_loss_stops_naming_the_step(tokenizer, data_file, tmp_path, monkeypatch):
    import lorakit.training.step as step_module

    real = step_module.summed_loss
    calls = {"n": 0}

    def poisoned(model, batch, *args):
        calls["n"] += 1
        loss = real(model, batch, *args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(step_module, "summed_loss", poisoned)
    with pytest.raises(LoraError, match=r"not finite at step 3.*step-2"):
        run(tokenizer, data_file, tmp_path, save_every=2)
    assert (tmp_path / "checkpoints" / "step-2" / "state.safetensors").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_gradient_checkpointing_trains_with_frozen_embedding(tokenizer, data_file, tmp_path):
    plain = run(tokenizer, data_file, tmp_path / "plain", max_steps=2)
    ckpt = run(tokenizer, data_file, tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True)
    assert ckpt.train_losses[2] == pytest.approx(plain.train_losses[2], abs=1e-5)
    assert ckpt.train_losses[2] != pytest.approx(ckpt.train_losses[1], abs=1e-4)


def test_a_compiled_run_trains_as_the_eager_one(tokenizer, data_file, tmp_path):
    # torch.compile (inductor) over lorakit's fused nodes, the shared q/k/v node and the
    # chunked loss: the same losses and adapter as without it (without dropout: inductor
    # draws its masks from its own random stream).
    eager = run(tokenizer, data_file, tmp_path / "eager", max_steps=3)
    compiled = run(tokenizer, data_file, tmp_path / "compiled", max_steps=3, compile=True)
    for step in (1, 2, 3):
        assert compiled.train_losses[step] == pytest.approx(eager.train_losses[step], abs=1e-5)
    a, b = _adapter(eager.model), _adapter(compiled.model)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0)


# --- outputs ------------------------------------------------------------------------------------


def test_output_folder_layout(tokenizer, data_file, tmp_path):
    run(tokenizer, data_file, tmp_path, max_steps=2, val_fraction=0.25, eval_every=1)
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
    } <= names
    saved = yaml.safe_load((tmp_path / "train_config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["val_fraction"] == 0.25
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 1, 2]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_finished_runs_folder_is_refused_and_overwrite_replaces_it_whole(
    tokenizer, data_file, tmp_path
):
    output = tmp_path / "run"
    run(tokenizer, data_file, output, max_steps=2, save_every=1)
    before = _files(output)
    with pytest.raises(LoraError, match=r"holds an earlier run of lorakit train \(finished"):
        run(tokenizer, data_file, output, max_steps=1)
    # --overwrite replaces it only once the inputs and the model passed: a refused run keeps it.
    with pytest.raises(LoraError, match="nope_proj"):
        run(tokenizer, data_file, output, max_steps=1, targets=["nope_proj"], overwrite=True)
    assert _files(output) == before
    run(tokenizer, data_file, output, max_steps=1, overwrite=True)
    assert sorted(p.name for p in output.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "generation_settings.json",
        "loss.png",
        "metrics.jsonl",
        "train_config.yaml",
    ]  # the old run's checkpoints are gone with it
    records = (output / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in records]
    assert steps == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no lock, no old version


def test_a_symlinked_output_is_written_through_and_stays_a_link(tokenizer, data_file, tmp_path):
    real = tmp_path / "disk" / "run"
    link = tmp_path / "run"
    link.symlink_to(real)  # dangling: the run makes the folder it points to
    run(tokenizer, data_file, link, max_steps=2, save_every=1)
    assert link.is_symlink() and link.resolve() == real
    assert {"adapter_model.safetensors", "train_config.yaml", "checkpoints"} <= {
        p.name for p in real.iterdir()
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "run"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["run"]  # nothing half-swapped


# --- config --------------------------------------------------------------------------------------


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: my.jsonl\nlr: 0.001\nrank: 4\nseq-len: 128\ntargets: q_proj,v_proj\n")
    config = resolve_config(path, {"rank": 8})
    assert (config.data, config.lr, config.rank, config.seq_len) == ("my.jsonl", 1e-3, 8, 128)
    assert config.targets == ["q_proj", "v_proj"]
    assert config.max_steps == TrainConfig().max_steps  # no demo defaults with user data


def test_demo_defaults_without_data():
    config = resolve_config(None, {"lr": 5e-4})
    assert config.data.endswith("train.jsonl") and config.test_data.endswith("test.jsonl")
    assert config.lr == 5e-4  # a flag beats the demo default
    assert config.max_steps == DEMO_DEFAULTS["max_steps"]


def test_config_errors_list_every_problem(tmp_path):
    with pytest.raises(LoraError, match=r"rank must be a positive integer[\s\S]*schedule"):
        TrainConfig(rank=0, schedule="step")
    with pytest.raises(
        LoraError, match=r"Unknown config keys: learning_rate \(did you mean lr\?\)"
    ):
        resolve_config(None, {"learning_rate": 1.0})
    with pytest.raises(LoraError, match="not found"):
        resolve_config(tmp_path / "missing.yaml")


def test_an_unusable_output_or_data_path_fails_before_any_model_loads(data_file, tmp_path):
    from lorakit.training.inputs import check_inputs

    (tmp_path / "afile").write_text("x")
    cases = [
        ({"output": str(tmp_path / "afile")}, "afile is a file; pass a folder"),
        ({"output": str(tmp_path / "afile" / "run")}, "cannot write in"),
        ({"data": str(tmp_path)}, "a folder, not a file"),
    ]
    for changes, message in cases:
        config = TrainConfig(**{"data": str(data_file), "output": str(tmp_path / "o"), **changes})
        with pytest.raises(LoraError, match=message):
            check_inputs(config, check_model=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_unknown_target_is_named(tokenizer, data_file, tmp_path):
    with pytest.raises(LoraError, match="nope_proj"):
        run(tokenizer, data_file, tmp_path, targets=["nope_proj"])
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_all_examples_too_long(tokenizer, data_file, tmp_path):
    with pytest.raises(LoraError, match="Raise --seq-len"):
        run(tokenizer, data_file, tmp_path, seq_len=4)


# --- transformers.Trainer ------------------------------------------------------------------------


def test_lorakit_model_trains_under_hf_trainer(tokenizer, data_file, tmp_path):
    from functools import partial

    from transformers import Trainer, TrainingArguments

    from lorakit import LoraConfig
    from lorakit.data import collate, load_datasets

    model = tiny_llama(len(tokenizer))
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = _adapter(model)
    dataset, _ = load_datasets(data_file, TextCodec(tokenizer), 64)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=partial(collate, pad_id=tokenizer.pad_token_id),
    )
    trainer.train()
    after = _adapter(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    for name, value in model.named_parameters():
        if name in base:
            assert torch.equal(value, base[name]), name


# --- several tasks -------------------------------------------------------------------------------


def test_joint_training_equals_training_each_task_alone(tokenizer, data_file, tmp_path):
    rows = data_file.read_text().splitlines()
    files = {"a": tmp_path / "a.jsonl", "b": tmp_path / "b.jsonl"}
    files["a"].write_text("\n".join(rows[:8]) + "\n")
    files["b"].write_text("\n".join(rows[8:14]) + "\n")  # another size: other epoch boundaries
    settings = dict(max_steps=4, batch_size=2, grad_accum=2, seq_len=64, lr=1e-2, warmup_steps=1)
    settings.update(rank=4, alpha=8, dropout=0.0, max_grad_norm=0.05)  # clipping on
    tasks = [f"{name}={path}" for name, path in files.items()]
    config = TrainConfig(tasks=tasks, output=str(tmp_path / "joint"), **settings)
    train(config, tiny_llama(len(tokenizer)), tokenizer)
    squared_norms = [0.0] * 4
    for name, path in files.items():
        alone = TrainConfig(data=str(path), output=str(tmp_path / name), **settings)
        train(alone, tiny_llama(len(tokenizer)), tokenizer)
        for step, norm in enumerate(_logged(tmp_path / name, "grad_norm")):
            squared_norms[step] += norm**2
        joint = load_file(tmp_path / "joint" / name / "adapter_model.safetensors")
        single = load_file(tmp_path / name / "adapter_model.safetensors")
        assert joint.keys() == single.keys()
        for key in joint:
            torch.testing.assert_close(joint[key], single[key], atol=1e-5, rtol=0)
        assert max(float(v.abs().max()) for k, v in joint.items() if "lora_B" in k) > 1e-3
    # Adam and clipping hide a gradient's scale; the logged norm (before clipping) does not.
    joint_norms = _logged(tmp_path / "joint", "grad_norm")
    assert joint_norms == pytest.approx([math.sqrt(n) for n in squared_norms], rel=1e-4)


def _logged(output: Path, key: str) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [record[key] for record in map(json.loads, lines) if key in record]


def test_task_flags_are_checked():
    with pytest.raises(LoraError, match=r"NAME=FILE[\s\S]*unique[\s\S]*--val-data"):
        TrainConfig(tasks=["a=x.jsonl", "a=y.jsonl", "nofile"], val_data="v.jsonl")
    assert TrainConfig(tasks="a=x.jsonl,b=y.jsonl").task_files() == {
        "a": "x.jsonl",
        "b": "y.jsonl",
    }
    assert resolve_config(None, {"tasks": ["a=x.jsonl"]}).data is None  # no demo data


def test_task_flag_repeats_on_the_command_line():
    from lorakit.cli import build_parser

    args = build_parser().parse_args(["train", "--task", "a=x.jsonl", "--task", "b=y.jsonl"])
    assert args.tasks == ["a=x.jsonl", "b=y.jsonl"]
