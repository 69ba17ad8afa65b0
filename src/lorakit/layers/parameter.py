"""LoRA on a raw 2D or 3D parameter of a module (``target_parameters``), e.g. MoE experts."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import LoraLayer, lora_delta
from .wrapper import Shape


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
    parameter sees the adapted weight; dropout is undefined here (x is not ours to drop), and
    rows cannot be routed (the module sees tokens, not examples). Several parameters of one
    module nest one wrapper per parameter, the first one innermost, as PEFT does.
    """

    supports_routing = False
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

    def target_name(self, path: str) -> str:
        # "experts.base_layer" (a nested wrapper's path) -> "experts.gate_up_proj"
        owner = ".".join(part for part in path.split(".") if part != "base_layer")
        return f"{owner}.{self.parameter_name}"

    def delta_weight(self, name: str) -> Tensor:
        delta = lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name])
        return delta.transpose(-1, -2) if self.transposed else delta

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """The module's forward with W + Σ pending ΔW in place of the parameter."""
        names = self.pending()
        if not names:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight
        # Differentiable in A and B; the frozen base weight itself gets no gradient.
        adapted = weight + sum(self.delta_weight(n) for n in names).to(weight.dtype)
        return torch.func.functional_call(
            self.base_layer, {self.parameter_path: adapted}, args, kwargs, strict=False
        )
