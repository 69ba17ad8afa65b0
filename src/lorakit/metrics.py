"""What a training run records: metrics.jsonl, optional TensorBoard, the loss-curve PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .errors import LoraError

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class Metrics:
    """Train and eval losses: kept in memory, appended to metrics.jsonl, optionally TensorBoard."""

    def __init__(self, output: Path, start_step: int, tensorboard: bool, is_main: bool) -> None:
        self.path = output / METRICS_FILE
        self.is_main = is_main
        self.train_losses: dict[int, float] = {}
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

    def train(self, step: int, loss: float, lr: float, grad_norm: float, tok_per_s: float) -> None:
        self.train_losses[step] = loss
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
        self._write({**record, "tokens_per_s": round(tok_per_s, 1)})
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def eval(self, step: int, loss: float) -> None:
        self.eval_losses[step] = loss
        self._write({"step": step, "eval_loss": loss, "perplexity": math.exp(min(loss, 50))})
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", loss, step)
        if self.is_main:
            tqdm.write(f"step {step}: eval loss {loss:.4f}")

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(list(self.train_losses), list(self.train_losses.values()), label="train")
        if self.eval_losses:
            ax.plot(list(self.eval_losses), list(self.eval_losses.values()), "o-", label="eval")
        ax.set(xlabel="step", ylabel="loss", yscale="log", title="lorakit train")
        ax.legend()
        fig.tight_layout()
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
