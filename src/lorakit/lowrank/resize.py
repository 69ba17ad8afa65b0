"""An adapter's rank changed in place: the best rank-r LoRA of each module's ΔW."""

from __future__ import annotations

import torch
from torch import nn

from ..config import WEIGHT_INITS
from ..merge import check_adapter_names
from ..progress import progress
from ..state import AdapterState, adapter_configs
from ..targeting import lora_layers
from .extract import relative_change, unit_scale_config
from .report import FactorRow, LowRankReport
from .svd import low_rank, raise_problems, rank_limit_problems, rank_problems


def resize_adapter(
    model: nn.Module,
    rank: int | None = None,
    adapter_name: str = "default",
    energy: float | None = None,
) -> LowRankReport:
    """Change the rank of adapter ``adapter_name`` in place: the best rank-r LoRA of its ΔW.

    Each module's ΔW (``delta_weight``) is factorised by ``low_rank``; the adapter's config gets
    the new ranks (per module with ``energy``, as ``rank_pattern``) at scale 1. A larger rank
    than before is allowed and exact. Optimiser state for the old factors no longer applies.

    Raises:
        LoraError: unknown adapter, rank / energy as in ``low_rank`` (rank above a module's
            min(out, in)), a merged or PiSSA / OLoRA adapter, or layouts with no single ΔW
            matrix (fused slices, 3D experts, grouped convolutions).
    """
    check_adapter_names(model, [adapter_name])
    config = adapter_configs(model)[adapter_name]
    layers = lora_layers(model, adapter_name)
    problems = rank_problems(rank, energy) + _resize_problems(adapter_name, config.init, layers)
    limits = {
        path: layer.rank_limit(layer.base_layer, **layer.options)
        for path, layer in layers
        if not layer.matrix_problem(layer.base_layer, **layer.options)
    }
    raise_problems(f"resize adapter '{adapter_name}'", problems + rank_limit_problems(rank, limits))

    rows, ranks = [], {}
    with torch.no_grad():
        # Every factorisation first (low_rank raises on a non-finite ΔW), then the writes:
        # an error never leaves the adapter half resized.
        deltas = [layer.delta_weight(adapter_name) for _, layer in layers]
        factors = [
            low_rank(layer.as_matrix(delta), rank, energy)
            for (_, layer), delta in progress(
                zip(layers, deltas, strict=True), "resize (SVD)", len(layers), "matrix"
            )
        ]
        for (path, layer), delta, (B, A, info) in zip(layers, deltas, factors, strict=True):
            old = layer.r[adapter_name]
            before = layer.lora_A[adapter_name].numel() + layer.lora_B[adapter_name].numel()
            layer.set_factors(adapter_name, B, A, scale=1.0)
            error = relative_change(delta, layer.delta_weight(adapter_name))
            key = layer.target_name(path)  # patterns name a parameter, as in plan()
            ranks[key] = info["rank"]
            shape = tuple(layer.base_weight.shape)
            after = B.numel() + A.numel()
            rows.append(
                FactorRow(key, shape, info["rank"], error, info["energy"], before, after, old)
            )
    AdapterState.of(model).update(adapter_name, unit_scale_config(config, ranks))
    return LowRankReport("resize", rows, adapter_configs(model)[adapter_name])


def _resize_problems(
    adapter_name: str, init: str, layers: list[tuple[str, nn.Module]]
) -> list[str]:
    """Why the adapter has no plain low-rank ΔW to refactorise, one problem per cause."""
    problems = []
    if init in WEIGHT_INITS:
        problems.append(
            f"adapter '{adapter_name}' is a {init} adapter whose base weight holds a "
            "residual; save_adapter it (a plain LoRA), load that onto the original base model "
            "and resize there"
        )
    for path, layer in layers:
        reason = layer.matrix_problem(layer.base_layer, **layer.options)
        if layer.is_dora(adapter_name) or adapter_name in layer.lora_bias:
            reason = "a DoRA or lora_bias adapter (not a plain low-rank delta)"
        if reason:
            problems.append(f"{path}: cannot resize {reason}")
        elif adapter_name in layer.merged:
            problems.append(f"{path}: adapter '{adapter_name}' is merged; unmerge it first")
    return problems
