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

Mixture-of-experts models, as vLLM's main-branch source reads them (2026: ``FusedMoEWithLoRA``
and ``FusedMoE3DWithLoRA`` in ``vllm/lora/layers/fused_moe.py``, ``_stack_moe_lora_weights``
in ``vllm/lora/model_manager.py``, ``pack_moe`` in ``vllm/lora/lora_weights.py``):

=====================  ==========================================================  =========
rule                   vLLM source                                                 lorakit
=====================  ==========================================================  =========
expert layout          ``SupportsLoRA.is_3d_moe_weight``: True (GPT-OSS): PEFT's   written
                       3D layout, ``experts.base_layer.lora_*`` (gate_up_proj)      per
                       and ``experts.lora_*`` (down_proj); False (the others): one  model
                       pair per expert, ``experts.<e>.gate_proj/up_proj/down_proj``
                       (Mixtral: ``block_sparse_moe.experts.<e>.w1/w3/w2``)
all projections        ``_stack_moe_lora_weights`` asserts both 3D pairs;          checked
                       ``pack_moe`` asserts w1, w2 and w3 for every expert
routers                the router is no LoRA module of the MoE layer               refused
=====================  ==========================================================  =========
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor, nn

from ..atomic import atomic_folder, write_errors
from ..config import alpha_for_scale
from ..errors import LoraError
from ..io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, file_facts, top_level
from ..layers import LoraLayer
from ..tables import format_table
from ..targeting import moe_parts, unwrap
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


@dataclass(frozen=True)
class MoeArch:
    """How vLLM reads a mixture-of-experts architecture's expert LoRA."""

    names: tuple[str, ...]  # the other modules it adapts
    three_d: bool = False  # ``is_3d_moe_weight``: PEFT's stacked 3D layout, else per expert
    experts: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # 2D names
    rename: tuple[str, str] = ("", "")  # transformers 5's module path -> vLLM's


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", *_MLP)
MOE_ARCHS: dict[str, MoeArch] = {
    "Qwen3MoeForCausalLM": MoeArch(_ATTENTION + _MLP),
    "Qwen2MoeForCausalLM": MoeArch(_ATTENTION + _MLP),
    "Qwen3NextForCausalLM": MoeArch(_ATTENTION + _MLP + ("in_proj_qkvz", "in_proj_ba", "out_proj")),
    "OlmoeForCausalLM": MoeArch(_ATTENTION + _MLP),
    "DeepseekV2ForCausalLM": MoeArch(_MLA),
    "DeepseekV3ForCausalLM": MoeArch(_MLA),
    "Llama4ForCausalLM": MoeArch(_ATTENTION + _MLP),
    "MixtralForCausalLM": MoeArch(
        _ATTENTION, experts=("w1", "w3", "w2"), rename=(".mlp.", ".block_sparse_moe.")
    ),
    "GptOssForCausalLM": MoeArch(_ATTENTION, three_d=True),
}


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
    known = KNOWN_ARCHS.get(arch) or (MOE_ARCHS[arch].names if arch in MOE_ARCHS else ())
    bad = [p.path for p in found.pairs if p.path not in skip and p.path.split(".")[-1] not in known]
    bad += [o for o in found.other if o.split(" ")[0].split(".base_layer")[0] not in skip]
    if not bad:
        return Check("target modules", True, f"every adapted module is one of {', '.join(known)}")
    return Check(
        "target modules",
        False,
        f"vLLM's {arch} adapts {', '.join(known) or 'no known modules'}, not {_names(bad)}; "
        "retrain with target_modules among those",
    )


def _experts(model: nn.Module, name: str) -> dict[str, dict[str, LoraLayer]]:
    """Experts module path -> expert parameter -> the LoRA wrapper holding adapter ``name``."""
    parts = moe_parts(model)
    found: dict[str, dict[str, LoraLayer]] = {}
    for path, wrapper in top_level(model, name):
        owner = path.split(".base_layer")[0]
        if wrapper.is_lora and owner in parts.experts:
            found.setdefault(owner, {})[wrapper.target_name(path).rsplit(".", 1)[-1]] = wrapper
    return found


def _expert_checks(arch: str, model: nn.Module, found: Collected, name: str) -> list[Check]:
    """vLLM's MoE rules (module docstring): the layout, all projections, no router."""
    experts, parts = _experts(model, name), moe_parts(model)
    routers = [p.path for p in found.pairs if parts.role(p.path) == "router"]
    checks = [_refusal("routers", routers, "vLLM adapts no MoE router; retrain without it")]
    if not experts:
        return checks
    moe = MOE_ARCHS.get(arch)
    if moe is None:
        return [
            *checks,
            Check(
                "expert layout",
                False,
                f"lorakit knows no vLLM layout for "
                f"{arch}'s routed experts ({_names(list(experts))})",
            ),
        ]
    partial = [
        f"{path} ({', '.join(sorted(held))})"
        for path, held in experts.items()
        if set(held) != {"gate_up_proj", "down_proj"}
    ]
    layout = (
        "PEFT's 3D layout" if moe.three_d else f"one pair per expert ({', '.join(moe.experts)})"
    )
    return [
        *checks,
        Check("expert layout", True, f"{len(experts)} experts modules, written in {layout}"),
        _refusal(
            "all projections",
            partial,
            "vLLM loads an expert's gate, up and down "
            "LoRA together: adapt gate_up_proj and down_proj, or neither",
        ),
    ]


