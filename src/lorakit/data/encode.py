"""Encoding: chat template, prompt masking, truncation, packing, and padded batches.

Loss falls on the assistant's tokens only, each reply's end-of-turn token included so the
model learns to stop (``train_on_prompt=True``: on every token). A ``text`` record is trained
on every token, with eos appended. Labels follow Hugging Face's convention: ``labels`` is
aligned with ``input_ids``, -100 marks no loss, and the model shifts by one to predict each
token from those before it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LoraError
from .records import BadRecord, Conversation, Example, skip_report

if TYPE_CHECKING:  # reading and checking data files needs no transformers
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label that carries no loss (PyTorch's cross_entropy default)


@dataclass
class EncodedDataset:
    """Token sequences ready for training, with what encoding them kept and cut.

    Items are ``{"input_ids": [...], "labels": [...]}``, so the data set plugs straight into a
    ``torch.utils.data.DataLoader`` with :func:`collate`.

    Attributes:
        input_ids: one list of token ids per sequence.
        labels: aligned with ``input_ids``; ``IGNORE_INDEX`` where there is no loss.
        seq_len: the most tokens a sequence holds.
        examples: examples encoded, dropped ones included (skipped ones not).
        truncated: examples cut to ``seq_len`` tokens (and kept).
        dropped: examples left with no token to learn from once cut.
        skipped: bad records skipped, by reason (``skip_bad_records``).
        source: the data file, for :meth:`summary`.
        records: records in ``source``, skipped ones included; 0: ``examples`` + skipped.
        refused: indices (in the examples given) of those the template or tokenizer refused.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    seq_len: int
    examples: int
    truncated: int = 0
    dropped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = "the data"
    records: int = 0
    refused: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise LoraError(
                f"{len(self.input_ids)} input sequences but {len(self.labels)} label sequences."
            )
        for i, (ids, labels) in enumerate(zip(self.input_ids, self.labels, strict=True)):
            if len(ids) != len(labels) or len(ids) > self.seq_len:
                raise LoraError(
                    f"Sequence {i}: {len(ids)} tokens and {len(labels)} labels; both must be "
                    f"equal and at most seq_len={self.seq_len}."
                )
        if min(self.examples, self.truncated, self.dropped, *self.skipped.values()) < 0:
            raise LoraError("Example counts must not be negative.")

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def collate(self, items: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict:
        """A batch of this data set's items (:func:`collate`); the training loop calls this."""
        return collate(items, pad_id)

    @property
    def tokens(self) -> int:
        """Tokens in all sequences, padding excluded."""
        return sum(len(ids) for ids in self.input_ids)

    @property
    def target_tokens(self) -> int:
        """Tokens that carry loss."""
        return sum(label != IGNORE_INDEX for labels in self.labels for label in labels)

    def summary(self) -> str:
        """One line for logs, e.g. ``500 examples -> 500 sequences (<= 256 tokens): ...``."""
        records = self.records or self.examples + sum(self.skipped.values())
        skipped = skip_report(self.skipped, records, self.source)
        return (
            f"{self.examples} examples -> {len(self)} sequences (<= {self.seq_len} tokens): "
            f"{self.tokens:,} tokens, {self.target_tokens:,} with loss; "
            f"{self.truncated} truncated, {self.dropped} dropped"
            + (f"; {skipped}" if skipped else "")
        )


def encode_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    train_on_prompt: bool = False,
    pack: bool = False,
    sources: Sequence[str] | None = None,
    skip_bad_records: bool = False,
) -> EncodedDataset:
    """Tokenise examples, mask the prompts, cut to ``seq_len`` and optionally pack.

    An example longer than ``seq_len`` loses its end (counted as truncated); one left with no
    token carrying loss is dropped (counted). A very long one is cut before it is tokenised
    (:func:`char_budget`), so a record of 100 MB costs no more memory than seq_len tokens. The first token of every example carries no
    loss: nothing comes before it to predict it from (and with packing, it would be predicted
    from the previous, unrelated example).

    Packing fills sequences of up to ``seq_len`` tokens with whole examples, in order, so
    fewer tokens are spent on padding. Attention is not blocked between the examples sharing
    a sequence, and positions run on across them: each example still starts with its chat
    template's opening tokens, and the cross-talk costs little for short fine-tuning runs.

    Args:
        examples: from :func:`read_examples`.
        tokenizer: with a chat template if any example is a conversation.
        seq_len: the most tokens a sequence may hold.
        train_on_prompt: put loss on every token of conversations, not only the assistant's.
        pack: pack several examples into each sequence.
        sources: where each example came from (:attr:`DataFile.sources`), for messages;
            default "example N".
        skip_bad_records: skip (and count) examples the chat template or the tokenizer
            refuses, instead of raising.

    Raises:
        LoraError: bad ``seq_len``, no chat template, a template that does not compile or
            renders a conversation inconsistently with its beginning, an example the template
            or tokenizer refuses (named), or every example dropped.
    """
    if seq_len < 2:
        raise LoraError(f"seq_len must be at least 2, got {seq_len}.")
    sequences = []
    truncated = dropped = 0
    skipped: Counter[str] = Counter()
    refused: list[int] = []
    budget = None
    for i, example in enumerate(examples):
        where = sources[i] if sources is not None else f"example {i + 1}"
        if _chars(example) > seq_len * _CHARS_PER_TOKEN:  # cheap; most data sets never are
            budget = budget or char_budget(tokenizer, seq_len)
            example = cut_example(example, budget)
        try:
            ids, labels = _encode(example, tokenizer, train_on_prompt, where)
        except BadRecord as bad:
            if not skip_bad_records:
                raise
            skipped[bad.reason] += 1
            refused.append(i)
            continue
        if len(ids) > seq_len:
            truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        sequences.append((ids, labels))
    if not sequences:
        if skipped:
            raise LoraError(
                f"No example could be encoded: {skip_report(skipped, len(examples), 'the data')}."
            )
        raise LoraError(
            f"All {len(examples)} examples were dropped: none has a target token within the "
            f"first {seq_len} tokens. Raise --seq-len."
        )
    if pack:
        sequences = _pack(sequences, seq_len)
    return EncodedDataset(
        input_ids=[ids for ids, _ in sequences],
        labels=[labels for _, labels in sequences],
        seq_len=seq_len,
        examples=len(examples) - sum(skipped.values()),
        truncated=truncated,
        dropped=dropped,
        skipped=dict(skipped),
        refused=refused,
    )


