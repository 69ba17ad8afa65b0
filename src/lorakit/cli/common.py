"""Helpers shared by the subcommands: cheap input checks, ``--adapter NAME=DIR`` values,
status lines, adapter loading, the generation settings in use, threads, and reading a chat
message.

Everything here that runs before a model loads stays cheap (file system and JSON only), so a
wrong path or flag is reported in a second, not after the model has loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LoraError

if TYPE_CHECKING:
    from torch import nn

    from ..data import DataFile

ADAPTER_CONFIG = "adapter_config.json"
_SEPARATORS = {"/", os.sep}  # in a path, never in an adapter name


def status(message: str) -> None:
    """A line on stderr saying what is happening (results go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def check_adapter_folder(folder: str | Path, flag: str = "--adapter") -> Path:
    """``folder`` if it holds an adapter (``adapter_config.json``), else a ``LoraError``."""
    path = Path(folder)
    if not (path / ADAPTER_CONFIG).is_file():
        raise LoraError(
            f"{flag} {folder}: not an adapter folder (no {ADAPTER_CONFIG}). Pass the --output "
            "folder of lorakit train, a checkpoint folder, or a PEFT adapter folder."
        )
    return path


def check_model_spec(spec: str, flag: str = "--model") -> str:
    """The resolved model spec (see ``lorakit.models.resolve_model_spec``); the flag is named."""
    from ..models.load import resolve_model_spec

    try:
        return resolve_model_spec(spec)
    except LoraError as error:
        message = str(error)
        if not message.startswith(f"{spec}: "):  # the spec named once, not twice
            message = f"{spec}: {message}"
        raise LoraError(f"{flag} {message}") from None


def check_data_file(
    path: str | Path,
    data_format: str | None = None,
    flag: str = "--data",
    skip_bad_records: bool = False,
) -> DataFile:
    """A data file, read and checked before any model loads (see ``lorakit.data.read_data``)."""
    from ..data import read_data

    if not Path(path).is_file():
        raise LoraError(f"{flag} {path}: file not found; pass an existing JSON/JSONL file.")
    return read_data(path, data_format, skip_bad_records=skip_bad_records)


def check_empty_output(path: str | Path, flag: str = "--output") -> Path:
    """``path`` if it does not exist or is an empty folder (a new model folder goes there)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraError(f"{flag} {out} exists and is not empty; pass a new folder.")
    return out


def check_size(rank: int | None, energy: float | None) -> None:
    """``--rank`` a positive integer, ``--energy`` in (0, 1]."""
    if rank is not None and rank <= 0:
        raise LoraError(f"--rank must be a positive integer, got {rank}.")
    if energy is not None and not 0 < energy <= 1:
        raise LoraError(f"--energy must be in (0, 1], e.g. 0.9, got {energy}.")


def recorded_base(folder: str | Path) -> str | None:
    """The base model an adapter folder records (``base_model_name_or_path``), if any."""
    try:
        config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return base if isinstance(base, str) and base else None


def load_adapters(model: nn.Module, adapters: dict[str, str], model_name: str) -> None:
    """Load each ``name -> folder`` adapter onto ``model``, saying so when ``model`` is not the
    base it records (``load_adapter`` refuses, in a few lines, a base that does not fit)."""
    from ..io import load_adapter

    for name, folder in adapters.items():
        note_other_base(folder, model_name)
        load_adapter(model, folder, adapter_name=name)


def note_other_base(folder: str | Path, model_name: str) -> None:
    """A status line when an adapter records a base model other than ``model_name``."""
    base = recorded_base(folder)
    if base and base != model_name and _as_spec(base) != model_name:
        status(f"note: adapter {folder} records base model {base}; loading it onto {model_name}")


def _as_spec(base: str) -> str:
    """A recorded base as lorakit names it once loaded (a GGUF's converted folder: the GGUF)."""
    from ..models.load import resolve_model_spec

    try:
        return resolve_model_spec(base)
    except LoraError:
        return base


def model_name(model: Any, spec: str) -> str:
    """How to name a loaded model in messages: the spec it resolved to."""
    return str(getattr(model, "name_or_path", None) or spec)


def set_threads() -> None:
    """Torch threads for a command that loads a model: every core, shared among the
    processes torchrun started on this machine, unless ``OMP_NUM_THREADS`` says otherwise.

    Raises:
        LoraError: ``LOCAL_WORLD_SIZE`` is set but not a whole number of at least 1.
    """
    import torch

    from ..training.distributed import launcher_int

    if os.environ.get("OMP_NUM_THREADS"):
        return  # the user's choice (torch already follows it)
    # The run is compute-bound and nothing else of ours needs the CPU.
    local_processes = launcher_int("LOCAL_WORLD_SIZE", 1)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))


