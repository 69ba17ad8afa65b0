"""The run folder: one reader of train_config.yaml for resume and merge, the settings written
and read back unchanged, checkpoints found and leftovers of killed writes cleaned."""

from __future__ import annotations

import pytest

from lorakit import LoraError
from lorakit.cli import main
from lorakit.training.checkpoint import check_resumable
from lorakit.training.config import TrainConfig, resolve_config
from lorakit.training.run_folder import (
    CONFIG_FILE,
    STATE_FILE,
    clean_checkpoints,
    latest_checkpoint,
    read_run_config,
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
