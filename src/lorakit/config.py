"""LoraConfig: what to adapt and how, validated on construction; the scale rule; the JSON.

The JSON form is PEFT's ``adapter_config.json``, and this module is its one writer:
``to_peft_dict`` gives the keys PEFT reads for the config alone (``peft_type``, ``r``,
``lora_alpha``, ``lora_dropout``, ``target_modules``, ...), ``to_peft_file`` the whole file
``save_adapter`` writes (the config plus ``FileFacts``, what the model adds), and
``from_peft_dict`` reads a file PEFT wrote. Field names differ from PEFT's where PEFT's are
historical (``alpha`` for ``lora_alpha``, ``init`` for ``init_lora_weights``).

The scale rule, PEFT's, is written once (``lora_scale``, inverted by ``alpha_for_scale``)::

    scale = alpha / r                 scale = alpha / sqrt(r)   with use_rslora
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import LoraError

BIAS_MODES = ("none", "all", "lora_only")
# "random": B random too, so the adapter changes the output from the start (PEFT's
# init_lora_weights=False, for tests); "nora": A's columns of unit norm; B = 0 or from the weight.
INIT_MODES = ("kaiming", "gaussian", "random", "nora", "pissa", "olora")
# Inits that take A, B from the base weight and leave the residual in it (LoRA layers only).
WEIGHT_INITS = ("pissa", "olora")
ALL_LINEAR = "all-linear"
# The PEFT release lorakit's files are written for (PEFT reads some tensors by it).
PEFT_FILE_VERSION = "0.22.0"


def lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    """The scale of a rank-``r`` adapter: ``alpha / r``, or ``alpha / sqrt(r)`` (rsLoRA)."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def alpha_for_scale(scale: float, r: int, use_rslora: bool) -> float:
    """The alpha that gives a rank-``r`` adapter ``scale`` (the inverse of ``lora_scale``)."""
    return scale * (math.sqrt(r) if use_rslora else r)


