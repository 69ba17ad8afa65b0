"""What a run prints: its settings, its effective batch, and the before/after table."""

from __future__ import annotations

from collections.abc import Sized

from .config import TrainConfig
from .distributed import Dist


def log(message: str, is_main: bool) -> None:
    """A line above the progress bar, on rank 0 only."""
    if is_main:
        from tqdm import tqdm

        tqdm.write(message)


def short(text: str, width: int = 60) -> str:
    """``text`` quoted, cut to ``width`` characters."""
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def describe_parallel(config: TrainConfig, dist: Dist, tasks: int = 1) -> str:
    """The effective batch: processes x batch x accumulation (x tasks), and the model's spread.

    With several tasks every micro-batch holds ``batch_size`` rows of each task, so a step
    takes ``tasks`` times as many rows.
    """
    mode = "FSDP2 (fully_shard)" if dist.fsdp else "DDP"
    if not dist.enabled:
        mode = "one process"
    per_task = dist.world_size * config.batch_size * config.grad_accum
    counts = (
        f"{dist.world_size} process(es) x batch {config.batch_size} x grad-accum "
        f"{config.grad_accum}"
    )
    if tasks == 1:
        return f"{mode}: {counts} = {per_task} sequences per step, on {dist.device}"
    return (
        f"{mode}: {counts} x {tasks} tasks = {per_task * tasks} rows per step "
        f"({per_task} per task), on {dist.device}"
    )


def bar_label(is_main: bool, test: Sized, what: str) -> str | None:
    """The label of an exact-match progress bar (rank 0 only)."""
    return f"exact match, {what} ({len(test)} greedy replies)" if is_main else None


def describe(config: TrainConfig) -> str:
    """The ``config:`` line: the settings that shape a run."""
    keys = ("model", "data", "max_steps", "epochs", "batch_size", "grad_accum", "seq_len")
    keys += ("lr", "schedule", "warmup_steps", "rank", "alpha", "dropout", "targets", "seed")
    values = config.to_dict()
    if config.tasks:
        keys = ("model", "tasks", *keys[2:])
    return "config: " + ", ".join(f"{k}={values[k]}" for k in keys)


def print_table(
    before: dict[str, float],
    after: dict[str, float],
    eval_losses: dict,
    shape: tuple[int, int] | None = None,
) -> None:
    """Print the before/after table of a training run (the CLI's user output).

    ``shape``: (hits, total) of :func:`shape_matches`, a row for the answers ``generate`` gives.
    """
    rows = []
    if "exact_match" in before or "exact_match" in after:
        rows.append(
            (
                "exact match (test)",
                f"{before['exact_match']:.0%}" if "exact_match" in before else "-",
                f"{after['exact_match']:.0%}" if "exact_match" in after else "-",
            )
        )
    if eval_losses:
        first, last = min(eval_losses), max(eval_losses)
        rows.append(
            (
                "val loss",
                f"{eval_losses[first]:.4f}" if first == 0 else "-",
                f"{eval_losses[last]:.4f}",
            )
        )
    if shape is not None:
        rows.append(("JSON shape, generate", "-", f"{shape[0]}/{shape[1]}"))
    print(f"\n{'':<22}{'before':>10}{'after':>10}")
    for name, b, a in rows:
        print(f"{name:<22}{b:>10}{a:>10}")
    if shape is not None:
        print(
            f"(JSON shape: {shape[1]} test requests with no system prompt, prompted as "
            "`lorakit generate` does with the saved settings)"
        )
    print()
