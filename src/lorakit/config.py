"""LoraConfig: what to adapt and how, validated on construction.

The JSON form is PEFT's ``adapter_config.json``: ``to_peft_dict`` writes the keys PEFT reads
(``peft_type``, ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ...), and
``from_peft_dict`` reads a file PEFT wrote. Field names differ from PEFT's where PEFT's are
historical (``alpha`` for ``lora_alpha``, ``init`` for ``init_lora_weights``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import LoraError

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "pissa", "olora")
# Inits that take A, B from the base weight and leave the residual in it (LoRA layers only).
WEIGHT_INITS = ("pissa", "olora")
ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter.

    The adapted weight is ``W + scale * B @ A`` with ``A: (r, in)``, ``B: (out, r)`` and
    ``scale = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).

    Target matching (``target_modules``, ``exclude_modules``, ``modules_to_save``): a list entry
    matches a module whose dotted path equals it or ends with ``.entry``; a string is a regex that
    must match the whole path; ``"all-linear"`` selects every Linear / GPT-2 Conv1D except the
    output head. An excluded module excludes everything inside it.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    # Only adapt modules inside these layer indices (e.g. ``model.layers.3.``); needs list targets.
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    # Per-module overrides: regex (matched against the end of the path) -> rank / alpha.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    init: str = "kaiming"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    # Raw parameters such as a fused MoE ``mlp.experts.gate_up_proj`` (E, out, in).
    target_parameters: list[str] | None = None
    # Module -> which equal output slices of a fused projection get LoRA, e.g. qkv [True, False, True].
    fused_slices: dict[str, list[bool]] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            problems.append(f"alpha must be a finite number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            problems.append(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES:
            problems.append(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = list(self.exclude_modules)
        if not self.target_modules and not self.target_parameters:
            problems.append(
                "nothing to adapt: set target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear') "
                "or target_parameters"
            )
        for name, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                problems.append(f"rank_pattern[{name!r}] must be a positive integer, got {rank!r}")
        for name, flags in self.fused_slices.items():
            if not flags or not all(isinstance(f, bool) for f in flags) or not any(flags):
                problems.append(
                    f"fused_slices[{name!r}] must be a non-empty list of booleans with at least "
                    f"one True, got {flags!r}"
                )
        if self.layers_to_transform is not None and not isinstance(self.target_modules, list):
            problems.append("layers_to_transform needs target_modules as a list of names")
        if problems:
            raise LoraError("Invalid LoraConfig:\n  - " + "\n  - ".join(problems))

    def rank_for(self, path: str) -> int:
        """Rank of the module at ``path``: the first matching ``rank_pattern`` entry, else ``r``."""
        key = first_pattern_match(self.rank_pattern, path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        """Alpha of the module at ``path``: the first matching ``alpha_pattern`` entry, else ``alpha``."""
        key = first_pattern_match(self.alpha_pattern, path)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scale_for(self, path: str) -> float:
        """The LoRA scale of ``path``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(r) if self.use_rslora else r)

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT's ``LoraConfig`` reads."""
        return {
            "peft_type": "LORA",
            "task_type": None,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules,
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "bias": self.bias,
            "init_lora_weights": True if self.init == "kaiming" else self.init,
            "use_rslora": self.use_rslora,
            "modules_to_save": self.modules_to_save,
            "target_parameters": self.target_parameters,
            "fan_in_fan_out": False,
            "use_dora": False,
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read an ``adapter_config.json`` written by PEFT or lorakit; refuse what LoRA can't express."""
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraError(
                f"adapter_config.json has peft_type={data.get('peft_type')!r}; lorakit reads LoRA "
                "adapters only (peft_type 'LORA')."
            )
        unsupported = [k for k in ("use_dora", "lora_bias") if data.get(k)]
        if data.get("layer_replication"):
            unsupported.append("layer_replication")
        if unsupported:
            raise LoraError(
                f"adapter_config.json uses PEFT features lorakit does not implement: {unsupported}. "
                "Merge the adapter with PEFT (merge_and_unload) and use the merged model instead."
            )
        init = data.get("init_lora_weights", True)
        return cls(
            r=data["r"],
            alpha=data.get("lora_alpha", data["r"]),
            dropout=data.get("lora_dropout", 0.0),
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            rank_pattern=dict(data.get("rank_pattern") or {}),
            alpha_pattern=dict(data.get("alpha_pattern") or {}),
            bias=data.get("bias", "none"),
            init=_init_mode(init),
            use_rslora=bool(data.get("use_rslora", False)),
            modules_to_save=data.get("modules_to_save"),
            target_parameters=data.get("target_parameters"),
            base_model_name_or_path=data.get("base_model_name_or_path"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field, for lorakit's own round trip (kept in the adapter file's metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Inverse of ``to_dict``; unknown keys are an error so typos don't pass silently."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraError(f"Unknown LoraConfig keys {unknown}; known keys are {sorted(known)}.")
        return cls(**data)


def first_pattern_match(patterns: dict[str, Any], path: str) -> str | None:
    """The first key of ``patterns`` that matches the end of ``path`` (PEFT's rule)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


def _init_mode(init_lora_weights: Any) -> str:
    """lorakit's ``init`` for PEFT's ``init_lora_weights`` (``pissa_niter_k`` reads as pissa)."""
    if isinstance(init_lora_weights, str):
        if init_lora_weights.startswith("pissa"):
            return "pissa"
        if init_lora_weights in ("gaussian", "olora"):
            return init_lora_weights
        # loftq, eva, corda, ...: their adapters pair with a changed base or init data that
        # lorakit does not reproduce, so reading them as plain LoRA would be silently wrong.
        raise LoraError(
            f"adapter_config.json has init_lora_weights={init_lora_weights!r}, which lorakit "
            "does not implement; merge it with PEFT (merge_and_unload) and use the merged model."
        )
    return "kaiming"
