"""What a LoRA layer kind is, read from its class without building a wrapper.

Planning (``lorakit.inject.plan``) and file checks (``lorakit.io``) ask these class methods
about a module before anything is wrapped: the matrix ΔW = B A the kind adapts (per slice or
expert), the shapes of A and B in lorakit's layout and in PEFT's file, which options the kind
supports, and what stops it from adapting a module. ``LoraLayer`` (``base.py``) adds the
instance side: adapters, forward, merging and PEFT tensors.

Shapes, for one adapter of rank r on a matrix (out, in)::

    A: (r, in)      B: (out, r)      ΔW = scale · B @ A: (out, in)
    magnitude (DoRA): (out,)          lora_B.bias (lora_bias): (out,)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .wrapper import Shape, Wrapper


class LoraKind(Wrapper):
    """The class side of every LoRA layer: flags and shapes, asked before wrapping.

    A kind sets the flags below and implements ``matrix_shape``; kinds whose layout differs
    from PEFT's override ``adapter_shapes`` / ``to_peft`` / ``from_peft``, and kinds whose
    weight is not an (out, in) matrix override ``to_matrix`` / ``from_matrix``.
    """

    is_lora = True
    supports_routing = True
    # PEFT's tensor names for A and B under the module's path.
    peft_keys: ClassVar[tuple[str, str]] = ("lora_A.weight", "lora_B.weight")
    supports_dora: ClassVar[bool] = False
    supports_lora_bias: ClassVar[bool] = False
    supports_weight_init: ClassVar[bool] = False  # PiSSA / OLoRA
    supports_nora: ClassVar[bool] = False  # A shaped (..., r, in): its columns can be normalised
    # "input": dropout acts on x; "ignored": no input to drop (token ids); "refused".
    dropout_mode: ClassVar[str] = "input"
    # The wrapped module's children are part of this kind (not separate targets).
    owns_children: ClassVar[bool] = False
    # A linear layer (Linear, GPT-2 Conv1D, a quantized Linear): what "all-linear" targets.
    is_linear: ClassVar[bool] = False

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options: Any) -> tuple[int, int]:
        """(out, in) of one matrix ΔW = B A for ``module`` (per slice or expert)."""
        raise NotImplementedError

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int, **options: Any) -> tuple[Shape, Shape]:
        """Shapes of A and B in lorakit's layout: (r, in), (out, r) unless overridden."""
        out_features, in_features = cls.matrix_shape(module, **options)
        return (r, in_features), (out_features, r)

    @classmethod
    def rank_limit(cls, module: nn.Module, **options: Any) -> int:
        """The largest rank that adds capacity: min(out, in) of ``matrix_shape``."""
        return min(cls.matrix_shape(module, **options))

    @classmethod
    def problems(cls, path: str, module: nn.Module, r: int, **options: Any) -> list[str]:
        """What stops this kind from adapting ``module`` at rank ``r`` (empty when fine)."""
        return []

    @classmethod
    def router_problem(cls, module: nn.Module) -> str | None:
        """Why this kind cannot adapt ``module`` as an MoE router (a gate picking experts)."""
        return None

    @classmethod
    def matrix_problem(cls, module: nn.Module, **options: Any) -> str | None:
        """Why ΔW of this kind is not one (out, in) matrix that the low-rank tools can
        refactor, if it is not (``factors`` / ``set_factors`` then refuse)."""
        return None

    @classmethod
    def magnitude_shape(cls, module: nn.Module, **options: Any) -> Shape:
        """Shape of the DoRA magnitude as PEFT stores it: one value per output channel."""
        return (cls.matrix_shape(module, **options)[0],)

    @classmethod
    def peft_shapes(
        cls, module: nn.Module, settings: Mapping[str, Any], **options: Any
    ) -> dict[str, Shape]:
        """PEFT tensor name -> shape for an adapter of rank ``settings["r"]`` (with
        ``use_dora`` / ``lora_bias`` when set): A and B in PEFT's layout, B's bias, m."""
        shape_a, shape_b = cls.adapter_shapes(module, settings["r"], **options)
        # On the meta device: a config's r of 10**9 costs nothing before the file's shapes
        # are found not to match it.
        meta = {"device": "meta"}
        A, B = cls.to_peft(
            torch.empty(shape_a, **meta), torch.empty(shape_b, **meta), module, **options
        )
        shapes = {cls.peft_keys[0]: tuple(A.shape), cls.peft_keys[1]: tuple(B.shape)}
        if settings.get("lora_bias"):
            shapes["lora_B.bias"] = (cls.matrix_shape(module, **options)[0],)
        if settings.get("use_dora"):
            shapes["lora_magnitude_vector"] = cls.magnitude_shape(module, **options)
        return shapes

    @classmethod
    def trainable_count(cls, module: nn.Module, settings: Mapping[str, Any], **options: Any) -> int:
        """Entries of A and B (the plan's count, as PEFT's: biases and m aside)."""
        shape_a, shape_b = cls.adapter_shapes(module, settings["r"], **options)
        return math.prod(shape_a) + math.prod(shape_b)

    @classmethod
    def plan_label(cls, settings: Mapping[str, Any]) -> str:
        return str(settings["r"])

    @classmethod
    def to_peft(
        cls, A: Tensor, B: Tensor, module: nn.Module, **options: Any
    ) -> tuple[Tensor, Tensor]:
        """(A, B) in lorakit's layout -> PEFT's layout (the same unless overridden)."""
        return A, B

    @classmethod
    def from_peft(
        cls, A: Tensor, B: Tensor, module: nn.Module, r: int, **options: Any
    ) -> tuple[Tensor, Tensor]:
        """Inverse of ``to_peft``."""
        return A, B

    @classmethod
    def to_matrix(cls, module: nn.Module, weight: Tensor, **options: Any) -> Tensor:
        """A tensor laid out like the base weight as the (out, in) matrix B @ A gives."""
        return weight

    @classmethod
    def from_matrix(cls, module: nn.Module, matrix: Tensor, **options: Any) -> Tensor:
        """Inverse of ``to_matrix``."""
        return matrix
