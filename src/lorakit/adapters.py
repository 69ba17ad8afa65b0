"""Many adapters on one base model: choose, disable, delete, route rows, combine."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .config import LoraConfig, alpha_for_scale
from .errors import LoraError
from .inject import add_lora, replace_module
from .layers import LoraLayer
from .lowrank.svd import factored_svd
from .merge import active_adapters, check_adapter_names, merge, merged_adapters, unmerge
from .progress import progress
from .state import AdapterState, adapter_configs
from .targeting import iter_adapter_modules, lora_layers

__all__ = [
    "active_adapters",
    "combine",
    "delete_adapter",
    "disable_adapters",
    "route",
    "set_adapter",
]


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Activate ``names`` (one name or a list: their deltas add up) and deactivate the rest.

    Raises ``LoraError`` for unknown names, or when a merged adapter would be deactivated
    (its delta is in the weights: ``unmerge`` it first).
    """
    names = [names] if isinstance(names, str) else list(names)
    check_adapter_names(model, names)
    stuck = sorted(set(merged_adapters(model)) - set(names))
    if stuck:
        raise LoraError(f"Adapter(s) {stuck} are merged into the weights; unmerge them first.")
    for _, module in iter_adapter_modules(model):
        module.set_active(names)


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; restore the previous state on exit.

    Merged adapters are unmerged for the block and merged back afterwards, also when the block
    raises.
    """
    modules = [m for _, m in iter_adapter_modules(model)]
    was_merged = merged_adapters(model)
    was_active = [m.active for m in modules]
    unmerge(model)
    for m in modules:
        m.set_active([])
    try:
        yield model
    finally:
        for m, active in zip(modules, was_active, strict=True):
            m.set_active(active)
        if was_merged:
            merge(model, was_merged)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere, unmerging it first; emptied wrappers are removed."""
    check_adapter_names(model, [name])
    unmerge(model, [name])
    for path, module in reversed(list(iter_adapter_modules(model))):
        if name not in module.adapter_names():
            continue
        module.delete_adapter(name)
        if not module.adapter_names():
            replace_module(model, path, module.base_layer)
    AdapterState.of(model).remove(name)


@contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Give row i of every batch inside the block adapter ``names[i]`` (None: the base model).

    Rows are grouped by adapter, so each layer makes one batched LoRA call per distinct
    adapter, not one per row. Inputs must keep the batch as their first dimension (true for
    ``model(**batch)`` and ``generate`` without beam search).
    """
    known = [n for n in names if n is not None]
    check_adapter_names(model, known)
    if merged_adapters(model):
        raise LoraError("Cannot route while adapters are merged; unmerge the model first.")
    wrappers = [
        (p, m) for p, m in iter_adapter_modules(model) if set(known) & set(m.adapter_names())
    ]
    refused = sorted(f"{p} ({type(m).__name__})" for p, m in wrappers if not m.supports_routing)
    if refused:
        raise LoraError(
            f"Cannot route these adapters: {refused} serve one adapter per forward (a "
            "modules_to_save copy, trainable rows, a raw parameter or attention sees tokens, "
            "not examples). Run those adapters one at a time with set_adapter."
        )
    groups: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    layers = [m for _, m in lora_layers(model)]
    for layer in layers:
        layer.set_route(groups, len(names))
    try:
        yield model
    finally:
        for layer in layers:
            layer.clear_route()


def combine(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    method: str = "cat",
    rank: int | None = None,
) -> dict[str, float]:
    """Add adapter ``name`` built from weighted existing adapters; return per-module errors.

    With ΔW_i = s_i B_i A_i and weights w_i, per module:

    - ``cat``: B = [w_1 s_1 B_1, …], A = [A_1; …], scale 1, rank Σ r_i. Exact:
      ΔW = Σ w_i ΔW_i.
    - ``svd``: the best rank-``rank`` factorisation of Σ w_i ΔW_i; the returned dict gives each
      module's relative Frobenius error.
    - ``linear``: B = Σ sign(w_i)·sqrt(|w_i| s_i) B_i, A = Σ sqrt(|w_i| s_i) A_i (PEFT's
      ``linear``): needs equal ranks and targets, and is exact only for one adapter.

    The new adapter records the model's ``name_or_path`` as its base (the first adapter's base
    when the model has none). ``modules_to_save`` copies are not combined. Raises ``LoraError``
    before changing anything for unknown names, an existing ``name``, an unknown method, or
    unequal ranks/targets for ``linear``.
    """
    layers = [(p, m) for p, m in lora_layers(model) if any(n in m.lora_A for n in weights)]
    _check_combinable(model, weights, name, method, rank, layers)
    ranks = {path: _combined_rank(path, layer, weights, method, rank) for path, layer in layers}
    nested = {id(n) for _, m in layers for n in m.nested_layers()}
    config = _combined_config([(p, m) for p, m in layers if id(m) not in nested], ranks)
    first = adapter_configs(model)[next(iter(weights))].base_model_name_or_path
    config.base_model_name_or_path = getattr(model, "name_or_path", None) or first
    add_lora(model, config, name)
    errors = {}
    with torch.no_grad():
        for path, layer in progress(layers, f"combine ({method})", unit="layer"):
            errors.update(_combine_layer(path, layer, name, weights, method, ranks[path]))
    return errors


def _check_combinable(
    model: nn.Module,
    weights: dict[str, float],
    name: str,
    method: str,
    rank: int | None,
    layers: list[tuple[str, LoraLayer]],
) -> None:
    check_adapter_names(model, list(weights))
    if name in adapter_configs(model):
        raise LoraError(f"adapter '{name}' already exists; choose another name.")
    if method not in ("cat", "svd", "linear"):
        raise LoraError(f"combine method must be 'cat', 'svd' or 'linear', got {method!r}.")
    if method == "svd" and (rank is None or rank <= 0):
        raise LoraError("combine(method='svd') needs rank=<positive integer>.")
    special = sorted(
        f"{p} ('{n}')"
        for p, m in layers
        for n in weights
        if n in m.lora_A and (m.is_dora(n) or n in m.lora_bias)
    )
    if special:
        raise LoraError(
            f"combine needs plain LoRA adapters; DoRA or lora_bias adapters sit on {special}: "
            "their magnitudes and biases do not add up as low-rank deltas."
        )


def _combined_rank(
    path: str, layer: LoraLayer, weights: dict[str, float], method: str, rank: int | None
) -> int:
    """The combined adapter's rank on one layer (``cat``: the sum, ``svd``: ``rank`` capped)."""
    present = [n for n in weights if n in layer.lora_A]
    if method == "cat":
        return sum(layer.r[n] for n in present)
    if method == "svd":
        B, A = layer.factors(present[0])
        return min(rank, B.shape[-2], A.shape[-1])
    if len(present) != len(weights) or len({layer.r[n] for n in present}) > 1:
        raise LoraError(
            f"combine(method='linear') needs every adapter on every module with equal "
            f"ranks; {path} has { ({n: layer.r[n] for n in present}) }. Use 'cat' or 'svd'."
        )
    return layer.r[present[0]]


