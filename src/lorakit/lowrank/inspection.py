"""What an adapter learned: spectra of ΔW and how much ΔW amplifies directions already in W.

Per module, with ΔW = U Σ Vᵀ and r the adapter's rank (Hu et al. 2021, section 7.3)::

    ‖U_rᵀ W V_r‖_F        W projected onto ΔW's top-r singular directions
    ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F   the amplification factor

A large factor means ΔW strongly amplifies directions W barely uses. For context the report
also gives the projection onto W's own top-r directions (√(σ1(W)² + … + σr(W)²), the largest
any r directions can give) and onto random orthonormal r directions.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LoraError
from ..io import PREFIX, load_adapter, read_adapter
from ..layers import LoraLayer, lora_delta
from ..merge import check_adapter_names
from ..progress import progress
from ..state import adapter_configs
from ..tables import align_parts, format_table, natural_key
from ..targeting import lora_layers
from .svd import factored_svd, rank_for_energy, spare_threads, torch_threads

EFFECTIVE_ENERGY = 0.9  # effective rank: the smallest rank holding this share of ‖ΔW‖_F²
_PAIR_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")


@dataclass
class ModuleSpectrum:
    """One adapted matrix. The W-related fields are None without the base weights."""

    path: str
    rank: int
    scale: float
    delta_norm: float  # ‖ΔW‖_F
    singular_values: list[float]  # of ΔW, the first ``rank``
    effective_rank: int
    weight_norm: float | None = None  # ‖W‖_F
    projection: float | None = None  # ‖U_rᵀ W V_r‖_F
    top_projection: float | None = None  # √(σ1(W)² + … + σr(W)²)
    random_projection: float | None = None  # W onto random orthonormal r directions
    amplification: float | None = None  # ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F


@dataclass
class InspectReport:
    """Per-module spectra of one adapter. ``str()`` is a table."""

    adapter_name: str
    modules: list[ModuleSpectrum] = field(default_factory=list)

    def __str__(self) -> str:
        with_base = any(m.amplification is not None for m in self.modules)
        head = ["module", "r", "scale", "|dW|", "sigma_1..3 of dW", "eff. rank"]
        if with_base:
            head += ["|W|", "|U'WV|", "top-r of W", "random", "amplif."]
        rows = [tuple(head)]
        # each sigma_i in a sub-column of its own, so the column reads value under value
        sigmas = align_parts(
            [" ".join(f"{s:.3g}" for s in m.singular_values[:3]) for m in self.modules]
        )
        for m, sigma in zip(self.modules, sigmas, strict=True):
            row = [m.path, str(m.rank), f"{m.scale:g}", f"{m.delta_norm:.3g}"]
            row += [sigma, str(m.effective_rank)]
            if with_base:
                values = (m.weight_norm, m.projection, m.top_projection, m.random_projection)
                row += [f"{v:.3g}" for v in values] + [f"{m.amplification:.3g}"]
            rows.append(tuple(row))
        lines = format_table(rows)
        lines.append(
            f"adapter '{self.adapter_name}': {len(self.modules)} matrices; effective rank = "
            f"smallest rank holding {EFFECTIVE_ENERGY:.0%} of |dW|^2"
        )
        return "\n".join(lines)


def _spectrum(path: str, rank: int, scale: float, factors: tuple[Tensor, Tensor], W, seed: int):
    """A ``ModuleSpectrum`` for ΔW = B @ A (``factors``, (out, k) and (k, in)) and, if given,
    W (out, in) in the same layout."""
    U, S, Vh = factored_svd(*factors)  # exact, without forming ΔW
    r = min(rank, S.numel())
    result = ModuleSpectrum(
        path=path,
        rank=rank,
        scale=scale,
        delta_norm=float(S.norm()),  # ‖ΔW‖_F² = Σσ²
        singular_values=S[:r].tolist(),
        effective_rank=rank_for_energy(S, EFFECTIVE_ENERGY),
    )
    if W is None:
        return result
    with torch_threads(spare_threads()):
        _weight_analysis(result, U[:, :r], Vh[:r], W.float(), seed)
    return result


def _weight_analysis(result: ModuleSpectrum, U: Tensor, Vh: Tensor, W: Tensor, seed: int) -> None:
    """Fill ``result``'s W fields from ΔW's top directions U (out, r), Vh (r, in) and W."""
    r = U.shape[1]
    gen = torch.Generator().manual_seed(seed)
    # Random orthonormal directions: Q of the QR of a Gaussian matrix.
    Q_out = torch.linalg.qr(torch.randn(W.shape[0], r, generator=gen))[0]  # (out, r)
    Q_in = torch.linalg.qr(torch.randn(W.shape[1], r, generator=gen))[0]  # (in, r)
    # (r, out) @ (out, in) @ (in, r) -> (r, r)
    projection = float((U.T @ W @ Vh.T).norm())
    result.weight_norm = float(W.norm())
    result.projection = projection
    result.top_projection = _top_energy(W, r)
    result.random_projection = float((Q_out.T @ W @ Q_in).norm())
    result.amplification = result.delta_norm / projection if projection else float("inf")


def _top_energy(W: Tensor, r: int) -> float:
    """√(σ1(W)² + … + σr(W)²) for W (out, in).

    The σ² are the eigenvalues of the smaller Gram matrix, W Wᵀ or Wᵀ W (k, k) with
    k = min(out, in); a symmetric eigensolver on it takes a fraction of an SVD of W (this was
    most of ``inspect --base``'s time), and float64 keeps the top values exact to ~1e-12.
    """
    W = W.double()
    gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W  # (k, k)
    top = torch.linalg.eigvalsh(gram)[-r:]  # ascending: the r largest σ²
    return float(top.clamp(min=0).sum().sqrt())


def _factors_and_weight(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """(B', A', W): ΔW = B' @ A' and W as before the adapter, as (…, out, in) matrices.

    Low-rank factors where the layer has them (the spectrum then costs O((out + in) r²));
    ΔW itself with an identity factor otherwise (a grouped convolution).
    """
    weight = layer.base_weight.detach().float()
    delta = layer.delta_weight(name)
    if name in layer.merged:
        weight = weight - delta
    try:
        B, A = layer.factors(name)
    except LoraError:  # no factors (a grouped convolution)
        B = None
    if B is None or B.dim() != weight.dim():  # or per-slice factors of one fused matrix
        A = layer.as_matrix(delta)
        B = torch.eye(A.shape[-2])
    else:
        B = B.float() * layer.scale[name]
    initial = layer.initial_lora(name)
    if initial is not None:
        # PiSSA / OLoRA: the base holds W - s·B0 A0; the change from W is s·[B, -B0] [A; A0].
        A0, B0 = initial
        weight = weight + layer.from_matrix(layer.base_layer, lora_delta(B0, A0, layer.scale[name]))
        B = torch.cat([B, -B0.float() * layer.scale[name]], dim=-1)
        A = torch.cat([A.float(), A0.float()], dim=-2)
    return B, A, layer.as_matrix(weight)


def _from_model(model: nn.Module, adapter_name: str, seed: int) -> InspectReport:
    check_adapter_names(model, [adapter_name])
    report = InspectReport(adapter_name)
    layers = lora_layers(model, adapter_name)
    for path, layer in progress(layers, "inspect", unit="layer"):
        rank, scale = layer.r[adapter_name], layer.scale[adapter_name]
        if layer.initial_lora(adapter_name) is not None:
            rank *= 2  # the change from W is a rank-2r LoRA (see lorakit.io)
        with torch.no_grad():
            B, A, W = _factors_and_weight(layer, adapter_name)
            if A.dim() == 3:  # experts: one matrix each
                for e in range(A.shape[0]):
                    pair = (B[e], A[e])
                    report.modules.append(_spectrum(f"{path}[{e}]", rank, scale, pair, W[e], seed))
            else:
                report.modules.append(_spectrum(path, rank, scale, (B, A), W.flatten(1), seed))
    return report


def _from_files(directory: str | os.PathLike, adapter_name: str) -> InspectReport:
    config, tensors, _ = read_adapter(directory)
    if config.target_parameters:
        raise LoraError(
            f"{directory} adapts parameters ({config.target_parameters}) stored in a stacked "
            "layout; inspect it with its base model: inspect_adapter(dir, base_model)."
        )
    report = InspectReport(adapter_name)
    for key in tensors:
        suffix = next((s for s in _PAIR_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            continue
        path = key.removeprefix(PREFIX).removesuffix(suffix)
        A, B = tensors[key], tensors[key.removesuffix(suffix) + suffix.replace("_A", "_B")]
        scale = config.scale_for(path)
        # PEFT's layout: B (out, r[, 1…]) @ A (r, in[, k…]) -> (out, in·k…)
        factors = (B.flatten(1).float() * scale, A.flatten(1))
        report.modules.append(_spectrum(path, A.shape[0], scale, factors, None, 0))
    report.modules.sort(key=lambda m: natural_key(m.path))  # the file's order is text order
    return report


def inspect_adapter(
    model_or_dir: nn.Module | str | os.PathLike,
    base_model: nn.Module | None = None,
    adapter_name: str = "default",
    seed: int = 0,
) -> InspectReport:
    """Rank, scale, ‖ΔW‖, singular values and effective rank of each adapted matrix.

    Args:
        model_or_dir: a model holding adapter ``adapter_name``, or an adapter folder.
        base_model: for a folder, the model it was made for; the adapter is loaded onto a
            copy (the model itself is not changed) and the W analysis is added. A model
            brings its own base weights.
        seed: for the random directions of the baseline projection.

    Raises:
        LoraError: unknown adapter, an unreadable folder, or one that does not fit
            ``base_model``.
    """
    if isinstance(model_or_dir, nn.Module):
        return _from_model(model_or_dir, adapter_name, seed)
    if not Path(model_or_dir).is_dir():
        raise LoraError(f"{model_or_dir} is not a folder; pass a model or an adapter folder.")
    if base_model is None:
        return _from_files(model_or_dir, adapter_name)
    model = copy.deepcopy(base_model)
    if adapter_name in adapter_configs(model):
        raise LoraError(f"base_model already holds an adapter '{adapter_name}'; pick another name.")
    load_adapter(model, model_or_dir, adapter_name)
    return _from_model(model, adapter_name, seed)


def _layer_number(path: str, position: int) -> int:
    """The layer index in a module path (``model.layers.3.self_attn.q_proj`` -> 3), else its
    position among the modules of the same name."""
    found = re.search(r"\.(\d+)\.", f".{path}.")
    return int(found[1]) if found else position


def _log_labeller(low: float, high: float) -> Callable[[float, Any], str]:
    """Tick labels for a log axis from ``low`` to ``high``, as plain numbers (4, not 4×10^0)
    that do not overlap: every power of ten; between them 2 and 5 on an axis of at most two
    decades, 3 as well within one, every tick within half of one."""
    decades = math.log10(high / low)
    shown = {1} | ({2, 5} if decades <= 2 else set()) | ({3} if decades <= 1 else set())
    if decades <= 0.5:
        shown = set(range(1, 10))

    def label(value: float, _: Any) -> str:
        if value <= 0:
            return ""
        exponent = math.floor(math.log10(value) + 1e-9)  # 0.001 -> -3, not -4
        return f"{value:g}" if round(value / 10**exponent) in shown else ""

    return label


def plot_spectra(report: InspectReport, path: str | os.PathLike) -> Path:
    """Write a PNG of ΔW's singular values: one panel per module name (q_proj, ...), one line
    per layer, darker for deeper layers, σ on a log scale. Returns the file's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    groups: dict[str, list[ModuleSpectrum]] = {}
    for m in report.modules:
        groups.setdefault(m.path.rsplit(".", 1)[-1], []).append(m)
    cols = min(4, len(groups)) or 1
    rows = max(1, -(-len(groups) // cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(4 * cols + 1, 3 * rows), squeeze=False, layout="constrained"
    )
    depth = max((len(modules) for modules in groups.values()), default=1)
    colors = matplotlib.colors.Normalize(vmin=0, vmax=max(depth - 1, 1))
    for ax, (name, modules) in zip(axes.flat, groups.items(), strict=False):
        for position, m in enumerate(modules):
            values = [max(s, 1e-12) for s in m.singular_values]
            color = plt.cm.viridis(colors(_layer_number(m.path, position)))
            ax.plot(range(1, len(values) + 1), values, marker=".", color=color, label=m.path)
        ax.set(title=name, xlabel="index i", ylabel="sigma_i of dW", yscale="log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        label = FuncFormatter(_log_labeller(*ax.get_ylim()))
        ax.yaxis.set_major_formatter(label)
        ax.yaxis.set_minor_formatter(label)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    scale = matplotlib.cm.ScalarMappable(norm=colors, cmap=plt.cm.viridis)
    bar = fig.colorbar(scale, ax=axes.ravel().tolist(), label="layer")
    bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Singular values of dW, adapter '{report.adapter_name}'")
    out = Path(path)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)  # never a half-written picture
    return out
