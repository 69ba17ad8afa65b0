"""``--report-to tensorboard,wandb,mlflow``: each tracker's offline files hold the scalars of
metrics.jsonl, at their steps, and the run's settings (lorakit.training.trackers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit import LoraError
from lorakit.training.config import TrainConfig
from lorakit.training.loop import train


@pytest.fixture(scope="module")
def run(smollm2_tokenizer, data_file, tmp_path_factory) -> Path:
    """The output of a 4-step run reporting to the three trackers, eval every 2 steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    output = tmp_path_factory.mktemp("run")
    homes = tmp_path_factory.mktemp("wandb-home")
    patch = pytest.MonkeyPatch()
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        patch.setenv(name, str(homes))
    patch.setenv("WANDB_SILENT", "true")
    patch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer), num_attention_heads=4, num_key_value_heads=2, **shape
    )
    settings = dict(max_steps=4, batch_size=4, seq_len=64, lr=1e-2, warmup_steps=1, rank=4)
    settings.update(eval_every=2, val_fraction=0.25, report_to=["tensorboard", "wandb", "mlflow"])
    try:
        train(
            TrainConfig(data=str(data_file), output=str(output), **settings),
            LlamaForCausalLM(config),
            smollm2_tokenizer,
        )
    finally:
        patch.undo()
    return output


def _logged(output: Path) -> dict[str, dict[int, float]]:
    """Tracker name -> step -> value, read from metrics.jsonl."""
    names = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm"}
    names.update({"eval_loss": "eval/loss", "perplexity": "eval/perplexity"})
    logged: dict[str, dict[int, float]] = {}
    for record in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()):
        for key, name in names.items():
            if key in record:
                logged.setdefault(name, {})[record["step"]] = record[key]
    assert sorted(logged["train/loss"]) == [1, 2, 3, 4] and sorted(logged["eval/loss"]) == [0, 2, 4]
    return logged


def test_tensorboard_events_hold_the_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for name, values in _logged(run).items():
        found = {e.step: e.value for e in events.Scalars(name)}
        assert found == pytest.approx(values, rel=1e-6), name
    (text,) = events.Tensors("config/text_summary")
    assert '"rank": 4' in text.tensor_proto.string_val[0].decode()


def _wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` file (LevelDB's log format after W&B's
    7-byte header: 32 KiB blocks of chunks with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def test_wandb_offline_run_holds_the_scalars_and_the_settings(run):
    (path,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    found: dict[str, dict[int, float]] = {}
    config = {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            for key, value in row.items():
                found.setdefault(key, {})[row["_step"]] = value
        elif kind == "run":  # the settings travel with the run's start
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
    for name, values in _logged(run).items():
        assert found[name] == pytest.approx(values, rel=1e-6), name
    assert config["rank"] == 4 and config["report_to"] == ["tensorboard", "wandb", "mlflow"]


def test_mlflow_file_store_holds_the_scalars_and_the_settings(run):
    (metrics,) = (run / "mlruns").glob("*/*/metrics")
    for name, values in _logged(run).items():
        lines = (metrics / name).read_text().split("\n")
        found = {
            int(step): float(value) for _, value, step in (line.split() for line in lines if line)
        }
        assert found == pytest.approx(values, rel=1e-6), name
    params = metrics.parent / "params"
    assert (params / "rank").read_text() == "4"
    assert (params / "report_to").read_text() == "tensorboard,wandb,mlflow"


def test_a_tracker_not_installed_is_one_line_naming_the_extra(data_file, tmp_path, monkeypatch):
    import importlib.util

    from lorakit.training.inputs import check_inputs

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    config = TrainConfig(data=str(data_file), output=str(tmp_path / "o"), report_to="mlflow,wandb")
    with pytest.raises(
        LoraError,
        match=r"^--report-to wandb needs the wandb package: pip install 'lorakit\[wandb\]'\.$",
    ):
        check_inputs(config, check_model=False)


def test_an_unknown_tracker_is_refused_naming_the_known_ones():
    with pytest.raises(
        LoraError, match=r"unknown tracker 'neptune'; choose from tensorboard, wandb, mlflow"
    ):
        TrainConfig(report_to=["neptune"])
