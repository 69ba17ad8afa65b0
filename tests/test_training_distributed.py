"""``lorakit train`` under torchrun: 2 CPU processes (gloo) against 1, on a tiny random Llama.

Each distributed run is a real ``torchrun`` launch (a subprocess), so these tests check what a
user runs: 2 processes x batch b must give what 1 process x batch 2b gives, for DDP and FSDP2,
and a 2-process checkpoint must resume in 1 process as if never stopped.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.training.config import TrainConfig
from lorakit.training.loop import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

# Dropout 0: dropout masks are drawn per rank, so they differ between world sizes.
SETTINGS = dict(
    max_steps=4,
    batch_size=2,  # per process; the 1-process reference uses 4
    grad_accum=2,
    seq_len=48,
    lr=1e-2,
    warmup_steps=1,
    rank=4,
    alpha=8,
    dropout=0.0,
    save_every=2,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama saved as a model folder with the SmolLM2 tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _flags(settings: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


def _env() -> dict[str, str]:
    # One thread per process: two processes share this machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def launch(model_dir: Path, data_file: Path, output: Path, *extra: str) -> str:
    """``torchrun --nproc-per-node 2 -m lorakit train ...``; returns its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "lorakit", "train"]
    command += [f"--model={model_dir}", f"--data={data_file}", f"--output={output}"]
    command += _flags(SETTINGS) + list(extra)
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def one_process(model_dir: Path, data_file: Path, output: Path, **changes):
    settings = {**SETTINGS, "batch_size": 4, **changes}
    config = TrainConfig(model=str(model_dir), data=str(data_file), output=str(output), **settings)
    return train(config)


def losses(output: Path, key: str = "loss") -> dict[int, float]:
    """Logged ``key`` (loss or grad_norm) by step, from OUTPUT/metrics.jsonl."""
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def assert_same_run(reference: Path, output: Path) -> None:
    """Same losses and gradient norms: Adam's updates barely depend on the gradient's scale,
    so a wrong factor of N would only show in the norm."""
    for key in ("loss", "grad_norm"):
        assert losses(output, key) == pytest.approx(losses(reference, key), rel=1e-5, abs=1e-6)


def assert_same_adapter(a: Path, b: Path) -> float:
    """Equal adapter files (1e-5); returns the largest difference."""
    first, second = (
        load_file(a / "adapter_model.safetensors"),
        load_file(b / "adapter_model.safetensors"),
    )
    assert first.keys() == second.keys()
    worst = max(float((first[k] - second[k]).abs().max()) for k in first)
    assert worst <= 1e-5, worst
    # The adapter trained: B moved away from its zero init.
    assert max(float(v.abs().max()) for k, v in first.items() if "lora_B" in k) > 1e-3
    return worst


@pytest.fixture(scope="module")
def reference(model_dir, data_file, tmp_path_factory) -> Path:
    """1 process x batch 4, the run every 2-process run must reproduce."""
    output = tmp_path_factory.mktemp("one")
    one_process(model_dir, data_file, output)
    return output


def test_ddp_two_processes_equal_one_with_double_batch(model_dir, data_file, reference, tmp_path):
    log = launch(model_dir, data_file, tmp_path)
    assert "2 process(es) x batch 2 x grad-accum 2 = 8 sequences per step" in log
    assert_same_adapter(reference, tmp_path)
    assert_same_run(reference, tmp_path)
    # Same PEFT files as one process; written once (by rank 0).
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "adapter_config.json" in names and "loss.png" in names
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4

    # The 2-process checkpoint at step 2 resumes in 1 process (batch 2 x 2 = 4) seamlessly.
    resumed = tmp_path.parent / f"{tmp_path.name}-resumed"
    checkpoint = tmp_path / "checkpoints" / "step-2"
    result = one_process(model_dir, data_file, resumed, resume=str(checkpoint))
    assert sorted(result.train_losses) == [3, 4]
    for step in (3, 4):
        assert result.train_losses[step] == pytest.approx(losses(tmp_path)[step], abs=1e-5)
    assert_same_adapter(tmp_path, resumed)


