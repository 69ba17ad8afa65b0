"""The run folder: one reader of train_config.yaml for resume and merge (alias bombs and deep
nesting refused), the settings written and read back unchanged, checkpoints found, leftovers
of killed writes cleaned, and one run per output (its lock, earlier runs, other kinds)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny

from lorakit import LoraError
from lorakit.cli import main
from lorakit.training.checkpoint import check_resumable
from lorakit.training.config import TrainConfig, resolve_config
from lorakit.training.run_folder import (
    CONFIG_FILE,
    STATE_FILE,
    claim_output,
    clean_checkpoints,
    latest_checkpoint,
    read_run_config,
    read_yaml_mapping,
    start_run_folder,
    write_run_config,
)
from lorakit.training.statefile import save_tree


def _checkpoint(output, step: int = 2):
    """OUTPUT/checkpoints/step-N as a run leaves it, without training: a state file, the
    run's settings and an adapter_config.json (all ``lorakit merge`` checks before loading)."""
    folder = output / "checkpoints" / f"step-{step}"
    folder.mkdir(parents=True)
    save_tree(
        {"step": step, "trainable": {}, "optimizer": {}, "world_size": 1}, folder / STATE_FILE
    )
    write_run_config(TrainConfig(data="train.jsonl", quantize="nf4").to_dict(), folder)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def _error(capsys, *argv: str) -> str:
    """What ``lorakit COMMAND ...`` printed as its error, without the ``lorakit COMMAND:``."""
    assert main(list(argv)) == 2
    return capsys.readouterr().err.strip().split(": error: ", 1)[1]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (b"lr: [1e-3\n", "is not valid YAML"),
        (b"- rank\n- lr\n", "must hold a mapping of keys to values"),
        (b"\xff\xfe\x00garbage", "Cannot read"),
    ],
)
def test_a_damaged_run_config_gives_one_error_on_resume_and_on_merge(
    tmp_path, capsys, damage, problem
):
    step = _checkpoint(tmp_path / "run")
    (step / CONFIG_FILE).write_bytes(damage)
    with pytest.raises(LoraError) as from_api:
        resolve_config(None, {"resume": str(tmp_path / "run")})
    with pytest.raises(LoraError) as before_loading:
        check_resumable(step, TrainConfig(data="train.jsonl"), world_size=1)
    resumed = _error(capsys, "train", "--resume", str(tmp_path / "run"))
    merged = _error(capsys, "merge", "--adapter", str(step), "--output", str(tmp_path / "m"))
    assert str(from_api.value) == str(before_loading.value) == resumed == merged
    assert problem in merged and str(step / CONFIG_FILE) in merged
    assert "restore it from another copy" in merged  # the fix, not only the problem


def test_settings_come_back_as_written_and_resume_from_them(tmp_path):
    config = TrainConfig(data="train.jsonl", rank=4, targets=["q_proj", "v_proj"], lr=1e-3)
    write_run_config(config.to_dict(), tmp_path)
    assert read_run_config(tmp_path) == config.to_dict()
    assert TrainConfig(**read_run_config(tmp_path)) == config
    assert not list(tmp_path.glob(".*"))  # the temporary name is gone


def test_a_folder_without_settings_is_none_for_merge_and_an_error_for_resume(tmp_path):
    assert read_run_config(tmp_path, required=False) is None  # a PEFT adapter's folder
    with pytest.raises(LoraError, match=rf"{CONFIG_FILE} not found: .*OUTPUT/checkpoints/step-N"):
        read_run_config(tmp_path)


def test_the_newest_checkpoint_is_found_in_the_output_or_its_checkpoints(tmp_path):
    for step in (2, 10, 4):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "step-12").mkdir()  # no state: not a checkpoint
    newest = tmp_path / "checkpoints" / "step-10"
    assert latest_checkpoint(tmp_path) == newest
    assert latest_checkpoint(tmp_path / "checkpoints") == newest
    assert (
        latest_checkpoint(tmp_path / "checkpoints" / "step-4")
        == tmp_path / "checkpoints" / "step-4"
    )


