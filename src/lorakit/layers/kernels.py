"""The fused LoRA paths: base projection and every active adapter in one autograd node.

``LoraLinear.forward`` uses ``LoraLinearFunction`` when the base is a plain, frozen Linear /
GPT-2 Conv1D; the maths is the same as composing ``F.linear`` calls, with fewer temporaries.
``LoraParameter`` uses ``GroupedLoraFunction`` for routed experts: the tokens of each expert
meet its LoRA factors in grouped GEMMs, so no expert's ΔW is built. Tested against the plain
formulas in ``tests/test_layers_kernels.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    scales: Sequence[float],
    lora: Sequence,
    out: Tensor | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The forward maths of ``LoraLinearFunction`` on flattened x (N, in): (y, inputs, hs).

    ``lora`` holds (xᵢ or None, Aᵢ, Bᵢ) per adapter; used directly under no_grad. ``out``: an
    (N, out) tensor y is written into (the autograd node's own output, seen flat).
    """
    if out is None:
        y = F.linear(x, weight, bias)  # (N, in) @ (in, out) -> (N, out)
    elif bias is None:
        y = torch.mm(x, weight.t(), out=out)
    else:
        y = torch.addmm(bias, x, weight.t(), out=out)
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
        # y is made in x's leading shape and filled through a flat view, so what this node
        # returns is no view: model code may add to it in place (Llama-4's ``out.add_``).
        y = x.new_empty(*x.shape[:-1], W.shape[0])
        flat = y.view(-1, W.shape[0])  # (N, out)
        _, inputs, hs = lora_linear(x.reshape(-1, x.shape[-1]), W, bias, scales, lora, flat)
        ctx.scales, ctx.x_shape = scales, x.shape
        ctx.dropped = [lora[3 * i] is not None for i in range(len(scales))]
        kept = () if ctx.weight_fn else (W,)
        ctx.save_for_backward(*kept, *inputs, *lora[1::3], *lora[2::3], *hs)
        return y

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


# --- linear layers reading one input -------------------------------------------------------
def _add_product(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, in place where the dtypes agree (fp32 adapters on a half base: cast)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out.add_(torch.mm(a, b).to(out.dtype))


def input_grad_into(gx: Tensor, g: Tensor, weight: Tensor) -> None:
    """gx += g W (``input_grad``'s layout rule for a half-precision W on the CPU)."""
    if weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16):
        gx.add_(input_grad(g, weight))
    else:
        _add_product(gx, g, weight)


