"""LoRA on ``nn.Linear`` (weight (out, in)) and GPT-2 ``Conv1D`` (weight (in, out)).

The one kind with a fast path: ``LoraLinear.forward`` picks among three ways to compute the
same output (``_path``), and PiSSA / OLoRA initialisation, which reads the weight's SVD / QR.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import LoraLayer, lora_delta
from .kernels import LoraLinearFunction, lora_linear
from .registry import register
from .shared_input import SharedInput, settle_probes


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer storing its weight as (in, out).

    Checked by name so the core library does not import transformers.
    """
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


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


@register(nn.Linear, "transformers.pytorch_utils.Conv1D")
class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` or GPT-2 ``Conv1D``: A (r, in), B (out, r)."""

    is_linear = True
    supports_dora = True
    supports_lora_bias = True
    supports_weight_init = True
    supports_nora = True

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options: Any) -> tuple[int, int]:
        shape = tuple(module.weight.shape)
        return shape[::-1] if is_gpt2_conv1d(module) else shape

    @classmethod
    def router_problem(cls, module: nn.Module) -> str | None:
        # A Linear subclass with a forward of its own routes inside it (Llama-4's returns
        # (scores, logits)): there is no x Wᵀ output for LoRA to add to.
        if is_gpt2_conv1d(module) or type(module).forward is nn.Linear.forward:
            return None
        return (
            f"{type(module).__name__} is a router whose forward does more than x Wᵀ (it "
            "returns its routing, not a projection), so LoRA cannot add to its output"
        )

    def __init__(self, base_layer: nn.Module, **options: Any) -> None:
        super().__init__(base_layer, **options)
        self.fan_in_fan_out = is_gpt2_conv1d(base_layer)
        self.out_features, self.in_features = self.matrix_shape(base_layer)
        # The layers reading this one's input, run as one node (shared_input.py); not a
        # submodule, so neither saved nor moved.
        self._shared: SharedInput | None = None

    @classmethod
    def link_shared_inputs(cls, model: nn.Module) -> None:
        """Give every layer of this kind in ``model`` its candidate ``SharedInput`` set: the
        layers of one parent module with its input size, weight dtype and device (split by
        the first forward; see ``shared_input``). Earlier sets are replaced: after a wrapper
        was added or replaced the sets are made anew. A layer under two parents runs alone."""
        layers = [
            (p, c) for p, m in model.named_modules() for c in m.children() if isinstance(c, cls)
        ]
        parents = Counter(id(c) for _, c in layers)
        candidates: dict[tuple, list[LoraLinear]] = defaultdict(list)
        for parent, layer in layers:
            layer._shared = None
            weight = layer.base_weight
            if parents[id(layer)] == 1:
                candidates[parent, layer.in_features, weight.dtype, weight.device].append(layer)
        for members in candidates.values():
            if len(members) > 1:
                group = SharedInput(members)
                for member in members:
                    member._shared = group
        model._lorakit_probing = len(candidates) > 0
        if not any(hook is settle_probes for hook in model._forward_pre_hooks.values()):
            model.register_forward_pre_hook(settle_probes)

    @classmethod
    def to_matrix(cls, module: nn.Module, weight: Tensor, **options: Any) -> Tensor:
        return weight.T if is_gpt2_conv1d(module) else weight

    from_matrix = to_matrix  # a transpose is its own inverse

    def delta_weight(self, name: str) -> Tensor:
        return self.as_matrix(lora_delta(self.lora_B[name], self.lora_A[name], self.scale[name]))

    def lora_output(self, name: str, x: Tensor) -> Tensor:
        # (..., in) @ (in, r) -> (..., r), scaled while small, @ (r, out) -> (..., out)
        after_a = F.linear(self._dropped(name, x), self.lora_A[name]) * self.scale[name]
        bias = self.lora_bias[name] * self.scale[name] if name in self.lora_bias else None
        return F.linear(after_a, self.lora_B[name], bias)

    # --- PiSSA / OLoRA -----------------------------------------------------------------------
    def _init_from_weight(self, name: str, init: str) -> None:
        """PiSSA / OLoRA: A, B from the base weight, which keeps the residual W - ΔW."""
        A, B = self.lora_A[name], self.lora_B[name]
        weight = self.base_weight
        matrix = self.as_matrix(weight.detach().to(A.dtype))  # (out, in)
        A0, B0 = principal_init(matrix, A.shape[0], self.scale[name], init)
        with torch.no_grad():
            A.copy_(A0)
            B.copy_(B0)
            weight.copy_((weight.float() - self.delta_weight(name)).to(weight.dtype))
        # The starting point, kept so a trained adapter can be saved as a plain LoRA on the
        # original weight (``original_weight_pair``); not part of the state dict.
        self.register_buffer(f"lora_A0_{name}", A0, persistent=False)
        self.register_buffer(f"lora_B0_{name}", B0, persistent=False)

    def initial_lora(self, name: str) -> tuple[Tensor, Tensor] | None:
        if f"lora_A0_{name}" not in self._buffers:
            return None
        return self._buffers[f"lora_A0_{name}"], self._buffers[f"lora_B0_{name}"]

    def restore_base(self, name: str) -> None:
        """Give back to the base weight what a PiSSA / OLoRA init took out (scale · B0 A0)."""
        initial = self.initial_lora(name)
        if initial is None:
            return
        A0, B0 = initial
        weight = self.base_weight
        delta = self.as_matrix(lora_delta(B0, A0, self.scale[name]))
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))
        self._buffers.pop(f"lora_A0_{name}")
        self._buffers.pop(f"lora_B0_{name}")

    def original_weight_pair(self, name: str) -> tuple[Tensor, Tensor]:
        """PiSSA / OLoRA as a rank-2r LoRA on the weight before the init.

        The init moved scale · B0 A0 out of the base: W = W_res + scale · B0 A0. The trained
        model is W_res + scale · B A = W + scale · [B, -B0] [A; A0] (PEFT's
        ``path_initial_model_for_weight_conversion``).
        """
        A, B = self.lora_A[name], self.lora_B[name]
        initial = self.initial_lora(name)
        if initial is None:
            return A, B
        A0, B0 = initial
        # (r, in) + (r, in) -> (2r, in);  (out, r) + (out, r) -> (out, 2r)
        return torch.cat([A, A0.to(A.dtype)]), torch.cat([B, -B0.to(B.dtype)], dim=1)

    def peft_rank(self, name: str) -> int:
        return self.r[name] * (2 if self.initial_lora(name) is not None else 1)

    # --- forward -----------------------------------------------------------------------------
    def _path(self, x: Tensor, extra_args: bool) -> str:
        """Which of three equal computations ``forward`` runs, and why.

        - ``routed``: ``route()`` gave rows their own adapters; two batched products.
        - ``fused``: one autograd node (``LoraLinearFunction``) for the base and every pending
          plain adapter, or for one DoRA adapter (y = g ⊙ fused(x, no bias) + b). It needs a
          plain frozen Linear / Conv1D without hooks (it reads the weight directly), no extra
          call arguments, no lora_bias, and no autocast (which rewrites dtypes per op, while
          the node adds in place).
        - ``generic``: ``LoraLayer.forward``, composing ordinary ops; always correct.
        """
        base = self.base_layer
        if self._route is not None:
            return "generic" if extra_args else "routed"
        names = self.pending()
        dora = [n for n in names if self.is_dora(n)]
        if (
            extra_args
            or not self._fusable_base()
            or base.weight.requires_grad
            or base._forward_hooks
            or base._forward_pre_hooks
            or torch.is_autocast_enabled(x.device.type)
            or any(n in self.lora_bias for n in names)
            or (dora and (len(names) > 1 or (self.training and self.dropout[dora[0]] > 0)))
        ):
            return "generic"
        return "fused"

    def _fusable_base(self) -> bool:
        """Whether the base computes exactly x Wᵀ + b from ``_fused_weight`` (no subclass
        with its own forward), so the fused node may replace its call."""
        return type(self.base_layer) is nn.Linear or self.fan_in_fan_out

    def _fused_weight(self) -> Tensor | Callable[[torch.dtype], Tensor]:
        """W (out, in) for the fused node, or a function giving it (see LoraLinearFunction)."""
        return self.as_matrix(self.base_layer.weight)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """base(x) + Σ pending adapters, computed the way ``_path`` chooses."""
        path = self._path(x, bool(args or kwargs))
        if path == "routed":
            return self._routed(x)
        if path == "generic":
            return super().forward(x, *args, **kwargs)
        return self._fused(x)

    def _shareable(self, x: Tensor) -> bool:
        """Whether this layer's output for ``x`` may come from its ``SharedInput`` node: the
        fused path with pending plain adapters on a plain weight (no DoRA, no quantized base)."""
        names = self.pending()
        return (
            bool(names)
            and self._path(x, False) == "fused"
            and not any(self.is_dora(n) for n in names)
            and not callable(self._fused_weight())
        )

    def _fused(self, x: Tensor) -> Tensor:
        base, names = self.base_layer, self.pending()
        if not names:
            return base(x)
        shared = self._shared.output(self, x) if self._shared is not None else None
        if shared is not None:
            return shared
        lora: list[Tensor | None] = []
        for n in names:
            dropped = self.dropout[n] > 0 and self.training
            lora += [self._dropped(n, x) if dropped else None, self.lora_A[n], self.lora_B[n]]
        weight = self._fused_weight()  # (out, in), or a function giving it
        scales = [self.scale[n] for n in names]
        dora = self.is_dora(names[0])
        bias = None if dora else base.bias
        if torch.is_grad_enabled():
            y = LoraLinearFunction.apply(x, weight, bias, scales, *lora)
        else:  # inference: the same maths without building an autograd node
            weight = weight(x.dtype) if callable(weight) else weight
            flat, _, _ = lora_linear(x.reshape(-1, x.shape[-1]), weight, bias, scales, lora)
            y = flat.view(*x.shape[:-1], flat.shape[-1])
        if not dora:
            return y
        # DoRA: y = g ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b, g = m / ‖W + ΔW‖ (out,)
        y = y * self.dora_factor(names[0]).to(y.dtype)
        return y if base.bias is None else y + base.bias

    def _routed(self, x: Tensor) -> Tensor:
        """Routed rows of several plain adapters in two batched products, not a loop.

        Row b with adapter n: y_b += s_n x_b A_nᵀ B_nᵀ. Each row gets its adapter's factors,
        ranks zero-padded to the largest and B pre-scaled (a base-model row: zeros), so the
        whole batch takes two batched products and no rows are gathered or scattered::

            (b, T, in) @ (b, in, r) -> (b, T, r) @ (b, r, out) -> (b, T, out), added to y

        DoRA, lora_bias, dropout in training or a wrong batch: the generic path.
        """
        groups = self._route
        special = any(self.is_dora(n) or n in self.lora_bias for n, _ in groups)
        dropout = self.training and any(self.dropout[n] > 0 for n, _ in groups)
        if not groups or special or dropout or x.shape[0] != self._route_batch:
            return super().forward(x)
        result = self.base_layer(x)  # (b, ..., out)
        A, B = self._route_stacks()
        rows = x.reshape(x.shape[0], -1, x.shape[-1])  # (b, T, in)
        h = torch.bmm(rows if rows.dtype == A.dtype else rows.to(A.dtype), A)  # (b, T, r)
        out = result.view(x.shape[0], -1, result.shape[-1])  # (b, T, out), result's storage
        if out.dtype == h.dtype:
            out.baddbmm_(h, B)  # y += (b, T, r) @ (b, r, out), in place
        else:  # fp32 adapters on a half-precision base: add in the base dtype
            out.add_(torch.bmm(h, B).to(out.dtype))
        return result

    def _route_stacks(self) -> tuple[Tensor, Tensor]:
        """(Aᵀ per row (b, in, r), scaled Bᵀ per row (b, r, out)) for the route.

        Without autograd (serving, decoding step after step) they are built once per
        ``route`` block, not once per forward; with it, each forward builds its own graph.
        """
        if self._route_stack is not None and not torch.is_grad_enabled():
            return self._route_stack
        groups = self._route
        r = max(self.lora_A[n].shape[0] for n, _ in groups)
        A0, B0 = self.lora_A[groups[0][0]], self.lora_B[groups[0][0]]
        # Entry 0: zeros, for base-model rows; entry i: adapter i's factors, rank padded to r.
        As, Bs = [A0.new_zeros(r, A0.shape[1])], [B0.new_zeros(B0.shape[0], r)]
        which = torch.zeros(self._route_batch, dtype=torch.long, device=A0.device)
        for i, (n, rows) in enumerate(groups, start=1):
            pad = r - self.lora_A[n].shape[0]
            As.append(F.pad(self.lora_A[n], (0, 0, 0, pad)))  # (r, in)
            Bs.append(F.pad(self.lora_B[n] * self.scale[n], (0, pad)))  # (out, r)
            which[rows] = i
        # (k + 1, r, in)[which] -> (b, r, in) -> (b, in, r); likewise B -> (b, r, out)
        stacks = torch.stack(As)[which].mT.contiguous(), torch.stack(Bs)[which].mT.contiguous()
        if not torch.is_grad_enabled():
            self._route_stack = stacks
        return stacks