def test_fsdp2_with_the_nproc_launcher_equals_one_process(
    model_dir, data_file, reference, tmp_path
):
    command = [sys.executable, "-m", "lorakit", "train", "--nproc", "2", "--fsdp"]
    command += [f"--model={model_dir}", f"--data={data_file}", f"--output={tmp_path}"]
    command += _flags(SETTINGS)
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FSDP2 (fully_shard): 2 process(es)" in done.stdout + done.stderr
    assert_same_adapter(reference, tmp_path)
    assert_same_run(reference, tmp_path)

    # An FSDP2 checkpoint holds whole tensors: it resumes in 1 process too.
    resumed = tmp_path.parent / f"{tmp_path.name}-resumed"
    checkpoint = tmp_path / "checkpoints" / "step-2"
    result = one_process(model_dir, data_file, resumed, resume=str(checkpoint))
    for step in (3, 4):
        assert result.train_losses[step] == pytest.approx(losses(tmp_path)[step], abs=1e-5)
    assert_same_adapter(tmp_path, resumed)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_hung_rank_stops_the_other_with_a_message(model_dir, data_file, tmp_path):
    # The two ranks are started by hand (torchrun would itself stop the survivors of a crash):
    # rank 1 is frozen mid-run, and rank 0 must give up after --dist-timeout, not hang.
    env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env.update(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    command = [sys.executable, "-m", "lorakit", "train", f"--model={model_dir}"]
    command += [f"--data={data_file}", f"--output={tmp_path}", "--max-steps=1000"]
    command += ["--batch-size=2", "--seq-len=48", "--dist-timeout=5"]
    ranks = [
        subprocess.Popen(
            command,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "metrics.jsonl").is_file(), "training never started"
        ranks[1].send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        output, _ = ranks[0].communicate(timeout=60)
        assert ranks[0].returncode == 2, output
        assert time.monotonic() - frozen < 30
        assert "Rank 0 stopped: another process" in output and "--dist-timeout" in output
    finally:
        for process in ranks:
            process.kill()
            process.communicate()


# --- launcher variables ------------------------------------------------------------------------
_LAUNCHER = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
_VARIABLE = "The environment variable"


def _environment(monkeypatch, env: dict[str, str]) -> None:
    for name in _LAUNCHER:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"WORLD_SIZE": "2"},
            "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: launch with "
            "torchrun (it sets them all) or lorakit train --nproc N, or unset WORLD_SIZE to "
            "train in one process.",
        ),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"},
            "WORLD_SIZE=2 is set but MASTER_PORT is not: launch with torchrun",
        ),
        (
            {"WORLD_SIZE": "two"},
            "The environment variable WORLD_SIZE is 'two': it must be a whole number, 1 or "
            "more. torchrun sets it; unset it to run one process.",
        ),
        ({"WORLD_SIZE": "0"}, f"{_VARIABLE} WORLD_SIZE is '0': it must be a whole number, 1 or"),
        ({"WORLD_SIZE": "2", "RANK": "one", **_MASTER}, f"{_VARIABLE} RANK is 'one': it must be"),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1", **_MASTER},
            f"{_VARIABLE} LOCAL_RANK is '-1': it must be a whole number, 0 or more.",
        ),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
            f"{_VARIABLE} MASTER_PORT is 'abc': it must be a whole number, 1 or more.",
        ),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
            "MASTER_PORT=70000 is not a port (1 to 65535); launch with torchrun",
        ),
        (
            {"WORLD_SIZE": "2", "RANK": "2", **_MASTER},
            "RANK=2 is not below WORLD_SIZE=2: ranks run from 0 to WORLD_SIZE - 1. Launch with "
            "torchrun, which sets both.",
        ),
    ],
)
def test_malformed_launcher_variables_are_refused_by_name(monkeypatch, env, message):
    from lorakit import LoraError
    from lorakit.training.distributed import setup

    _environment(monkeypatch, env)
    with pytest.raises(LoraError) as error:
        setup()
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_set_threads_refuses_a_malformed_local_world_size(monkeypatch, value):
    from lorakit import LoraError
    from lorakit.cli.common import set_threads

    _environment(monkeypatch, {"LOCAL_WORLD_SIZE": value})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("threads were set"))
    with pytest.raises(LoraError, match=f"LOCAL_WORLD_SIZE is '{value}': it must be a whole"):
        set_threads()


def test_set_threads_shares_the_cores_among_local_processes(monkeypatch):
    from lorakit.cli.common import set_threads

    _environment(monkeypatch, {"LOCAL_WORLD_SIZE": "2"})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    set_threads()
    assert chosen == [4]


def test_lorakit_train_with_half_a_launch_is_one_line_and_writes_nothing(
    monkeypatch, data_file, tmp_path, capsys
):
    from lorakit.cli import main

    _environment(monkeypatch, {"WORLD_SIZE": "2"})
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert main(["train", "--data", str(data_file), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WORLD_SIZE=2 is set but RANK" in err
    assert list(tmp_path.iterdir()) == []
