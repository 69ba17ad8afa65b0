"""``accelerate launch`` runs ``lorakit train`` as torchrun does: 2 CPU processes (gloo) give
the adapter of 1 process at the same global batch (docs/distributed.md)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LoraError
from lorakit.training import distributed
from lorakit.training.config import TrainConfig
from lorakit.training.loop import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available()
    or shutil.which("accelerate", path=Path(sys.executable).parent) is None,
    reason="needs torch.distributed and accelerate's launcher",
)
# Dropout 0: masks are drawn per rank, so they differ between world sizes.
SETTINGS = dict(max_steps=3, batch_size=2, grad_accum=2, seq_len=48, lr=1e-2, warmup_steps=1)
SETTINGS.update(rank=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama saved as a model folder with the SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
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
    copy.deepcopy(smollm2_tokenizer).save_pretrained(folder)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(output: Path) -> dict[int, float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_accelerate_launch_of_two_cpu_processes_equals_one_at_the_same_global_batch(
    model_dir, data_file, tmp_path
):
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    command += ["-m", "lorakit", "train", f"--model={model_dir}", f"--data={data_file}"]
    command += [f"--output={tmp_path / 'two'}"]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "DDP: 2 process(es) x batch 2 x grad-accum 2 = 8 sequences per step" in done.stdout
    config = {**SETTINGS, "batch_size": 4}
    one = TrainConfig(
        model=str(model_dir), data=str(data_file), output=str(tmp_path / "one"), **config
    )
    train(one)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    a = load_file(tmp_path / "one" / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 1e-3


def test_accelerates_launch_without_ranks_is_refused_instead_of_training_alone(monkeypatch):
    # What `accelerate launch --num_processes 2` (no --multi_gpu) gives its one process.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(LoraError, match=r"without giving it a rank.*Add --multi_gpu"):
        distributed.setup()
