"""A full fine-tune turned into a LoRA adapter: ΔW = W_tuned − W_base, factorised per target."""

from __future__ import annotations

import re
from collections import Counter

import torch
from torch import Tensor, nn

from ..config import LoraConfig, alpha_for_scale
from ..inject import PlanEntry, add_lora, plan
from ..progress import progress
from ..targeting import inside, unwrap, walk
from .report import FactorRow, LowRankReport, factor_row
from .svd import low_rank, raise_problems, rank_limit_problems, rank_problems


def unit_scale_config(config: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """``config`` with the given rank per module and scale 1 everywhere.

    The most common rank becomes ``r``, the others exact-path ``rank_pattern`` entries; alpha
    follows each rank (alpha = r, or sqrt(r) with rsLoRA) so every scale is 1.
    """
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))

    def alpha(rank: int) -> float:
        return alpha_for_scale(1.0, rank, config.use_rslora)

    others = {re.escape(path): k for path, k in ranks.items() if k != r}
    return config.replace(
        r=r,
        alpha=alpha(r),
        rank_pattern=others,
        alpha_pattern={key: alpha(k) for key, k in others.items()},
    )


def _unwrapped_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The user's parameters by name, tied ones under each name, lorakit wrappers looked through."""
    found = {}
    for path, module in walk(model):
        user = unwrap(module)
        # walk does not enter a wrapper: take the whole module it wraps.
        for name, p in user.named_parameters(recurse=user is not module, remove_duplicate=False):
            found[f"{path}.{name}" if path else name] = p
    return found


