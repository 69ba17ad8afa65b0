"""Image + text conversations to model inputs: the processor expands images, we mask labels.

The model's processor does everything family-specific: its chat template places each image's
marker, and calling it replaces every marker by the image's tokens (a count that depends on the
image's size for Qwen2-VL, on tiling for Idefics3) and returns whatever the model takes beside
``input_ids`` (``pixel_values``, ``image_grid_thw``, ``pixel_attention_mask``,
``mm_token_type_ids``, ...). Nothing here names a family.

Labels are the input ids on the assistant's reply tokens (each reply's end-of-turn token
included) and -100 everywhere else: prompts, image tokens, padding. A reply's tokens are found
by rendering the conversation up to the reply (with the generation prompt) and through it, and
running both through the processor with the images they hold: the full sequence must start
with each, so the reply is the span between.

Truncation to ``seq_len`` never cuts through an image: a record whose image tokens reach past
``seq_len`` is dropped (and counted); a longer record whose images all fit loses the text at
its end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import IGNORE_INDEX
from ..errors import LoraError
from .data import IMAGE, VlmExample, load_image

Parts = list[dict[str, Any]]  # a turn's content parts, as processors' chat templates take them


def to_parts(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Turns with ``<image>`` in their text as turns of content parts (text and image)."""
    turns = []
    for message in messages:
        parts: Parts = []
        for i, piece in enumerate(message["content"].split(IMAGE)):
            if i:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        turns.append({"role": message["role"], "content": parts})
    return turns


def render(processor: Any, messages: list[dict[str, str]], prompt: bool = False) -> str:
    """The processor's chat template applied to ``messages`` (``prompt``: ask for a reply)."""
    return processor.apply_chat_template(
        to_parts(messages), tokenize=False, add_generation_prompt=prompt
    )


def process(
    processor: Any, texts: list[str], images: list[list[Any]], side: str = "right"
) -> dict[str, torch.Tensor]:
    """The processor on a batch of rendered texts and their images, padded on ``side``."""
    images_arg = images if any(images) else None
    try:
        # padding_side explicitly: some processors (InternVL) default to the left.
        outputs = processor(
            text=texts, images=images_arg, padding=True, padding_side=side, return_tensors="pt"
        )
        return dict(outputs)
    except (ValueError, TypeError) as error:
        raise LoraError(f"The model's processor refused the batch: {error}") from error


def image_token_ids(processor: Any) -> set[int]:
    """Ids of the special tokens a processor uses for images (``image_token``,
    ``fake_image_token``, ``start_image_token``, ...): read from the processor itself."""
    tokenizer = processor.tokenizer
    ids = set()
    for name in dir(processor):
        if name.endswith("_token") and ("image" in name or "vision" in name):
            token = getattr(processor, name, None)
            if isinstance(token, str) and token in tokenizer.get_vocab():
                ids.add(tokenizer.convert_tokens_to_ids(token))
    return ids


