"""Checkpoints: whole or absent at any kill -9 or full disk, no pickle, leftovers cleaned,
and a resume that checks which base model it continues on."""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import random
import signal
import time
from pathlib import Path

import pytest
import tiny
import torch
from disk import files_on, small_disk  # noqa: F401
from peft import PeftConfig
from peft.utils import load_peft_weights
from safetensors import SafetensorError

from lorakit import LoraError
from lorakit.io import read_adapter
from lorakit.training.checkpoint import read_state
from lorakit.training.config import TrainConfig
from lorakit.training.loop import train
from lorakit.training.run_folder import (
    STATE_FILE,
    checkpoint_steps,
    clean_checkpoints,
    latest_checkpoint,
)

TRIALS = 20
STEPS = 12  # the killed run's length; kills come before its last checkpoint
TIMED_RUN_LIMIT = 300  # seconds; a child this slow is hung, not slow (it takes ~3 s)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return copy.deepcopy(smollm2_tokenizer)


def run(tokenizer, data_file: Path, output: Path, base=None, **changes):
    settings = dict(data=str(data_file), output=str(output), max_steps=4, batch_size=4)
    settings.update(seq_len=64, lr=1e-2, warmup_steps=1, rank=4, alpha=8, dropout=0.0)
    settings.update(changes)
    base = base if base is not None else tiny.llama(vocab=len(tokenizer))
    return train(TrainConfig(**settings), base, tokenizer)


def _trainable(folder: Path) -> dict[str, torch.Tensor]:
    return read_state(folder)["trainable"]


def test_checkpoint_state_is_safetensors_and_resume_needs_no_pickle(tokenizer, data_file, tmp_path):
    run(tokenizer, data_file, tmp_path, save_every=2)
    step = tmp_path / "checkpoints" / "step-4"
    assert sorted(p.name for p in step.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "generation_settings.json",
        STATE_FILE,
        "train_config.yaml",
    ]
    assert STATE_FILE.endswith(".safetensors")
    assert read_state(step)["step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2", "step-4"]


