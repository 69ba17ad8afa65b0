"""The fused LoRA linear path: base projection and every active adapter in one autograd node.

``LoraLinear.forward`` uses it when the base is a plain, frozen Linear / GPT-2 Conv1D; the
maths is the same as composing ``F.linear`` calls, with fewer temporaries (see
``LoraLinearFunction``). Tested against the plain formula in ``tests/test_layers_kernels.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, scales: Sequence[float], lora: Sequence
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The forward maths of ``LoraLinearFunction`` on flattened x (N, in): (y, inputs, hs).

    ``lora`` holds (xᵢ or None, Aᵢ, Bᵢ) per adapter; used directly under no_grad.
    """
    y = F.linear(x, weight, bias)  # (N, in) @ (in, out) -> (N, out)
    inputs, hs = [], []
    for i, s in enumerate(scales):
        xi, A, B = lora[3 * i : 3 * i + 3]
        xi = x if xi is None else xi.reshape(x.shape)
        xi = xi if xi.dtype == A.dtype else xi.to(A.dtype)
        h = torch.mm(xi, A.t()).mul_(s)  # (N, in) @ (in, r) -> (N, r), scaled while small
        if y.dtype == h.dtype:
            y.addmm_(h, B.t())  # y += (N, r) @ (r, out), in place
        else:  # fp32 adapter on a half-precision base: add in the base dtype, as unfused
            y.add_(torch.mm(h, B.t()).to(y.dtype))
        inputs.append(xi)
        hs.append(h)
    return y, inputs, hs


def input_grad(g: Tensor, weight: Tensor) -> Tensor:
    """∂x = g W: (N, out) @ (out, in) -> (N, in).

    On the CPU a bfloat16 / float16 W in its (out, in) row-major layout sends this product to a
    slow single-threaded GEMM: 10.4 s for g (128, 5632) and W (5632, 2048) on an AVX2 EPYC,
    against 0.29 s for the same product with W laid out (in, out), which a transposed copy
    (0.03 s) gives. CUDA and float32 take both layouts at full speed, so W is used as it is.
    """
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
        weight = weight.t().contiguous().t()  # same values, column-major: oneDNN's fast path
    return torch.mm(g, weight)


class LoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + Σᵢ sᵢ Bᵢ Aᵢ xᵢ`` for a frozen W as one autograd node.

    ``xᵢ`` is dropout(x) when adapter i has dropout (computed by the caller, so autograd
    handles the mask) and x itself otherwise (``None`` in ``lora``). Flattened shapes:
    x (N, in), W (out, in), Aᵢ (r, in), Bᵢ (out, r), g = ∂L/∂y (N, out)::

        forward   y  = x Wᵀ + b                  (N, out)
                  hᵢ = sᵢ xᵢ Aᵢᵀ                  (N, r)
                  y += hᵢ Bᵢᵀ                     in place
        backward  ∂x  = g W                       (N, in)
                  ∂Bᵢ = gᵀ hᵢ                     (out, r)
                  gᵢ  = sᵢ g Bᵢ                   (N, r)
                  ∂Aᵢ = gᵢᵀ xᵢ                    (r, in)
                  ∂x += gᵢ Aᵢ   (∂xᵢ = gᵢ Aᵢ for a dropped copy)
                  ∂b  = Σ_N g

    Why faster than composing ``F.linear`` calls: the scale only multiplies (N, r) tensors,
    the LoRA output goes into y and its input gradient into ∂x in place (``addmm_``), so no
    (N, out) or (N, in) temporaries are made for the scale, the sum, or autograd's gradient
    accumulation; x is saved once and never copied when there is no dropout.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, *lora):  # lora: (x₁, A₁, B₁, x₂, A₂, B₂, ...)
        # ``weight`` may be a callable giving W (a quantized base): it is called again in
        # backward instead of keeping the dequantized W alive between the two passes.
        ctx.weight_fn = weight if callable(weight) else None
        W = weight(x.dtype) if ctx.weight_fn else weight
        y, inputs, hs = lora_linear(x.reshape(-1, x.shape[-1]), W, bias, scales, lora)
        ctx.scales, ctx.x_shape = scales, x.shape
        ctx.dropped = [lora[3 * i] is not None for i in range(len(scales))]
        kept = () if ctx.weight_fn else (W,)
        ctx.save_for_backward(*kept, *inputs, *lora[1::3], *lora[2::3], *hs)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        if ctx.weight_fn:
            weight, saved = ctx.weight_fn(grad.dtype), ctx.saved_tensors
        else:
            weight, *saved = ctx.saved_tensors
        k, needs = len(ctx.scales), ctx.needs_input_grad
        inputs, As, Bs, hs = (saved[j * k : (j + 1) * k] for j in range(4))
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gx = input_grad(g, weight) if needs[0] else None
        grads: list[Tensor | None] = []
        for i, s in enumerate(ctx.scales):
            xi, A, B, h = inputs[i], As[i], Bs[i], hs[i]
            gi = g if g.dtype == A.dtype else g.to(A.dtype)
            # (r, N) @ (N, out) -> (r, out), transposed: as (hᵀ g)ᵀ, 4x faster on CPU than
            # gᵀ h, whose 8-column output starves the GEMM kernel.
            gB = torch.mm(h.t(), gi).t() if needs[6 + 3 * i] else None
            gh = torch.mm(gi, B).mul_(s)  # (N, out) @ (out, r) -> (N, r)
            gA = torch.mm(gh.t(), xi) if needs[5 + 3 * i] else None  # (r, N) @ (N, in)
            gxi = None
            if ctx.dropped[i]:
                gxi = torch.mm(gh, A).view(*ctx.x_shape[:-1], A.shape[1])
            elif gx is not None and gx.dtype == gh.dtype:
                gx.addmm_(gh, A)  # ∂x += (N, r) @ (r, in), in place
            elif gx is not None:
                gx.add_(torch.mm(gh, A).to(gx.dtype))
            grads += [gxi, gA, gB]
        gb = g.sum(0) if needs[2] else None
        gx = gx.view(ctx.x_shape) if gx is not None else None
        return gx, None, gb, None, *grads
