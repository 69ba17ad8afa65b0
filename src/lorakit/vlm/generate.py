"""Greedy replies from a vision-language model: batches (exact match) and a streamed reply.

Prompts go through the processor as in training (:mod:`lorakit.vlm.collate`), padded on the
left so that every row's next token sits in the last column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import LoraError
from ..generate import exact_match
from .collate import process, render
from .data import IMAGE, ImageSource, VlmExample, load_image


def _inputs(
    processor: Any, conversations: Sequence[list[dict[str, str]]], images: Sequence[list[Any]]
) -> dict[str, torch.Tensor]:
    texts = [render(processor, c, prompt=True) for c in conversations]
    return process(processor, texts, list(images), side="left")


@torch.no_grad()
def generate_replies(
    model: nn.Module,
    processor: Any,
    examples: Sequence[VlmExample],
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """Greedy replies to each example's turns before its last reply, in order."""
    was_training = model.training
    model.eval()
    replies: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            prompts = [e.messages[:-1] for e in chunk]
            images = [[load_image(s) for s in e.images] for e in chunk]
            enc = _inputs(processor, prompts, images)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
            # (B, prompt + new) -> the new tokens only
            new = out[:, enc["input_ids"].shape[1] :]
            replies += processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return replies


def vlm_exact_match(
    model: nn.Module, processor: Any, examples: Sequence[VlmExample], batch_size: int = 16
) -> float:
    """Share of examples whose greedy reply equals their last (assistant) turn.

    Raises:
        LoraError: an example that does not end with the assistant's reply.
    """
    for example in examples:
        if example.messages[-1]["role"] != "assistant":
            raise LoraError(f"{example.where}: exact match needs a record ending with a reply.")
    references = [e.messages[-1]["content"] for e in examples]
    tokenizer = processor.tokenizer
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    replies = generate_replies(model, processor, examples, longest + 8, batch_size)
    hits = sum(exact_match(p, r) for p, r in zip(replies, references, strict=True))
    return hits / len(references)


def stream_vlm_reply(
    model: nn.Module,
    processor: Any,
    messages: list[dict[str, str]],
    images: list[ImageSource],
    max_new_tokens: int = 256,
) -> str:
    """Print the reply to ``messages`` (with one ``<image>`` per image) as it is generated.

    Raises:
        LoraError: the placeholders and the images differ in number.
    """
    from transformers import TextStreamer

    placeholders = sum(m["content"].count(IMAGE) for m in messages)
    if placeholders != len(images):
        raise LoraError(f"{placeholders} {IMAGE} placeholder(s) for {len(images)} image(s).")
    enc = _inputs(processor, [messages], [[load_image(s) for s in images]])
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
            streamer=streamer,
        )
    return processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
