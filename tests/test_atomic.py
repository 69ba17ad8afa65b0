"""Folders replaced as one unit: complete-old or complete-new at any kill -9 or full disk."""

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter
from lorakit.atomic import atomic_folder, clean_leftovers

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
