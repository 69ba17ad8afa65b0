"""vLLM: a pre-flight against its LoRA loader's rules, then a folder it accepts.

vLLM reads a PEFT folder with ``LoRAModel.from_local_checkpoint`` (``vllm/lora/models.py``;
``vllm/lora/lora_model.py`` in later versions) after ``PEFTHelper.validate_legal``
(``vllm/lora/peft_helper.py``). lorakit cannot run vLLM here, so each rule below is what those
files say as far as lorakit knows them (vLLM 0.6 to 0.11), in its strictest form where versions
differ:

=====================  ==========================================================  =========
rule                   vLLM source                                                 lorakit
=====================  ==========================================================  =========
architecture           the model class implements ``SupportsLoRA``                 known list
                       (``model_executor/models/interfaces.py``)
target modules         ``from_local_checkpoint``: "expected target modules in ...  Linear
                       but received ...": linear layers the model lists (its       pairs on
                       ``packed_modules_mapping`` expands q/k/v, gate/up)          known names
modules_to_save        ``PEFTHelper._validate_features``: "vLLM only supports      refused
                       modules_to_save being None."
DoRA                   same: "vLLM does not yet support DoRA."                     refused
bias                   ``validate_legal``: "Adapter bias cannot be used without    refused
                       bias_enabled" (``--enable-lora-bias``, later removed)
embeddings, lm_head    older versions: only a model's ``embedding_modules``, new   refused
                       tokens from ``new_embeddings.safetensors``; later removed
rank                   ``validate_legal``: "LoRA rank r is greater than            checked
                       max_lora_rank"; every module is padded to max_lora_rank
                       (default 16; one of 1, 8, 16, 32, 64, 128, 256, 320, 512)
scaling                ``PEFTHelper.__post_init__``: one ``lora_alpha / r`` (or    folded
                       ``/ sqrt(r)`` with ``use_rslora``) for every module;        into B
                       ``rank_pattern`` / ``alpha_pattern`` are not read
=====================  ==========================================================  =========

The folder written: each module's B carries ``true scale / global scale``, ``use_rslora`` is
false and ``alpha_pattern`` gives every module of another rank the global scale, so vLLM
(one scale) and PEFT (per-module scales) compute the same ΔW.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_folder
from ..config import alpha_for_scale
from ..errors import LoraError
from ..io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, file_facts
from ..tables import format_table
from ..targeting import unwrap
from .pairs import Collected, collect

# Architectures whose vLLM implementation supports LoRA, with the module names it adapts.
_DECODER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KNOWN_ARCHS: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": _DECODER,
    "MistralForCausalLM": _DECODER,
    "Qwen2ForCausalLM": _DECODER,
    "Qwen3ForCausalLM": _DECODER,
    "GemmaForCausalLM": _DECODER,
    "Gemma2ForCausalLM": _DECODER,
    "Phi3ForCausalLM": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py


@dataclass
class Check:
    """One vLLM loader rule and how the adapter fares."""

    rule: str
    ok: bool
    detail: str


@dataclass
class VllmReport:
    """Every rule checked, in order; ``ok`` when vLLM would load the exported folder."""

    architecture: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def __str__(self) -> str:
        rows = [(c.rule, "pass" if c.ok else "FAIL", c.detail) for c in self.checks]
        return "\n".join(format_table([("vLLM rule", "result", "why"), *rows]))


def _names(paths: list[str], limit: int = 4) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def _embedding_paths(model: nn.Module, found: Collected) -> list[str]:
    """Paths of pairs on the input embedding or the output head."""
    ends = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, get, lambda: None)()
        if module is not None:
            ends.append(unwrap(module))
    return [p.path for p in found.pairs if unwrap(model.get_submodule(p.path)) in ends]


def _target_check(arch: str, found: Collected, skip: list[str]) -> Check:
    known = KNOWN_ARCHS.get(arch, ())
    bad = [p.path for p in found.pairs if p.path not in skip and p.path.split(".")[-1] not in known]
    bad += found.other
    if not bad:
        return Check("target modules", True, f"every adapted module is one of {', '.join(known)}")
    return Check(
        "target modules",
        False,
        f"vLLM's {arch} adapts {', '.join(known) or 'no known modules'}, not {_names(bad)}; "
        "retrain with target_modules among those",
    )


def _rank_check(found: Collected, max_lora_rank: int) -> Check:
    top = max((p.rank for p in found.pairs), default=0)
    if top <= max_lora_rank:
        return Check("rank", True, f"largest rank {top} <= --max-lora-rank {max_lora_rank}")
    fits = next((r for r in MAX_LORA_RANKS if r >= top), None)
    fix = (
        f"serve with --max-lora-rank {fits} (and pass it here)"
        if fits
        else "vLLM's largest is 512: lorakit resize ADAPTER --rank 512 first"
    )
    return Check("rank", False, f"largest rank {top} > --max-lora-rank {max_lora_rank}; {fix}")


def _scaling_check(found: Collected, global_scale: float) -> Check:
    other = [p.path for p in found.pairs if not math.isclose(p.scale, global_scale)]
    detail = f"vLLM scales every module by {global_scale:g}"
    if other:
        detail += f"; {len(other)} modules scale otherwise and get the factor folded into B"
    return Check("scaling", True, detail)


def _refusal(rule: str, paths: list[str], what: str) -> Check:
    """Pass when ``paths`` is empty; else fail naming them, with ``what`` to change."""
    return Check(rule, not paths, f"{_names(paths)}: {what}" if paths else "none")


def check_vllm(
    model: nn.Module, adapter_name: str = "default", max_lora_rank: int = 16
) -> VllmReport:
    """vLLM's LoRA loader rules (see the module docstring) for adapter ``adapter_name``."""
    found = collect(model, adapter_name)
    cfg, arch = found.config, type(model).__name__
    ends = _embedding_paths(model, found)
    known = arch in KNOWN_ARCHS
    merge = "merge it (lorakit merge) and serve the merged model"
    biases = found.lora_bias + ([f"bias={cfg.bias!r}"] if cfg.bias != "none" else [])
    checks = [
        Check(
            "architecture",
            known,
            f"{arch} supports LoRA in vLLM"
            if known
            else f"{arch} is not among the architectures lorakit knows to support LoRA in "
            f"vLLM ({', '.join(KNOWN_ARCHS)}); see SupportsLoRA in vllm/model_executor/models/",
        ),
        _target_check(arch, found, ends),
        _refusal("modules_to_save", found.saved, f"vLLM refuses modules_to_save; {merge}"),
        _refusal("DoRA", found.dora, f"vLLM has no DoRA; {merge}"),
        _refusal("bias", biases, "vLLM loads no adapter biases; retrain with bias='none'"),
        _refusal(
            "embeddings, lm_head",
            ends + found.tokens,
            "not every vLLM version loads LoRA on embeddings, the head or token rows; "
            f"retrain without them or {merge}",
        ),
        _rank_check(found, max_lora_rank),
        _scaling_check(found, cfg.scale),
    ]
    return VllmReport(arch, checks)


