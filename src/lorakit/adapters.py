"""Many adapters on one base model: choose, disable, delete, route rows, combine."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import LoraError
from .inject import (
    CONFIGS_ATTR,
    adapter_configs,
    add_lora,
    iter_adapter_modules,
    logical_path,
    replace_module,
)
from .layers import LoraConv, LoraFused, LoraLayer, LoraParameter, ModulesToSave, lora_delta
from .merge import _active, check_adapter_names, merge, unmerge


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters whose deltas currently add to the output."""
    return _active(model)


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Activate ``names`` (one name or a list: their deltas add up) and deactivate the rest.

    Raises ``LoraError`` for unknown names, or when a merged adapter would be deactivated
    (its delta is in the weights: ``unmerge`` it first).
    """
    names = [names] if isinstance(names, str) else list(names)
    check_adapter_names(model, names)
    stuck = sorted(
        {n for _, m in iter_adapter_modules(model) if isinstance(m, LoraLayer) for n in m.merged}
        - set(names)
    )
    if stuck:
        raise LoraError(f"Adapter(s) {stuck} are merged into the weights; unmerge them first.")
    for _, module in iter_adapter_modules(model):
        module.active = [n for n in names if n in module.adapter_names()]


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block; restore the previous state on exit.

    Merged adapters are unmerged for the block and merged back afterwards, also when the block
    raises.
    """
    modules = [m for _, m in iter_adapter_modules(model)]
    was_merged = sorted({n for m in modules if isinstance(m, LoraLayer) for n in m.merged})
    was_active = [list(m.active) for m in modules]
    unmerge(model)
    for m in modules:
        m.active = []
    try:
        yield model
    finally:
        for m, active in zip(modules, was_active, strict=True):
            m.active = active
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
            plain = module.base_layer if isinstance(module, LoraLayer) else module.original_module
            replace_module(model, path, plain)
    configs = dict(adapter_configs(model))
    del configs[name]
    setattr(model, CONFIGS_ATTR, configs)


