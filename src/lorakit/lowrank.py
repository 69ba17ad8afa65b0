"""Low-rank approximation: truncated SVD, LoRA extraction and resizing, factorised layers.

Eckart–Young: for W = U Σ Vᵀ (σ1 ≥ σ2 ≥ …) the best rank-r approximation in Frobenius norm is
U_r Σ_r V_rᵀ, and its error is exactly the tail, ‖W − W_r‖_F² = Σ_{i>r} σ_i². lorakit splits
it evenly between two factors::

    W (out × in)  ≈  B (out × r)  @  A (r × in),   B = U_r Σ_r^½,  A = Σ_r^½ V_rᵀ

storing r·(out + in) numbers instead of out·in. The factors serve two ideas:

- additive (LoRA): the fine-tuned W' = W + B A, the low-rank part is a *change* to a weight that
  stays — ``extract_adapter`` (from a full fine-tune), ``resize_adapter``;
- replacement (DeepSeek-V2's ``q_a_proj`` / ``q_b_proj``): W itself becomes B A, two thinner
  Linears — ``factorize``, saved and read back by ``load_factorized``.

Spectra and the LoRA paper's amplification analysis of an adapter live in ``lorakit.inspect``.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import WEIGHT_INITS, LoraConfig
from .errors import LoraError
from .inject import PlanEntry, add_lora, plan
from .layers import lora_delta
from .merge import check_adapter_names
from .progress import progress
from .state import AdapterState, adapter_configs
from .tables import format_table
from .targeting import lora_layers, unwrap, walk

# A given rank on a matrix at least this wide uses a randomized SVD (Halko et al. 2011).
RANDOMIZED_MIN_DIM = 2048
# Float rounding in Σσ² (fp32 σ, summed in fp64): energy=1 then picks the numerical rank.
_ENERGY_SLACK = 1e-10


# --- one matrix ------------------------------------------------------------------------------
def rank_problems(rank: int | None, energy: float | None) -> list[str]:
    if (rank is None) == (energy is None):
        return ["give exactly one of rank (a fixed rank) or energy (a fraction in (0, 1])"]
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        return [f"rank must be a positive integer, got {rank!r}"]
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        return [f"energy must be a fraction in (0, 1], got {energy!r}"]
    return []


def raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        raise LoraError(f"Cannot {what}:\n  - " + "\n  - ".join(problems))


def rank_limit_problems(rank: int | None, limits: dict[str, int]) -> list[str]:
    """One problem naming the modules whose min(out, in) (``limits``) is below ``rank``."""
    small = {
        path: limit for path, limit in limits.items() if isinstance(rank, int) and rank > limit
    }
    if not small:
        return []
    lowest = min(small.values())
    example = next(path for path, limit in small.items() if limit == lowest)
    return [
        f"rank {rank} exceeds min(out, in) of {len(small)} module(s), e.g. {example}: "
        f"{lowest}; use rank <= {lowest}, energy, or narrower targets"
    ]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` CPU threads for torch, then restore its setting.

    Process-wide (``torch.set_num_threads``): for the SVD tools, not for threaded servers.
    """
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spare_threads() -> int:
    """Threads for one SVD of a weight: torch's setting, cut to the cores other jobs leave.

    LAPACK's SVD, QR and eigensolvers split a call across OpenMP threads that meet at a
    barrier after every step; when other jobs keep the cores busy, the threads wait for one
    that is not scheduled. On the 2-core development machine at load average 7, two threads
    took 8x (one 2048 x 2048 SVD) to 50x (210 rank-16 factored SVDs) the CPU time of one.
    ``OMP_NUM_THREADS``, when set, is the user's choice and kept.
    """
    threads = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return threads
    try:
        others = os.getloadavg()[0] - 1  # the 1-minute average counts this process too
    except (AttributeError, OSError):  # no load average on this system
        return threads
    return max(1, min(threads, int((os.cpu_count() or 1) - others)))


def factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The exact thin SVD of M = B @ A without forming M: (..., m, k) @ (..., k, n).

    With B = Q_b R_b and Aᵀ = Q_a R_a (QR), M = Q_b (R_b R_aᵀ) Q_aᵀ, and the small core's
    SVD U' S V'ᵀ gives M = (Q_b U') S (Q_a V')ᵀ. It costs O((m + n) k²) instead of the
    O(m n min(m, n)) of an SVD of M, which matters for a LoRA delta (k = r ≪ m, n). Returns
    U (..., m, j), S (..., j), Vᴴ (..., j, n) with j = min(m, n, k), in fp32.

    One thread: the products are too small to share (see :func:`spare_threads`).
    """
    with torch_threads(1):
        Qb, Rb = torch.linalg.qr(B.float())  # (..., m, j1), (..., j1, k)
        Qa, Ra = torch.linalg.qr(A.float().mT)  # (..., n, j2), (..., j2, k)
        U, S, Vh = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)  # core (..., j1, j2)
        return Qb @ U, S, Vh @ Qa.mT


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest k with σ1² + … + σk² ≥ energy · Σσ² (at least 1; σ sorted descending)."""
    squares = singular_values.double().square()
    total = squares.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) >= (energy - _ENERGY_SLACK) * total
    return int(kept.nonzero()[0, 0]) + 1


def low_rank(
    W: Tensor,
    rank: int | None = None,
    energy: float | None = None,
    *,
    randomized: bool | None = None,
    niter: int = 4,
    seed: int = 0,
) -> tuple[Tensor, Tensor, dict]:
    """Best rank-r factors of a 2D tensor: W (out, in) ≈ B (out, r) @ A (r, in).

    Args:
        W: the matrix; factors are fp32 (fp64 for an fp64 W).
        rank: r, at most min(out, in).
        energy: instead of ``rank``, the smallest r keeping this fraction of Σσ² (needs the
            full spectrum, so always an exact SVD).
        randomized: use ``torch.svd_lowrank`` (r + 10 probe vectors, ``niter`` power
            iterations, seeded). Default: when min(out, in) ≥ ``RANDOMIZED_MIN_DIM`` and
            r ≤ min(out, in) / 4.

    Returns:
        ``(B, A, info)``; ``info``: ``rank``, ``rel_error`` = ‖W − B A‖_F / ‖W‖_F (the tail of
        the spectrum for an exact SVD, measured for a randomized one),
        ``energy`` = ‖B A‖_F² / ‖W‖_F² (the kept share of Σσ²), ``method`` (``"svd"`` or
        ``"randomized_svd"``), ``singular_values`` (all for an exact SVD, r + 10 otherwise).

    Raises:
        LoraError: W not 2D or not finite, both or neither of rank and energy, rank below 1 or
            above min(out, in), energy outside (0, 1].
    """
    problems = rank_problems(rank, energy)
    if W.dim() != 2:
        problems.append(f"W must be a 2D matrix, got shape {tuple(W.shape)}")
    elif not problems and rank is not None and rank > min(W.shape):
        problems.append(f"rank {rank} exceeds min(out, in) = {min(W.shape)} of W {tuple(W.shape)}")
    elif not torch.isfinite(W).all():
        problems.append("W holds NaN or inf values")
    raise_problems("factorise the matrix", problems)
    work = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    small = min(work.shape)
    if randomized is None:
        randomized = rank is not None and small >= RANDOMIZED_MIN_DIM and rank <= small // 4
    if randomized and energy is None:
        with torch.random.fork_rng(devices=[]), torch_threads(spare_threads()):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(work, q=min(rank + 10, small), niter=niter)
        Vh, method = V.T, "randomized_svd"
    else:
        with torch_threads(spare_threads()):
            U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        method = "svd"
        if energy is not None:
            rank = rank_for_energy(S, energy)
    root = S[:rank].sqrt()
    B = U[:, :rank] * root  # (out, r) · (r,) -> (out, r)
    A = root[:, None] * Vh[:rank]  # (r, 1) · (r, in) -> (r, in)
    squares = S.double().square()
    if method == "svd":  # Eckart–Young: the error is exactly the tail of the spectrum
        total = float(squares.sum())
        rel_error = math.sqrt(float(squares[rank:].sum()) / total) if total else 0.0
    else:  # only the top of the spectrum is known: the error is measured
        total = float(work.double().square().sum())  # ‖W‖_F² = Σσ²
        residual = work - lora_delta(B, A, 1.0).to(work.dtype)
        rel_error = math.sqrt(float(residual.double().square().sum()) / total) if total else 0.0
    kept = float(squares[:rank].sum()) / total if total else 1.0
    info = {"rank": rank, "rel_error": rel_error, "energy": kept, "method": method}
    info["singular_values"] = S
    return B, A, info


