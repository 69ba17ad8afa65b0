"""What a training run records: metrics.jsonl, the trackers asked for (TensorBoard, W&B,
MLflow: :mod:`.trackers`), the loss-curve PNG."""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..atomic import write_errors
from .trackers import Tracker, open_trackers

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Metrics:
    """Train and eval losses: kept in memory, appended to metrics.jsonl, sent to the trackers.

    A multi-task run also logs each task's loss (``task_loss``: name -> loss); ``loss`` is
    their sum, the quantity the step minimises.
    """

    def __init__(
        self,
        output: Path,
        start_step: int,
        tensorboard: bool,
        is_main: bool,
        report_to: Sequence[str] = (),
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """``report_to``: the trackers that also get every scalar (``--tensorboard`` is
        ``tensorboard`` among them) and the run's ``settings`` (:mod:`.trackers`)."""
        self.path = output / METRICS_FILE
        self.is_main = is_main
        self.train_losses: dict[int, float] = {}
        self.task_losses: dict[str, dict[int, float]] = {}
        self.eval_losses: dict[int, float] = {}
        self.trackers: list[Tracker] = []
        if not is_main:
            return
        if self.path.is_file():
            self._keep_until(start_step)
        names = [*report_to, *(["tensorboard"] if tensorboard else [])]
        self.trackers = open_trackers(names, output, settings or {}, start_step)

    def _keep_until(self, start_step: int) -> None:
        """A resumed run keeps the records up to its start and replaces the rest; a line a
        full disk or a kill cut short is dropped."""
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, TypeError, KeyError):
                continue
            if step <= start_step:
                kept.append(line)
                losses = self.train_losses if "loss" in record else self.eval_losses
                losses[step] = record.get("loss", record.get("eval_loss"))
                for task, loss in record.get("task_loss", {}).items():
                    self.task_losses.setdefault(task, {})[step] = loss
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with write_errors(f"the metrics to {self.path}", self._then):
            try:
                tmp.write_text("".join(f"{line}\n" for line in kept))
                tmp.replace(self.path)  # a crash here keeps the old history whole
            finally:
                tmp.unlink(missing_ok=True)

    @property
    def _then(self) -> str:
        return f". Free space, then run again (or go on from a checkpoint: --resume {self.path.parent})."

    def _write(self, record: dict[str, Any]) -> None:
        """Append one line; a write the disk cuts short is taken back, so no half line stays."""
        if not self.is_main:
            return
        data = (json.dumps(record) + "\n").encode()
        with write_errors(f"the metrics to {self.path}", self._then):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                start = os.fstat(fd).st_size
                try:
                    if os.write(fd, data) < len(data):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # full mid-line
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)

    def train(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tok_per_s: float,
        task_losses: dict[str, float] | None = None,
    ) -> None:
        """Record one optimizer step; ``task_losses``: each task's loss in a multi-task run."""
        self.train_losses[step] = loss
        record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        record["tokens_per_s"] = round(tok_per_s, 1)
        if task_losses:
            record["task_loss"] = dict(task_losses)
            for task, value in task_losses.items():
                self.task_losses.setdefault(task, {})[step] = value
        self._write(record)
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}
        scalars["train/tokens_per_s"] = record["tokens_per_s"]
        scalars.update({f"train/loss_{t}": v for t, v in (task_losses or {}).items()})
        self._track(scalars, step)

    def _track(self, scalars: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def eval(self, step: int, loss: float) -> None:
        """Log the validation loss at ``step`` (and its perplexity, exp(loss) capped at e^50)."""
        self.eval_losses[step] = loss
        perplexity = math.exp(min(loss, 50))
        self._write({"step": step, "eval_loss": loss, "perplexity": perplexity})
        self._track({"eval/loss": loss, "eval/perplexity": perplexity}, step)
        if self.is_main:
            tqdm.write(f"step {step}: eval loss {loss:.4f}")

    def figure(self) -> Any:
        """The loss curves as a matplotlib figure: integer steps, loss on a log axis labelled
        with plain numbers (0.5, 2), one line per task in a multi-task run."""
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogFormatter, MaxNLocator

        class PlainLog(LogFormatter):
            """matplotlib's choice of labelled ticks, written as 0.04 instead of 4×10⁻²."""

            def __call__(self, x: float, pos: int | None = None) -> str:
                return f"{x:.6g}" if super().__call__(x, pos) else ""

        fig, ax = plt.subplots(figsize=(6, 4))
        train_label = "train (sum of tasks)" if self.task_losses else "train"
        ax.plot(list(self.train_losses), list(self.train_losses.values()), label=train_label)
        for task, losses in self.task_losses.items():
            ax.plot(list(losses), list(losses.values()), "--", label=f"train {task}")
        if self.eval_losses:
            ax.plot(list(self.eval_losses), list(self.eval_losses.values()), "o-", label="eval")
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="lorakit train")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(PlainLog())
        ax.yaxis.set_minor_formatter(PlainLog(labelOnlyBase=False))
        ax.legend()
        fig.tight_layout()
        return fig

    def plot(self, path: Path) -> None:
        """Write :meth:`figure` as a PNG (temporary name, then renamed).

        Raises:
            LoraError: a full disk or no permission; no part of the file is left.
        """
        import matplotlib.pyplot as plt

        fig = self.figure()
        tmp = path.with_name(f".{path.stem}.tmp.png")
        then = f"; its numbers are all in {self.path}. Free space to have the plot next time."
        try:
            with write_errors(f"the loss plot {path}", then):
                fig.savefig(tmp, dpi=100)
                tmp.replace(path)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Flush and close the trackers, if any; ``metrics.jsonl`` needs no closing."""
        for tracker in self.trackers:
            tracker.close()
