"""What a training run records: metrics.jsonl, optional TensorBoard, the loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import LoraError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Metrics:
    """Train and eval losses: kept in memory, appended to metrics.jsonl, optionally TensorBoard.

    A multi-task run also logs each task's loss (``task_loss``: name -> loss); ``loss`` is
    their sum, the quantity the step minimises.
    """

    def __init__(self, output: Path, start_step: int, tensorboard: bool, is_main: bool) -> None:
        self.path = output / METRICS_FILE
        self.is_main = is_main
        self.train_losses: dict[int, float] = {}
        self.task_losses: dict[str, dict[int, float]] = {}
        self.eval_losses: dict[int, float] = {}
        self.writer = None
        if not is_main:
            return
        if self.path.is_file():
            # A resumed run keeps the records up to its start and replaces the rest.
            kept = []
            for line in self.path.read_text().splitlines():
                record = json.loads(line)
                if record["step"] <= start_step:
                    kept.append(line)
                    losses = self.train_losses if "loss" in record else self.eval_losses
                    losses[record["step"]] = record.get("loss", record.get("eval_loss"))
                    for task, loss in record.get("task_loss", {}).items():
                        self.task_losses.setdefault(task, {})[record["step"]] = loss
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            tmp.replace(self.path)  # a crash here keeps the old history whole
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise LoraError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from error
            self.writer = SummaryWriter(str(output / "tensorboard"))

    def _write(self, record: dict[str, Any]) -> None:
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

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
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            for task, value in (task_losses or {}).items():
                self.writer.add_scalar(f"train/loss_{task}", value, step)

    def eval(self, step: int, loss: float) -> None:
        """Log the validation loss at ``step`` (and its perplexity, exp(loss) capped at e^50)."""
        self.eval_losses[step] = loss
        self._write({"step": step, "eval_loss": loss, "perplexity": math.exp(min(loss, 50))})
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", loss, step)
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
        """Write :meth:`figure` as a PNG (temporary name, then renamed)."""
        import matplotlib.pyplot as plt

        fig = self.figure()
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any; ``metrics.jsonl`` needs no closing."""
        if self.writer is not None:
            self.writer.close()