def _unit_scale_config(config: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """``config`` with the given rank per module and scale 1 everywhere.

    The most common rank becomes ``r``, the others exact-path ``rank_pattern`` entries; alpha
    follows each rank (alpha = r, or sqrt(r) with rsLoRA) so every scale is 1.
    """
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))

    def alpha(rank: int) -> float:  # scale = alpha / r (rsLoRA: alpha / sqrt(r)) = 1
        return math.sqrt(rank) if config.use_rslora else float(rank)

    others = {re.escape(path): k for path, k in ranks.items() if k != r}
    return config.replace(
        r=r,
        alpha=alpha(r),
        rank_pattern=others,
        alpha_pattern={key: alpha(k) for key, k in others.items()},
    )


@dataclass
class FactorRow:
    """One factorised matrix: its rank, error and parameter counts before and after."""

    path: str
    shape: tuple[int, ...]
    rank: int
    rel_error: float  # ‖M − B A‖_F / ‖M‖_F, M the matrix that was factorised
    energy: float  # share of ‖M‖_F² kept
    params_before: int
    params_after: int
    old_rank: int | None = None  # resize_adapter: the rank it had


@dataclass
class LowRankReport:
    """What ``extract_adapter``, ``resize_adapter`` or ``factorize`` did. ``str()`` is a table.

    ``untargeted`` (extraction): parameters that changed in the fine-tune outside the targets,
    with their relative change ‖ΔW‖/‖W‖; ``kept``: those of them the adapter carries.
    """

    action: str
    rows: list[FactorRow]
    config: LoraConfig | None = None
    untargeted: dict[str, float] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        """Parameters of the factorised matrices (or of the adapter) before."""
        return sum(r.params_before for r in self.rows)

    @property
    def params_after(self) -> int:
        """Parameters of the factors after."""
        return sum(r.params_after for r in self.rows)

    def __str__(self) -> str:
        head = ("module", "shape", "rank", "rel. error", "energy", "params before", "after")
        rows = [head]
        for r in self.rows:
            rank = f"{r.old_rank} -> {r.rank}" if r.old_rank is not None else str(r.rank)
            shape = "x".join(map(str, r.shape))
            errors = f"{r.rel_error:.2e}", f"{r.energy:.4f}"
            rows.append(
                (r.path, shape, rank, *errors, f"{r.params_before:,}", f"{r.params_after:,}")
            )
        lines = format_table(rows)
        lines.append(
            f"{self.action}: {len(self.rows)} modules, {self.params_before:,} -> "
            f"{self.params_after:,} parameters"
        )
        for name, change in self.untargeted.items():
            kept = "kept" if name in self.kept else "dropped"
            lines.append(f"changed outside the targets: {name} (|dW|/|W| = {change:.2e}), {kept}")
        return "\n".join(lines)


# --- additive: extraction and resizing --------------------------------------------------------
def _plain_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The user's parameters by name, tied ones under each name, lorakit wrappers looked through."""
    found = {}
    for path, module in walk(model):
        plain = unwrap(module)
        # walk does not enter a wrapper: take the whole module it wraps.
        for name, p in plain.named_parameters(recurse=plain is not module, remove_duplicate=False):
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


