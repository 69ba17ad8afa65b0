"""LoRA on a raw 2D or 3D parameter of a module (``target_parameters``), e.g. MoE experts.

Routed experts take a fast path: for transformers' experts modules (the interface of its
``use_experts_implementation``: ``gate_up_proj`` / ``up_proj`` and ``down_proj`` as (E, ·, ·),
``_apply_gate``, ``is_transposed``, called with the tokens and their top-k experts) and for
Llama-4's, whose experts see every token slot, the wrapper computes the experts' forward
itself with each expert's LoRA applied to its own tokens (``kernels.GroupedLoraFunction``)::

    tokens sorted by expert -> x_e (n_e, in) -> x_e Wₑ + s (x_e Aₑᵀ) Bₑᵀ -> gate -> down, alike

so no expert's ΔW is formed. Any other module runs its own forward with W + ΔW swapped in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import LoraLayer, lora_delta
from .kernels import Groups, grouped_lora
from .wrapper import Shape

# The expert parameters the fast path knows, and the experts modules that run every expert on
# every token slot with weights (E, in, out) applied as x @ W (declaring no ``is_transposed``).
_EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
_DENSE_EXPERTS = ("Llama4TextExperts",)
Pairs = dict[str, list[tuple[Tensor, Tensor, float]]]  # parameter -> (P, Q, scale) per adapter


def _owner(module: nn.Module) -> tuple[nn.Module, str]:
    """The user's module under nested parameter wrappers, and the path prefix down to it."""
    prefix = ""
    while isinstance(module, LoraParameter):
        module, prefix = module.base_layer, prefix + "base_layer."
    return module, prefix


