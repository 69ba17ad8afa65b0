"""Choosing each row's next token: greedy at temperature 0, else seeded sampling with top-p.

Every request owns a ``torch.Generator`` seeded from its ``seed`` (a fresh random seed when it
gives none), so a seeded request draws the same tokens whatever else shares its batch.

A row whose logits are broken (a NaN or +inf: an adapter that overflows, a broken model)
gets no token (``None``) rather than a NaN's argmax or an exception that would stop the whole
batch: the engine fails that request alone. The row's maximum tells, so the check costs no
pass of its own: ``max`` propagates NaN, and is +inf for a +inf and -inf when every logit is
-inf (a few -inf logits, masked tokens, are fine).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens and when it stops (OpenAI's names and meanings).

    Attributes:
        max_tokens: most tokens to generate.
        temperature: 0 picks the most likely token (greedy); higher flattens the distribution.
        top_p: sample only from the most likely tokens whose probabilities sum to ``top_p``.
        seed: seed of the request's own random generator; ``None``: a random one.
        stop: texts that end the reply where they first appear (not included in it).
        ignore_eos: keep going past end-of-sequence tokens (vLLM's extension; benchmarks).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with a random seed when it is ``None``."""
    return torch.Generator().manual_seed(random.getrandbits(63) if seed is None else seed)


def next_tokens(
    logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]
) -> list[int | None]:
    """One token per row of ``logits`` (B, V): argmax at temperature 0, else a sample;
    ``None`` for a row whose logits are broken (NaN, +inf, or all -inf).

    Greedy rows take the first maximum of the raw logits, as ``model.generate(do_sample=False)``
    does, so a greedy reply equals ``lorakit generate``'s.
    """
    tops, greedy = logits.max(dim=-1)  # (B, V) -> (B,), (B,): the top logit and its token
    tops, greedy = tops.tolist(), greedy.tolist()
    tokens: list[int | None] = []
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not math.isfinite(tops[i]):
            tokens.append(None)
        elif p.temperature == 0:
            tokens.append(greedy[i])
        else:
            tokens.append(sample(logits[i], p.temperature, p.top_p, g, tops[i]))
    return tokens


def sample(
    logits: Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
    top: float | None = None,
) -> int | None:
    """Draw one token id from softmax(logits / temperature), cut to the top-p nucleus;
    ``None`` when the top logit (``top``, if known) overflows float32 once scaled.

    The nucleus is the shortest run of most likely tokens whose probabilities sum to at least
    ``top_p``; a token is kept when the mass of the tokens before it is below ``top_p``.
    """
    top = float(logits.max()) if top is None else top
    if not abs(top) / temperature < FLOAT32_MAX:  # NaN too; softmax subtracts the top logit
        return None
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # (V,)
        keep[0] = True  # the most likely token, even for a top_p that is 0 in float32
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