# Tokenising costs over 100 bytes of memory a character (a 70 MB record: 11 GB and 220 s), only
# for the result to be cut to seq_len tokens. No token stands for more characters than the
# longest entry of its vocabulary, so the text past seq_len times that length cannot reach the
# first seq_len tokens: it is cut before tokenising, with a margin of two. The cheap test
# first: no example shorter than this many characters a token is ever cut.
_CHARS_PER_TOKEN = 16


def char_budget(tokenizer: PreTrainedTokenizerBase, seq_len: int) -> int:
    """The characters of an example's text past which no token can fall in the first
    ``seq_len``: ``2 * seq_len`` times the longest vocabulary entry (at least 16)."""
    longest = max(map(len, tokenizer.get_vocab()), default=0)
    return 2 * seq_len * max(longest, _CHARS_PER_TOKEN)


def _chars(example: Example) -> int:
    if isinstance(example, str):
        return len(example)
    return sum(len(m["content"]) for m in example if isinstance(m.get("content"), str))


def cut_example(example: Example, budget: int) -> Example:
    """``example`` with its text after the first ``budget`` characters left out: a text cut,
    a conversation's turns kept while their contents fit (the last one cut to fit)."""
    if isinstance(example, str):
        return example[:budget]
    kept: Conversation = []
    for message in example:
        content = message.get("content")
        if budget <= 0:
            break
        if isinstance(content, str):
            if len(content) > budget:
                message = {**message, "content": content[:budget]}
            budget -= len(message["content"])
        kept.append(message)
    return kept


@contextmanager
def refusals(where: str) -> Iterator[None]:
    """Turn what the chat template or the tokenizer refuses while rendering one record into a
    :class:`BadRecord` naming ``where`` (so ``skip_bad_records`` can count it); a template that
    does not compile is the template's fault, not the record's: a :class:`LoraError`."""
    from jinja2 import TemplateError, TemplateSyntaxError  # comes with transformers

    try:
        yield
    except TemplateSyntaxError as error:
        raise LoraError(
            f"The chat template does not compile (template line {error.lineno}: {error}). "
            "Fix the template file given with --chat-template, or leave it out."
        ) from error
    except TemplateError as error:
        raise BadRecord(
            where, "refused by the chat template", f"the chat template refuses it: {error}."
        ) from error
    except (ValueError, TypeError) as error:
        if isinstance(error, LoraError):  # ours, about the tokenizer or template: as it is
            raise
        raise BadRecord(
            where,
            "refused by the tokenizer",
            f"the chat template or tokenizer fails on it: {error!r}.",
        ) from error


