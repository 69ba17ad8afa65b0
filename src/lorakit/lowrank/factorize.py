"""Replacement-style low rank: a Linear swapped for two smaller ones (DeepSeek's q_a/q_b).

Unlike LoRA, which adds ``scale · B A`` next to a frozen W, ``factorize`` replaces W by its
best rank-r factorisation ``B A`` (truncated SVD, ``lowrank.low_rank``): fewer parameters and
FLOPs for good, at the cost of the discarded singular values. The layout (module -> rank) is
recorded in the model's config so ``models.load_model`` rebuilds the architecture on load.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import LoraConfig
from ..errors import LoraError
from ..inject import PlanEntry, plan, replace_module
from ..layers import LoraLinear, is_gpt2_conv1d
from ..progress import progress
from ..targeting import iter_adapter_modules
from .report import LowRankReport, factor_row
from .svd import low_rank, raise_problems, rank_limit_problems, rank_problems

FACTORIZED_KEY = "lorakit_factorized"  # config.json key: module path -> rank of its factors


class LowRankLinear(nn.Module):
    """A Linear (out, in) replaced by two: ``down`` (in -> r), then ``up`` (r -> out, with bias).

    y = up(down(x)) = B (A x) + b, DeepSeek-V2's ``q_a_proj`` / ``q_b_proj`` pair (without the
    norm between them). r·(in + out) weights instead of in·out: fewer when r < in·out/(in + out).
    """

    def __init__(
        self,
        in_features: int,
        rank: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        # (..., in) -> (..., r) -> (..., out)
        return self.up(self.down(x))


def _shell(module: nn.Module, rank: int) -> LowRankLinear:
    """An empty ``LowRankLinear`` of rank ``rank`` to stand in for Linear / Conv1D ``module``."""
    weight = module.weight
    in_features, out_features = weight.shape if is_gpt2_conv1d(module) else weight.shape[::-1]
    bias = getattr(module, "bias", None) is not None
    return LowRankLinear(in_features, rank, out_features, bias, weight.device, weight.dtype)


def factorize(
    model: nn.Module,
    target_modules: list[str] | str,
    rank: int | None = None,
    energy: float | None = None,
) -> LowRankReport:
    """Replace each target Linear / GPT-2 Conv1D in place by a ``LowRankLinear`` (W ≈ B A).

    Targets match as in ``LoraConfig`` (``"all-linear"`` spares the output head). With
    ``energy`` each module keeps its own smallest sufficient rank. The layout (module path ->
    rank) is recorded under ``lorakit_factorized`` in ``model.config``, so
    ``model.save_pretrained(dir)`` writes a folder ``load_factorized(dir)`` reads back.

    Raises:
        LoraError: as ``low_rank`` for rank / energy (rank above a target's min(out, in)), a
            target that is not a Linear or Conv1D or whose weight is tied to another module,
            or a model holding LoRA adapters (``unload`` them first).
    """
    entries = _factorize_entries(model, target_modules, rank, energy)

    rows, layout = [], {}
    with torch.no_grad():
        # Every factorisation before the first replacement: an error changes nothing.
        factors = []
        for entry in progress(entries, "factorize (SVD)", unit="matrix"):
            module = model.get_submodule(entry.path)
            weight = module.weight.T if is_gpt2_conv1d(module) else module.weight  # (out, in)
            factors.append((module, weight, *low_rank(weight, rank, energy)))
        for entry, (module, weight, B, A, info) in zip(entries, factors, strict=True):
            factored = _shell(module, info["rank"])
            factored.down.weight.copy_(A)
            factored.up.weight.copy_(B)
            if module.bias is not None:
                factored.up.bias.copy_(module.bias)
            replace_module(model, entry.path, factored)
            layout[entry.path] = info["rank"]
            rows.append(
                factor_row(entry, info, info["rel_error"], weight.numel(), B.numel() + A.numel())
            )
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, FACTORIZED_KEY, {**getattr(config, FACTORIZED_KEY, {}), **layout})
    return LowRankReport("factorize", rows)


def _factorize_entries(
    model: nn.Module, target_modules: list[str] | str, rank: int | None, energy: float | None
) -> list[PlanEntry]:
    """The targets, each checked to be an untied Linear / Conv1D with room for ``rank``."""
    problems = rank_problems(rank, energy)
    if any(True for _ in iter_adapter_modules(model)):
        problems.append("the model holds LoRA adapters; merge or unload() them first")
    raise_problems("factorize", problems)
    try:  # LoraConfig's target matching, with plan's checks and hints
        entries = plan(model, LoraConfig(r=1, target_modules=target_modules), "factorize").entries
    except LoraError as err:
        raise LoraError(str(err).replace("add adapter 'factorize'", "factorize", 1)) from None
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    limits = {}
    for entry in entries:
        module = model.get_submodule(entry.path)
        # Exactly a float Linear / Conv1D, whose W (out, in) is replaced: not a quantized
        # Linear (its subclass), and no other kind's weight is one such matrix.
        if entry.layer is not LoraLinear:
            problems.append(f"{entry.path}: {entry.module_type} is not a Linear or Conv1D")
        elif owners[id(module.weight)] > 1:
            problems.append(f"{entry.path}: its weight is tied to another module; untie it first")
        else:
            limits[entry.path] = min(entry.shape)
    raise_problems("factorize", problems + rank_limit_problems(rank, limits))
    return entries


def load_factorized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a causal LM saved after ``factorize`` (its ``config.json`` names the layout).

    Builds the architecture from the config, swaps in ``LowRankLinear`` shells of the recorded
    ranks and loads the safetensors weights (one file or shards), strictly.

    Raises:
        LoraError: no ``config.json`` with a ``lorakit_factorized`` layout, or weights that do
            not fit the layout.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    # models.load_model has refused a folder with its own code unless the user trusted it;
    # the architecture here is always one transformers ships.
    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    layout = getattr(config, FACTORIZED_KEY, None)
    if not layout:
        raise LoraError(
            f"{folder / 'config.json'} records no {FACTORIZED_KEY!r} layout: it is not a "
            "factorised model. Load it as a plain model."
        )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for path, rank in layout.items():
        replace_module(model, path, _shell(model.get_submodule(path), rank))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoraError(f"{folder} has no .safetensors weights; save with model.save_pretrained.")
    state = {k: v for f in files for k, v in load_file(f).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    # A tied weight (lm_head tied to the embeddings) is saved once, under the other name.
    missing = [k for k in missing if k not in params or id(params[k]) not in loaded]
    problems = [f"missing tensor {k}" for k in missing] + [
        f"unexpected tensor {k}" for k in unexpected
    ]
    raise_problems(f"load the factorised model in {folder}", problems[:50])
    model.name_or_path = str(folder)
    return model.eval()
