"""LoRA wrappers: each keeps the user's layer as ``base_layer`` and adds low-rank adapters.

::

    x ──► base_layer ───────────────────────────────────────┐
    │                                                        + ──► y
    └──► dropout ──► A (r × in) ──► B (out × r) ──► × scale ─┘

    y  = base(x) + scale · B A dropout(x)
    ΔW = scale · B @ A            (``lora_delta``, the one place it is computed)

A layer holds any number of named adapters. ``active`` lists those that add to the output,
``merged`` those already folded into the base weight (they must not be added twice), and
``route`` (set by ``lorakit.adapters.route``) assigns batch rows to adapters instead.

Initialisation: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default ``kaiming_uniform_``
with ``a=sqrt(5)``, as PEFT) or N(0, (1/r)²) for ``init="gaussian"``; B = 0, so a new adapter
leaves the model's output unchanged. ``init="pissa"`` / ``"olora"`` (linear layers only) take
A and B from the base weight's SVD / QR instead and leave the residual W - scale · B A in the
base weight: the output is unchanged too (see ``principal_init``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import WEIGHT_INITS
from .errors import LoraError
from .kernels import LoraLinearFunction, lora_linear


def lora_delta(B: Tensor, A: Tensor, scale: float) -> Tensor:
    """``scale * B @ A`` in fp32: (..., out, r) @ (..., r, in) -> (..., out, in).

    Leading dimensions batch over experts or slices. Every merge, unmerge, SVD and export
    goes through here, so precision and layout are decided once.
    """
    return torch.matmul(B.float(), A.float()) * scale


def principal_init(weight: Tensor, r: int, scale: float, init: str) -> tuple[Tensor, Tensor]:
    """A (r, in) and B (out, r) taken from ``weight`` (out, in), as PEFT computes them.

    ``pissa`` (Meng et al. 2024): W = U S Vᵀ, B = U_r sqrt(S_r / scale),
    A = sqrt(S_r / scale) V_rᵀ, so scale · B A = U_r S_r V_rᵀ, W's best rank-r approximation.
    ``olora`` (Büyükakyüz 2024): W = Q R, B = Q_r (orthonormal columns), A = R_r (first r rows).
    Either way the caller leaves W - scale · B A in the base weight.
    """
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        root = (S[:r] / scale).sqrt()
        return root[:, None] * Vh[:r], U[:, :r] * root  # (r, in), (out, r)
    Q, R = torch.linalg.qr(weight)
    return R[:r].contiguous(), Q[:, :r].contiguous()


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer storing its weight as (in, out).

    Checked by name so the core library does not import transformers.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class LoraLayer(nn.Module):
    """Base of all LoRA wrappers: named adapters, activation, routing, merge bookkeeping.

    Subclasses define the adapter shapes (``_shapes``), the adapter's contribution to the
    output (``lora_output``) and the weight delta in the base weight's layout (``delta_weight``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.training = base_layer.training  # a wrapper added to an eval() model stays in eval
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.r: dict[str, int] = {}
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.route: list[tuple[str | None, Tensor]] | None = None
        self.route_batch = 0  # the batch size ``route`` was set up for

    # --- adapter management -------------------------------------------------------------
    @property
    def base_weight(self) -> nn.Parameter:
        """The base parameter that ``delta_weight`` is added to when merging."""
        return self.base_layer.weight

    @property
    def fan_in(self) -> int:
        """Inputs feeding one output of A: sets the scale of A's initialisation."""
        return self.in_features

    def _shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def add_adapter(
        self, name: str, r: int, scale: float, dropout: float = 0.0, init: str = "kaiming"
    ) -> None:
        """Create adapter ``name`` (A random, B zero) and make it active."""
        if init in WEIGHT_INITS and not isinstance(self, LoraLinear):
            raise LoraError(
                f"init={init!r} needs a Linear or Conv1D layer, not "
                f"{type(self.base_layer).__name__}; use init='kaiming' for this layer."
            )
        shape_a, shape_b = self._shapes(r)
        weight = self.base_weight
        # Adapters train in fp32 even on a half-precision base; forward casts at the boundary.
        dtype = weight.dtype if weight.dtype == torch.float64 else torch.float32
        A = torch.empty(shape_a, device=weight.device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:
            bound = 1.0 / math.sqrt(self.fan_in)
            nn.init.uniform_(A, -bound, bound)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(shape_b, device=weight.device, dtype=dtype))
        self.r[name] = r
        self.scale[name] = float(scale)
        self.dropout[name] = float(dropout)
        if init in WEIGHT_INITS:
            self._init_from_weight(name, init)
        self.active.append(name)

    def _init_from_weight(self, name: str, init: str) -> None:
        """PiSSA / OLoRA: A, B from the base weight, which keeps the residual W - ΔW."""
        A, B = self.lora_A[name], self.lora_B[name]
        weight = self.base_weight
        matrix = weight.detach().to(A.dtype)  # (out, in); (in, out) for GPT-2 Conv1D
        A0, B0 = principal_init(
            matrix.T if self.fan_in_fan_out else matrix, A.shape[0], self.scale[name], init
        )
        with torch.no_grad():
            A.copy_(A0)
            B.copy_(B0)
            weight.copy_((weight.float() - self.delta_weight(name)).to(weight.dtype))
        # The starting point, kept so a trained adapter can be saved as a plain LoRA on the
        # original weight (``lorakit.io``); not part of the state dict.
        self.register_buffer(f"lora_A0_{name}", A0, persistent=False)
        self.register_buffer(f"lora_B0_{name}", B0, persistent=False)

    def initial_lora(self, name: str) -> tuple[Tensor, Tensor] | None:
        """(A0, B0) a PiSSA / OLoRA adapter started from; None for other inits."""
        if f"lora_A0_{name}" not in self._buffers:
            return None
        return self._buffers[f"lora_A0_{name}"], self._buffers[f"lora_B0_{name}"]

    def restore_base(self, name: str) -> None:
        """Give back to the base weight what a PiSSA / OLoRA init took out (scale · B0 A0)."""
        initial = self.initial_lora(name)
        if initial is None:
            return
        A0, B0 = initial
        delta = lora_delta(B0, A0, self.scale[name])
        weight = self.base_weight
        with torch.no_grad():
            weight.copy_(
                (weight.float() + (delta.T if self.fan_in_fan_out else delta)).to(weight.dtype)
            )

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``, restoring a PiSSA / OLoRA residual; the caller unmerges it."""
        self.restore_base(name)
        del self.lora_A[name], self.lora_B[name], self.r[name], self.scale[name], self.dropout[name]
        self._buffers.pop(f"lora_A0_{name}", None)
        self._buffers.pop(f"lora_B0_{name}", None)
        if name in self.active:
            self.active.remove(name)

    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds."""
        return list(self.lora_A.keys())

    # --- the maths ----------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """ΔW of adapter ``name`` in fp32, shaped like ``base_weight``."""
        raise NotImplementedError

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        """Adapter ``name``'s contribution ``scale · B A dropout(x)`` to the output for input x."""
        raise NotImplementedError

    def _dropped(self, name: str, x: Tensor) -> Tensor:
        p = self.dropout[name]
        x = x if x.dtype == self.lora_A[name].dtype else x.to(self.lora_A[name].dtype)
        return F.dropout(x, p, training=True) if p > 0 and self.training else x

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.route is not None:
            if x.shape[0] != self.route_batch:
                raise LoraError(
                    f"route() was given {self.route_batch} adapter names but the batch has "
                    f"{x.shape[0]} rows; pass one name (or None) per row."
                )
            # Rows grouped by adapter: one batched call per adapter, not one per example.
            for name, rows in self.route:
                if name is not None and name in self.lora_A:
                    delta = self.lora_output(name, x[rows]).to(result.dtype)
                    result.index_add_(0, rows, delta)  # in place: no copy per adapter
            return result
        for name in self.active:
            if name in self.lora_A and name not in self.merged:
                result = result + self.lora_output(name, x).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return f"adapters={self.r}, active={self.active}, merged={self.merged}"


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight (out, in)) or GPT-2 ``Conv1D`` (weight (in, out))."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_gpt2_conv1d(base_layer)
        w = base_layer.weight
        self.in_features, self.out_features = w.shape if self.fan_in_fan_out else w.shape[::-1]

    def _shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, name: str) -> Tensor:
        delta = lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name])
        return delta.T if self.fan_in_fan_out else delta

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        # (..., in) @ (in, r) -> (..., r), scaled while small, @ (r, out) -> (..., out)
        after_a = F.linear(self._dropped(name, x), self.lora_A[name]) * self.scale[name]
        return F.linear(after_a, self.lora_B[name])

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """Base plus active adapters through ``LoraLinearFunction`` when the base is a plain,
        frozen, hook-free Linear / Conv1D; routed batches through ``_routed``; otherwise
        (trainable base weight, hooks, extra arguments, autocast) the generic ``LoraLayer.forward``.
        """
        base = self.base_layer
        if self.route is not None and not (args or kwargs):
            return self._routed(x)
        if (
            self.route is not None
            or args
            or kwargs
            or not (type(base) is nn.Linear or self.fan_in_fan_out)
            or base.weight.requires_grad
            or base._forward_hooks
            or base._forward_pre_hooks
            # Autocast rewrites dtypes per op; the fused node's in-place adds can't follow it.
            or torch.is_autocast_enabled(x.device.type)
        ):
            return super().forward(x, *args, **kwargs)
        names = [n for n in self.active if n in self.lora_A and n not in self.merged]
        if not names:
            return base(x)
        lora: list[Tensor | None] = []
        for n in names:
            A = self.lora_A[n]
            dropped = self.dropout[n] > 0 and self.training
            lora += [self._dropped(n, x) if dropped else None, A, self.lora_B[n]]
        weight = base.weight.t() if self.fan_in_fan_out else base.weight  # (out, in)
        scales = [self.scale[n] for n in names]
        if torch.is_grad_enabled():
            return LoraLinearFunction.apply(x, weight, base.bias, scales, *lora)
        # Inference: the same maths without building an autograd node.
        y, _, _ = lora_linear(x.reshape(-1, x.shape[-1]), weight, base.bias, scales, lora)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _routed(self, x: Tensor) -> Tensor:
        """Routed rows of several adapters in two batched products, not a loop over adapters.

        Row b with adapter n: y_b += s_n x_b A_nᵀ B_nᵀ. The k adapters are stacked (ranks
        zero-padded to the largest, which adds nothing; B pre-scaled) and gathered per row:
        (m, T, in) @ (m, in, r) -> (m, T, r) @ (m, r, out) -> (m, T, out) for the m routed
        rows. One adapter, dropout in training, or a wrong batch: ``LoraLayer.forward``.
        """
        groups = [(n, rows) for n, rows in self.route if n is not None and n in self.lora_A]
        dropout = self.training and any(self.dropout[n] > 0 for n, _ in groups)
        if len(groups) < 2 or dropout or x.shape[0] != self.route_batch:
            return super().forward(x)
        result = self.base_layer(x)
        r = max(self.r[n] for n, _ in groups)
        A = torch.stack([F.pad(self.lora_A[n], (0, 0, 0, r - self.r[n])) for n, _ in groups])
        B = torch.stack(
            [F.pad(self.lora_B[n] * self.scale[n], (0, r - self.r[n])) for n, _ in groups]
        )  # (k, r, in), (k, out, r)
        rows = torch.cat([idx for _, idx in groups])  # (m,)
        which = torch.cat([torch.full_like(idx, i) for i, (_, idx) in enumerate(groups)])
        xr = x[rows]
        h = torch.bmm(xr.reshape(len(rows), -1, x.shape[-1]).to(A.dtype), A[which].mT)
        delta = torch.bmm(h, B[which].mT).view(*xr.shape[:-1], -1)
        return result.index_add_(0, rows, delta.to(result.dtype))


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: a lookup into A's columns, not a dense one-hot product.

    A: (r, num_embeddings), B: (embedding_dim, r), ΔW = (scale · B A)ᵀ of shape (num, dim).
    """

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.weight.shape

    @property
    def fan_in(self) -> int:
        return 1  # the input is one-hot: each output of A sees a single column

    def _shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def delta_weight(self, name: str) -> Tensor:
        return lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name]).T

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        base = self.base_layer
        # (...,) ids -> (..., r) rows of Aᵀ -> (..., dim); dropout does not apply to ids.
        after_a = F.embedding(
            x,
            self.lora_A[name].T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        return F.linear(after_a, self.lora_B[name]) * self.scale[name]


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}  # by number of spatial dims


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d/2d/3d``: A is a conv with the base kernel, stride, padding and
    dilation (in -> r), B a 1×…×1 conv (r -> out) with the base's groups, as PEFT lays it out.

    ΔW[o, i, k…] = scale · Σ_r B[o, r] A[r, i, k…]; with groups > 1 A mixes channels across
    groups, so the delta cannot be folded into the grouped weight and merging raises.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.conv = _CONV_FUNCTIONS[len(base_layer.kernel_size)]
        self.in_features = base_layer.in_channels
        self.out_features = base_layer.out_channels

    @property
    def fan_in(self) -> int:
        return self.in_features * math.prod(self.base_layer.kernel_size)

    def _shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        base = self.base_layer
        ones = (1,) * len(base.kernel_size)
        return (r, self.in_features, *base.kernel_size), (
            self.out_features,
            r // base.groups,
            *ones,
        )

    def delta_weight(self, name: str) -> Tensor:
        base = self.base_layer
        if base.groups > 1:
            raise LoraError(
                f"Cannot merge LoRA into a grouped convolution ({base}): the LoRA path mixes "
                "channels across groups. Keep the adapter unmerged."
            )
        A, B = self.lora_A[name], self.lora_B[name]
        # (out, r) @ (r, in·k…) -> (out, in·k…)
        delta = lora_delta(B.flatten(1), A.flatten(1), self.scale[name])
        return delta.view(base.weight.shape)

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        base = self.base_layer
        after_a = self.conv(
            self._dropped(name, x),
            self.lora_A[name],
            None,
            base.stride,
            base.padding,
            base.dilation,
        )
        return self.conv(after_a, self.lora_B[name], groups=base.groups) * self.scale[name]


class LoraFused(LoraLayer):
    """LoRA on chosen equal output slices of a fused projection (loralib's ``MergedLinear``).

    For a qkv Linear with ``enabled=[True, False, True]``, q and v get their own rank-r pair
    and k none. A: (n_on, r, in), B: (n_on, out/n, r); the base may be Linear or GPT-2 Conv1D.
    """

    def __init__(self, base_layer: nn.Module, enabled: Sequence[bool]) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_gpt2_conv1d(base_layer)
        w = base_layer.weight
        self.in_features, self.out_features = w.shape if self.fan_in_fan_out else w.shape[::-1]
        self.enabled = list(enabled)
        self.slice_size = self.out_features // len(self.enabled)
        self.register_buffer(
            "slice_index",
            torch.tensor([i for i, on in enumerate(self.enabled) if on], device=w.device),
            persistent=False,
        )

    def _shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        n_on = int(sum(self.enabled))
        return (n_on, r, self.in_features), (n_on, self.slice_size, r)

    def _scatter(self, per_slice: Tensor) -> Tensor:
        # (..., n_on, s) -> (..., n, s) with zeros on disabled slices -> (..., n·s)
        shape = (*per_slice.shape[:-2], len(self.enabled), self.slice_size)
        full = per_slice.new_zeros(shape).index_copy(-2, self.slice_index, per_slice)
        return full.flatten(-2)

    def delta_weight(self, name: str) -> Tensor:
        # (n_on, s, r) @ (n_on, r, in) -> (n_on, s, in), placed as rows of (out, in)
        per_slice = lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name])
        full = per_slice.new_zeros(len(self.enabled), *per_slice.shape[1:])
        delta = full.index_copy(0, self.slice_index, per_slice).flatten(0, 1)
        return delta.T if self.fan_in_fan_out else delta

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        n_on, r, _ = A.shape
        # (..., in) -> (..., n_on·r) -> (..., n_on, r) -> (..., n_on, s)
        after_a = F.linear(self._dropped(name, x), A.reshape(n_on * r, -1)).unflatten(-1, (n_on, r))
        per_slice = torch.einsum("...nr,nsr->...ns", after_a, B)
        return self._scatter(per_slice) * self.scale[name]


class LoraParameter(LoraLayer):
    """LoRA on a raw 2D or 3D parameter of a module (``target_parameters``).

    2D (out, in): ΔW = scale · B A. 3D (E, out, in), e.g. fused MoE experts: one pair per
    expert, A: (E, r, in), B: (E, out, r), ΔW[e] = scale · B[e] A[e]. A module that stores
    experts as (E, in, out) marks itself ``is_transposed`` (transformers' convention) and gets
    ΔW[e]ᵀ. The module's own forward runs with W + ΔW swapped in, so any code that reads the
    parameter sees the adapted weight; dropout is undefined here (x is not ours to drop).
    Several parameters of one module nest one wrapper per parameter, as PEFT does.
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        module, path = base_layer, parameter_name
        while isinstance(module, LoraParameter):
            module, path = module.base_layer, "base_layer." + path
        self.parameter_path = path  # relative to base_layer, through nested wrappers
        self.owner = [module]  # a list so the owner is not registered twice as a submodule
        param = getattr(module, parameter_name)
        self.transposed = param.dim() == 3 and bool(getattr(module, "is_transposed", False))
        self.num_experts = param.shape[0] if param.dim() == 3 else 0
        out_in = param.shape[-2:] if param.dim() == 3 else param.shape
        self.out_features, self.in_features = out_in[::-1] if self.transposed else out_in

    @property
    def base_weight(self) -> nn.Parameter:
        return getattr(self.owner[0], self.parameter_name)

    def _shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        experts = (self.num_experts,) if self.num_experts else ()
        return (*experts, r, self.in_features), (*experts, self.out_features, r)

    def add_adapter(
        self, name: str, r: int, scale: float, dropout: float = 0.0, init: str = "kaiming"
    ) -> None:
        if dropout:
            raise LoraError(
                f"dropout={dropout} is not defined for target_parameters "
                f"({self.parameter_name}): the delta is added to the weight, there is no input "
                "to drop. Use dropout=0."
            )
        super().add_adapter(name, r, scale, 0.0, init)

    def delta_weight(self, name: str) -> Tensor:
        delta = lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name])
        return delta.transpose(-1, -2) if self.transposed else delta

    def forward(self, *args, **kwargs) -> Tensor:
        if self.route is not None:
            raise LoraError(
                f"Per-example routing is not supported for target_parameters "
                f"({self.parameter_name}): its module sees tokens, not examples."
            )
        names = [n for n in self.active if n in self.lora_A and n not in self.merged]
        if not names:
            return self.base_layer(*args, **kwargs)
        weight = self.base_weight
        # Differentiable in A and B; the frozen base weight itself gets no gradient.
        adapted = weight + sum(self.delta_weight(n) for n in names).to(weight.dtype)
        return torch.func.functional_call(
            self.base_layer, {self.parameter_path: adapted}, args, kwargs, strict=False
        )


class ModulesToSave(nn.Module):
    """A full trainable copy of a module per adapter (``modules_to_save``, e.g. a new head).

    The original stays frozen in ``original_module``; forward uses the copy of the first active
    adapter that has one.
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.training = original_module.training
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []

    def add_adapter(self, name: str) -> None:
        """Copy the original module as adapter ``name``'s trainable module."""
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone
        self.active.append(name)

    def delete_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s copy."""
        del self.modules_to_save[name]
        if name in self.active:
            self.active.remove(name)

    def adapter_names(self) -> list[str]:
        """Names of the adapters with a copy here."""
        return list(self.modules_to_save.keys())

    def forward(self, *args, **kwargs):
        for name in self.active:
            if name in self.modules_to_save:
                return self.modules_to_save[name](*args, **kwargs)
        return self.original_module(*args, **kwargs)
