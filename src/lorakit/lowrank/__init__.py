"""Low-rank approximation: truncated SVD, LoRA extraction and resizing.

The factors W ≈ B A of :mod:`.svd` serve two ideas:

- additive (LoRA): the fine-tuned W' = W + B A, the low-rank part is a *change* to a weight that
  stays — :func:`extract_adapter` (from a full fine-tune), :func:`resize_adapter`;
- replacement (DeepSeek-V2's ``q_a_proj`` / ``q_b_proj``): W itself becomes B A, two thinner
  Linears — :mod:`.factorize`.

Spectra and the LoRA paper's amplification analysis of an adapter live in :mod:`.inspection`.
"""

from .extract import extract_adapter
from .report import FactorRow, LowRankReport
from .resize import resize_adapter
from .svd import (
    RANDOMIZED_MIN_DIM,
    factored_svd,
    low_rank,
    rank_for_energy,
    spare_threads,
    torch_threads,
)

__all__ = [
    "RANDOMIZED_MIN_DIM",
    "FactorRow",
    "LowRankReport",
    "extract_adapter",
    "factored_svd",
    "low_rank",
    "rank_for_energy",
    "resize_adapter",
    "spare_threads",
    "torch_threads",
]