def _encode(
    example: Example, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool, where: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example, the first token without loss; what the chat
    template or the tokenizer refuses in it becomes a :class:`BadRecord` naming ``where``."""
    with refusals(where):
        if isinstance(example, str):
            ids, labels = _encode_text(example, tokenizer)
        else:
            ids, labels = _encode_conversation(example, tokenizer, train_on_prompt)
    if ids:
        labels[0] = IGNORE_INDEX
    return ids, labels


def _encode_text(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    if tokenizer.eos_token_id is None:
        raise LoraError("The tokenizer has no eos token to end text examples with.")
    # The tokenizer's own special tokens (a bos, for models that want one), then eos so the
    # model learns where a document ends.
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return ids, list(ids)


def _render(tokenizer: PreTrainedTokenizerBase, messages: Conversation, prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Conversation) -> str:
    """``messages`` rendered by the chat template, ending with the prompt for a reply.

    Raises:
        LoraError: the tokenizer has no chat template.
    """
    if tokenizer.chat_template is None:
        raise LoraError(
            "The tokenizer has no chat template; use a chat (instruct) model for generation."
        )
    return _render(tokenizer, messages, prompt=True)


def _encode_conversation(
    messages: Conversation, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels masking everything but the replies.

    The masks are found on the text, not on token counts: each assistant reply spans from the
    end of the conversation rendered up to it (with the generation prompt) to the end of the
    conversation rendered through it, cut after the reply's first eos so the template's
    trailing newline carries no loss. A token carries loss when its first character falls in
    a reply, so tokens merging across a boundary cannot shift the masks.
    """
    if tokenizer.chat_template is None:
        raise LoraError(
            "The tokenizer has no chat template, so conversations cannot be rendered. Use a "
            "chat (instruct) model, or data in the text format."
        )
    text = _render(tokenizer, messages, prompt=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if train_on_prompt:
        return ids, list(ids)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt=True)
        through = _render(tokenizer, messages[: i + 1], prompt=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise LoraError(
                "The chat template renders a conversation differently from its beginning, so "
                "the assistant's tokens cannot be told apart. Train on every token instead "
                "(train_on_prompt / --train-on-prompt)."
            )
        end = len(through)
        eos = tokenizer.eos_token
        stop = text.find(eos, len(before), end) if eos else -1
        spans.append((len(before), stop + len(eos) if stop >= 0 else end))
    labels = [
        token if any(start <= first < end for start, end in spans) else IGNORE_INDEX
        for token, (first, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def _pack(
    sequences: list[tuple[list[int], list[int]]], seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """Concatenate whole examples, in order, into sequences of at most ``seq_len`` tokens."""
    packed: list[tuple[list[int], list[int]]] = []
    for ids, labels in sequences:
        if packed and len(packed[-1][0]) + len(ids) <= seq_len:
            packed[-1][0].extend(ids)
            packed[-1][1].extend(labels)
        else:
            packed.append((list(ids), list(labels)))
    return packed


def collate(batch: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of :class:`EncodedDataset` items on the right into ``(B, T)`` tensors.

    Use as ``DataLoader(dataset, collate_fn=functools.partial(collate, pad_id=...))``.

    Returns:
        ``input_ids`` (padded with ``pad_id``), ``attention_mask`` (0 on padding) and
        ``labels`` (``IGNORE_INDEX`` on padding), all ``torch.long``.
    """
    width = max(len(item["input_ids"]) for item in batch)
    input_ids, attention_mask, labels = [], [], []
    for item in batch:
        pad = width - len(item["input_ids"])
        input_ids.append([*item["input_ids"], *[pad_id] * pad])
        attention_mask.append([1] * len(item["input_ids"]) + [0] * pad)
        labels.append([*item["labels"], *[IGNORE_INDEX] * pad])
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


class TextCodec:
    """A tokenizer's side of a run: examples to training sequences, prompts to model inputs.

    The image road's :class:`~lorakit.vlm.collate.ImageCodec` has the same methods over a
    processor, so training, evaluation and generation take either.

    Attributes:
        tokenizer: the model's tokenizer (with the chat template in use).
        processor: what saves beside a merged model: here the tokenizer itself.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.processor: Any = tokenizer

    def encode(self, examples: Sequence[Example], seq_len: int, **options: Any) -> EncodedDataset:
        """Training sequences: :func:`encode_examples` with ``options`` (``train_on_prompt``,
        ``pack``, ``sources``, ``skip_bad_records``)."""
        return encode_examples(examples, self.tokenizer, seq_len, **options)

    def prompts(self, conversations: Sequence[Conversation]) -> dict[str, torch.Tensor]:
        """Each conversation (ending before the reply) rendered with the generation prompt,
        tokenised and padded on the left, so every row's next token is in the last column:
        ``input_ids`` and ``attention_mask``, ``(B, T)``."""
        texts = [render_prompt(self.tokenizer, c) for c in conversations]
        return dict(
            self.tokenizer(
                texts,
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=False,
            )
        )
