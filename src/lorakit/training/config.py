"""``TrainConfig``: the settings of ``lorakit train``, one source for YAML keys, flags and help.

Each field's default and ``--help`` text live here (field metadata); ``resolve_config`` reads
an optional YAML file and applies the flags on top; with no data the bundled demo task and
its tuned settings (``DEMO_DEFAULTS``) are used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ALL_LINEAR, LoraConfig
from ..errors import LoraError, brief
from ..models.load import DEFAULT_MODEL
from .aliases import suggest_key
from .run_folder import (
    CHECKPOINTS,
    CONFIG_FILE,
    latest_checkpoint,
    read_run_config,
    read_yaml_mapping,
)
from .trackers import tracker_problems

SCHEDULES = ("cosine", "linear", "constant")


def _opt(default: Any, help: str) -> Any:
    """A config field whose ``help`` becomes its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything ``lorakit train`` needs; the fields are its YAML keys and flags."""

    # --- model and data
    model: str = _opt(DEFAULT_MODEL, "base model: HF folder, .gguf file or smollm2-135m")
    dtype: str = _opt(
        "auto",
        "base weights: auto (bfloat16 on a CUDA GPU that has it, else float32), float32, "
        "bfloat16 or float16; adapters stay float32",
    )
    quantize: str | None = _opt(
        None, "load the base quantized by bitsandbytes: nf4 (4-bit, QLoRA) or int8"
    )
    trust_remote_code: bool = _opt(
        False, "run the Python code a model folder ships (auto_map); without it it is refused"
    )
    data: str | None = _opt(
        None,
        "training data: JSON/JSONL, CSV, Parquet or a datasets save_to_disk folder; none = "
        "the bundled demo task",
    )
    tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "NAME=FILE, repeated: one adapter per task, batches mix the tasks"},
    )
    val_data: str | None = _opt(None, "validation data file")
    val_fraction: float = _opt(0.0, "hold out this fraction of --data for validation")
    test_data: str | None = _opt(None, "chat/alpaca file for the before/after exact-match table")
    format: str | None = _opt(None, "data format: alpaca, chat, sharegpt, text or images (auto)")
    system: str | None = _opt(
        None,
        "system prompt for conversations without one; saved with the adapter for generate, "
        "chat and eval (none given: the one every training conversation shares, if any)",
    )
    chat_template: str | None = _opt(
        None, "Jinja chat template file to use instead of the model's own; saved with the adapter"
    )
    seq_len: int = _opt(512, "cut sequences to this many tokens")
    train_on_prompt: bool = _opt(False, "put loss on prompt tokens too")
    packing: bool = _opt(False, "pack several examples into each sequence")
    skip_bad_records: bool = _opt(
        False, "skip malformed data records (counted and reported) instead of stopping at one"
    )
    output: str = _opt("runs/lorakit", "output folder: adapter, metrics, plot, checkpoints")
    # --- LoRA
    rank: int = _opt(16, "LoRA rank r")
    alpha: float = _opt(32.0, "LoRA alpha (scale = alpha / r)")
    dropout: float = _opt(0.05, "dropout on the LoRA input")
    targets: list[str] = field(
        default_factory=lambda: [ALL_LINEAR],
        metadata={"help": "modules to adapt, comma-separated (all-linear: MoE experts too)"},
    )
    target_parameters: list[str] = field(
        default_factory=list,
        metadata={"help": "raw parameters to adapt: MoE experts (gate_up_proj,down_proj)"},
    )
    train_projector: bool = _opt(
        False, "image data: train the vision-language model's projector in full (modules_to_save)"
    )
    train_vision: bool = _opt(
        False, "image data: LoRA on the vision encoder too (by default only the language model)"
    )
    # --- optimisation
    max_steps: int = _opt(0, "optimizer steps; 0 = from --epochs")
    epochs: float = _opt(1.0, "passes over the data when --max-steps is 0")
    batch_size: int = _opt(8, "sequences per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(2e-4, "peak learning rate")
    loraplus_ratio: float = _opt(1.0, "LoRA+: lr of B / lr of A (1 = plain LoRA, 16 typical)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (never on biases and norms)")
    schedule: str = _opt("cosine", "lr after warmup: cosine, linear or constant")
    warmup_steps: int = _opt(10, "steps of linear warmup from 0")
    max_grad_norm: float = _opt(1.0, "clip gradients to this norm (0 = off)")
    gradient_checkpointing: bool = _opt(False, "recompute activations to save memory")
    loss_chunk_tokens: int | None = _opt(
        None,
        "loss from the hidden states N tokens at a time, never the full logits; unset: 1024 "
        "where exact (a frozen plain head, no logit softcap/scale), 0: the plain loss",
    )
    bf16: bool = _opt(False, "bf16 autocast")
    compile: bool = _opt(False, "torch.compile the model (inductor); the first 2 steps compile")
    seed: int = _opt(0, "seed for init, shuffling and dropout")
    # --- evaluation, checkpoints, logging
    eval_every: int = _opt(0, "validation loss every N steps (0 = at the end only)")
    save_every: int = _opt(0, "checkpoint every N steps (0 = none)")
    keep_checkpoints: int = _opt(2, "keep the last K checkpoints")
    resume: str | None = _opt(
        None,
        "continue a run from its output folder (or one checkpoint); alone, it reads the run's "
        "own settings from there",
    )
    overwrite: bool = _opt(
        False, "replace an earlier run in --output (adapter, logs, checkpoints) instead of refusing"
    )
    tensorboard: bool = _opt(False, "also write TensorBoard logs to OUTPUT/tensorboard")
    report_to: list[str] = field(
        default_factory=list,
        metadata={
            "help": "trackers that also get the metrics and the settings, comma-separated: "
            "tensorboard, wandb (offline, OUTPUT/wandb), mlflow (file store OUTPUT/mlruns)"
        },
    )
    # --- several processes (under torchrun; see docs/distributed.md)
    fsdp: bool = _opt(False, "under torchrun: shard the frozen base with FSDP2 instead of DDP")
    dist_timeout: int = _opt(600, "under torchrun: seconds to wait for another rank, then stop")

    def __post_init__(self) -> None:
        problems = _coerce_types(self)
        if not problems:  # the ranges are only worth checking on values of the right type
            problems = _task_problems(self) + _range_problems(self) + _precision_problems(self)
            problems += tracker_problems(self.report_to)
        if problems:
            raise LoraError("Invalid training config:\n  - " + "\n  - ".join(problems))

    def task_files(self) -> dict[str, str]:
        """Task name -> data file for ``--task NAME=FILE`` (empty: one adapter on ``data``)."""
        return dict(entry.split("=", 1) for entry in self.tasks)

    def lora_config(self, base_model: str | None) -> LoraConfig:
        """The adapter's config; ``base_model`` is recorded so the adapter finds its base."""
        targets = ALL_LINEAR if self.targets == [ALL_LINEAR] else list(self.targets)
        return LoraConfig(
            r=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=targets or None,
            target_parameters=list(self.target_parameters) or None,
            base_model_name_or_path=base_model,
        )

    def to_dict(self) -> dict[str, Any]:
        """Field name -> value, in field order: what ``train_config.yaml`` holds."""
        return dataclasses.asdict(self)


