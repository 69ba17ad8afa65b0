"""``lorakit train``: fine-tune an adapter, in one process or under torchrun.

The flags are generated from :class:`lorakit.training.config.TrainConfig`, so the YAML keys,
the flags and their defaults in ``--help`` cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import LoraError
from .common import set_threads

# --- train ----------------------------------------------------------------------------------------


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from ..training.config import iter_config_help

    parser.add_argument(
        "config", nargs="?", default=None, help="YAML file with the same keys; flags override it"
    )
    for name, default, help_text in iter_config_help():
        flag = "--" + name.replace("_", "-")
        # SUPPRESS: only flags given on the command line reach the config, over the YAML file.
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": name}
        shown = ",".join(default) if isinstance(default, list) else default
        kwargs["help"] = f"{help_text} (default: {shown})".replace("%", "%%")
        flags = [flag]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, list):
            # Comma-separated and repeatable: --task a=x.jsonl --task b=y.jsonl.
            kwargs["type"] = lambda s: [t.strip() for t in s.split(",") if t.strip()]
            kwargs["action"] = "extend"
            flags += [flag.removesuffix("s")] if flag.endswith("s") else []
        elif isinstance(default, (int, float)):
            kwargs["type"] = type(default)
        parser.add_argument(*flags, **kwargs)
    parser.add_argument(
        "--demo",
        choices=["vlm"],
        default=None,
        help="vlm: the vision-language demo (a SmolVLM-shaped model assembled from the bundled "
        "SmolLM2 learns to name coloured shapes); without it and --data, the text demo",
    )
    parser.add_argument(
        "--nproc",
        type=_process_count,
        default=1,
        help="processes (GPUs) on this machine: launches torchrun --nproc-per-node N for you; "
        "for several machines run torchrun -m lorakit train yourself (see docs/distributed.md)",
    )


def _process_count(text: str) -> int:
    """``--nproc``: a whole number of processes, at least 1."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of processes, 1 or more: {text}")
    return count


def _flags(overrides: dict[str, Any]) -> list[str]:
    """Command-line flags that give ``overrides`` back (for relaunching under torchrun)."""
    flags = []
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, ",".join(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def _launch(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Run this same ``lorakit train`` in ``args.nproc`` processes under torchrun."""
    import subprocess
    import sys

    if "WORLD_SIZE" in os.environ:
        raise LoraError(
            "--nproc given inside a torchrun launch; drop --nproc (torchrun sets the processes)."
        )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(args.nproc), "-m", "lorakit", "train"]
    command += ([args.config] if args.config else []) + _flags(overrides)
    command += ["--debug"] if getattr(args, "debug", False) else []  # each process shows its own
    return subprocess.run(command, check=False).returncode


def run_train(args: argparse.Namespace) -> int:
    """Fine-tune a LoRA adapter (no arguments: the bundled model on the bundled demo task).

    Under torchrun (or with --nproc N) it trains data-parallel: DDP, or FSDP2 with --fsdp.
    --resume OUTPUT alone continues that run with its own settings.

    Prints the settings, a progress bar and, at the end, a before/after table; writes the
    adapter, generation_settings.json (system prompt, chat template), metrics.jsonl, loss.png,
    train_config.yaml and checkpoints to --output.
    """
    from ..training.config import config_fields, resolve_config
    from ..training.inputs import check_inputs
    from ..training.loop import train

    overrides = {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}
    if args.demo == "vlm":
        from ..vlm.demo import demo_config

        config = demo_config(args.config, overrides)
    else:
        config = resolve_config(args.config, overrides)  # bad settings fail here, before launching
    from ..vlm.modality import choose_modality

    # Settings the road does not implement fail here, before any launch or load.
    choose_modality(config.model, config.data).refuse(config, args.nproc)
    if args.nproc > 1:
        check_inputs(config)  # every process would find the same problem, after a model load
        return _launch(args, overrides)
    set_threads()
    result = train(config)
    if "RANK" not in os.environ or os.environ["RANK"] == "0":
        print(f"done: {result.steps} steps, adapter in {result.output}")
    return 0


COMMANDS = {"train": (_train_arguments, run_train)}