@contextmanager
def route(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Give row i of every batch inside the block adapter ``names[i]`` (None: the base model).

    Rows are grouped by adapter, so each layer makes one batched LoRA call per distinct
    adapter, not one per row. Inputs must keep the batch as their first dimension (true for
    ``model(**batch)`` and ``generate`` without beam search).
    """
    known = [n for n in names if n is not None]
    check_adapter_names(model, known)
    layers = [m for _, m in iter_adapter_modules(model) if isinstance(m, LoraLayer)]
    if any(m.merged for m in layers):
        raise LoraError("Cannot route while adapters are merged; unmerge the model first.")
    copies = sorted(
        {
            p
            for p, m in iter_adapter_modules(model)
            if isinstance(m, ModulesToSave) and set(known) & set(m.adapter_names())
        }
    )
    if copies:
        raise LoraError(
            f"Cannot route adapters with modules_to_save copies ({copies}): a copied module "
            "serves one adapter per forward. Run those adapters one at a time with set_adapter."
        )
    groups: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    for layer in layers:
        device = layer.base_weight.device
        layer.route = [
            (name, torch.tensor(rows, device=device))
            for name, rows in groups.items()
            if name in layer.lora_A
        ]
        layer.route_batch = len(names)
    try:
        yield model
    finally:
        for layer in layers:
            layer.route = None


def _matrices(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor]:
    """Adapter ``name`` as (B, A) matrices with B @ A meaningful: (..., out, r), (..., r, in)."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    if isinstance(layer, LoraConv):
        if layer.base_layer.groups > 1:
            raise LoraError(f"combine does not support grouped convolutions ({layer.base_layer}).")
        return B.flatten(1), A.flatten(1)
    return B, A


def _store(layer: LoraLayer, name: str, B: Tensor, A: Tensor) -> None:
    layer.lora_A[name].copy_(A.reshape(layer.lora_A[name].shape))  # under combine's no_grad
    layer.lora_B[name].copy_(B.reshape(layer.lora_B[name].shape))


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

    ``modules_to_save`` copies are not combined. Raises ``LoraError`` before changing anything
    for unknown names, an existing ``name``, an unknown method, or unequal ranks/targets
    for ``linear``.
    """
    check_adapter_names(model, list(weights))
    if name in adapter_configs(model):
        raise LoraError(f"adapter '{name}' already exists; choose another name.")
    if method not in ("cat", "svd", "linear"):
        raise LoraError(f"combine method must be 'cat', 'svd' or 'linear', got {method!r}.")
    if method == "svd" and (rank is None or rank <= 0):
        raise LoraError("combine(method='svd') needs rank=<positive integer>.")
    layers = [
        (path, m)
        for path, m in iter_adapter_modules(model)
        if isinstance(m, LoraLayer) and any(n in m.lora_A for n in weights)
    ]
    ranks: dict[str, int] = {}
    for path, layer in layers:
        present = [n for n in weights if n in layer.lora_A]
        if method == "linear":
            if len(present) != len(weights) or len({layer.r[n] for n in present}) > 1:
                raise LoraError(
                    f"combine(method='linear') needs every adapter on every module with equal "
                    f"ranks; {path} has { ({n: layer.r[n] for n in present}) }. Use 'cat' or 'svd'."
                )
            ranks[path] = layer.r[present[0]]
        elif method == "cat":
            ranks[path] = sum(layer.r[n] for n in present)
        else:
            B, A = _matrices(layer, present[0])
            ranks[path] = min(rank, B.shape[-2], A.shape[-1])
    config = _combined_config(layers, ranks)
    config.base_model_name_or_path = adapter_configs(model)[
        next(iter(weights))
    ].base_model_name_or_path
    add_lora(model, config, name)
    errors = {}
    with torch.no_grad():
        for path, layer in layers:
            errors.update(_combine_layer(path, layer, name, weights, method, ranks[path]))
    return errors


def _combine_layer(
    path: str, layer: LoraLayer, name: str, weights: dict[str, float], method: str, rank: int
) -> dict[str, float]:
    """Fill adapter ``name`` of one layer per ``combine``; {path: truncation error} for svd."""
    pairs = [
        (*_matrices(layer, n), w * layer.scale[n]) for n, w in weights.items() if n in layer.lora_A
    ]
    if method == "cat":
        B = torch.cat([b * ws for b, _, ws in pairs], dim=-1)
        A = torch.cat([a for _, a, _ in pairs], dim=-2)
    elif method == "linear":
        B = sum(b * math.copysign(math.sqrt(abs(ws)), ws) for b, _, ws in pairs)
        A = sum(a * math.sqrt(abs(ws)) for _, a, ws in pairs)
    else:
        delta = sum(lora_delta(b, a, ws) for b, a, ws in pairs)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        root = S[..., :rank].sqrt()
        B, A = U[..., :rank] * root.unsqueeze(-2), root.unsqueeze(-1) * Vh[..., :rank, :]
        _store(layer, name, B, A)
        return {path: float(S[..., rank:].norm() / S.norm().clamp_min(1e-30))}
    _store(layer, name, B, A)
    return {}


def _combined_config(layers: list, ranks: dict[str, int]) -> LoraConfig:
    """Config of a combined adapter: exactly these modules, each with scale 1 at its rank."""
    modules, parameters, slices, rank_pattern = [], [], {}, {}
    for path, layer in layers:
        if isinstance(layer, LoraParameter):
            owner = logical_path(path)
            parameters.append(f"{owner}.{layer.parameter_name}")
            rank_pattern[re.escape(f"{owner}.{layer.parameter_name}")] = ranks[path]
            continue
        modules.append(re.escape(path))
        rank_pattern[re.escape(path)] = ranks[path]
        if isinstance(layer, LoraFused):
            slices[path] = layer.enabled
    return LoraConfig(
        r=max(ranks.values()),
        alpha=max(ranks.values()),
        target_modules="|".join(modules) if modules else None,
        target_parameters=parameters or None,
        rank_pattern=rank_pattern,
        alpha_pattern={k: float(v) for k, v in rank_pattern.items()},
        fused_slices=slices,
    )