def test_a_checkpoint_cut_between_two_renames_is_put_back(tmp_path):
    root = tmp_path / "checkpoints"
    (root / ".step-4.old-abc").mkdir(parents=True)  # the fallback swap, cut after rename one
    (root / ".step-4.new-def").mkdir()
    removed = clean_checkpoints(tmp_path)
    assert [p.name for p in removed] == [".step-4.new-def"]
    assert sorted(p.name for p in root.iterdir()) == ["step-4"]


def test_leftovers_of_this_version_and_of_lorakit_0_1_are_removed_and_others_kept(tmp_path):
    root = _checkpoint(tmp_path, 3).parent
    for name in (".step-3.new-abc", ".step-5-x1y2", ".step-2.pruned-def", ".notes"):
        (root / name).mkdir()
    removed = clean_checkpoints(tmp_path)
    assert sorted(p.name for p in removed) == [
        ".step-2.pruned-def",
        ".step-3.new-abc",
        ".step-5-x1y2",
    ]
    assert sorted(p.name for p in root.iterdir()) == [".notes", "step-3"]


# --- settings files that would cost gigabytes or recursion ----------------------------------------
_ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (_ALIAS_BOMB + "rank: *i\n", "it holds more than 100,000 values"),
        ("rank: " + "[" * 5000 + "]" * 5000 + "\n", "its values nest more than 64 levels deep"),
        ("rank: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n", "nest more than 64 levels"),
    ],
)
def test_alias_bombs_and_deep_nesting_are_refused_by_name(tmp_path, text, problem):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    start = time.monotonic()
    with pytest.raises(LoraError) as error:
        resolve_config(path)
    message = str(error.value)
    assert message.startswith(f"{path} is refused: ") and problem in message
    assert "Correct the file" in message and len(message) < 400
    assert time.monotonic() - start < 5  # nothing was expanded


