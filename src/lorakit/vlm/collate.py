"""Image + text conversations to model inputs: the processor expands images, we mask labels.

:class:`ImageCodec` is the image road's codec (the text road's is
:class:`lorakit.data.encode.TextCodec`): training sequences, batches and generation prompts
through the model's processor.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import IGNORE_INDEX, IMAGE, Conversation, EncodedDataset, images_of
from ..data.encode import TextCodec, char_budget, refusals
from ..data.images import ImageSource, load_image
from ..data.records import BadRecord, skip_report
from ..errors import LoraError

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
class ImageDataset(EncodedDataset):
    """Encoded conversations with images: token ids and labels as the processor expands them,
    and what a batch needs to run the processor again (the rendered texts and the images).

    Batches are made by :meth:`collate`, which runs the processor, so pixels are read from
    disk per batch rather than held in memory.

    Attributes:
        texts: each sequence's conversation rendered by the chat template.
        images: each sequence's images, in order.
        processor: the model's processor.
    """

    texts: list[str] = field(default_factory=list)
    images: list[list[ImageSource]] = field(default_factory=list)
    processor: Any = None

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        return {**item, "text": self.texts[index], "images": self.images[index]}

    def collate(self, items: Sequence[Mapping[str, Any]], pad_id: int | None = None) -> dict:
        """A batch: the processor's outputs for the items, cut to ``seq_len``, and labels.

        ``pad_id`` is unused (the processor pads on the right).
        """
        images = [[load_image(s) for s in item["images"]] for item in items]
        batch = process(self.processor, [item["text"] for item in items], images)
        ids = batch["input_ids"]  # (B, T)
        if ids.shape[1] > self.seq_len:
            # Right padding: past seq_len lie only cut text and padding (images were checked).
            for key, value in batch.items():
                if isinstance(value, torch.Tensor) and value.shape == ids.shape:
                    batch[key] = value[:, : self.seq_len]
        width = batch["input_ids"].shape[1]
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        for row, item in enumerate(items):
            labels[row, : len(item["labels"])] = torch.tensor(item["labels"])
        batch["labels"] = labels
        return batch

    def summary(self) -> str:
        """One line for logs, with the images counted."""
        count = sum(len(images) for images in self.images)
        return super().summary().replace(" examples -> ", f" examples ({count} images) -> ", 1)


class ImageCodec(TextCodec):
    """A processor's side of a run: :class:`TextCodec`'s methods, images included."""

    def __init__(self, processor: Any) -> None:
        super().__init__(processor.tokenizer)
        self.processor = processor

    def encode(
        self,
        examples: Sequence[Conversation],
        seq_len: int,
        *,
        train_on_prompt: bool = False,
        sources: Sequence[str] | None = None,
        skip_bad_records: bool = False,
        **options: Any,
    ) -> ImageDataset:
        """Render, expand and label every example (see the module docstring).

        What the chat template or the tokenizer refuses in a record is a bad record (named;
        with ``skip_bad_records`` skipped and counted, as on the text road). ``options``
        (``pack``) are refused before a run reaches here (:mod:`lorakit.modality`).

        Raises:
            LoraError: a chat template that renders a conversation differently from its
                beginning or refuses it (naming the record), or no example left within
                ``seq_len``.
        """
        masked = image_token_ids(self.processor)
        budget = char_budget(self.tokenizer, seq_len)
        data = ImageDataset([], [], seq_len, len(examples), processor=self.processor)
        for number, example in enumerate(examples):
            where = sources[number] if sources is not None else f"example {number + 1}"
            example = _cut_text(example, budget)
            if example is None:  # an image past any seq_len tokens: dropped, as below
                data.dropped += 1
                continue
            try:
                with refusals(where):
                    text = render(self.processor, example)
                    ids, labels = _labels(self.processor, example, text, train_on_prompt, where)
            except BadRecord as bad:
                if not skip_bad_records:
                    raise
                data.skipped[bad.reason] = data.skipped.get(bad.reason, 0) + 1
                data.refused.append(number)
                continue
            labels = [IGNORE_INDEX if i in masked else y for i, y in zip(ids, labels, strict=True)]
            last_image = max((p for p, i in enumerate(ids) if i in masked), default=-1)
            if last_image >= seq_len or all(y == IGNORE_INDEX for y in labels[:seq_len]):
                data.dropped += 1
                continue
            data.truncated += len(ids) > seq_len
            data.input_ids.append(ids[:seq_len])
            data.labels.append(labels[:seq_len])
            data.texts.append(text)
            data.images.append(images_of(example))
        data.examples -= sum(data.skipped.values())
        if not data.input_ids and data.skipped:
            report = skip_report(data.skipped, len(examples), "the data")
            raise LoraError(f"No example could be encoded: {report}.")
        if not data.input_ids:
            source = sources[0].rsplit(", ", 1)[0] if sources else "the data"
            raise LoraError(
                f"{source}: every example was dropped at --seq-len {seq_len}: cutting them would cut "
                "through an image's tokens or leave no reply. Raise --seq-len (or use smaller "
                "images)."
            )
        return data

    def prompts(self, conversations: Sequence[Conversation]) -> dict[str, torch.Tensor]:
        """The processor's inputs for each conversation with the generation prompt, padded on
        the left; the placeholders and the images must agree in number.

        Raises:
            LoraError: a conversation whose ``<image>`` placeholders and images differ in count.
        """
        for conversation in conversations:
            placeholders = sum(m["content"].count(IMAGE) for m in conversation)
            if placeholders != len(images_of(conversation)):
                raise LoraError(
                    f"{placeholders} {IMAGE} placeholder(s) for "
                    f"{len(images_of(conversation))} image(s)."
                )
        texts = [render(self.processor, c, prompt=True) for c in conversations]
        images = [[load_image(s) for s in images_of(c)] for c in conversations]
        return process(self.processor, texts, images, side="left")


def _cut_text(example: Conversation, budget: int) -> Conversation | None:
    """``example`` with its text past ``budget`` characters left out before the processor
    sees it (no token of it can fall within ``seq_len``, :func:`char_budget`), so a huge
    record costs what ``seq_len`` tokens cost; ``None`` when an image's placeholder lies past
    the budget (its tokens cannot fit: the record is dropped whole, never cut through)."""
    used, kept = 0, []
    for message in example:
        content = message["content"]
        if used + content.rfind(IMAGE) + len(IMAGE) > budget and IMAGE in content:
            return None
        if used >= budget:
            if any(m.get("images") for m in example[len(kept) :]):
                return None
            break
        kept.append({**message, "content": content[: budget - used]})
        used += len(content)
    return kept


def _labels(
    processor: Any, example: Conversation, text: str, train_on_prompt: bool, where: str
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one example, image tokens expanded by the processor."""
    images = [load_image(s) for s in images_of(example)]
    ids = process(processor, [text], [images])["input_ids"][0].tolist()
    if train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    eos = processor.tokenizer.eos_token_id
    for i, message in enumerate(example):
        if message["role"] != "assistant":
            continue
        seen = len(images_of(example[:i]))  # a prefix is processed with its own images
        spans = []
        for prompt, turns in ((True, example[:i]), (False, example[: i + 1])):
            prefix = process(processor, [render(processor, turns, prompt)], [images[:seen]])
            spans.append(prefix["input_ids"][0].tolist())
        before, through = spans
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise LoraError(
                f"{where}: the chat template renders this conversation differently "
                "from its beginning, so the assistant's tokens cannot be told apart. Train on "
                "every token instead (--train-on-prompt)."
            )
        reply = ids[len(before) : len(through)]
        # The reply ends at its end-of-turn token: what the template adds after it is not
        # the model's to predict.
        end = len(reply) - reply[::-1].index(eos) if eos in reply else len(reply)
        labels[len(before) : len(before) + end] = reply[:end]
    return ids, labels
