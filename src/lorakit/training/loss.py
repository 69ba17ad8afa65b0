"""Next-token cross-entropy from the final hidden states, a chunk of tokens at a time.

The plain loss runs the output head over every position and takes cross-entropy of the
logits ``z = h W^T + b``, (N, V) in float32: at 4k tokens and SmolLM2's V = 49,152 that is
0.8 GB, and as much again for its gradient. Per target token with label ``y``::

    loss_i   = logsumexp(z_i) - z_i[y]                  z_i = h_i W^T + b          (V,)
    dloss/dh = (softmax(z_i) - onehot(y)) W                                          (H,)

so :class:`ChunkedCrossEntropy` computes both in its forward, ``chunk_tokens`` target tokens at
a time, and keeps only ``dloss/dh`` (N, H) for the backward, which scales it by the incoming
gradient (the Liger / Cut-Cross-Entropy idea). The peak is one (chunk, V) block instead of two
(N, V) ones; tokens without a label (-100: prompts, padding) are skipped, not computed.

It needs the head to be frozen and exactly ``logits = head(hidden)``; :func:`chunked_problem`
says why a model is not (a trainable or wrapped head, a softcap or scale on the logits) and
:func:`token_losses` then takes the plain path, or refuses if the chunked loss was asked for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..errors import LoraError

DEFAULT_CHUNK_TOKENS = 1024  # a (1024, V) float32 block: 200 MB at V = 49,152

# Config attributes of models whose logits are not head(hidden), with the value that leaves
# them alone: Gemma 2/3 softcap tanh(z / c) c, Cohere multiplies by logit_scale, Granite
# divides by logits_scaling, Falcon-H1 and Muse multiply by a multiplier.
LOGIT_TRANSFORMS: dict[str, Any] = {
    "final_logit_softcapping": None,
    "logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "lm_head_multiplier": 1.0,
    "output_multiplier": 1.0,
}


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of ``hidden @ weight.T + bias`` without the (N, V) logits."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk_tokens: int,
    ) -> torch.Tensor:
        """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) -> losses (N,) fp32."""
        want_grad = ctx.needs_input_grad[0]
        losses = hidden.new_zeros(labels.shape, dtype=torch.float32)
        grad = hidden.new_zeros(hidden.shape, dtype=torch.float32) if want_grad else None
        targets = (labels != IGNORE_INDEX).nonzero().squeeze(1)  # (M,): positions with a label
        # float32 like the plain path's logits.float(), also under bf16 autocast.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.float()  # (V, H); no copy when it is float32 already
            b = None if bias is None else bias.float()
            for start in range(0, targets.numel(), chunk_tokens):
                rows = targets[start : start + chunk_tokens]  # (C,)
                y = labels[rows]  # (C,)
                logits = F.linear(hidden[rows].float(), w, b)  # (C, H) @ (H, V) -> (C, V)
                target = logits.gather(1, y[:, None]).squeeze(1)  # (C,)
                # logsumexp by hand, in place: torch.logsumexp would hold a second (C, V).
                top = logits.amax(dim=1, keepdim=True)  # (C, 1)
                exps = logits.sub_(top).exp_()  # (C, V)
                total = exps.sum(dim=1)  # (C,)
                losses[rows] = top.squeeze(1) + total.log() - target
                if grad is not None:
                    probs = exps.div_(total[:, None])  # softmax, still in place
                    probs[torch.arange(len(rows), device=rows.device), y] -= 1.0
                    grad[rows] = probs @ w  # (C, V) @ (V, H) -> (C, H)
        ctx.save_for_backward(grad if grad is not None else losses.new_empty(0))
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """dL/dhidden = dL/dloss_i * dloss_i/dh_i (each loss depends on its own row only)."""
        (grad,) = ctx.saved_tensors
        grad_hidden = (grad * grad_losses[:, None]).to(ctx.hidden_dtype)  # (N, H)
        return grad_hidden, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Cross-entropy of ``F.linear(hidden, weight, bias)`` against ``labels``, per token.

    Args:
        hidden: (N, H) final hidden states (what the output head reads).
        weight: (V, H) frozen head weight; bias: (V,) or ``None``.
        labels: (N,) token ids, ``-100`` for no loss (its loss and gradient are 0).
        chunk_tokens: labelled tokens per block; the peak is one (chunk_tokens, V) block.

    Returns:
        (N,) float32 losses, equal to ``F.cross_entropy(logits.float(), labels,
        reduction="none")``; gradients flow to ``hidden`` only.
    """
    return ChunkedCrossEntropy.apply(hidden, weight, bias, labels, chunk_tokens)


