"""Generation with a chat template: batched greedy answers, exact match, streaming chat."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .data import Conversation, Example
from .demo import exact_match
from .errors import LoraError


def _prompt(tokenizer: Any, messages: Conversation) -> str:
    if tokenizer.chat_template is None:
        raise LoraError(
            "The tokenizer has no chat template; use a chat (instruct) model for generation."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    tokenizer: Any,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 128,
    batch_size: int = 16,
) -> list[str]:
    """Greedy replies to each conversation (ending with a user turn), in order.

    Prompts are padded on the left so every sequence's next token sits in the last column.
    """
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    replies: list[str] = []
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [_prompt(tokenizer, c) for c in conversations[start : start + batch_size]]
            enc = tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            # (B, prompt + new) -> the new tokens only
            new = out[:, enc["input_ids"].shape[1] :]
            replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return replies


def split_references(examples: Sequence[Example]) -> tuple[list[Conversation], list[str]]:
    """Prompts (every turn before the last assistant reply) and the replies to match.

    Raises:
        LoraError: for ``text`` examples, which have no reply to compare with.
    """
    prompts, references = [], []
    for example in examples:
        if isinstance(example, str) or example[-1]["role"] != "assistant":
            raise LoraError(
                "Exact match needs chat, sharegpt or alpaca records ending with the assistant's "
                "reply; text records have no reference answer."
            )
        prompts.append(example[:-1])
        references.append(example[-1]["content"])
    return prompts, references


def exact_match_score(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], batch_size: int = 25
) -> float:
    """Share of examples whose greedy reply equals the reference (see ``demo.exact_match``).

    ``max_new_tokens`` is just above the longest reference, so the score costs little more
    than the answers themselves.
    """
    prompts, references = split_references(examples)
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    replies = generate_batch(model, tokenizer, prompts, longest + 8, batch_size)
    hits = sum(exact_match(p, r) for p, r in zip(replies, references, strict=True))
    return hits / len(references)


def stream_reply(
    model: nn.Module, tokenizer: Any, messages: Conversation, max_new_tokens: int = 256
) -> str:
    """Print the reply to ``messages`` token by token as it is generated; return it."""
    from transformers import TextStreamer

    enc = tokenizer(_prompt(tokenizer, messages), return_tensors="pt", add_special_tokens=False).to(
        model.device
    )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def print_table(before: dict[str, float], after: dict[str, float], eval_losses: dict) -> None:
    """Print the before/after table of a training run (the CLI's user output)."""
    rows = []
    if "exact_match" in before or "exact_match" in after:
        rows.append(
            (
                "exact match (test)",
                f"{before['exact_match']:.0%}" if "exact_match" in before else "-",
                f"{after['exact_match']:.0%}" if "exact_match" in after else "-",
            )
        )
    if eval_losses:
        first, last = min(eval_losses), max(eval_losses)
        rows.append(
            (
                "val loss",
                f"{eval_losses[first]:.4f}" if first == 0 else "-",
                f"{eval_losses[last]:.4f}",
            )
        )
    print(f"\n{'':<20}{'before':>10}{'after':>10}")
    for name, b, a in rows:
        print(f"{name:<20}{b:>10}{a:>10}")
    print()
