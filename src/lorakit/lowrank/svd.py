"""Truncated SVD of one matrix, and the rank checks every low-rank tool shares.

Eckart–Young: for W = U Σ Vᵀ (σ1 ≥ σ2 ≥ …) the best rank-r approximation in Frobenius norm is
U_r Σ_r V_rᵀ, and its error is exactly the tail, ‖W − W_r‖_F² = Σ_{i>r} σ_i². lorakit splits
it evenly between two factors::

    W (out × in)  ≈  B (out × r)  @  A (r × in),   B = U_r Σ_r^½,  A = Σ_r^½ V_rᵀ
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..errors import LoraError
from ..layers import lora_delta

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
    raise_problems("factorise the matrix", _matrix_problems(W, rank, energy))
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
    rel_error, kept = _errors(work, S, B, A, exact=method == "svd")
    info = {"rank": rank, "rel_error": rel_error, "energy": kept, "method": method}
    info["singular_values"] = S
    return B, A, info


def _matrix_problems(W: Tensor, rank: int | None, energy: float | None) -> list[str]:
    problems = rank_problems(rank, energy)
    if W.dim() != 2:
        problems.append(f"W must be a 2D matrix, got shape {tuple(W.shape)}")
    elif not problems and rank is not None and rank > min(W.shape):
        problems.append(f"rank {rank} exceeds min(out, in) = {min(W.shape)} of W {tuple(W.shape)}")
    elif not torch.isfinite(W).all():
        problems.append("W holds NaN or inf values")
    return problems


def _errors(W: Tensor, S: Tensor, B: Tensor, A: Tensor, *, exact: bool) -> tuple[float, float]:
    """(‖W − B A‖_F / ‖W‖_F, the share of Σσ² that B A keeps) for B A of rank r = B.shape[1].

    For an exact SVD (``S`` the whole spectrum) Eckart–Young gives both from the spectrum's
    tail; a randomized SVD knows only the top of it, so the error is measured.
    """
    rank = B.shape[1]
    squares = S.double().square()
    if exact:
        total = float(squares.sum())
        rel_error = math.sqrt(float(squares[rank:].sum()) / total) if total else 0.0
    else:
        total = float(W.double().square().sum())  # ‖W‖_F² = Σσ²
        residual = W - lora_delta(B, A, 1.0).to(W.dtype)
        rel_error = math.sqrt(float(residual.double().square().sum()) / total) if total else 0.0
    kept = float(squares[:rank].sum()) / total if total else 1.0
    return rel_error, kept