def chunked_problem(model: nn.Module) -> str | None:
    """Why the chunked loss would not equal the plain one on ``model`` (``None``: it would)."""
    inner = _inner(model)
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None:
        return "the model has no output head (get_output_embeddings)"
    # Exactly nn.Linear: a LoRA, modules_to_save or trainable-tokens wrapper, or a quantized
    # layer, computes something else than F.linear(h, weight, bias).
    if type(head) is not nn.Linear:
        return f"its output head is a {type(head).__name__}, not a plain frozen nn.Linear"
    if any(p.requires_grad for p in head.parameters()):
        return "its output head is trainable (the chunked loss gives no gradient to it)"
    if head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head):
        return "its output head has hooks or a replaced forward (accelerate, a user hook)"
    if type(head.weight) is not nn.Parameter and type(head.weight) is not torch.Tensor:
        # An FSDP2 shard (DTensor) or another tensor subclass: not a whole (V, H) matrix.
        return f"its output head's weight is a {type(head.weight).__name__}, not a tensor"
    config = getattr(inner, "config", None)
    for part in {id(c): c for c in (config, _text_config(config)) if c is not None}.values():
        for name, neutral in LOGIT_TRANSFORMS.items():
            value = getattr(part, name, neutral)
            if value != neutral:
                kind = getattr(part, "model_type", "this model")
                return f"{kind} post-processes its logits ({name}={value})"
    return None


def _inner(model: nn.Module) -> nn.Module:
    """The model itself, not torch.compile's or DDP's wrapper around it (FSDP2 keeps the
    model's own class)."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _text_config(config: Any) -> Any:
    """The language model's config inside a VLM's (itself for a text model)."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else None


def chunk_size(model: nn.Module, chunk_tokens: int | None) -> int:
    """Tokens per chunk for ``model``: 0 for the plain loss.

    ``None`` chooses: :data:`DEFAULT_CHUNK_TOKENS` where the chunked loss is exact, else 0.

    Raises:
        LoraError: ``chunk_tokens`` > 0 asked for a model where it would not be exact.
    """
    if chunk_tokens == 0:
        return 0
    problem = chunked_problem(model)
    if problem is None:
        return chunk_tokens or DEFAULT_CHUNK_TOKENS
    if chunk_tokens is None:
        return 0
    raise LoraError(
        f"loss_chunk_tokens {chunk_tokens}: the chunked loss would not equal the plain one, as "
        f"{problem}. Set loss_chunk_tokens to 0 (--loss-chunk-tokens 0) for the plain loss, "
        "or leave it unset to choose automatically."
    )


@contextmanager
def _head_returns_input(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within: ``head(x)`` returns ``x`` itself; yields the list of what it returned.

    An instance ``forward`` shadows the class's for this module alone and is deleted after
    (:func:`chunked_problem` made sure the head had none of its own), so the head never computes
    its (N, V) logits, and DDP, gradient checkpointing and routing around it are unchanged.
    """
    seen: list[torch.Tensor] = []

    def passthrough(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x

    head.forward = passthrough
    try:
        yield seen
    finally:
        del head.forward


def _hidden_states(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, H): what the model's output head reads, the model run without the head."""
    inner = _inner(model)
    with _head_returns_input(inner.get_output_embeddings()) as seen:
        out = model(**inputs).logits
    # The model's logits must be what its head returned (a float() cast aside): a model that
    # softcaps or scales them, with no config attribute saying so, is caught here.
    same = len(seen) == 1 and (out is seen[0] or torch.equal(out, seen[0].to(out.dtype)))
    if not same:
        raise LoraError(
            f"The chunked loss needs logits = output_head(hidden), but {type(inner).__name__} "
            "changes what its head returns (or calls it more than once). Set "
            "loss_chunk_tokens to 0 (--loss-chunk-tokens 0) for the plain loss."
        )
    return out


def token_losses(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy per position: (B, T-1), 0 where the label is -100.

    Position t predicts token t + 1, so the loss pairs positions 0..T-2 with ``labels[:, 1:]``.
    ``chunk_tokens``: 0 = the plain loss over full logits; > 0 = the chunked loss
    (:class:`ChunkedCrossEntropy`) with that many tokens a chunk; ``None`` = the chunked loss
    where it is exact (:func:`chunk_size`).
    """
    targets = labels[:, 1:]  # (B, T-1)
    chunk = chunk_size(model, chunk_tokens)
    if chunk == 0:
        logits = model(**inputs).logits[:, :-1].float()  # (B, T-1, V)
        flat = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        return flat.view(targets.shape)
    hidden = _hidden_states(model, inputs)[:, :-1]  # (B, T-1, H)
    head = _inner(model).get_output_embeddings()
    flat = chunked_cross_entropy(
        hidden.reshape(-1, hidden.size(-1)), head.weight, head.bias, targets.reshape(-1), chunk
    )
    return flat.view(targets.shape)