def _architecture_problems(base: dict[str, Tensor], tuned: dict[str, Tensor]) -> list[str]:
    problems = [f"{n}: only in the base model" for n in base if n not in tuned]
    problems += [f"{n}: only in the tuned model" for n in tuned if n not in base]
    problems += [
        f"{n}: shape {tuple(p.shape)} in the base, {tuple(tuned[n].shape)} in the tuned model"
        for n, p in base.items()
        if n in tuned and p.shape != tuned[n].shape
    ]
    if not problems:
        return []
    more = [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
    return [*problems[:20], *more, "base and tuned models must share one architecture"]


def relative_change(old: Tensor, new: Tensor) -> float:
    """‖new − old‖_F / ‖old‖_F, in fp32 (0 for a zero ``old`` left unchanged)."""
    old, new = old.detach().float(), new.detach().float()
    return float((new - old).norm() / old.norm().clamp_min(1e-12))


def _what_to_keep(
    untargeted: dict[str, float], paths: set[str]
) -> tuple[list[str], str, list[str]]:
    """How an adapter on ``paths`` can carry the changed parameters ``untargeted``.

    Returns ``(modules_to_save, bias, kept parameter names)``: the modules owning the changes
    are saved whole, unless they contain a target (PEFT adapts nothing inside a saved module);
    changed biases of targeted modules need ``bias="lora_only"``.
    """
    owners = {n.rpartition(".")[0] for n in untargeted} - paths
    saved = sorted(o for o in owners if o and not any(inside(t, o) for t in paths))
    bias = "lora_only" if any(f"{p}.bias" in untargeted for p in paths) else "none"
    kept = [
        n
        for n in untargeted
        if n.rpartition(".")[0] in saved or (bias != "none" and n.removesuffix(".bias") in paths)
    ]
    return saved, bias, kept


def extract_adapter(
    base_model: nn.Module,
    tuned_model: nn.Module,
    target_modules: list[str] | str,
    rank: int | None = None,
    energy: float | None = None,
    adapter_name: str = "default",
    *,
    keep_untargeted: bool = False,
) -> LowRankReport:
    """Turn a full fine-tune into a LoRA adapter on ``base_model`` (added in place).

    For each target (Linear, GPT-2 Conv1D, Embedding, ungrouped conv) the change
    ΔW = W_tuned − W_base is factorised by ``low_rank`` into B A at scale 1, so
    ``save_adapter(base_model, dir)`` writes it in PEFT's format; with ``energy`` every module
    gets its own rank (written as ``rank_pattern``).

    Parameters that changed outside the targets (norms, heads, biases) are listed in the report.
    With ``keep_untargeted`` their modules become ``modules_to_save`` holding the tuned values,
    and changed biases of targeted modules are kept with ``bias="lora_only"`` (written into
    ``base_model``'s biases, as PEFT loads them): then full rank reproduces the tuned model.

    Raises:
        LoraError: as ``low_rank`` for rank / energy, differing architectures, targets that
            match nothing or are not supported, an adapter name already in use.
    """
    problems = rank_problems(rank, energy)
    base, tuned = _unwrapped_parameters(base_model), _unwrapped_parameters(tuned_model)
    problems += _architecture_problems(base, tuned)
    raise_problems("extract an adapter", problems)
    probe = LoraConfig(r=1, target_modules=target_modules)
    entries = _extraction_entries(base_model, probe, adapter_name, rank)

    factors = {}
    for entry in progress(entries, "extract (SVD)", unit="matrix"):
        name = f"{entry.path}.weight"
        delta = tuned[name].detach().float() - base[name].detach().float()
        module = unwrap(base_model.get_submodule(entry.path))
        matrix = entry.layer.to_matrix(module, delta, **entry.options)
        factors[entry.path] = (delta, *low_rank(matrix, rank, energy))

    untargeted = _untargeted_changes(base, tuned, {f"{e.path}.weight" for e in entries})
    paths = {e.path for e in entries}
    saved, bias, kept = _what_to_keep(untargeted, paths) if keep_untargeted else ([], "none", [])
    ranks = {path: info["rank"] for path, (_, _, _, info) in factors.items()}
    name_or_path = getattr(base_model, "name_or_path", None) or None
    settings = probe.replace(
        modules_to_save=saved or None, bias=bias, base_model_name_or_path=name_or_path
    )
    config = unit_scale_config(settings, ranks)
    add_lora(base_model, config, adapter_name)
    biases = [f"{p}.bias" for p in paths if f"{p}.bias" in untargeted and bias != "none"]
    with torch.no_grad():
        rows = _write_factors(base_model, adapter_name, entries, factors)
        _copy_tuned_values(base_model, adapter_name, tuned, saved, {n: base[n] for n in biases})
    return LowRankReport("extract", rows, config, untargeted, kept)


def _extraction_entries(
    model: nn.Module, probe: LoraConfig, adapter_name: str, rank: int | None
) -> list[PlanEntry]:
    """The targets of ``probe`` in ``model``, each checked to hold one ΔW matrix of that rank."""
    entries = plan(model, probe, adapter_name).entries
    problems, limits = [], {}
    for entry in entries:
        module = unwrap(model.get_submodule(entry.path))
        reason = entry.layer.matrix_problem(module, **entry.options)
        if reason:
            problems.append(f"{entry.path}: cannot extract into {reason}")
        else:
            limits[entry.path] = entry.layer.rank_limit(module, **entry.options)
    raise_problems("extract an adapter", problems + rank_limit_problems(rank, limits))
    return entries


def _write_factors(
    model: nn.Module, adapter_name: str, entries: list[PlanEntry], factors: dict[str, tuple]
) -> list[FactorRow]:
    """Set each target's (B, A) at scale 1; one report row each, its error measured."""
    rows = []
    for entry in entries:
        delta, B, A, info = factors[entry.path]
        layer = model.get_submodule(entry.path)
        layer.set_factors(adapter_name, B, A, scale=1.0)
        error = relative_change(delta, layer.delta_weight(adapter_name))
        rows.append(factor_row(entry, info, error, delta.numel(), B.numel() + A.numel()))
    return rows


def _untargeted_changes(
    base: dict[str, Tensor], tuned: dict[str, Tensor], targeted: set[str]
) -> dict[str, float]:
    """Parameters outside ``targeted`` that the fine-tune changed: name -> ‖ΔW‖ / ‖W‖."""
    return {
        name: relative_change(p, tuned[name])
        for name, p in base.items()
        if name not in targeted and not torch.equal(p, tuned[name])
    }


def _copy_tuned_values(
    model: nn.Module,
    adapter_name: str,
    tuned: dict[str, Tensor],
    saved: list[str],
    biases: dict[str, Tensor],
) -> None:
    """The tuned values into the adapter's saved modules and into the base's kept biases."""
    for path in saved:
        copied = model.get_submodule(path)
        names = copied.peft_tensors(adapter_name)  # the copy's parameters, by name
        copied.load_peft_tensors(adapter_name, {n: tuned[f"{path}.{n}"] for n in names})
    for name, p in biases.items():
        p.copy_(tuned[name])