def _relative_change(old: Tensor, new: Tensor) -> float:
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
    saved = sorted(o for o in owners if o and not any(t.startswith(o + ".") for t in paths))
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
    base, tuned = _plain_parameters(base_model), _plain_parameters(tuned_model)
    problems += _architecture_problems(base, tuned)
    raise_problems("extract an adapter", problems)
    probe = LoraConfig(r=1, target_modules=target_modules)
    entries = plan(base_model, probe, adapter_name).entries
    modules = [unwrap(base_model.get_submodule(e.path)) for e in entries]
    limits = {}
    for entry, module in zip(entries, modules, strict=True):
        reason = entry.layer.matrix_problem(module, **entry.options)
        if reason:
            problems.append(f"{entry.path}: cannot extract into {reason}")
        else:
            limits[entry.path] = entry.layer.rank_limit(module, **entry.options)
    raise_problems("extract an adapter", problems + rank_limit_problems(rank, limits))

    factors = {}
    pairs = list(zip(entries, modules, strict=True))
    for entry, module in progress(pairs, "extract (SVD)", unit="matrix"):
        name = f"{entry.path}.weight"
        delta = tuned[name].detach().float() - base[name].detach().float()
        matrix = entry.layer.to_matrix(module, delta, **entry.options)
        factors[entry.path] = (delta, *low_rank(matrix, rank, energy))

    targeted = {f"{e.path}.weight" for e in entries}
    untargeted = {
        name: _relative_change(p, tuned[name])
        for name, p in base.items()
        if name not in targeted and not torch.equal(p, tuned[name])
    }
    paths = {e.path for e in entries}
    saved, bias, kept = _what_to_keep(untargeted, paths) if keep_untargeted else ([], "none", [])
    ranks = {path: info["rank"] for path, (_, _, _, info) in factors.items()}
    config = _unit_scale_config(
        probe.replace(
            modules_to_save=saved or None,
            bias=bias,
            base_model_name_or_path=getattr(base_model, "name_or_path", None) or None,
        ),
        ranks,
    )
    add_lora(base_model, config, adapter_name)

    rows = []
    with torch.no_grad():
        for entry in entries:
            delta, B, A, info = factors[entry.path]
            layer = base_model.get_submodule(entry.path)
            layer.set_factors(adapter_name, B, A, scale=1.0)
            error = _relative_change(delta, layer.delta_weight(adapter_name))
            rows.append(factor_row(entry, info, error, delta.numel(), B.numel() + A.numel()))
        for path in saved:
            clone = base_model.get_submodule(path).modules_to_save[adapter_name]
            for name, p in clone.named_parameters():
                p.copy_(tuned[f"{path}.{name}"])
        if bias == "lora_only":
            for path in paths:
                if f"{path}.bias" in untargeted:
                    base[f"{path}.bias"].copy_(tuned[f"{path}.bias"])
    return LowRankReport("extract", rows, config, untargeted, kept)


def factor_row(entry: PlanEntry, info: dict, error: float, before: int, after: int) -> FactorRow:
    return FactorRow(entry.target, entry.shape, info["rank"], error, info["energy"], before, after)


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
    problems = rank_problems(rank, energy)
    if config.init in WEIGHT_INITS:
        problems.append(
            f"adapter '{adapter_name}' is a {config.init} adapter whose base weight holds a "
            "residual; save_adapter it (a plain LoRA), load that onto the original base model "
            "and resize there"
        )
    layers = lora_layers(model, adapter_name)
    limits = {}
    for path, layer in layers:
        reason = layer.matrix_problem(layer.base_layer, **layer.options)
        if layer.is_dora(adapter_name) or adapter_name in layer.lora_bias:
            reason = "a DoRA or lora_bias adapter (not a plain low-rank delta)"
        if reason:
            problems.append(f"{path}: cannot resize {reason}")
        elif adapter_name in layer.merged:
            problems.append(f"{path}: adapter '{adapter_name}' is merged; unmerge it first")
        else:
            limits[path] = layer.rank_limit(layer.base_layer, **layer.options)
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
            error = _relative_change(delta, layer.delta_weight(adapter_name))
            key = layer.target_name(path)  # patterns name a parameter, as in plan()
            ranks[key] = info["rank"]
            shape = tuple(layer.base_weight.shape)
            after = B.numel() + A.numel()
            rows.append(
                FactorRow(key, shape, info["rank"], error, info["energy"], before, after, old)
            )
    AdapterState.of(model).update(adapter_name, _unit_scale_config(config, ranks))
    return LowRankReport("resize", rows, adapter_configs(model)[adapter_name])