class LoraParameter(LoraLayer):
    """LoRA on ``module.<parameter>``, built with ``parameter="name"``.

    2D (out, in): ΔW = scale · B A. 3D (E, out, in), e.g. fused MoE experts: one pair per
    expert, A: (E, r, in), B: (E, out, r), ΔW[e] = scale · B[e] A[e]. A module that stores
    experts as (E, in, out) marks itself ``is_transposed`` (transformers' convention) and gets
    ΔW[e]ᵀ. The module's own forward runs with W + ΔW swapped in, so any code that reads the
    parameter sees the adapted weight (routed experts: the fast path of the module docstring,
    the same maths); dropout is undefined here (x is not ours to drop), and
    rows cannot be routed (the module sees tokens, not examples). Several parameters of one
    module nest one wrapper per parameter, the first one innermost, as PEFT does.
    """

    supports_routing = False
    supports_nora = True  # per expert: A is (E, r, in)
    dropout_mode = "refused"
    nests = True

    @classmethod
    def _parameter(cls, module: nn.Module, parameter: str) -> nn.Parameter:
        return getattr(_owner(module)[0], parameter)

    @classmethod
    def _transposed(cls, module: nn.Module, parameter: str) -> bool:
        owner = _owner(module)[0]
        return getattr(owner, parameter).dim() == 3 and bool(getattr(owner, "is_transposed", False))

    @classmethod
    def weight_shape(cls, module: nn.Module, **options: Any) -> Shape:
        return tuple(cls._parameter(module, options["parameter"]).shape)

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options: Any) -> tuple[int, int]:
        shape = tuple(cls._parameter(module, options["parameter"]).shape[-2:])
        return shape[::-1] if cls._transposed(module, options["parameter"]) else shape

    @classmethod
    def to_matrix(cls, module: nn.Module, weight: Tensor, **options: Any) -> Tensor:
        # (E, in, out) experts of a transposed module -> (E, out, in), as B @ A gives
        return weight.transpose(-1, -2) if cls._transposed(module, options["parameter"]) else weight

    from_matrix = to_matrix  # a transpose is its own inverse

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int, **options: Any) -> tuple[Shape, Shape]:
        param = cls._parameter(module, options["parameter"])
        experts = (param.shape[0],) if param.dim() == 3 else ()
        out_features, in_features = cls.matrix_shape(module, **options)
        return (*experts, r, in_features), (*experts, out_features, r)

    @classmethod
    def problems(cls, path: str, module: nn.Module, r: int, **options: Any) -> list[str]:
        shape = tuple(cls._parameter(module, options["parameter"]).shape)
        if len(shape) in (2, 3):
            return []
        return [
            f"{path}.{options['parameter']}: parameter of shape {shape} is {len(shape)}D; "
            "target_parameters supports 2D (out, in) and 3D (experts, out, in) tensors"
        ]

    @classmethod
    def matrix_problem(cls, module: nn.Module, **options: Any) -> str | None:
        if cls._parameter(module, options["parameter"]).dim() == 3:
            return "a 3D expert parameter (one matrix per expert)"
        return None

    @classmethod
    def to_peft(cls, A: Tensor, B: Tensor, module: nn.Module, **options) -> tuple[Tensor, Tensor]:
        if A.dim() == 2:
            return A, B
        # PEFT stacks experts: A (E·r, in) by expert; B (out, r·E) with expert as fastest index.
        experts, r, _ = A.shape
        return A.reshape(experts * r, -1), B.permute(1, 2, 0).reshape(B.shape[1], r * experts)

    @classmethod
    def from_peft(cls, A: Tensor, B: Tensor, module: nn.Module, r: int, **options):
        param = cls._parameter(module, options["parameter"])
        if param.dim() == 2:
            return A, B
        experts = param.shape[0]
        # (E·r, in) -> (E, r, in);  (out, r·E) -> (out, r, E) -> (E, out, r)
        return A.reshape(experts, r, -1), B.reshape(B.shape[0], r, experts).permute(2, 0, 1)

    @classmethod
    def existing(cls, module: nn.Module, **options: Any) -> LoraLayer | None:
        while isinstance(module, cls):
            if module.parameter_name == options["parameter"]:
                return module
            module = module.base_layer
        return None

    def __init__(self, base_layer: nn.Module, **options: Any) -> None:
        super().__init__(base_layer, **options)
        self.parameter_name = options["parameter"]
        owner, prefix = _owner(base_layer)
        self.parameter_path = prefix + self.parameter_name  # relative to base_layer
        self.owner = [owner]  # a list so the owner is not registered twice as a submodule
        self.transposed = self._transposed(base_layer, self.parameter_name)
        self.out_features, self.in_features = self.matrix_shape(base_layer, **options)

    @property
    def base_weight(self) -> nn.Parameter:
        return getattr(self.owner[0], self.parameter_name)

    def peft_pair(self, name: str) -> tuple[Tensor, Tensor] | None:
        # PEFT's file stacks the experts of a 3D weight as one 2-D pair (rank E·r), which is
        # no plain LoRA on a 2-D weight: runtimes must not take it for one.
        return None if self.base_weight.dim() == 3 else super().peft_pair(name)

    def target_name(self, path: str) -> str:
        # "experts.base_layer" (a nested wrapper's path) -> "experts.gate_up_proj"
        owner = ".".join(part for part in path.split(".") if part != "base_layer")
        return f"{owner}.{self.parameter_name}"

    def delta_weight(self, name: str) -> Tensor:
        delta = lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name])
        return delta.transpose(-1, -2) if self.transposed else delta

    def input_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """Adapter ``name`` as the module's input meets it: (P (E, in, r), Q (E, r, out)) with
        x P Q = x ΔWᵀ for a module computing x Wᵀ, or x ΔW for one computing x W."""
        A, B = self.lora_A[name], self.lora_B[name]
        applies_as_is = bool(getattr(self.owner[0], "is_transposed", False)) or (
            type(self.owner[0]).__name__ in _DENSE_EXPERTS
        )
        # ΔW in the parameter's layout is B A, or (B A)ᵀ for a transposed one (``delta_weight``)
        return (A.mT, B.mT) if applies_as_is == self.transposed else (B, A)

    def _chain(self) -> list[LoraParameter]:
        """This wrapper and the parameter wrappers nested inside it, outermost first."""
        chain, module = [], self
        while isinstance(module, LoraParameter):
            chain.append(module)
            module = module.base_layer
        return chain

    def _experts_path(self, args: tuple, kwargs: dict) -> str | None:
        """``"routed"`` or ``"dense"`` when the experts fast path computes this call exactly:
        a known experts module without hooks, frozen expert weights, only expert weights
        adapted, and the call its forward takes; else None."""
        owner = self.owner[0]
        dense = type(owner).__name__ in _DENSE_EXPERTS
        routed = all(hasattr(owner, a) for a in ("has_gate", "is_transposed", "_apply_gate"))
        weights = [getattr(owner, n) for n in _EXPERT_WEIGHTS if hasattr(owner, n)]
        if (
            not (dense or routed)
            or kwargs
            or len(args) != (1 if dense else 3)
            or owner._forward_hooks
            or owner._forward_pre_hooks
            or getattr(owner, "_is_expert_parallel", False)
            or any(w.requires_grad for w in weights)
            or any(w.parameter_name not in _EXPERT_WEIGHTS for w in self._chain())
        ):
            return None
        return "dense" if dense else "routed"

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The module's forward with W + Σ pending ΔW in place of the parameter (experts: the
        fast path of the module docstring)."""
        names = self.pending()
        path = self._experts_path(args, kwargs)
        if path is not None:
            pairs: Pairs = {}
            for wrapper in self._chain():
                for n in wrapper.pending():
                    P, Q = wrapper.input_factors(n)
                    pairs.setdefault(wrapper.parameter_name, []).append((P, Q, wrapper.scale[n]))
            if pairs:
                return _run_experts(self.owner[0], path, pairs, args)
        if not names:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight
        # Differentiable in A and B; the frozen base weight itself gets no gradient.
        adapted = weight + sum(self.delta_weight(n) for n in names).to(weight.dtype)
        return torch.func.functional_call(
            self.base_layer, {self.parameter_path: adapted}, args, kwargs, strict=False
        )


def _run_experts(owner: nn.Module, path: str, pairs: Pairs, args: tuple) -> Tensor:
    """The fast path ``path`` on the call ``args``. Under autocast the module's own forward
    multiplies in the autocast dtype; the custom autograd node is not autocast-aware, so its
    operands (x, W, P, Q) are cast to that dtype explicitly and autocast is off inside."""
    run = _routed_experts if path == "routed" else _dense_experts
    device = args[0].device.type
    if not torch.is_autocast_enabled(device):
        return run(owner, pairs, *args)
    dtype = torch.get_autocast_dtype(device)
    cast = {n: [(P.to(dtype), Q.to(dtype), s) for P, Q, s in ps] for n, ps in pairs.items()}
    with torch.autocast(device, enabled=False):
        return run(owner, cast, *args, dtype=dtype)


def _project(
    owner: nn.Module,
    name: str,
    x: Tensor,
    groups: Groups,
    pairs: Pairs,
    dtype: torch.dtype | None,
) -> Tensor:
    """x (S, in), sorted by expert, through expert weight ``name`` (cast to ``dtype`` if given)
    and its LoRA pairs; x meets the weight in the weight's dtype."""
    weight = getattr(owner, name)  # (E, out, in), or (E, in, out) when applied as x @ W
    weight = weight if dtype is None else weight.to(dtype)
    applied = type(owner).__name__ in _DENSE_EXPERTS or owner.is_transposed
    return grouped_lora(x, weight if applied else weight.mT, groups, pairs.get(name, []))