def vllm_files(model: nn.Module, adapter_name: str = "default") -> tuple[dict, dict]:
    """(adapter_config.json, tensors) with one scale for every module, as vLLM applies it.

    Global scale g = the scale of the config ``save_adapter`` writes (``lora_alpha / r``, or
    ``/ sqrt(r)``). The JSON is that file's with use_rslora false and ``lora_alpha`` g · r, so
    vLLM's rule and PEFT's agree on g; each module's B becomes B · s / g (s: its true scale),
    and a module of rank r_m != r gets ``alpha_pattern`` g · r_m, so PEFT's alpha_m / r_m is
    g too.
    """
    found = collect(model, adapter_name)
    saved = found.config.on_original_weight()
    g, r = saved.scale, saved.r
    tensors = {}
    for pair in found.pairs:
        key = f"{PREFIX}{pair.path}."
        tensors[key + pair.keys[0]] = pair.A.contiguous()
        tensors[key + pair.keys[1]] = (pair.B * (pair.scale / g)).contiguous()
    one_scale = saved.replace(
        use_rslora=False, alpha=alpha_for_scale(g, r, False), alpha_pattern={}
    )
    facts = dataclasses.replace(
        file_facts(model, adapter_name),
        scales={pair.path: g for pair in found.pairs if pair.rank != r},
    )
    return one_scale.to_peft_file(facts), tensors


def to_vllm(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    max_lora_rank: int = 16,
) -> VllmReport:
    """Check vLLM's rules, then write a PEFT folder vLLM loads (see the module docstring).

    Raises:
        LoraError: a rule fails; the message lists each with what to change, and nothing
            is written.
    """
    if Path(directory).exists() and not Path(directory).is_dir():
        raise LoraError(f"{directory} is a file; give a folder for the vLLM adapter.")
    report = check_vllm(model, adapter_name, max_lora_rank)
    if not report.ok:
        lines = [f"{c.rule}: {c.detail}" for c in report.failures()]
        raise LoraError(
            "vLLM would refuse or misread this adapter; nothing was written:\n  - "
            + "\n  - ".join(lines)
        )
    config, tensors = vllm_files(model, adapter_name)
    try:
        with atomic_folder(directory) as new:
            save_file(tensors, new / WEIGHTS_NAME, metadata={"format": "pt"})
            (new / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    except OSError as err:
        raise LoraError(
            f"Could not write {directory} ({err.strerror or err}); what was there is "
            "unchanged. Free space or choose another --output."
        ) from err
    return report
