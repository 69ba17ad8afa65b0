"""The contract every LoRA layer kind fulfils, and what all kinds share.

::

    x ──► base_layer ───────────────────────────────────────┐
    │                                                        + ──► y
    └──► dropout ──► A (r × in) ──► B (out × r) ──► × scale ─┘

    y  = base(x) + scale · B A dropout(x)
    ΔW = scale · B @ A            (``lora_delta``, the one place it is computed)

DoRA (Liu et al. 2024) splits the adapted weight into a direction and a trainable magnitude
m (one value per output channel)::

    W' = m ⊙ (W + ΔW) / ‖W + ΔW‖          ‖·‖ per output channel, detached from the graph
    y  = g ⊙ (base(x) − b) + g ⊙ scale · B A x + b,      g = m / ‖W + ΔW‖

m starts at ‖W‖ (ΔW = 0 at init), so a new DoRA adapter leaves the output unchanged.

A layer kind is a subclass that says, as class methods read without building a wrapper
(``kind.LoraKind``), what its matrix ΔW looks like, its adapter shapes and their PEFT layout,
and which options it supports; and, per instance, its delta in the base weight's layout
(``delta_weight``) and its contribution to the output (``lora_output``). Everything else
(adapters, activation, routing, DoRA, merging, PEFT tensors) lives here, and this class is
the only writer of its state: other modules call its methods (the ``wrapper.Wrapper``
contract, and the LoRA-only ones: ranks, scales, factors).

Initialisation: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default ``kaiming_uniform_``
with ``a=sqrt(5)``, as PEFT) or N(0, (1/r)²) for ``init="gaussian"``; for ``init="nora"`` the
uniform A with every column A[..., :, j] scaled to unit L2 norm (per expert); B = 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LoraError
from .kind import LoraKind


def lora_delta(B: Tensor, A: Tensor, scale: float) -> Tensor:
    """``scale * B @ A`` in fp32: (..., out, r) @ (..., r, in) -> (..., out, in).

    Leading dimensions batch over experts or slices. Every merge, unmerge, SVD and export
    goes through here, so precision and layout are decided once.
    """
    return torch.matmul(B.float(), A.float()) * scale


class LoraLayer(LoraKind):
    """Base of all LoRA wrappers: named adapters, activation, routing, DoRA, merge state.

    Subclasses set the class attributes of ``LoraKind`` and implement ``matrix_shape``,
    ``delta_weight`` and ``lora_output``; layouts that differ from PEFT's override
    ``to_peft`` / ``from_peft`` (and ``peft_tensors`` where a kind holds several pairs).
    """

    # --- construction ----------------------------------------------------------------------
    def __init__(self, base_layer: nn.Module, **options: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.training = base_layer.training  # a wrapper added to an eval() model stays in eval
        self.options = options  # what the kind was built with (fused slices, parameter name)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_bias = nn.ParameterDict()  # B's bias (PEFT's lora_bias), per adapter
        self.lora_magnitude = nn.ParameterDict()  # DoRA's m, per adapter
        self.r: dict[str, int] = {}
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self._active: list[str] = []
        self._merged: list[str] = []
        self._merge_norms: dict[str, Tensor] = {}  # DoRA: ‖W + ΔW‖ used when merging
        self._route: list[tuple[str, Tensor]] | None = None
        self._route_batch = 0
        self._route_stack: tuple[Tensor, ...] | None = None  # routed kinds' per-route cache

    @property
    def base_weight(self) -> nn.Parameter:
        """The base parameter that ``delta_weight`` is added to when merging."""
        return self.base_layer.weight

    def base_shape(self) -> tuple[int, ...]:
        """The base weight's logical shape, as an adapter's fingerprint records it."""
        return tuple(self.base_weight.shape)

    @property
    def fan_in(self) -> int:
        """Inputs feeding one output of A: sets the scale of A's initialisation."""
        return self.matrix_shape(self.base_layer, **self.options)[1]

    # --- adapter management ----------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        scale: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        *,
        use_dora: bool = False,
        lora_bias: bool = False,
    ) -> None:
        """Create adapter ``name`` (A random, B zero unless ``init="random"``; DoRA's m = ‖W‖)
        and make it active."""
        shape_a, shape_b = self.adapter_shapes(self.base_layer, r, **self.options)
        weight = self.base_weight
        # Adapters train in fp32 even on a half-precision base; forward casts at the boundary.
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        A = torch.empty(shape_a, device=weight.device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:
            bound = 1.0 / math.sqrt(self.fan_in)
            nn.init.uniform_(A, -bound, bound)
        if init == "nora":  # PEFT's floor on the norm, so a zero column stays zero
            A /= A.norm(dim=-2, keepdim=True).clamp_min(1e-6)
        B = torch.zeros(shape_b, device=weight.device, dtype=dtype)
        if init == "random":  # B's fan-in is r: the bound nn.Linear(r, out) would use
            nn.init.uniform_(B, -1.0 / math.sqrt(r), 1.0 / math.sqrt(r))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.r[name], self.scale[name], self.dropout[name] = r, float(scale), float(dropout)
        if lora_bias:
            out_features = self.matrix_shape(self.base_layer, **self.options)[0]
            self.lora_bias[name] = nn.Parameter(weight.new_zeros(out_features, dtype=dtype))
        if init in ("pissa", "olora"):
            self._init_from_weight(name, init)
        if use_dora:
            shape = self.magnitude_shape(self.base_layer, **self.options)
            self.lora_magnitude[name] = nn.Parameter(
                self.weight_norm(name).reshape(shape).to(dtype)
            )
        self._active.append(name)

    def _init_from_weight(self, name: str, init: str) -> None:
        raise LoraError(
            f"init={init!r} needs a Linear or Conv1D layer, not "
            f"{type(self.base_layer).__name__}; use init='kaiming' for this layer."
        )

    def initial_lora(self, name: str) -> tuple[Tensor, Tensor] | None:
        """(A0, B0) a PiSSA / OLoRA adapter started from; None for other inits."""
        return None

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (the caller unmerged it first)."""
        self.restore_base(name)
        for store in (self.lora_A, self.lora_B, self.lora_bias, self.lora_magnitude):
            if name in store:
                del store[name]
        for store in (self.r, self.scale, self.dropout):
            del store[name]
        if name in self._active:
            self._active.remove(name)

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(self.lora_A.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``: A, B, and its bias and magnitude if any."""
        stores = (self.lora_A, self.lora_B, self.lora_bias, self.lora_magnitude)
        return [store[name] for store in stores if name in store]

    def is_dora(self, name: str) -> bool:
        """Whether adapter ``name`` is a DoRA adapter."""
        return name in self.lora_magnitude

    @property
    def merged(self) -> list[str]:
        """Adapters folded into the base weight, in merge order."""
        return list(self._merged)

    def set_route(self, groups: dict[str | None, list[int]], batch: int) -> None:
        """Route batch rows to adapters: ``groups`` maps a name (None: base) to its rows."""
        device = self.base_weight.device
        self._route = [
            (name, torch.tensor(rows, device=device))
            for name, rows in groups.items()
            if name is not None and name in self.lora_A
        ]
        self._route_batch = batch
        self._route_stack = None

    def clear_route(self) -> None:
        """Back to the active adapters for every row."""
        self._route = None
        self._route_stack = None

    def pending(self) -> list[str]:
        """Active adapters whose delta is not in the weight: forward adds these."""
        return [n for n in self._active if n not in self._merged]

    # --- the maths -------------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter ``name`` in fp32, shaped like ``base_weight``."""
        raise NotImplementedError

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        """Adapter ``name``'s ``scale · (B A dropout(x) + b_B)`` for input x."""
        raise NotImplementedError

    def as_matrix(self, weight: Tensor) -> Tensor:
        """``to_matrix`` for this layer's base module."""
        return self.to_matrix(self.base_layer, weight, **self.options)

    def channel(self, per_output: Tensor) -> Tensor:
        """A per-output-channel vector (out,) shaped to broadcast against this layer's output."""
        return per_output

    def dense_weight(self) -> Tensor:
        """The base weight as a float tensor in its own layout (dequantized if need be)."""
        return self.base_weight.float()

    def weight_norm(self, name: str) -> Tensor:
        """DoRA's ‖W + ΔW‖ per output channel, (out,), fp32 and without gradient."""
        with torch.no_grad():
            matrix = self.as_matrix(self.dense_weight() + self.delta_weight(name))
            return torch.linalg.vector_norm(matrix, dim=1)

    def dora_factor(self, name: str) -> Tensor:
        """g = m / ‖W + ΔW‖ (out,): differentiable in m only, as in the paper and PEFT."""
        return self.lora_magnitude[name].reshape(-1) / self.weight_norm(name)

    def _dropped(self, name: str, x: Tensor) -> Tensor:
        p = self.dropout[name]
        x = x if x.dtype == self.lora_A[name].dtype else x.to(self.lora_A[name].dtype)
        return F.dropout(x, p, training=True) if p > 0 and self.training else x

    def _without_bias(self, y: Tensor) -> Tensor:
        bias = getattr(self.base_layer, "bias", None)
        return y if bias is None else y - self.channel(bias)

    def dora_output(self, name: str, x: Tensor, unbiased: Tensor) -> Tensor:
        """What DoRA adapter ``name`` adds to base(x): (g − 1)(base(x) − b) + g · lora(x).

        ``unbiased`` is base(x) − b. With dropout in training the base term uses the dropped
        input too, as PEFT does.
        """
        g = self.channel(self.dora_factor(name))
        if self.dropout_mode == "input" and self.dropout[name] > 0 and self.training:
            x = self._dropped(name, x)
            unbiased = self._without_bias(self.base_layer(x.to(unbiased.dtype)))
        return (g - 1) * unbiased + g * self.lora_output(name, x)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """base(x) plus every pending adapter, or each routed row's adapter."""
        result = self.base_layer(x, *args, **kwargs)
        if self._route is not None:
            return self._routed_generic(x, result)
        names = self.pending()
        unbiased = self._without_bias(result) if any(map(self.is_dora, names)) else None
        for name in names:
            if self.is_dora(name):
                delta = self.dora_output(name, x, unbiased)
            else:
                delta = self.lora_output(name, x)
            result = result + delta.to(result.dtype)
        return result

    def _routed_generic(self, x: Tensor, result: Tensor) -> Tensor:
        if x.shape[0] != self._route_batch:
            raise LoraError(
                f"route() was given {self._route_batch} adapter names but the batch has "
                f"{x.shape[0]} rows; pass one name (or None) per row."
            )
        # Rows grouped by adapter: one batched call per adapter, not one per example.
        for name, rows in self._route:
            if self.is_dora(name):
                delta = self.dora_output(name, x[rows], self._without_bias(result[rows]))
            else:
                delta = self.lora_output(name, x[rows])
            result.index_add_(0, rows, delta.to(result.dtype))  # in place: no copy per adapter
        return result

    # --- merging ---------------------------------------------------------------------------
    def merge_problem(self, names: Sequence[str]) -> str | None:
        """Why merging ``names`` (on top of those merged) would not be exact, if it would not."""
        together = set(self._merged) | {n for n in names if n in self.lora_A}
        if len(together) > 1 and any(map(self.is_dora, together)):
            return (
                f"DoRA adapters merge alone, but {sorted(together)} would be merged together "
                "(each one's norm is taken against the unmerged weight); merge one at a time "
                "and unload, or keep them unmerged"
            )
        if (
            any(n in self.lora_bias for n in names)
            and getattr(self.base_layer, "bias", None) is None
        ):
            return "lora_bias needs a base layer with a bias to merge into; keep it unmerged"
        return None

    def merged_weight(self, name: str) -> tuple[Tensor, Tensor | None]:
        """(W, bias) after merging ``name``, in fp32; nothing is written."""
        weight = self.dense_weight() + self.delta_weight(name)
        if self.is_dora(name):
            g = self.dora_factor(name).detach()
            weight = self.from_matrix(
                self.base_layer, g[:, None] * self.as_matrix(weight), **self.options
            )
        bias = None
        if name in self.lora_bias:
            bias = self.base_layer.bias.float() + self.scale[name] * self.lora_bias[name].float()
        return weight, bias

    def merge(self, name: str, weight: Tensor, bias: Tensor | None) -> None:
        """Write ``merged_weight(name)``'s result and record ``name`` as merged."""
        if self.is_dora(name):
            self._merge_norms[name] = self.weight_norm(name)
        _assign(self.base_weight, weight)
        if bias is not None:
            _assign(self.base_layer.bias, bias)
        self._merged.append(name)

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` back out of the weight: W = W' / g − ΔW, bias − s·b_B."""
        weight = self.base_weight.float()
        if self.is_dora(name):
            g = self.lora_magnitude[name].detach().float().reshape(-1) / self._merge_norms.pop(name)
            weight = self.from_matrix(
                self.base_layer, self.as_matrix(weight) / g[:, None], **self.options
            )
        _assign(self.base_weight, weight - self.delta_weight(name))
        if name in self.lora_bias:
            bias = self.base_layer.bias
            _assign(bias, bias.float() - self.scale[name] * self.lora_bias[name].float())
        self._merged.remove(name)

    # --- PEFT's file layout ----------------------------------------------------------------
    def peft_tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s tensors under PEFT's names (relative to this module's path)."""
        A, B = self.original_weight_pair(name)
        A, B = self.to_peft(A, B, self.base_layer, **self.options)
        tensors = {self.peft_keys[0]: A, self.peft_keys[1]: B}
        if name in self.lora_bias:
            tensors["lora_B.bias"] = self.lora_bias[name]
        if self.is_dora(name):
            tensors["lora_magnitude_vector"] = self.lora_magnitude[name]
        return tensors

    def load_peft_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Copy checked PEFT tensors (``peft_tensors``' names) into adapter ``name``."""
        A, B = self.from_peft(
            tensors[self.peft_keys[0]],
            tensors[self.peft_keys[1]],
            self.base_layer,
            self.r[name],
            **self.options,
        )
        with torch.no_grad():
            self.lora_A[name].copy_(A)
            self.lora_B[name].copy_(B)
            if name in self.lora_bias:
                self.lora_bias[name].copy_(tensors["lora_B.bias"])
            if self.is_dora(name):
                self.lora_magnitude[name].copy_(tensors["lora_magnitude_vector"])

    def peft_rank(self, name: str) -> int:
        """The rank PEFT sees for adapter ``name`` (wider where the layout differs)."""
        return self.r[name]

    def original_weight_pair(self, name: str) -> tuple[Tensor, Tensor]:
        """(A, B) of adapter ``name`` as a LoRA on the weight before any init changed it
        (what is saved; a PiSSA / OLoRA layer's differs from its trained A, B)."""
        return self.lora_A[name], self.lora_B[name]

    def peft_pair(self, name: str) -> tuple[Tensor, Tensor] | None:
        """(A (rank, in), B (out, rank)) as PEFT's file holds them, in fp32 on the CPU, when
        adapter ``name`` is exactly one 2-D pair there (besides lora_bias and m); None for
        conv kernels, expert stacks and attention's two pairs."""
        tensors = self.peft_tensors(name)
        pair = [tensors.get(key) for key in self.peft_keys]
        extra = set(tensors) - set(self.peft_keys) - {"lora_B.bias", "lora_magnitude_vector"}
        if extra or any(t is None or t.dim() != 2 for t in pair):
            return None
        A, B = (t.detach().float().cpu() for t in pair)
        return A, B

    def extras(self, name: str) -> list[str]:
        return ["use_dora"] * self.is_dora(name) + ["lora_bias"] * (name in self.lora_bias)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Adapter ``name`` as (B, A) with scale · B @ A = ``as_matrix(delta_weight)``:
        (..., out, r) and (..., r, in); leading dimensions batch over slices or experts."""
        return self.lora_B[name], self.lora_A[name]

    def set_factors(self, name: str, B: Tensor, A: Tensor, scale: float | None = None) -> None:
        """Make adapter ``name`` the factors B (out, r) @ A (r, in), whatever its rank.

        Used by the low-rank tools and ``combine``; the scale becomes ``scale`` (kept when None).
        """
        r = A.shape[-2]
        shape_a, shape_b = self.adapter_shapes(self.base_layer, r, **self.options)
        old_a, old_b = self.lora_A[name], self.lora_B[name]
        self.lora_A[name] = nn.Parameter(A.reshape(shape_a).to(old_a), old_a.requires_grad)
        self.lora_B[name] = nn.Parameter(B.reshape(shape_b).to(old_b), old_b.requires_grad)
        self.r[name] = r
        if scale is not None:
            self.scale[name] = float(scale)

    # --- rewrapping --------------------------------------------------------------------------
    # The layer's state besides its child modules and buffers. Not listed: ``options`` and
    # what a subclass derives from its base (the new wrapper derives its own), and routing,
    # which lasts one ``route`` block.
    moved_state: ClassVar[tuple[str, ...]] = (
        "r",
        "scale",
        "dropout",
        "_active",
        "_merged",
        "_merge_norms",
    )

    def move_state_to(self, other: LoraLayer) -> LoraLayer:
        """Give ``other`` all of this layer's adapter state and return it: the same adapters
        on another base that computes what this one does (a float copy of a quantized base).

        Moved: every child module but the base (A, B, lora_bias, DoRA magnitudes, nested
        wrappers), every buffer (PiSSA / OLoRA starting factors), ``moved_state`` (ranks,
        scales, dropout, activation, merge records and DoRA's merge norms) and train / eval
        mode. Tensors are shared, not copied; ``other``'s base must already hold what is
        recorded as merged here.
        """
        for name, child in self.named_children():
            if name != self.wrapped_attribute:
                other.add_module(name, child)
        for name, buffer in self._buffers.items():
            persistent = name not in self._non_persistent_buffers_set
            other.register_buffer(name, buffer, persistent=persistent)
        for name in self.moved_state:
            setattr(other, name, getattr(self, name).copy())
        return other.train(self.training)

    def extra_repr(self) -> str:
        return f"adapters={self.r}, active={self._active}, merged={self._merged}"


def _assign(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def warn_large_rank(path: str, r: int, limit: int) -> None:
    """PEFT allows r > min(in, out); so do we, with a warning (the extra rank adds nothing)."""
    warnings.warn(
        f"{path}: rank {r} exceeds min(in, out) = {limit}; the adapter is allowed (as in PEFT) "
        f"but cannot use more than rank {limit}. Consider r <= {limit} (rank_pattern).",
        stacklevel=4,
    )