@dataclass
class VlmDataset:
    """Encoded conversations: each item is a rendered text, its images and its labels.

    Items are collated by :meth:`collate`, which runs the processor on the batch, so pixels are
    read from disk per batch rather than held in memory.

    Attributes:
        examples: the kept examples.
        texts: each kept example rendered by the chat template.
        labels: each kept example's labels, at most ``seq_len`` long.
        processor: the model's processor.
        seq_len: the most tokens a sequence holds.
        truncated: examples whose text was cut at the end (images all kept).
        dropped: examples dropped: an image past ``seq_len``, or no reply token left.
        source: the data file, for :meth:`summary`.
    """

    examples: list[VlmExample]
    texts: list[str]
    labels: list[list[int]]
    processor: Any
    seq_len: int
    truncated: int = 0
    dropped: int = 0
    source: str = "the data"
    image_count: int = field(init=False)

    def __post_init__(self) -> None:
        self.image_count = sum(len(e.images) for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> int:
        return index

    @property
    def tokens(self) -> int:
        return sum(len(labels) for labels in self.labels)

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for labels in self.labels for label in labels)

    def summary(self) -> str:
        """One line for logs: examples, images, tokens, what was cut or dropped."""
        kept = len(self.examples)
        return (
            f"{kept + self.dropped} examples ({self.image_count} images) -> {kept} sequences "
            f"(<= {self.seq_len} tokens): {self.tokens:,} tokens, {self.target_tokens:,} with "
            f"loss; {self.truncated} truncated, {self.dropped} dropped (an image past "
            "--seq-len, or no reply left)"
        )

    def collate(self, items: Sequence[int], pad_id: int | None = None) -> dict[str, torch.Tensor]:
        """A batch of items (indices): the processor's outputs, cut to ``seq_len``, + labels.

        ``pad_id`` is unused (the processor pads); it keeps the signature of
        :func:`lorakit.data.collate`.
        """
        texts = [self.texts[i] for i in items]
        images = [[load_image(s) for s in self.examples[i].images] for i in items]
        batch = process(self.processor, texts, images)
        ids = batch["input_ids"]  # (B, T)
        if ids.shape[1] > self.seq_len:
            # Right padding: past seq_len lie only cut text and padding (images were checked).
            for key, value in batch.items():
                if isinstance(value, torch.Tensor) and value.shape == ids.shape:
                    batch[key] = value[:, : self.seq_len]
        width = batch["input_ids"].shape[1]
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, i in enumerate(items):
            labels[row, : len(self.labels[i])] = torch.tensor(self.labels[i])
        batch["labels"] = labels
        return batch


def encode_vlm(
    examples: list[VlmExample],
    processor: Any,
    seq_len: int,
    *,
    train_on_prompt: bool = False,
    source: str = "the data",
) -> VlmDataset:
    """Render, expand and label every example (see the module docstring).

    Raises:
        LoraError: a chat template that renders a conversation differently from its
            beginning (naming the record), or no example left within ``seq_len``.
    """
    masked = image_token_ids(processor)
    kept, texts, all_labels, truncated, dropped = [], [], [], 0, 0
    for example in examples:
        text = render(processor, example.messages)
        ids, labels = _labels(processor, example, text, train_on_prompt)
        labels = [
            IGNORE_INDEX if i in masked else label for i, label in zip(ids, labels, strict=True)
        ]
        last_image = max((p for p, i in enumerate(ids) if i in masked), default=-1)
        if last_image >= seq_len or all(label == IGNORE_INDEX for label in labels[:seq_len]):
            dropped += 1
            continue
        truncated += len(ids) > seq_len
        kept.append(example)
        texts.append(text)
        all_labels.append(labels[:seq_len])
    if not kept:
        raise LoraError(
            f"{source}: every example was dropped at --seq-len {seq_len}: cutting them would cut "
            "through an image's tokens or leave no reply. Raise --seq-len (or use smaller "
            "images)."
        )
    return VlmDataset(kept, texts, all_labels, processor, seq_len, truncated, dropped, source)


def _labels(
    processor: Any, example: VlmExample, text: str, train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, image tokens expanded by the processor."""
    images = [load_image(s) for s in example.images]
    ids = process(processor, [text], [images])["input_ids"][0].tolist()
    if train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    eos = processor.tokenizer.eos_token_id
    seen = 0  # images in the turns so far: a prefix is processed with exactly those
    for i, message in enumerate(example.messages):
        seen += message["content"].count(IMAGE)
        if message["role"] != "assistant":
            continue
        spans = []
        for prompt, turns in ((True, example.messages[:i]), (False, example.messages[: i + 1])):
            prefix = process(processor, [render(processor, turns, prompt)], [images[:seen]])
            spans.append(prefix["input_ids"][0].tolist())
        before, through = spans
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise LoraError(
                f"{example.where}: the chat template renders this conversation differently "
                "from its beginning, so the assistant's tokens cannot be told apart. Train on "
                "every token instead (--train-on-prompt)."
            )
        reply = ids[len(before) : len(through)]
        # The reply ends at its end-of-turn token: what the template adds after it is not
        # the model's to predict.
        end = len(reply) - reply[::-1].index(eos) if eos in reply else len(reply)
        labels[len(before) : len(before) + end] = reply[:end]
    return ids, labels
