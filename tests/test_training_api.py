"""``lorakit.train(...)``: the CLI's run from Python, data in memory or in any table file.

The same 12 conversations as JSONL through the CLI, as a list and a ``datasets.Dataset``
through the API, and as CSV, Parquet and a ``save_to_disk`` folder give the same losses.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

import lorakit
from lorakit import LoraError
from lorakit.cli import main

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Order number {i}?"},
            {"role": "assistant", "content": " ".join(["pizza"] * (1 + i % 4)) + f" {i}"},
        ]
    }
    for i in range(12)
]
SETTINGS = dict(max_steps=3, batch_size=4, seq_len=48, lr=1e-2, warmup_steps=1, rank=4)
SETTINGS.update(alpha=8, dropout=0.0, seed=3)


@pytest.fixture(scope="module")
def model_folder(smollm2_tokenizer, tmp_path_factory) -> Path:
    """A tiny Llama with the bundled tokenizer, as a model folder ``--model`` loads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cli_losses(model_folder, tmp_path_factory) -> dict[int, float]:
    """The train losses of ``lorakit train`` on the rows as JSONL."""
    root = tmp_path_factory.mktemp("cli")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["train", "--model", str(model_folder), "--data", str(root / "data.jsonl")]
    argv += ["--output", str(root / "run")]
    for key, value in SETTINGS.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    lines = (root / "run" / "metrics.jsonl").read_text().splitlines()
    losses = {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}
    assert len(losses) == 3
    return losses


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Records in memory go to a cache of this test's own."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))


def _data(kind: str, folder: Path):
    from datasets import Dataset

    table = Dataset.from_list(ROWS)
    if kind == "list":
        return ROWS
    if kind == "dataset":
        return table
    if kind == "csv":
        rows = [{"messages": json.dumps(r["messages"])} for r in ROWS]
        Dataset.from_list(rows).to_csv(str(folder / "data.csv"))
        return folder / "data.csv"
    if kind == "parquet":
        table.to_parquet(str(folder / "data.parquet"))
        return folder / "data.parquet"
    table.save_to_disk(str(folder / "saved"))
    return str(folder / "saved")


@pytest.mark.parametrize("kind", ["list", "dataset", "csv", "parquet", "save_to_disk"])
def test_the_api_on_each_kind_of_data_gives_the_clis_losses(
    kind, model_folder, cli_losses, tmp_path
):
    data = _data(kind, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        result = lorakit.train(data, model=model_folder, output=str(tmp_path / "run"), **SETTINGS)
    assert result.steps == 3 and result.output == tmp_path / "run"
    assert result.train_losses == pytest.approx(cli_losses, rel=0, abs=1e-6)
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def test_records_in_memory_resume_from_a_checkpoint(model_folder, tmp_path):
    settings = {**SETTINGS, "save_every": 2}
    with contextlib.redirect_stdout(io.StringIO()):
        whole = lorakit.train(ROWS, model=model_folder, output=str(tmp_path / "w"), **settings)
        step_2 = str(tmp_path / "w" / "checkpoints" / "step-2")
        resumed = lorakit.train(
            ROWS, model=model_folder, output=str(tmp_path / "r"), resume=step_2, **settings
        )
    assert resumed.train_losses[3] == pytest.approx(whole.train_losses[3], rel=0, abs=1e-6)
    saved = (tmp_path / "w" / "train_config.yaml").read_text()
    assert str(tmp_path / "cache" / "data") in saved, "the run names the cached copy"


def test_a_bad_record_in_memory_is_named_by_its_number(model_folder, tmp_path):
    rows = [*ROWS[:4], {"messages": [{"role": "assistant", "content": "no question"}]}]
    with pytest.raises(LoraError, match=r"^data, record 5: .*user"):
        lorakit.train(rows, model=model_folder, output=str(tmp_path / "run"), **SETTINGS)
    with pytest.raises(LoraError, match=r"data, record 2: .*not JSON serializable.*JSON values"):
        lorakit.train([ROWS[0], {"text": object()}], output=str(tmp_path / "run"))


def test_unknown_settings_and_wrong_data_are_refused_before_any_load(tmp_path):
    with pytest.raises(LoraError, match=r"learning_rate \(did you mean lr\?\)"):
        lorakit.train(ROWS, learning_rate=1e-3, output=str(tmp_path / "run"))
    with pytest.raises(LoraError, match=r"data must be a file, a list of records"):
        lorakit.train(42, output=str(tmp_path / "run"))
    with pytest.raises(LoraError, match=r"pass its tokenizer"):
        lorakit.train(ROWS, model=__import__("tiny").llama())


def test_import_lorakit_stays_light_and_train_loads_on_first_use():
    import subprocess
    import sys

    code = (
        "import sys, lorakit\n"
        "heavy = ('transformers', 'datasets', 'trl', 'wandb', 'mlflow', 'lorakit.training')\n"
        "print('BEFORE', [m for m in heavy if m in sys.modules])\n"
        "print('NAMES', lorakit.train.__module__, lorakit.AdapterCheckpoints.__module__)\n"
        "print('ALL', sorted(set(lorakit.__all__) - set(dir(lorakit))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "BEFORE []" in done.stdout, done.stdout + done.stderr
    assert "NAMES lorakit.training.api lorakit.hf.trainer" in done.stdout
    assert "ALL ['AdapterCheckpoints', 'train']" in done.stdout, "the lazy names, and no others"
