"""Choosing each row's next token: greedy at temperature 0, else seeded sampling with top-p.

Every request owns a ``torch.Generator`` seeded from its ``seed`` (a fresh random seed when it
gives none), so a seeded request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor


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
) -> list[int]:
    """One token per row of ``logits`` (B, V): argmax at temperature 0, else a sample.

    Greedy rows take ``argmax`` over the raw logits, as ``model.generate(do_sample=False)``
    does, so a greedy reply equals ``lorakit generate``'s.
    """
    greedy = logits.argmax(dim=-1).tolist()  # (B, V) -> (B,)
    return [
        greedy[i] if p.temperature == 0 else sample(logits[i], p.temperature, p.top_p, g)
        for i, (p, g) in enumerate(zip(params, generators, strict=True))
    ]


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Draw one token id from softmax(logits / temperature), cut to the top-p nucleus.

    The nucleus is the shortest run of most likely tokens whose probabilities sum to at least
    ``top_p``; a token is kept when the mass of the tokens before it is below ``top_p``.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # (V,), at least the first
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
