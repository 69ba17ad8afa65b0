"""What a run records: metrics.jsonl and the loss plot, on a full disk and after a kill."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from disk import files_on, small_disk  # noqa: F401

from lorakit import LoraError
from lorakit.training.metrics import METRICS_FILE, PLOT_FILE, Metrics


def test_a_line_the_disk_cuts_short_is_taken_back(tmp_path, monkeypatch):
    metrics = Metrics(tmp_path, 0, tensorboard=False, is_main=True)
    metrics.train(1, 2.0, 1e-3, 0.5, 100.0)
    written = (tmp_path / METRICS_FILE).read_bytes()
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real(fd, data[:7]))  # the disk fills
    with pytest.raises(LoraError) as error:
        metrics.train(2, 1.5, 1e-3, 0.5, 100.0)
    assert str(error.value) == (
        f"Could not write the metrics to {tmp_path / METRICS_FILE} (No space "
        f"left on device). Free space, then run again (or go on from a checkpoint: --resume "
        f"{tmp_path})."
    )
    assert (tmp_path / METRICS_FILE).read_bytes() == written  # no half line for a resume


def test_a_resume_keeps_whole_records_up_to_its_step_and_drops_a_cut_line(tmp_path):
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "eval_loss": 2.5}]
    lines.append({"step": 3, "loss": 1.0})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo'  # a kill mid-line
    (tmp_path / METRICS_FILE).write_text(text)
    metrics = Metrics(tmp_path, 2, tensorboard=False, is_main=True)
    assert metrics.train_losses == {1: 3.0, 2: 2.0} and metrics.eval_losses == {2: 2.5}
    kept = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert kept == lines[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


def test_a_plot_on_a_full_disk_is_one_line_and_leaves_no_part(tmp_path, monkeypatch):
    import matplotlib.figure

    metrics = Metrics(tmp_path, 0, tensorboard=False, is_main=True)
    metrics.train(1, 2.0, 1e-3, 0.5, 100.0)

    def full(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(LoraError) as error:
        metrics.plot(tmp_path / PLOT_FILE)
    assert str(error.value) == (
        f"Could not write the loss plot {tmp_path / PLOT_FILE} (No space left "
        f"on device); its numbers are all in {tmp_path / METRICS_FILE}. Free space to have the "
        "plot next time."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


def test_metrics_on_a_real_full_disk(small_disk):  # noqa: F811
    metrics = Metrics(small_disk, 0, tensorboard=False, is_main=True)
    (small_disk / "filler").write_bytes(b"x" * 60 * 1024)
    with pytest.raises(LoraError, match="No space left on device"):
        for step in range(1, 10_000):
            metrics.train(step, 1.0, 1e-3, 0.5, 100.0)
    for line in (small_disk / METRICS_FILE).read_text().splitlines():
        assert json.loads(line)["loss"] == 1.0  # every line whole
    with pytest.raises(LoraError, match=r"Could not write the loss plot .*No space left on device"):
        metrics.plot(small_disk / PLOT_FILE)
    assert files_on(small_disk) == ["filler", METRICS_FILE]
