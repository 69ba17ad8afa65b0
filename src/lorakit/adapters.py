"""Many adapters on one base model: choose, disable, delete, route rows to adapters."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .errors import LoraError
from .inject import CONFIGS_ATTR, adapter_configs, iter_adapter_modules
from .layers import LoraLayer
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
            parent_path, _, child = path.rpartition(".")
            plain = module.base_layer if isinstance(module, LoraLayer) else module.original_module
            setattr(model.get_submodule(parent_path), child, plain)
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
