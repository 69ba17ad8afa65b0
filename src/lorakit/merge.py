"""Folding adapters into the base weights and back: ``merge``, ``unmerge``, ``unload``.

Each layer knows what merging means for it (``merged_weight``: W + ΔW, DoRA's rescaled
direction, a lora_bias, replaced embedding rows); this module only orchestrates. ``merge``
computes every new weight and checks it is finite and exact before it writes a single one, so
a NaN in an adapter leaves the model untouched. Weights are updated as
``W <- cast(float32 result)`` so a half-precision base is not rounded twice.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .errors import LoraError
from .inject import replace_module
from .layers import LoraQuantizedLinear, Wrapper, iter_adapter_modules, layer_class_for
from .layers.quantized import float_linear
from .state import AdapterState, adapter_configs
from .targeting import inside


def _mergeable(model: nn.Module) -> list[tuple[str, Wrapper]]:
    """Every wrapper that folds into a weight: LoRA layers (nested too) and trainable rows,
    not whole copies (``unload`` swaps those in)."""
    return [(p, m) for p, m in iter_adapter_modules(model) if not m.whole_copy]


def check_adapter_names(model: nn.Module, names: Sequence[str]) -> None:
    """Raise ``LoraError`` naming every unknown adapter and listing the known ones."""
    AdapterState.of(model).check(list(names))


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters whose deltas currently add to the output (or are merged)."""
    wrappers = [m for _, m in iter_adapter_modules(model)]
    return [n for n in adapter_configs(model) if any(n in m.active for m in wrappers)]


def merged_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters folded into at least one weight."""
    layers = [m for _, m in _mergeable(model)]
    return [n for n in adapter_configs(model) if any(n in m.merged for m in layers)]


def _untie(model: nn.Module, weight: nn.Parameter, owner: str) -> None:
    """Give every other module sharing ``weight`` its own copy before ``weight`` changes."""
    others = [
        (path, module, name)
        for path, module in model.named_modules(remove_duplicate=False)
        for name, p in module._parameters.items()
        if p is weight and not inside(path, owner)
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


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Fold adapters (default: the active ones) into the base weights: W <- W + ΔW.

    Idempotent: an adapter already merged into a layer is skipped. Raises ``LoraError`` before
    changing anything if an adapter is unknown, produces a non-finite weight, or sits on a
    layer where merging would not be exact (see each layer's ``merge_problem``). Weights tied
    to a merged weight (an embedding tied to ``lm_head``) are untied with a warning so they
    keep their values.
    """
    _merge(model, list(adapter_names) if adapter_names is not None else active_adapters(model))
    return model


def _merge(model: nn.Module, names: list[str]) -> None:
    check_adapter_names(model, names)
    pending, bad = [], []
    for path, layer in _mergeable(model):
        todo = [n for n in names if n in layer.adapter_names() and n not in layer.merged]
        problem = layer.merge_problem(todo) if todo else None
        if problem:
            bad.append(f"{path}: {problem}")
            continue
        for name in todo:
            with torch.no_grad():
                weight, bias = layer.merged_weight(name)
            if not torch.isfinite(weight).all() or (
                bias is not None and not torch.isfinite(bias).all()
            ):
                bad.append(f"non-finite values (NaN/inf) in the merged weight of {path} ('{name}')")
            pending.append((path, layer, name, weight, bias))
    if bad:
        raise LoraError("Refusing to merge; no weight was changed:\n  - " + "\n  - ".join(bad))
    for path, layer, name, weight, bias in pending:
        _untie(model, layer.base_weight, path)
        layer.merge(name, weight, bias)


def unmerge(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Undo ``merge`` for the given adapters (default all merged ones), last merged first."""
    if adapter_names is not None:
        check_adapter_names(model, adapter_names)
    for _, layer in _mergeable(model):
        for name in reversed(layer.merged):
            if adapter_names is None or name in adapter_names:
                layer.unmerge(name)
    return model


def dequantize_merge(
    model: nn.Module,
    dtype: torch.dtype = torch.float32,
    base_weights: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """``unload(merge=True)`` for a model on a quantized (bitsandbytes) base: a float model.

    Each quantized layer becomes a float ``nn.Linear`` of ``dtype``: with adapters,
    dequant(W) + ΔW, or W + ΔW where ``base_weights`` ({"<module path>.weight": original float
    W}) gives the weights before quantization; without, dequant(W). Nothing is re-quantized.
    A transformers model also drops its ``quantization_config``, so ``save_pretrained`` writes
    a float folder that plain ``from_pretrained`` loads.
    """
    base_weights = base_weights or {}
    for path, module in list(iter_adapter_modules(model)):
        # The one kind that rewraps itself onto a float base (the wrapper contract has no
        # ``to_float``: no other kind has a base to dequantize).
        if isinstance(module, LoraQuantizedLinear):
            original = base_weights.get(f"{path}.weight")
            replace_module(model, path, module.to_float(dtype, original))
    for path, module in list(model.named_modules()):
        # A bitsandbytes layer without adapters: the registry names its kind.
        if layer_class_for(module) is LoraQuantizedLinear:
            replace_module(
                model, path, float_linear(module, dtype, base_weights.get(f"{path}.weight"))
            )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return unload(model, merge=True)


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every lorakit wrapper and return the model with plain torch modules only.

    With ``merge=True`` the active adapters are folded in first (and an active adapter's
    ``modules_to_save`` copy replaces the original); with ``merge=False`` all adapters are
    discarded and the original weights restored.
    """
    if merge:
        _merge(model, active_adapters(model))
    else:
        unmerge(model)
        for _, wrapper in iter_adapter_modules(model):
            for name in wrapper.adapter_names():
                wrapper.restore_base(name)
    for path, module in reversed(list(iter_adapter_modules(model))):
        replace_module(model, path, module.unloaded(merge))
    AdapterState.drop(model)
    return model