def parse_named_adapters(values: list[str]) -> dict[str, str]:
    """``["a=DIR1", "b=DIR2"]`` -> ``{"a": "DIR1", "b": "DIR2"}``; a bare DIR is named "default".

    An existing path wins over NAME=DIR, so ``runs/lr=0.01`` is a folder when it exists; so is
    a value whose part before ``=`` holds a path separator (no adapter name does).
    """
    named: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or Path(value).exists() or any(s in name for s in _SEPARATORS):
            name, folder = "default", value
        if not name or not folder or name in named:
            raise LoraError(
                f"--adapter {value!r}: give each adapter once as NAME=DIR (e.g. --adapter a=runs/a)."
            )
        named[name] = folder
    return named


def adapter_folders(args: argparse.Namespace) -> dict[str, str]:
    """``--adapter`` values as name -> folder, each checked; ``--model`` may be a run folder."""
    given = args.adapter
    if given is None and args.model and (Path(args.model) / ADAPTER_CONFIG).is_file():
        given = [args.model]  # a lorakit train output: its base model and its adapter
    adapters = parse_named_adapters(given or [])
    for folder in adapters.values():
        check_adapter_folder(folder)
    return adapters


def generation_settings(args: argparse.Namespace, adapters: dict[str, str]) -> Any:
    """The system prompt and chat template to use: the flags, else those saved with the
    adapters in use (or with the model folder), else none and the model's own template."""
    from ..data import read_chat_template
    from ..generate import GENERATION_FILE, GenerationSettings, read_generation_settings

    # merge has no --system / --chat-template: the saved ones always go into its folder.
    system_flag = getattr(args, "system", None)
    template_flag = getattr(args, "chat_template", None)
    names = [n.strip() for n in args.use.split(",")] if args.use else list(adapters)[-1:]
    folders = [adapters[n] for n in names if n in adapters] or [args.model or ""]
    # A folder without the file (a PEFT adapter, an old run) has no say.
    saved = {
        f: read_generation_settings(f)
        for f in folders
        if f and (Path(f) / GENERATION_FILE).is_file()
    }
    system = template = None
    if system_flag is not None:
        system = system_flag or None  # '' turns the saved one off
    else:
        systems = {s.system for s in saved.values()}
        if len(systems) > 1:
            raise LoraError(
                f"The adapters in use were trained with different system prompts "
                f"({', '.join(map(str, saved))}); pass --system to choose one ('' for none)."
            )
        system = systems.pop() if systems else None
    if template_flag is None:
        templates = {s.chat_template for s in saved.values()}
        if len(templates) > 1:
            raise LoraError(
                "The adapters in use were trained with different chat templates; pass "
                "--chat-template FILE to choose one."
            )
        template = templates.pop() if templates else None
    else:
        template = read_chat_template(template_flag)
    return GenerationSettings(system, template)


def read_message(prompt: str = "> ") -> str | None:
    """The user's next chat message from stdin (``chat`` only); ``None`` ends the chat: an
    empty line, end of input or Ctrl-C."""
    try:
        text = input(prompt).strip()
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    return text or None


def check_adapter_output(path: str | Path) -> Path:
    """``--output`` of the commands that write an adapter folder (``extract``, ``resize``,
    ``combine``, ``export --to vllm``): a new or empty folder, or an adapter folder
    (its adapter is replaced, its other files kept); checked before any model loads.

    Raises:
        LoraError: a file, or a non-empty folder of another kind (a model, a training run,
            anything without an adapter), which the adapter's files would be mixed into.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise LoraError(f"--output {out} is a file; pass a folder (it is created if missing).")
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if not names:
        return out
    weights = any(n.startswith(("model", "pytorch_model")) or n.endswith(".gguf") for n in names)
    if ADAPTER_CONFIG not in names:
        kind = "is not empty and holds no adapter"
    elif names & {"train_config.yaml", "checkpoints"}:
        kind = "holds a run of lorakit train (its adapter, settings and checkpoints)"
    elif "config.json" in names or weights:
        kind = "holds a model"
    else:
        return out
    raise LoraError(
        f"--output {out} {kind}; the adapter written there would be mixed with it. Pass a new "
        "or empty folder, or an adapter folder to replace."
    )