def shared_lora_linear(
    x: Tensor, layout: SharedLayout, tensors: Sequence, outs: Sequence[Tensor]
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The forward maths of ``SharedLoraFunction`` on flattened x (N, in), written into the
    (N, out_j) ``outs``: (A_cat, each adapter's flat input, each adapter's sᵢ Aᵢ xᵀ (rᵢ, N))."""
    weights, adapters = tensors[: 2 * layout.members], tensors[2 * layout.members :]
    for j, y in enumerate(outs):
        W, b = weights[2 * j : 2 * j + 2]
        if b is None:
            torch.mm(x, W.t(), out=y)
        else:
            torch.addmm(b, x, W.t(), out=y)
    xs, As, Bs = adapters[0::3], adapters[1::3], adapters[2::3]
    xa = x if x.dtype == As[0].dtype else x.to(As[0].dtype)
    undropped = [A for xi, A in zip(xs, As, strict=True) if xi is None]
    A_cat = torch.cat(undropped) if undropped else As[0][:0]  # (Σr, in)
    # (Σr, in) @ (in, N): every undropped adapter's A x at once, each one's rows contiguous
    # (the (N, Σr) layout would hand BLAS strided column blocks, several times slower)
    HT = torch.mm(A_cat, xa.t())
    inputs, hts, offset = [], [], 0
    for i, (xi, A, B) in enumerate(zip(xs, As, Bs, strict=True)):
        if xi is None:
            inputs.append(xa)
            ht = HT[offset : offset + A.shape[0]].mul_(layout.scales[i])
            offset += A.shape[0]
        else:  # its own dropout mask (PEFT draws one per layer): its own product
            inputs.append(xi.reshape(x.shape).to(A.dtype))
            ht = torch.mm(A, inputs[-1].t()).mul_(layout.scales[i])
        _add_product(outs[layout.owner[i]], ht.t(), B.t())  # y_j += (N, r) @ (r, out)
        hts.append(ht)
    return A_cat, inputs, hts


class SharedLayout(NamedTuple):
    """Which adapters of a ``SharedLoraFunction`` belong to which layer, and their scales."""

    members: int  # layers
    owner: list[int]  # per adapter: the index of its layer
    scales: list[float]  # per adapter


def shared_outputs(x: Tensor, weights: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's output tensor in x's leading shape, and the flat (N, out_j) view of it the
    maths writes into: separate tensors, not views, so model code may add to them in place."""
    ys = [x.new_empty(*x.shape[:-1], W.shape[0]) for W in weights]
    return ys, [y.view(-1, y.shape[-1]) for y in ys]


class SharedLoraFunction(torch.autograd.Function):
    """Linear layers j that read one x, each with its pending plain adapters i, as one node:
    ``y_j = x W_jᵀ + b_j + Σ_{i of j} sᵢ (xᵢ Aᵢᵀ) Bᵢᵀ`` (q/k/v of an attention, gate/up).

    x (N, in), W_j (out_j, in), Aᵢ (rᵢ, in), Bᵢ (out_j, rᵢ); A_cat stacks the Aᵢ of the
    adapters without dropout (xᵢ = x). Kept transposed, (r, N), so each adapter's block is
    contiguous::

        forward   Hᵀ  = s ⊙ A_cat xᵀ           (Σr, N)  one product for all of them
                  y_j = x W_jᵀ + b_j + Σᵢ Hᵢ Bᵢᵀ        (the base products unchanged)
        backward  Gᵢᵀ = sᵢ Bᵢᵀ g_jᵀ            (rᵢ, N)
                  ∂x  = Σ_j g_j W_j + G A_cat          one product, accumulated in place
                  ∂A_cat = Gᵀ x  (Σr, in)  one product;   ∂Bᵢ = g_jᵀ Hᵢ;   ∂b_j = Σ_N g_j

    An adapter with dropout has its own xᵢ = dropout(x) and products, as in
    ``LoraLinearFunction``. Outputs are separate tensors, not views: model code may add to
    them in place.
    """

    @staticmethod
    def forward(ctx, x, layout, *tensors):  # tensors: W₁, b₁, ..., W_m, b_m, x₁, A₁, B₁, ...
        flat = x.reshape(-1, x.shape[-1])
        weights = tensors[: 2 * layout.members : 2]
        ys, outs = shared_outputs(x, weights)
        A_cat, inputs, hts = shared_lora_linear(flat, layout, tensors, outs)
        adapters = tensors[2 * layout.members :]
        ctx.layout, ctx.x_shape = layout, x.shape
        ctx.dropped = [xi is not None for xi in adapters[0::3]]
        ctx.save_for_backward(*weights, A_cat, *inputs, *adapters[1::3], *adapters[2::3], *hts)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        layout, needs, dropped = ctx.layout, ctx.needs_input_grad, ctx.dropped
        m, k = layout.members, len(layout.owner)
        saved = ctx.saved_tensors  # read once: checkpointing unpacks on each read
        weights, (A_cat, *rest) = saved[:m], saved[m:]
        xs, As, Bs, hts = (rest[j * k : (j + 1) * k] for j in range(4))
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]  # (N, out_j)
        gx = None
        if needs[0]:
            gx = input_grad(gs[0], weights[0])
            for g, W in zip(gs[1:], weights[1:], strict=True):
                input_grad_into(gx, g, W)
        shared_GT, adapter_grads = [], []
        for i in range(k):
            g = gs[layout.owner[i]]
            g = g if g.dtype == Bs[i].dtype else g.to(Bs[i].dtype)
            slot = 2 + 2 * m + 3 * i  # needs_input_grad index of xᵢ (then Aᵢ, Bᵢ)
            gB = torch.mm(hts[i], g).t() if needs[slot + 2] else None  # (r, N) @ (N, out)
            GT = torch.mm(Bs[i].t(), g.t()).mul_(layout.scales[i])  # (r, out) @ (out, N)
            gA = gxi = None
            if dropped[i]:
                gA = torch.mm(GT, xs[i]) if needs[slot + 1] else None  # (r, N) @ (N, in)
                gxi = torch.mm(GT.t(), As[i]).view(*ctx.x_shape[:-1], As[i].shape[1])
            else:
                shared_GT.append(GT)
            adapter_grads.append([gxi, gA, gB])
        if shared_GT:
            GT = torch.cat(shared_GT)  # (Σr, N)
            if gx is not None:
                _add_product(gx, GT.t(), A_cat)  # ∂x += (N, Σr) @ (Σr, in)
            undropped = [i for i in range(k) if not dropped[i]]
            gA_cat = torch.mm(GT, xs[undropped[0]])  # (Σr, in): every undropped ∂A at once
            pieces = gA_cat.split([As[i].shape[0] for i in undropped])
            for i, piece in zip(undropped, pieces, strict=True):
                adapter_grads[i][1] = piece if needs[2 + 2 * m + 3 * i + 1] else None
        biases = [g.sum(0) if needs[3 + 2 * j] else None for j, g in enumerate(gs)]
        gx = gx.view(ctx.x_shape) if gx is not None else None
        base = [t for j in range(m) for t in (None, biases[j])]
        return gx, None, *base, *(t for trio in adapter_grads for t in trio)