def _routed_experts(
    owner: nn.Module,
    pairs: Pairs,
    hidden: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """transformers' experts forward (its ``grouped_mm`` implementation's maths) with each
    expert's LoRA on its own tokens: hidden (T, H), top-k experts and weights (T, k) -> (T, H).
    ``dtype``: the expert weights' compute dtype (autocast's); None: their own."""
    k = top_k_index.shape[-1]
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))  # (S = T·k,) slots, by expert
    groups = Groups(torch.bincount(expert_ids, minlength=owner.num_experts))
    x = hidden[perm // k]  # (S, H): each slot's token
    up = "gate_up_proj" if owner.has_gate else "up_proj"
    h = _project(owner, up, x, groups, pairs, dtype)
    if owner.has_bias:
        h = h + getattr(owner, f"{up}_bias")[expert_ids]
    h = owner._apply_gate(h) if owner.has_gate else owner.act_fn(h)  # (S, I)
    y = _project(owner, "down_proj", h, groups, pairs, dtype)  # (S, H)
    if owner.has_bias:
        y = y + owner.down_proj_bias[expert_ids]
    if owner.has_post_expert_norm:
        y = owner.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[perm, None]
    restore = torch.empty_like(perm)
    restore[perm] = torch.arange(perm.numel(), device=perm.device)
    # (S, H) back in slot order -> (T, k, H) -> sum over a token's k experts -> (T, H)
    return y[restore].view(-1, k, y.shape[-1]).sum(dim=1).to(hidden.dtype)


def _dense_experts(
    owner: nn.Module, pairs: Pairs, hidden: Tensor, dtype: torch.dtype | None = None
) -> Tensor:
    """Llama-4's experts forward (every expert on its own equal share of the rows, weights
    applied as x @ W) with LoRA: hidden (E·n, H) -> (E·n, H); ``dtype`` as for routed ones."""
    experts = owner.gate_up_proj.shape[0]
    rows = hidden.shape[0] // experts
    groups = Groups(torch.full((experts,), rows, device=hidden.device))
    gate, up = _project(owner, "gate_up_proj", hidden, groups, pairs, dtype).chunk(2, dim=-1)
    return _project(owner, "down_proj", up * owner.act_fn(gate), groups, pairs, dtype)
