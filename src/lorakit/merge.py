"""Folding adapters into the base weights and back: ``merge``, ``unmerge``, ``unload``.

``merge`` computes every delta (``lora_delta``, fp32) and checks it is finite before it writes
a single weight, so a NaN in an adapter leaves the model untouched. Weights are updated as
``W <- cast(float32(W) + ΔW)`` so a half-precision base is not rounded twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .errors import LoraError
from .inject import CONFIGS_ATTR, adapter_configs, iter_adapter_modules, replace_module
from .layers import LoraLayer, ModulesToSave


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(p, m) for p, m in iter_adapter_modules(model) if isinstance(m, LoraLayer)]


def check_adapter_names(model: nn.Module, names: Sequence[str]) -> None:
    """Raise ``LoraError`` naming every unknown adapter and listing the known ones."""
    known = list(adapter_configs(model))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LoraError(f"Unknown adapter(s) {unknown}; this model has {known}.")


def _active(model: nn.Module) -> list[str]:
    layers = [m for _, m in iter_adapter_modules(model)]
    return [n for n in adapter_configs(model) if any(n in m.active for m in layers)]


def _untie(model: nn.Module, weight: nn.Parameter, owner: str) -> None:
    """Give every other module sharing ``weight`` its own copy before ``weight`` changes."""
    others = [
        (path, module, name)
        for path, module in model.named_modules(remove_duplicate=False)
        for name, p in module._parameters.items()
        if p is weight and path != owner and not path.startswith(owner + ".")
    ]
    for path, module, name in others:
        module._parameters[name] = nn.Parameter(weight.detach().clone(), weight.requires_grad)
        warnings.warn(
            f"Merging into '{owner}' unties its weight from '{path}.{name}', which keeps the "
            "unmerged values (a tied lm_head would otherwise change silently).",
            stacklevel=3,
        )
    config = getattr(model, "config", None)
    if others and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def _write(weight: nn.Parameter, delta: Tensor, sign: float) -> None:
    with torch.no_grad():
        weight.copy_(weight.float().add(delta, alpha=sign).to(weight.dtype))


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights: W <- W + ΔW.

    Idempotent: an adapter already merged into a layer is skipped. Raises ``LoraError`` before
    changing anything if an adapter is unknown, produces a non-finite delta, or sits on a
    layer that cannot merge (a grouped convolution). Weights tied to a merged weight (an
    embedding tied to ``lm_head``) are untied with a warning so they keep their values.
    """
    _merge(model, list(adapter_names) if adapter_names is not None else _active(model))
    return model


def _merge(model: nn.Module, names: list[str]) -> None:
    check_adapter_names(model, names)
    pending, bad = [], []
    for path, layer in _lora_layers(model):
        for name in names:
            if name in layer.lora_A and name not in layer.merged:
                delta = layer.delta_weight(name)
                if not torch.isfinite(delta).all():
                    bad.append(f"{path} (adapter '{name}')")
                pending.append((path, layer, name, delta))
    if bad:
        raise LoraError(
            f"Refusing to merge: non-finite values (NaN/inf) in the delta of {bad}. No weight "
            "was changed; retrain or reload the adapter."
        )
    for path, layer, name, delta in pending:
        _untie(model, layer.base_weight, path)
        _write(layer.base_weight, delta, +1.0)
        layer.merged.append(name)


def unmerge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Undo ``merge`` (W <- W - ΔW) for the given adapters, default all merged ones."""
    if adapter_names is not None:
        check_adapter_names(model, adapter_names)
    for _, layer in _lora_layers(model):
        for name in list(layer.merged):
            if adapter_names is None or name in adapter_names:
                _write(layer.base_weight, layer.delta_weight(name), -1.0)
                layer.merged.remove(name)
    return model


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every lorakit wrapper and return the model with plain torch modules only.

    With ``merge=True`` the active adapters are folded in first (and an active adapter's
    ``modules_to_save`` copy replaces the original); with ``merge=False`` all adapters are
    discarded and the original weights restored.
    """
    if merge:
        _merge(model, _active(model))
    else:
        unmerge(model)
        for _, layer in _lora_layers(model):
            for name in layer.adapter_names():
                layer.restore_base(name)
    for path, module in reversed(list(iter_adapter_modules(model))):
        if isinstance(module, ModulesToSave):
            chosen = next((n for n in module.active if n in module.modules_to_save), None)
            plain = module.modules_to_save[chosen] if merge and chosen else module.original_module
        else:
            plain = module.base_layer
        replace_module(model, path, plain)
    if hasattr(model, CONFIGS_ATTR):
        delattr(model, CONFIGS_ATTR)
    return model