# --- routed experts: LoRA per token group --------------------------------------------------
def _groupable(a: Tensor, b: Tensor, n: int) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` takes a and b: one dtype it supports, and
    every stride (and the (·, n) output's rows) a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm") or a.dtype != b.dtype or a.dtype == torch.float64:
        return False
    size = a.element_size()
    strides = [st for t in (a, b) for st, dim in zip(t.stride(), t.shape, strict=True) if dim > 1]
    return all(st == 1 or st * size % 16 == 0 for st in strides) and n * size % 16 == 0


def grouped_mm(a: Tensor, b: Tensor, groups: Groups) -> Tensor:
    """Rows of ``a`` (S, K), sorted by group, each times its group's matrix of ``b`` (E, K, N):
    (S, N). One grouped GEMM where torch has one for these shapes, else one mm per group."""
    if _groupable(a, b, b.shape[-1]):
        return F.grouped_mm(a, b, offs=groups.offsets)
    out = a.new_empty(a.shape[0], b.shape[-1])
    for e, start, end in groups.spans():
        torch.mm(a[start:end], b[e], out=out[start:end])
    return out


def grouped_outer(a: Tensor, b: Tensor, groups: Groups) -> Tensor:
    """Per group e, ``a[:, rows_e] @ b[rows_e]``: (M, S) and (S, N) -> (E, M, N), the weight
    gradient of a grouped product (zeros for a group without rows)."""
    if _groupable(a, b, b.shape[-1]):
        return F.grouped_mm(a, b, offs=groups.offsets)
    out = a.new_zeros(len(groups.ends), a.shape[0], b.shape[-1])
    for e, start, end in groups.spans():
        torch.mm(a[:, start:end], b[start:end], out=out[e])
    return out


class Groups:
    """Row groups of a tensor sorted by expert: cumulative ``ends`` on the host (one sync to
    read them) and as the int32 ``offsets`` grouped GEMMs take."""

    def __init__(self, counts: Tensor) -> None:
        self.offsets = counts.cumsum(0).to(torch.int32)
        self.ends: list[int] = self.offsets.tolist()

    def spans(self) -> list[tuple[int, int, int]]:
        """(group, start, end) of each group with rows (the empty ones are skipped)."""
        starts = [0, *self.ends[:-1]]
        return [(g, s, e) for g, (s, e) in enumerate(zip(starts, self.ends, strict=True)) if e > s]


class GroupedLoraFunction(torch.autograd.Function):
    """``y = x Wₑ + Σᵢ sᵢ (x Pᵢₑ) Qᵢₑ`` for the rows of each expert e, as one autograd node.

    Rows of x (S, in) are sorted by expert (``Groups``); W (E, in, out) is frozen, Pᵢ (E, in, r)
    and Qᵢ (E, r, out) are adapter i's factors as the input meets them (Aᵀ and Bᵀ). Per group::

        forward   y  = x W                (S, out)     hᵢ = sᵢ x Pᵢ   (S, r)     y += hᵢ Qᵢ
        backward  ∂x = g Wᵀ + Σᵢ gᵢ Pᵢᵀ    gᵢ = sᵢ g Qᵢᵀ  (S, r)
                  ∂Qᵢ = hᵢᵀ g (E, r, out)  ∂Pᵢ = xᵀ gᵢ (E, in, r)

    No expert's ΔW = B A (out × in) is ever formed: the LoRA terms cost O(S · r · (in + out)),
    not O(E · in · out), and only x and the (S, r) hᵢ are kept for the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, groups, scales, *factors):  # factors: (P₁, Q₁, P₂, Q₂, ...)
        y = grouped_mm(x if x.dtype == weight.dtype else x.to(weight.dtype), weight, groups)
        hs = []
        for i, s in enumerate(scales):
            P, Q = factors[2 * i : 2 * i + 2]
            h = grouped_mm(x if x.dtype == P.dtype else x.to(P.dtype), P, groups).mul_(s)
            y.add_(grouped_mm(h, Q, groups).to(y.dtype))  # fp32 adapters: added in y's dtype
            hs.append(h)
        ctx.groups, ctx.scales = groups, scales
        ctx.save_for_backward(x, weight, *factors, *hs)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, *rest = ctx.saved_tensors
        k, groups, needs = len(ctx.scales), ctx.groups, ctx.needs_input_grad
        factors, hs = rest[: 2 * k], rest[2 * k :]
        g = grad.contiguous()  # an expanded gradient (a sum's) has zero strides
        gx = grouped_mm(g.to(weight.dtype), weight.mT, groups).to(x.dtype) if needs[0] else None
        grads: list[Tensor | None] = []
        for i, s in enumerate(ctx.scales):
            P, Q, h = factors[2 * i], factors[2 * i + 1], hs[i]
            gi = g if g.dtype == Q.dtype else g.to(Q.dtype)
            gQ = grouped_outer(h.t(), gi, groups) if needs[5 + 2 * i] else None
            gh = grouped_mm(gi, Q.mT, groups).mul_(s)  # (S, out) @ (out, r) -> (S, r)
            xi = x if x.dtype == P.dtype else x.to(P.dtype)
            gP = grouped_outer(xi.t(), gh, groups) if needs[4 + 2 * i] else None
            if gx is not None:
                gx.add_(grouped_mm(gh, P.mT, groups).to(gx.dtype))
            grads += [gP, gQ]
        return gx, None, None, None, *grads


def grouped_lora(
    x: Tensor, weight: Tensor, groups: Groups, pairs: list[tuple[Tensor, Tensor, float]]
) -> Tensor:
    """``GroupedLoraFunction`` for rows x (S, in) sorted by expert, W (E, in, out) and LoRA
    ``pairs`` (P (E, in, r), Q (E, r, out), scale): (S, out)."""
    factors = [t for P, Q, _ in pairs for t in (P, Q)]
    return GroupedLoraFunction.apply(x, weight, groups, [s for *_, s in pairs], *factors)
