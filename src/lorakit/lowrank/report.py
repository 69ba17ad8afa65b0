"""What a low-rank tool did: one row per factorised matrix, and the report as a table."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import LoraConfig
from ..inject import PlanEntry
from ..tables import format_table


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


def factor_row(entry: PlanEntry, info: dict, error: float, before: int, after: int) -> FactorRow:
    return FactorRow(entry.target, entry.shape, info["rank"], error, info["energy"], before, after)