def _combine_layer(
    path: str, layer: LoraLayer, name: str, weights: dict[str, float], method: str, rank: int
) -> dict[str, float]:
    """Fill adapter ``name`` of one layer per ``combine``; {path: truncation error} for svd."""
    pairs = [
        (*layer.factors(n), w * layer.scale[n]) for n, w in weights.items() if n in layer.lora_A
    ]
    if method == "cat":
        B = torch.cat([b * ws for b, _, ws in pairs], dim=-1)
        A = torch.cat([a for _, a, _ in pairs], dim=-2)
    elif method == "linear":
        B = sum(b * math.copysign(math.sqrt(abs(ws)), ws) for b, _, ws in pairs)
        A = sum(a * math.sqrt(abs(ws)) for _, a, ws in pairs)
    else:
        # Σ w_i s_i B_i A_i = [w_1 s_1 B_1, …] [A_1; …]: its SVD from the factors, exactly.
        B_cat = torch.cat([b * ws for b, _, ws in pairs], dim=-1)
        U, S, Vh = factored_svd(B_cat, torch.cat([a for _, a, _ in pairs], dim=-2))
        root = S[..., :rank].sqrt()
        B, A = U[..., :rank] * root.unsqueeze(-2), root.unsqueeze(-1) * Vh[..., :rank, :]
        layer.set_factors(name, B, A)
        return {path: float(S[..., rank:].norm() / S.norm().clamp_min(1e-30))}
    layer.set_factors(name, B, A)
    return {}


def _combined_config(layers: list, ranks: dict[str, int]) -> LoraConfig:
    """Config of a combined adapter: exactly these modules, each with scale 1 at its rank."""
    modules, parameters, slices, rank_pattern = [], [], {}, {}
    r = max(ranks.values())
    for path, layer in layers:
        target = re.escape(layer.target_name(path))
        rank_pattern[target] = ranks[path]
        if "parameter" in layer.options:
            parameters.append(layer.target_name(path))
            continue
        modules.append(target)
        if "slices" in layer.options:
            slices[path] = layer.options["slices"]
    return LoraConfig(
        r=r,
        alpha=alpha_for_scale(1.0, r, use_rslora=False),
        target_modules="|".join(modules) if modules else None,
        target_parameters=parameters or None,
        rank_pattern=rank_pattern,
        alpha_pattern={
            k: alpha_for_scale(1.0, v, use_rslora=False) for k, v in rank_pattern.items()
        },
        fused_slices=slices,
    )