class _Payload:
    """What an attacker pickles: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_legacy_state_file_carrying_a_pickle_is_refused_and_never_run(tmp_path):
    folder = tmp_path / "step-1"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "state.pt", "wb") as handle:
        pickle.dump({"step": 1, "x": _Payload(marker)}, handle)
    assert latest_checkpoint(tmp_path) == folder  # a lorakit 0.1 checkpoint is still found
    with pytest.raises(LoraError, match="never unpickles code"):
        read_state(folder)
    assert not marker.exists()


def test_a_corrupt_state_file_is_a_lora_error(tokenizer, data_file, tmp_path):
    run(tokenizer, data_file, tmp_path / "run", max_steps=2, save_every=2)
    state = tmp_path / "run" / "checkpoints" / "step-2" / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(LoraError, match=r"step-2/state.safetensors is not a readable lorakit"):
        run(
            tokenizer,
            data_file,
            tmp_path / "b",
            max_steps=4,
            save_every=2,
            resume=str(state.parent),
        )


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(
    tokenizer, data_file, tmp_path, monkeypatch
):
    import lorakit.training.checkpoint as checkpoint

    real, calls = checkpoint.save_tree, {"n": 0}

    def fill_up(tree, path):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: its adapter is written, then the disk fills
            raise OSError(28, "No space left on device")
        real(tree, path)

    monkeypatch.setattr(checkpoint, "save_tree", fill_up)
    with pytest.raises(LoraError, match=r"No space left on device\); the last good checkpoint"):
        run(tokenizer, data_file, tmp_path, save_every=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]
    assert read_state(tmp_path / "checkpoints" / "step-2")["step"] == 2
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_leftovers_of_killed_runs_are_cleaned_at_the_next_start(tokenizer, data_file, tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir(parents=True)
    for name in (".step-3.new-abc", ".step-5-x1y2", ".step-2.pruned-def"):
        (root / name).mkdir()
        (root / name / STATE_FILE).write_bytes(b"half")
    with pytest.raises(LoraError, match="No checkpoint found"):
        latest_checkpoint(tmp_path)  # none of them looks like a checkpoint
    run(tokenizer, data_file, tmp_path, max_steps=1)
    assert sorted(p.name for p in root.iterdir()) == []
    assert clean_checkpoints(tmp_path) == []


def test_a_non_finite_adapter_is_never_written(tokenizer, data_file, tmp_path, monkeypatch):
    import lorakit.training.loop as train_module

    real = train_module.build_optimizer

    def nan_gradient_at_step_3(model, config):
        # The loss stays finite; one NaN gradient spreads to every weight through clipping.
        calls = {"n": 0}

        def hook(grad):
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == 3 else grad

        next(p for p in model.parameters() if p.requires_grad).register_hook(hook)
        return real(model, config)

    monkeypatch.setattr(train_module, "build_optimizer", nan_gradient_at_step_3)
    with pytest.raises(LoraError, match=r"stopped being finite at step 3 .*step-2, is kept"):
        run(tokenizer, data_file, tmp_path, save_every=2)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    saved = _trainable(tmp_path / "checkpoints" / "step-2")
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_resume_refuses_another_base_and_accepts_a_moved_one(tokenizer, data_file, tmp_path):
    whole = run(tokenizer, data_file, tmp_path / "a", save_every=2)
    step = str(tmp_path / "a" / "checkpoints" / "step-2")
    other = tiny.llama(vocab=len(tokenizer) + 8)  # the model folder now holds another model
    with pytest.raises(LoraError, match=r"different base model \(2 parameter\(s\) differ; first: "):
        run(tokenizer, data_file, tmp_path / "b", base=other, resume=step)
    # The same model found under another path resumes: the path is not the model's identity.
    moved = run(tokenizer, data_file, tmp_path / "c", model="/elsewhere/smollm2", resume=step)
    for n in (3, 4):
        assert moved.train_losses[n] == pytest.approx(whole.train_losses[n], abs=1e-5)


# --- kill -9 at random moments of a run that checkpoints every step ----------------------------
def _train_until_killed(tokenizer, data_file: Path, output: Path, ready) -> None:
    torch.set_num_threads(1)
    ready.set()
    # As a user goes on after a kill: resume its checkpoints, or start over (--overwrite)
    # when it was killed before its first; a new run into the folder is refused.
    resume = str(output) if checkpoint_steps(output / "checkpoints") else None
    run(
        tokenizer,
        data_file,
        output,
        max_steps=STEPS,
        save_every=1,
        keep_checkpoints=2,
        resume=resume,
        overwrite=resume is None,
    )


def _check_complete(step: Path) -> None:
    """Both lorakit and PEFT read the checkpoint's adapter, and it is the state's adapter."""
    state = read_state(step)
    assert state["step"] == int(step.name.removeprefix("step-"))
    _, ours, _ = read_adapter(step)
    theirs = load_peft_weights(str(step), device="cpu")
    assert PeftConfig.from_pretrained(str(step)).r == 4
    assert sorted(ours) == sorted(theirs) and len(ours) == len(state["trainable"])
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name], value, rtol=0, atol=0)


def _start_child(context, tokenizer, data_file: Path, output: Path):
    ready = context.Event()
    child = context.Process(target=_train_until_killed, args=(tokenizer, data_file, output, ready))
    child.start()
    assert ready.wait(120), "the training child did not start"
    return child


def _seconds_to_last_checkpoint(context, tokenizer, data_file: Path, output: Path) -> float:
    """How long an uninterrupted child takes to write its step-STEPS checkpoint."""
    child = _start_child(context, tokenizer, data_file, output)
    start, last = time.monotonic(), output / "checkpoints" / f"step-{STEPS}"
    while not last.exists():
        assert child.is_alive() or last.exists(), "the timed run ended without its last checkpoint"
        if time.monotonic() - start > TIMED_RUN_LIMIT:
            child.kill()
            pytest.fail(f"the timed run wrote no step-{STEPS} in {TIMED_RUN_LIMIT} s")
        time.sleep(0.005)
    seconds = time.monotonic() - start
    child.join(60)
    return seconds


def test_kill_9_during_training_leaves_whole_checkpoints_that_resume_exactly(
    tokenizer, data_file, tmp_path, child_processes
):
    rng = random.Random(0)
    # Kill times are fractions of a measured run, so a fast machine is killed as early in its
    # run as a slow one (a fixed 0.2-2.5 s outlived the whole run on a fast CI machine).
    window = _seconds_to_last_checkpoint(child_processes, tokenizer, data_file, tmp_path / "timed")
    runs = [tmp_path / "run0"]
    for _ in range(TRIALS):
        # A killed run is resumed (see _train_until_killed), and the kill comes within the part
        # of the run still to do; a finished run is followed by a new one in a new folder. So
        # most kills land among steps and checkpoints.
        done = max((n for n, _ in checkpoint_steps(runs[-1] / "checkpoints")), default=0)
        if done == STEPS:
            runs.append(tmp_path / f"run{len(runs)}")
            done = 0
        output = runs[-1]
        child = _start_child(child_processes, tokenizer, data_file, output)
        time.sleep(rng.uniform(0.02, 0.8) * window * (STEPS + 1 - done) / (STEPS + 1))
        with contextlib.suppress(ProcessLookupError):  # a resumed run may have ended already
            os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        clean_checkpoints(output)  # what the next start does first
        root = output / "checkpoints"
        steps = sorted(root.iterdir()) if root.is_dir() else []
        assert all(not p.name.startswith(".") for p in steps), steps
        for step in steps:
            _check_complete(step)
    # The newest surviving checkpoint short of the end resumes as if the run had never stopped
    # (a child that ran faster than the timed one may have written step-STEPS itself), in the
    # newest run that wrote one (a finished run keeps step-STEPS - 1).
    output = next(r for r in reversed(runs) if checkpoint_steps(r / "checkpoints"))
    survivors = {read_state(p)["step"]: p for p in (output / "checkpoints").iterdir()}
    reached = max(step for step in survivors if step < STEPS)
    last = survivors[reached]
    assert latest_checkpoint(output) == survivors[max(survivors)]
    resumed = run(tokenizer, data_file, tmp_path / "r", max_steps=STEPS, resume=str(last))
    whole = run(tokenizer, data_file, tmp_path / "w", max_steps=STEPS)
    assert sorted(resumed.train_losses) == list(range(reached + 1, STEPS + 1))
    for n in resumed.train_losses:
        assert resumed.train_losses[n] == pytest.approx(whole.train_losses[n], abs=1e-5)


# --- full disks and file modes -------------------------------------------------------------------
def test_safetensors_own_full_disk_error_is_the_one_line_message(
    tokenizer, data_file, tmp_path, monkeypatch
):
    import lorakit.training.checkpoint as checkpoint

    def full(tree, path):  # what safetensors raises: no OSError
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(checkpoint, "save_tree", full)
    with pytest.raises(LoraError) as error:
        run(tokenizer, data_file, tmp_path, save_every=2)
    target = tmp_path / "checkpoints" / "step-2"
    assert str(error.value) == (
        f"Could not write the checkpoint {target} (No space left on device). "
        f"Free space, then continue with --resume {tmp_path}."
    )
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_a_real_full_disk_during_a_checkpoint_leaves_no_part_of_it(
    tokenizer,
    data_file,
    small_disk,  # noqa: F811
):
    output = small_disk / "run"
    with pytest.raises(LoraError) as error:
        run(tokenizer, data_file, output, save_every=1)
    assert str(error.value) == (
        f"Could not write the checkpoint {output / 'checkpoints' / 'step-1'} ("
        f"No space left on device). Free space, then continue with --resume {output}."
    )
    assert files_on(output / "checkpoints") == []
    assert not (output / "adapter_model.safetensors").exists()


def test_every_file_of_a_run_has_the_mode_of_the_umask(tokenizer, data_file, tmp_path):
    old = os.umask(0o022)
    try:
        run(tokenizer, data_file, tmp_path, max_steps=2, save_every=2)
    finally:
        os.umask(old)
    modes = {
        str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777
        for p in tmp_path.rglob("*")
        if p.is_file()
    }
    assert "checkpoints/step-2/state.safetensors" in modes and "adapter_model.safetensors" in modes
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}