@dataclass(frozen=True)
class FileFacts:
    """What an adapter file's JSON says besides the config: facts of the model it was saved
    from, gathered by the writer (``lorakit.io``) and put into the JSON by ``to_peft_file``."""

    base_model: str | None = None  # the base as transformers loads it; None: the config's
    task_type: str | None = None  # PEFT's task type for the model's class
    fan_in_fan_out: bool = False  # a GPT-2 Conv1D is adapted
    # Module path -> the rank PEFT must see there, where it is not the config's (a fused-slice
    # pair is wider in the file), and -> the scale the file must give it (alpha follows).
    ranks: dict[str, int] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    # Targets by full path, written instead of the config's rules where PEFT reads rules
    # otherwise (a mixture-of-experts model: ``lorakit.targeting.file_targets``); None: rules.
    targets: tuple[list[str], list[str]] | None = None  # (target_modules, target_parameters)


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
    # DoRA: a trainable magnitude per output channel on top of the LoRA direction.
    use_dora: bool = False
    # A trainable bias on B (PEFT's ``lora_bias``); merges into the base bias.
    lora_bias: bool = False
    # Embedding path -> token ids whose rows train (a list: the model's input embedding).
    trainable_token_indices: dict[str, list[int]] | list[int] | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        # PEFT's own LoraConfig turns name lists into sets; keep a JSON-friendly sorted list.
        for name in ("target_modules", "exclude_modules", "modules_to_save", "target_parameters"):
            value = getattr(self, name)
            if isinstance(value, (set, frozenset)):
                setattr(self, name, sorted(value))
            elif isinstance(value, tuple):
                setattr(self, name, list(value))
        problems = [*self._number_problems(), *self._name_problems(), *self._option_problems()]
        if problems:
            raise LoraError("Invalid LoraConfig:\n  - " + "\n  - ".join(problems))

    def _number_problems(self) -> list[str]:
        found = []
        if not _is_int(self.r) or self.r <= 0:
            found.append(f"r must be a positive integer, got {self.r!r}")
        if not _is_number(self.alpha):
            found.append(f"alpha must be a finite number, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            found.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        for field_name, pattern, check, what in (
            (
                "rank_pattern",
                self.rank_pattern,
                lambda v: _is_int(v) and v > 0,
                "a positive integer",
            ),
            ("alpha_pattern", self.alpha_pattern, _is_number, "a finite number"),
        ):
            if not isinstance(pattern, dict):
                found.append(
                    f"{field_name} must be a dict {{module regex: value}}, got {pattern!r}"
                )
                continue
            found += [
                f"{field_name}[{k!r}] must be {what}, got {v!r}"
                for k, v in pattern.items()
                if not check(v)
            ] + [
                f"{field_name} key {k!r} is not a valid regex" for k in pattern if not _is_regex(k)
            ]
        layers = self.layers_to_transform
        if layers is not None and not (
            (_is_int(layers) and layers >= 0)
            or (isinstance(layers, list) and all(_is_int(i) and i >= 0 for i in layers))
        ):
            found.append(
                f"layers_to_transform must be a layer index or a list of them, got {layers!r}"
            )
        return found

    def _name_problems(self) -> list[str]:
        found = []
        for field_name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, field_name)
            if isinstance(value, str):
                if not _is_regex(value):
                    found.append(f"{field_name} {value!r} is not a valid regex")
            elif value is not None and not _is_names(value):
                found.append(
                    f"{field_name} must be a list of module names or a regex string, got {value!r}"
                )
        for field_name in ("modules_to_save", "target_parameters"):
            value = getattr(self, field_name)
            if value is not None and not _is_names(value):
                found.append(f"{field_name} must be a list of names, got {value!r}")
        if not (self.target_modules or self.target_parameters or self.trainable_token_indices):
            found.append(
                "nothing to adapt: set target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear'), "
                "target_parameters or trainable_token_indices"
            )
        if self.layers_to_transform is not None and not isinstance(self.target_modules, list):
            found.append("layers_to_transform needs target_modules as a list of names")
        name = self.base_model_name_or_path
        if name is not None and not isinstance(name, str):
            found.append(f"base_model_name_or_path must be a string, got {name!r}")
        return found

    def _option_problems(self) -> list[str]:
        found = []
        if self.bias not in BIAS_MODES:
            found.append(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INIT_MODES:
            found.append(f"init must be one of {INIT_MODES}, got {self.init!r}")
        for field_name in ("use_rslora", "use_dora", "lora_bias"):
            if not isinstance(getattr(self, field_name), bool):
                found.append(
                    f"{field_name} must be true or false, got {getattr(self, field_name)!r}"
                )
        if self.use_dora is True and self.lora_bias is True:
            found.append("lora_bias=True is not supported with use_dora=True (nor in PEFT)")
        if self.lora_bias is True and self.init in WEIGHT_INITS:
            found.append(f"lora_bias=True needs a plain init, not init={self.init!r} (as in PEFT)")
        found += _token_problems(self.trainable_token_indices)
        if not isinstance(self.fused_slices, dict):
            return [
                *found,
                f"fused_slices must be a dict {{module: [bool, ...]}}, got {self.fused_slices!r}",
            ]
        for name, flags in self.fused_slices.items():
            if (
                not isinstance(flags, list)
                or not flags
                or not all(isinstance(f, bool) for f in flags)
                or not any(flags)
            ):
                found.append(
                    f"fused_slices[{name!r}] must be a non-empty list of booleans with at least "
                    f"one True, got {flags!r}"
                )
        return found

    def rank_for(self, path: str) -> int:
        """Rank of the module at ``path``: the first matching ``rank_pattern`` entry, else ``r``."""
        key = first_pattern_match(self.rank_pattern, path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, path: str) -> float:
        """Alpha of the module at ``path``: the first matching ``alpha_pattern`` entry, else ``alpha``."""
        key = first_pattern_match(self.alpha_pattern, path)
        return self.alpha_pattern[key] if key is not None else self.alpha

    def scale_for(self, path: str) -> float:
        """The LoRA scale of ``path`` (``lora_scale`` of its rank and alpha)."""
        return lora_scale(self.alpha_for(path), self.rank_for(path), self.use_rslora)

    @property
    def scale(self) -> float:
        """The scale of a module no pattern names (``lora_scale`` of ``alpha`` and ``r``)."""
        return lora_scale(self.alpha, self.r, self.use_rslora)

    def on_original_weight(self) -> LoraConfig:
        """The config an adapter is saved with: itself, or for PiSSA / OLoRA (whose layers
        save a rank-2r pair on the weight before the init, ``original_weight_pair``) rank 2r
        and a kaiming init at the same scales."""
        if self.init not in WEIGHT_INITS:
            return self

        def doubled(alpha: float) -> float:
            # lora_scale(alpha · c, 2r) = lora_scale(alpha, r) for c = 2 (rsLoRA: sqrt 2),
            # the factor alpha_for_scale gives at rank 2.
            return alpha_for_scale(alpha, 2, self.use_rslora)

        return self.replace(
            r=2 * self.r,
            alpha=doubled(self.alpha),
            rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()},
            alpha_pattern={k: doubled(v) for k, v in self.alpha_pattern.items()},
            init="kaiming",
        )

    def replace(self, **changes: Any) -> LoraConfig:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT's ``LoraConfig`` reads."""
        return {
            "peft_type": "LORA",
            "peft_version": PEFT_FILE_VERSION,
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
            "init_lora_weights": {"kaiming": True, "random": False}.get(self.init, self.init),
            "use_rslora": self.use_rslora,
            "modules_to_save": self.modules_to_save,
            "target_parameters": self.target_parameters,
            "trainable_token_indices": self.trainable_token_indices,
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "fan_in_fan_out": False,
            "inference_mode": True,
        }

    def to_peft_file(self, facts: FileFacts) -> dict[str, Any]:
        """The ``adapter_config.json`` that ``save_adapter`` writes with this config (an
        adapter's ``on_original_weight`` config) for a model described by ``facts``.

        Beyond ``to_peft_dict``: the base as transformers loads it, the model's task type and
        ``fan_in_fan_out``; ``exclude_modules`` as a regex that excludes whole subtrees, as
        lorakit does (PEFT excludes only the module named); and exact-path ``rank_pattern`` /
        ``alpha_pattern`` entries, first (PEFT takes the first pattern that matches), for the
        modules whose rank or scale in the file is not the config's.
        """
        ranks = {re.escape(path): rank for path, rank in facts.ranks.items()}
        alphas = {
            re.escape(path): alpha_for_scale(
                scale, facts.ranks.get(path) or self.rank_for(path), self.use_rslora
            )
            for path, scale in facts.scales.items()
        }
        modules, parameters = facts.targets or ([], [])  # full paths standing for the rules
        listed = {"target_modules": modules or None, "target_parameters": parameters or None}
        return self.to_peft_dict() | {
            "base_model_name_or_path": facts.base_model or self.base_model_name_or_path,
            "task_type": facts.task_type,
            "exclude_modules": _subtree_regex(self.exclude_modules),
            "rank_pattern": {**ranks, **self.rank_pattern},
            "alpha_pattern": {**alphas, **self.alpha_pattern},
            "fan_in_fan_out": facts.fan_in_fan_out,
            **(listed if facts.targets is not None else {}),
        }

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read an ``adapter_config.json`` written by PEFT or lorakit.

        Every key is either implemented, informational (no effect on the weights), or refused
        by name when set to anything but its neutral value: PEFT methods lorakit does not
        implement (KaSA, VeLoRA, ...) are never loaded as plain LoRA.
        """
        if not isinstance(data, dict):
            raise LoraError(
                f"adapter_config.json must hold a JSON object, got {type(data).__name__}."
            )
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraError(
                f"adapter_config.json has peft_type={data.get('peft_type')!r}; lorakit reads LoRA "
                "adapters only (peft_type 'LORA')."
            )
        if "r" not in data:
            raise LoraError(
                "adapter_config.json has no 'r' (the LoRA rank); it is not a LoRA adapter."
            )
        refused = {k: v for k, v in data.items() if not _peft_key_ok(k, v)}
        if refused:
            raise LoraError(
                "adapter_config.json sets PEFT options lorakit does not implement: "
                + ", ".join(f"{k}={v!r}" for k, v in refused.items())
                + ". Merge the adapter with PEFT (merge_and_unload) and use the merged model."
            )
        return cls(
            r=data["r"],
            alpha=data.get("lora_alpha", data["r"]),
            dropout=data.get("lora_dropout", 0.0),
            target_modules=data.get("target_modules"),
            exclude_modules=data.get("exclude_modules"),
            layers_to_transform=data.get("layers_to_transform"),
            layers_pattern=data.get("layers_pattern"),
            rank_pattern=_copied(data.get("rank_pattern") or {}),
            alpha_pattern=_copied(data.get("alpha_pattern") or {}),
            bias=data.get("bias", "none"),
            init=_init_mode(data.get("init_lora_weights", True)),
            use_rslora=bool(data.get("use_rslora", False)),
            modules_to_save=data.get("modules_to_save"),
            target_parameters=data.get("target_parameters"),
            trainable_token_indices=data.get("trainable_token_indices"),
            use_dora=bool(data.get("use_dora", False)),
            lora_bias=bool(data.get("lora_bias", False)),
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


# PEFT keys that from_peft_dict reads into a field.
_PEFT_IMPLEMENTED = {
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "init_lora_weights",
    "use_rslora",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "use_dora",
    "lora_bias",
    "base_model_name_or_path",
    "peft_type",
}
# PEFT keys that describe the run, not the weights: any value loads the same adapter.
# fan_in_fan_out is read off the layer type (GPT-2 Conv1D); megatron_core and
# qalora_group_size only matter with megatron_config / use_qalora, which are refused.
_PEFT_INFORMATIONAL = {
    "task_type",
    "auto_mapping",
    "peft_version",
    "revision",
    "inference_mode",
    "runtime_config",
    "fan_in_fan_out",
    "megatron_core",
    "qalora_group_size",
}


def _peft_key_ok(key: str, value: Any) -> bool:
    """Whether PEFT config ``key`` = ``value`` loads as lorakit reads it.

    A key lorakit does not know (KaSA, VeLoRA, a newer PEFT's) is fine only at a neutral
    value (None, False or empty): anything else would change the maths silently.
    """
    if key in _PEFT_IMPLEMENTED or key in _PEFT_INFORMATIONAL:
        return True
    return value is None or value is False or value == {} or value == [] or value == ""


def _copied(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else value  # anything else: __post_init__ says


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _is_regex(value: Any) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError):
        return False
    return True


def _token_problems(indices: Any) -> list[str]:
    if indices is None:
        return []
    groups = indices.values() if isinstance(indices, dict) else [indices]
    if isinstance(indices, dict) and not all(isinstance(k, str) for k in indices):
        return [f"trainable_token_indices keys must be module names, got {list(indices)!r}"]
    for ids in groups:
        if (
            not isinstance(ids, (list, tuple))
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            return [
                "trainable_token_indices must be a non-empty list of token ids, or a dict "
                f"module name -> such a list; got {indices!r}"
            ]
    return []


def _subtree_regex(spec: list[str] | str | None) -> str | None:
    """``exclude_modules`` for PEFT, which excludes only the module named where lorakit
    excludes its whole subtree: a regex that also matches everything below says the same."""
    if not spec:
        return None
    core = spec if isinstance(spec, str) else r"(?:.*\.)?(?:" + "|".join(map(re.escape, spec)) + ")"
    return rf"(?:{core})(?:\..*)?"


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
        if init_lora_weights in ("gaussian", "nora", "olora"):
            return init_lora_weights
        # loftq, eva, corda, astra, ...: their adapters pair with a changed base or init data that
        # lorakit does not reproduce, so reading them as plain LoRA would be silently wrong.
        raise LoraError(
            f"adapter_config.json has init_lora_weights={init_lora_weights!r}, which lorakit "
            "does not implement; merge it with PEFT (merge_and_unload) and use the merged model."
        )
    return "kaiming" if init_lora_weights is not False else "random"
