"""Folders replaced as one unit: complete-old or complete-new at any kill -9 or full disk."""

import errno
import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import tiny
import torch
from disk import files_on, small_disk  # noqa: F401
from peft import PeftModel
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter
from lorakit.atomic import atomic_folder, clean_leftovers, write_errors

TRIALS = 24


def test_new_version_replaces_old_and_keeps_other_files(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "a.txt").write_text("old")
    (target / "notes.txt").write_text("keep me")
    (target / "sub").mkdir()
    (target / "sub" / "x").write_text("x")
    with atomic_folder(target) as new:
        (new / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert (target / "notes.txt").read_text() == "keep me"
    assert (target / "sub" / "x").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing left beside it


def test_an_error_leaves_the_old_version_and_no_leftovers(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_folder(target) as new:
        (new / "a.txt").write_text("half")
        raise OSError("disk full")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_file_at_the_target_is_refused_not_replaced(tmp_path):
    target = tmp_path / "data.jsonl"
    target.write_text("precious")
    with pytest.raises(LoraError) as error, atomic_folder(target) as new:
        (new / "a.txt").write_text("new")
    assert str(error.value) == f"{target} is a file, not a folder; pass a folder path instead."
    assert target.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]


def test_leftovers_of_a_killed_write_are_cleaned_and_an_old_version_restored(tmp_path):
    target = tmp_path / "run"
    (tmp_path / ".run.new-abc").mkdir()  # killed while writing
    old = tmp_path / ".run.old-def"  # killed between the two renames of the fallback swap
    old.mkdir()
    (old / "a.txt").write_text("old")
    removed = clean_leftovers(target)
    assert [p.name for p in removed] == [".run.new-abc"]
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def _version(rank: int) -> nn.Module:
    """Two versions differ in rank, so a torn pair (config of one, weights of the other)
    cannot load anywhere."""
    torch.manual_seed(0)
    model = Mlp().eval()
    add_lora(model, LoraConfig(r=rank, alpha=2 * rank, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1 * rank)
    return model


def _save_forever(folder: str, ready) -> None:
    torch.set_num_threads(1)
    models = [_version(2), _version(4)]
    ready.set()
    i = 0
    while True:
        save_adapter(models[i % 2], folder)
        i += 1


def _outputs(x: torch.Tensor) -> list[torch.Tensor]:
    return [m(x).detach() for m in (_version(2), _version(4))]


def test_kill_9_during_saves_leaves_old_or_new_for_lorakit_and_peft(tmp_path, child_processes):
    folder = tmp_path / "adapter"
    x = torch.randn(3, 10)
    expected = _outputs(x)
    save_adapter(_version(2), folder)
    rng = random.Random(0)
    seen = set()
    for _ in range(TRIALS):
        ready = child_processes.Event()
        child = child_processes.Process(target=_save_forever, args=(str(folder), ready))
        child.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        clean_leftovers(folder)  # what the next save does first
        assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        torch.manual_seed(0)
        ours = load_adapter(Mlp().eval(), folder)(x)
        torch.manual_seed(0)
        theirs = PeftModel.from_pretrained(Mlp().eval(), folder)(x)
        match = {i for i, e in enumerate(expected) if torch.allclose(ours, e, atol=1e-6)}
        assert match, "the folder holds neither version"
        seen |= match
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert seen == {0, 1}, "the children never finished a save: the kills tested nothing"


def test_full_disk_during_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    save_adapter(_version(2), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full(path, data, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)  # the JSON, after the weights were written
    with pytest.raises(LoraError, match="No space left on device.*unchanged"):
        save_adapter(_version(4), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# --- symbolic links, file modes, writing errors ---------------------------------------------------
def test_a_symlinked_target_is_written_through_and_stays_a_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("old")
    (real / "notes.txt").write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic_folder(link) as new:
        (new / "a.txt").write_text("new")
    assert link.is_symlink() and link.resolve() == real
    assert (real / "a.txt").read_text() == "new"
    assert (real / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_an_adapter_saved_through_a_symlink_lands_where_it_points(tmp_path):
    real = tmp_path / "adapters" / "v1"
    link = tmp_path / "current"
    link.symlink_to(real)  # dangling until the first save
    save_adapter(_version(2), link)
    save_adapter(_version(4), link)  # and again, over the first
    assert link.is_symlink() and link.resolve() == real
    assert json.loads((real / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "current"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["v1"]


def test_a_loop_of_links_is_refused_by_name(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(LoraError) as error, atomic_folder(tmp_path / "a"):
        pass
    assert str(error.value).startswith(f"{tmp_path / 'a'} is a symbolic link that leads nowhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize(
    ("umask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]
)
def test_written_files_get_the_modes_of_the_umask(tmp_path, umask, file_mode, folder_mode):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("kept")
    os.chmod(target / "old.txt", 0o640)  # the user's choice for a file the write keeps
    old_umask = os.umask(umask)
    try:
        with atomic_folder(target) as new:
            save_file({"w": torch.zeros(2)}, new / "model.safetensors")  # owner-only by itself
            (new / "sub").mkdir()
            save_file({"w": torch.zeros(2)}, new / "sub" / "state.safetensors")
            (new / "config.json").write_text("{}")
    finally:
        os.umask(old_umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.rglob("*")}
    assert modes == {
        "model.safetensors": file_mode,
        "state.safetensors": file_mode,
        "config.json": file_mode,
        "sub": folder_mode,
        "old.txt": 0o640,
    }


def test_without_keep_rest_the_new_version_replaces_the_folder_whole(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_folder(target, keep_rest=False) as new:
        (new / "a.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.parametrize(
    ("error", "problem"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device"),
            "No space left on device",
        ),
        (
            OSError(errno.EDQUOT, "Disk quota exceeded"),
            "Disk quota exceeded",
        ),
        (
            SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            ),
            "No space left on device",
        ),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied"),
    ],
)
def test_write_errors_are_one_line_naming_the_problem(error, problem):
    with pytest.raises(LoraError) as raised, write_errors("the thing to /x", "; fix it."):
        raise error
    assert str(raised.value) == f"Could not write the thing to /x ({problem}); fix it."
    assert raised.value.__cause__ is error


def test_write_errors_leave_a_bug_as_it_is():
    bug = SafetensorError("You are trying to save a non contiguous tensor")
    with pytest.raises(SafetensorError), write_errors("x", "."):
        raise bug


def test_a_full_real_disk_is_one_line_and_leaves_nothing(small_disk):  # noqa: F811
    (small_disk / "kept").mkdir()
    (small_disk / "kept" / "a.txt").write_text("old")
    before = files_on(small_disk)
    with (
        pytest.raises(LoraError) as error,
        write_errors("the weights", "; nothing was left."),
        atomic_folder(small_disk / "kept") as new,
    ):
        save_file({"w": torch.zeros(64 * 1024)}, new / "w.safetensors")  # 256 KiB
    assert str(error.value) == (
        "Could not write the weights (No space left on device); nothing was left."
    )
    assert files_on(small_disk) == before
    assert (small_disk / "kept" / "a.txt").read_text() == "old"


# --- the writers built on atomic_folder: merged models, run adapters ------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")


def test_a_merged_model_folder_has_the_modes_of_the_umask(tmp_path):
    from lorakit.models.load import save_model_folder

    old = os.umask(0o022)
    try:
        save_model_folder(tiny.llama(), _tokenizer(), tmp_path / "merged")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_a_merged_model_on_a_full_disk_is_one_line_and_leaves_nothing(
    small_disk,  # noqa: F811
):
    from lorakit.models.load import save_model_folder

    out = small_disk / "merged"
    with pytest.raises(LoraError) as error:
        save_model_folder(tiny.llama(), _tokenizer(), out)
    assert str(error.value) == (
        f"Could not write the model to {out} (No space left on device); "
        "nothing was left there. Free space or choose another folder."
    )
    assert files_on(small_disk) == []


def test_a_runs_adapter_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    import lorakit.training.run_folder as run_folder
    from lorakit.generate import GenerationSettings

    folder = tmp_path / "run"
    run_folder.save_adapter_folder(_version(2), folder, "default", GenerationSettings())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full(model, new, name):
        (new / "adapter_model.safetensors").write_bytes(b"half")
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(run_folder, "write_adapter_files", full)
    with pytest.raises(LoraError) as error:
        run_folder.save_adapter_folder(_version(4), folder, "default", GenerationSettings())
    assert str(error.value) == (
        f"Could not write the adapter to {folder} (No space left on device); "
        "what was there before is unchanged. Free space, then run again (with --resume OUTPUT "
        "if the run saved checkpoints)."
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