def _rank_check(found: Collected, max_lora_rank: int, experts: list[int] = ()) -> Check:
    top = max([p.rank for p in found.pairs] + list(experts), default=0)
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
    known = arch in KNOWN_ARCHS or arch in MOE_ARCHS
    merge = "merge it (lorakit merge) and serve the merged model"
    experts = _experts(model, adapter_name)
    expert_ranks = [w.r[adapter_name] for held in experts.values() for w in held.values()]
    biases = found.lora_bias + ([f"bias={cfg.bias!r}"] if cfg.bias != "none" else [])
    checks = [
        Check(
            "architecture",
            known,
            f"{arch} supports LoRA in vLLM"
            if known
            else f"{arch} is not among the architectures lorakit knows to support LoRA in "
            f"vLLM ({', '.join([*KNOWN_ARCHS, *MOE_ARCHS])}); see SupportsLoRA in "
            "vllm/model_executor/models/",
        ),
        _target_check(arch, found, ends + list(experts)),
        *_expert_checks(arch, model, found, adapter_name),
        _refusal("modules_to_save", found.saved, f"vLLM refuses modules_to_save; {merge}"),
        _refusal("DoRA", found.dora, f"vLLM has no DoRA; {merge}"),
        _refusal("bias", biases, "vLLM loads no adapter biases; retrain with bias='none'"),
        _refusal(
            "embeddings, lm_head",
            ends + found.tokens,
            "not every vLLM version loads LoRA on embeddings, the head or token rows; "
            f"retrain without them or {merge}",
        ),
        _rank_check(found, max_lora_rank, expert_ranks),
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
    moe = MOE_ARCHS.get(type(model).__name__)
    for path, held in _experts(model, adapter_name).items():
        tensors.update(_expert_tensors(moe, path, held, adapter_name, g))
    if moe is not None and not moe.three_d and facts.targets is not None:
        # vLLM reads the tensors; the JSON names the modules as it knows them
        names = {p.path.rsplit(".", 1)[-1] for p in found.pairs} | set(moe.experts)
        facts = dataclasses.replace(facts, targets=(sorted(names), []))
    return one_scale.to_peft_file(facts), tensors


def _expert_tensors(
    moe: MoeArch, path: str, held: dict[str, LoraLayer], name: str, g: float
) -> dict[str, Tensor]:
    """One experts module's tensors in vLLM's layout for ``moe``, B carrying s / g."""
    if moe.three_d:  # PEFT's own stacked layout: gate_up_proj nested inside down_proj
        tensors = {}
        for wrapper in held.values():
            where = f"{PREFIX}{path}{'' if wrapper is held['down_proj'] else '.base_layer'}."
            A, B = (t.detach() for t in wrapper.peft_tensors(name).values())
            tensors[where + "lora_A.weight"] = A.contiguous()
            tensors[where + "lora_B.weight"] = (B * (wrapper.scale[name] / g)).contiguous()
        return tensors
    gate, up, down = moe.experts
    module = path.replace(*moe.rename) if moe.rename[0] else path
    tensors = {}
    for param, wrapper in held.items():
        P, Q = (t.detach() for t in wrapper.input_factors(name))  # x P Q: (E, in, r), (E, r, out)
        Q = Q * (wrapper.scale[name] / g)
        for e in range(P.shape[0]):
            A, B = P[e].T.contiguous(), Q[e].T  # (r, in), (out, r)
            # gate_up_proj's output is [gate; up] (transformers' concatenated layout)
            rows = (
                {down: B}
                if param == "down_proj"
                else dict(zip((gate, up), B.chunk(2), strict=True))
            )
            for leaf, part in rows.items():
                key = f"{PREFIX}{module}.{e}.{leaf}."
                tensors[key + "lora_A.weight"] = A.clone()  # gate and up share it
                tensors[key + "lora_B.weight"] = part.contiguous()
    return tensors


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
    kept = "; what was there is unchanged. Free space or choose another --output."
    with write_errors(str(directory), kept), atomic_folder(directory) as new:
        save_file(tensors, new / WEIGHTS_NAME, metadata={"format": "pt"})
        (new / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return report