def test_anchors_and_merge_keys_of_a_real_config_still_load(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: &b {rank: 8, alpha: 16}\nrun:\n  <<: *b\n  lr: 0.001\n")
    assert read_yaml_mapping(path, "fix")["run"] == {"rank": 8, "alpha": 16, "lr": 0.001}
    path.write_text("data: train.jsonl\nrank: &r 8\nalpha: *r\ntargets: [q_proj, v_proj]\n")
    config = resolve_config(path)
    assert (config.rank, config.alpha, config.targets) == (8, 8.0, ["q_proj", "v_proj"])


# --- one run per output -------------------------------------------------------------------------
def _finished_run(output: Path) -> Path:
    """A folder as a finished run leaves it (its settings, adapter and logs)."""
    output.mkdir(parents=True)
    write_run_config(TrainConfig(data="train.jsonl").to_dict(), output)
    (output / "adapter_config.json").write_text("{}")
    (output / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return output


def test_a_finished_run_is_refused_without_resume_or_overwrite(tmp_path):
    output = _finished_run(tmp_path / "run")
    with pytest.raises(LoraError) as error, claim_output(output):
        pass
    assert str(error.value) == (
        f"--output {output} holds an earlier run of lorakit train (finished: its adapter is "
        "written), which a new run would mix with its own. To go on, replace it with "
        "--overwrite, or choose a new --output."
    )
    with claim_output(output, overwrite=True) as held:
        assert held == output
    with claim_output(tmp_path / "elsewhere", resume=str(output)):  # a new folder: fine
        pass
    with claim_output(output, resume=str(output / "checkpoints" / "step-2")):
        pass  # the run it continues


def test_an_interrupted_run_is_refused_with_the_resume_that_continues_it(tmp_path):
    output = tmp_path / "run"
    _checkpoint(output, 4)
    write_run_config(TrainConfig(data="train.jsonl").to_dict(), output)
    refused = pytest.raises(LoraError, match=r"interrupted: its last checkpoint is step 4\)")
    with refused as error, claim_output(output):
        pass
    assert f"continue it with --resume {output}, replace it with --overwrite" in str(error.value)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_another_kind_is_refused_even_with_overwrite(tmp_path, overwrite):
    output = tmp_path / "model"
    output.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (output / name).write_text("{}")
    with pytest.raises(LoraError) as error, claim_output(output, overwrite=overwrite):
        pass
    assert str(error.value) == (
        f"--output {output} holds no run of lorakit train: it holds 'config.json', "
        "'model.safetensors', 'tokenizer.json', which lorakit train would mix with its own "
        "files. Pass a new or empty folder (or move those out)."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no lock left either


def test_overwrite_refuses_a_run_folder_holding_files_no_run_writes(tmp_path):
    output = _finished_run(tmp_path / "run")
    (output / "notes.txt").write_text("mine")
    refused = pytest.raises(LoraError, match="holds files no run writes: it holds 'notes.txt'")
    with refused, claim_output(output, overwrite=True):
        pass


def test_what_a_killed_run_left_before_its_settings_is_no_other_kind(tmp_path):
    (tmp_path / "run" / "checkpoints" / ".step-3.new-abc").mkdir(parents=True)
    (tmp_path / "run" / ".metrics.jsonl.tmp").write_text("")
    with claim_output(tmp_path / "run"):
        pass


def test_overwrite_swaps_the_old_run_out_whole_once_started(tmp_path):
    output = _finished_run(tmp_path / "run")
    _checkpoint(output, 2)
    settings = TrainConfig(data="new.jsonl").to_dict()
    start_run_folder(output, settings, replace=True)
    assert sorted(p.name for p in output.iterdir()) == [CONFIG_FILE]
    assert read_run_config(output) == settings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_lock_names_its_holder_and_goes_with_the_run(tmp_path):
    output = tmp_path / "run"
    lock = tmp_path / ".run.lock"
    with claim_output(output):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(LoraError) as error, claim_output(tmp_path / "." / "run"):
            pass  # another spelling of the same folder, held by another open file
        assert str(error.value) == (
            f"--output {tmp_path / '.' / 'run'} is in use: another lorakit train (pid "
            f"{os.getpid()}) is writing to it. Wait for it to end (or stop it), or choose "
            "another --output."
        )
    assert not lock.exists()


def test_a_symlinked_output_is_held_where_it_points(tmp_path):
    real = tmp_path / "disk" / "run"
    real.parent.mkdir()
    (tmp_path / "run").symlink_to(real)
    with claim_output(tmp_path / "run") as held:
        assert held == real
        assert (real.parent / ".run.lock").is_file()
        with pytest.raises(LoraError, match="is in use"), claim_output(real):
            pass


def test_two_writers_in_real_processes_and_a_killed_holders_lock_taken_over(
    tmp_path, data_file, smollm2_tokenizer, capsys
):
    model = tmp_path / "tiny"
    tiny.llama(vocab=len(smollm2_tokenizer)).save_pretrained(model)
    smollm2_tokenizer.save_pretrained(model)
    output, lock = tmp_path / "run", tmp_path / ".run.lock"
    argv = ["train", "--model", str(model), "--data", str(data_file), "--output", str(output)]
    argv += ["--max-steps", "100000", "--batch-size", "1", "--seq-len", "32"]
    first = subprocess.Popen([sys.executable, "-m", "lorakit", *argv], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text() == f"{first.pid}\n"):
            assert first.poll() is None, "the first run ended before it held its output"
            assert time.monotonic() < deadline, "the first run never held its output"
            time.sleep(0.02)
        # The second writer: one line naming the first's pid, and no model loaded.
        capsys.readouterr()
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert "config:" not in out  # refused before the run's settings were even shown
        assert f"is in use: another lorakit train (pid {first.pid}) is writing to it" in err
        assert "Traceback" not in err and err.count("\n") == 1
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    assert lock.read_text() == f"{first.pid}\n"  # a kill -9 leaves the file, not the lock
    with claim_output(output, overwrite=True):  # whatever the killed run had written
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()