def _coerce_types(config: TrainConfig) -> list[str]:
    """Bring each field to its annotated type in place; what cannot be, as problems.

    YAML reads ``1e-3`` (no dot) as a string and a CLI or API caller may pass ``"8"``: numeric
    strings are converted; anything else of the wrong type is refused by name. Floats must be
    finite (``inf`` epochs or lr would train forever or write NaNs).
    """
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind, optional = str(f.type).removesuffix(" | None"), str(f.type).endswith("| None")
        if value is None and optional:
            continue
        try:
            setattr(config, f.name, _COERCE[kind](value))
        except (TypeError, ValueError, OverflowError) as err:
            problems.append(f"{f.name} {err}, got {brief(value)}")
    return problems


def _parse_number(value: Any) -> Any:
    """A numeric string as a float (``"1e-3"``, ``" 8 "``); anything else unchanged."""
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return value


def _as_int(value: Any) -> int:
    value = _parse_number(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("must be an integer")
    return value


def _as_float(value: Any) -> float:
    value = _parse_number(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError("must be a number")
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return float(value)


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("must be true or false")
    return value


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("must be text")
    return value


def _as_list(value: Any) -> list[str]:
    """A list of names; ``"a,b"`` (a flag or a YAML string) splits at commas."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise TypeError("must be a list of names (or one comma-separated string)")
    return [item.strip() for entry in items for item in entry.split(",") if item.strip()]


_COERCE = {"int": _as_int, "float": _as_float, "bool": _as_bool, "str": _as_str}
_COERCE["list[str]"] = _as_list


_FLOAT32_MAX = 3.4028234663852886e38


def _range_problems(config: TrainConfig) -> list[str]:
    """Values of the right type that are still out of range."""
    problems = []
    positive = ("seq_len", "rank", "batch_size", "grad_accum", "keep_checkpoints")
    for name in (*positive, "dist_timeout"):
        if getattr(config, name) <= 0:
            problems.append(f"{name} must be a positive integer, got {getattr(config, name)}")
    for name in ("max_steps", "warmup_steps", "eval_every", "save_every", "loss_chunk_tokens"):
        if (getattr(config, name) or 0) < 0:  # loss_chunk_tokens None: chosen per model
            problems.append(f"{name} must be 0 or more, got {getattr(config, name)}")
    for name in ("lr", "alpha", "loraplus_ratio", "epochs"):
        if getattr(config, name) <= 0:
            problems.append(f"{name} must be positive, got {getattr(config, name)}")
    if config.lr > _FLOAT32_MAX:  # AdamW keeps its step size in float32
        problems.append(f"lr must be at most {_FLOAT32_MAX:.4g}, got {config.lr:g}")
    for name in ("weight_decay", "max_grad_norm"):
        if getattr(config, name) < 0:
            problems.append(f"{name} must be 0 or more, got {getattr(config, name)}")
    for name in ("dropout", "val_fraction"):
        if not 0 <= getattr(config, name) < 1:
            problems.append(f"{name} must be in [0, 1), got {getattr(config, name)}")
    if not 0 <= config.seed < 2**63:
        problems.append(f"seed must be in [0, 2**63), got {config.seed}")
    if config.schedule not in SCHEDULES:
        problems.append(
            f"schedule must be one of {', '.join(SCHEDULES)}, got {brief(config.schedule)}"
        )
    if not config.targets and not config.target_parameters:
        problems.append("targets is empty: name modules to adapt, e.g. q_proj,v_proj")
    if config.overwrite and config.resume:
        problems.append("--overwrite replaces the run that --resume continues: drop one of them")
    return problems


def _precision_problems(config: TrainConfig) -> list[str]:
    """``dtype`` and ``quantize`` names, and what they cannot be combined with."""
    from ..models.precision import DTYPE_CHOICES, QUANTIZATIONS

    problems = []
    if config.dtype not in DTYPE_CHOICES:
        problems.append(
            f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {brief(config.dtype)}"
        )
    if config.quantize is not None and config.quantize not in QUANTIZATIONS:
        problems.append(
            f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {brief(config.quantize)}"
        )
    if config.quantize and config.fsdp:
        problems.append("--fsdp with --quantize is not implemented: drop --fsdp to train with DDP")
    return problems


# Settings whose files or state are per adapter; multi-task runs do not support them yet.
_SINGLE_TASK_ONLY = ("data", "val_data", "test_data", "resume")


def _task_problems(config: TrainConfig) -> list[str]:
    """What is wrong with ``config.tasks`` (NAME=FILE entries, unique names, no --data)."""
    if not config.tasks:
        return []
    problems = []
    names = []
    for entry in config.tasks:
        name, _, path = entry.partition("=")
        if not name.strip() or not path.strip() or not name.replace("_", "").isalnum():
            problems.append(
                f"--task takes NAME=FILE with a letters/digits/_ name, got {brief(entry)}"
            )
        names.append(name)
    if len(set(names)) < len(names):
        problems.append(f"task names must be unique, got {brief(names)}")
    for key in _SINGLE_TASK_ONLY:
        if getattr(config, key):
            problems.append(f"--{key.replace('_', '-')} cannot be combined with --task yet")
    if config.save_every or config.val_fraction:
        problems.append("--save-every and --val-fraction cannot be combined with --task yet")
    return problems


# The demo's settings (no --data): tuned so `lorakit train` meets its accuracy target within
# its time budget on a 2-core CPU. A higher lr than the general default: 40 steps is short.
DEMO_DEFAULTS: dict[str, Any] = {
    "max_steps": 40,
    "lr": 1e-3,
    "batch_size": 8,
    "seq_len": 256,
    "warmup_steps": 5,
    "dropout": 0.0,
    "eval_every": 20,
    "save_every": 20,
}

# Settings a resumed run may change without breaking equality with an uninterrupted one.
RESUMABLE_CHANGES = {
    "resume",
    "model",  # a moved model folder: resume checks the base's fingerprint instead of its path
    "output",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "tensorboard",
    "report_to",
    "overwrite",
    "fsdp",
    "dist_timeout",
    "trust_remote_code",
    "compile",  # the same maths, compiled or not
}


def config_fields() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig`, in order (for the CLI and YAML)."""
    return list(dataclasses.fields(TrainConfig))


def resolve_config(
    yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """A config from a YAML file (optional) with ``overrides`` (the flags) on top.

    Without data in either, the bundled demo task is used with :data:`DEMO_DEFAULTS` for the
    keys neither sets. With ``resume`` and no YAML file, the run's own settings are read from
    its folder (see :func:`resumed_config`).

    Raises:
        LoraError: a missing or malformed YAML file, unknown keys (with the closest valid
            one), or flags that contradict the run being resumed.
    """
    overrides = dict(overrides or {})
    values = _read_yaml(Path(yaml_path)) if yaml_path is not None else {}
    check_keys(values, f"in {yaml_path}")
    check_keys(overrides)
    if yaml_path is None and overrides.get("resume"):
        return resumed_config(overrides)
    values.update(overrides)
    if values.get("data") is None and not values.get("tasks"):
        from ..data.demo import demo_path

        demo = {"data": str(demo_path("train")), "val_data": str(demo_path("val"))}
        demo["test_data"] = str(demo_path("test"))
        for key, value in {**demo, **DEMO_DEFAULTS}.items():
            values.setdefault(key, value)
        values["data"] = demo["data"]
    return TrainConfig(**values)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file, keys with ``-`` read as ``_``."""
    if not path.is_file():
        raise LoraError(f"Config file {path} not found; pass an existing YAML file.")
    return read_yaml_mapping(path, "Correct the file, or pass its settings as flags.")


def check_keys(values: dict[str, Any], where: str = "") -> None:
    """Refuse keys that are not :class:`TrainConfig` fields, naming the closest valid one."""
    names = [f.name for f in config_fields()]
    unknown = sorted(set(values) - set(names))
    if not unknown:
        return
    hints = []
    for key in unknown[:5]:  # a file of a million keys gets a message of five
        close = suggest_key(key[:100], names)
        shown = key if len(key) <= 60 else key[:57] + "..."
        hints.append(f"{shown} (did you mean {close}?)" if close else shown)
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    raise LoraError(
        f"Unknown config keys{' ' + where if where else ''}: {', '.join(hints)}{more}. "
        f"Valid keys: {', '.join(sorted(names))}."
    )


def resumed_config(overrides: dict[str, Any]) -> TrainConfig:
    """The config of the run ``overrides["resume"]`` continues, read from its newest checkpoint.

    Flags may change only what :func:`resume_conflicts` allows (``--output`` defaults to the
    run's own folder); any other flag that differs from the run's setting is refused by name,
    since the resumed losses would no longer equal an uninterrupted run's.

    Raises:
        LoraError: no checkpoint in the folder, a missing or damaged ``train_config.yaml``,
            or conflicting flags.
    """
    resume = str(overrides["resume"])
    checkpoint = latest_checkpoint(resume)
    saved = read_run_config(checkpoint)
    check_keys(saved, f"in {checkpoint / CONFIG_FILE}")
    # --batch-size may change with the number of processes (load_checkpoint checks the rest).
    conflicts = resume_conflicts(saved, overrides, batch_size_free=True)
    if conflicts:
        defaults = config_defaults()
        flags = ", ".join(
            f"--{key.replace('_', '-')} {_show(overrides[key])} "
            f"(the run has {_show(saved.get(key, defaults[key]))})"
            for key in conflicts
        )
        resumable = ", ".join("--" + k.replace("_", "-") for k in sorted(RESUMABLE_CHANGES))
        raise LoraError(
            f"Cannot resume {resume} with {flags}: a resumed run keeps the settings in "
            f"{checkpoint / CONFIG_FILE}, so that it continues exactly. Drop these flags to "
            "continue the run, or start a new run (a new --output, no --resume). A resume may "
            f"change only {resumable}."
        )
    # --overwrite belongs to the run that started the folder, never to its resumption.
    values = {
        **saved,
        **overrides,
        "resume": resume,
        "overwrite": overrides.get("overwrite", False),
    }
    if "output" not in overrides and checkpoint.parent.name == CHECKPOINTS:
        values["output"] = str(checkpoint.parent.parent)  # the run's folder, wherever it moved
    return TrainConfig(**values)


def resume_conflicts(
    saved: dict[str, Any], values: dict[str, Any], batch_size_free: bool = False
) -> list[str]:
    """The resume rule: the names in ``values`` (flags, or a ``to_dict()``) that a resume of
    the run whose ``train_config.yaml`` held ``saved`` may not change, in ``values``' order.

    A resumed run must train exactly as the uninterrupted one would, so only
    :data:`RESUMABLE_CHANGES` may differ, and ``batch_size`` if ``batch_size_free`` (the
    caller checks that processes x batch size stays the same). A key ``saved`` lacks is a
    setting added since: the run had its default. A saved key no field has any more differs.
    """
    defaults = config_defaults()
    free = RESUMABLE_CHANGES | ({"batch_size"} if batch_size_free else set())
    removed = sorted(set(saved) - set(defaults) - set(values))
    return [
        key
        for key in [*values, *removed]
        if key not in free and saved.get(key, defaults.get(key)) != values.get(key)
    ]


def _show(value: Any) -> str:
    """A setting as the user would type it on the command line (cut short for a message)."""
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= 100 else text[:97] + "..."


def iter_config_help() -> Iterator[tuple[str, Any, str]]:
    """(name, default, help) for each config field, for the CLI."""
    for f in config_fields():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        yield f.name, default, f.metadata["help"]


def config_defaults() -> dict[str, Any]:
    """Field name -> default value, for every :class:`TrainConfig` field."""
    return {name: default for name, default, _ in iter_config_help()}
