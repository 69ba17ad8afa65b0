"""Fine-tuning data: reading files, chat templates, prompt masking, truncation, packing, batches.

A data file is JSON (a list of records) or JSONL (one record a line). Each file holds one
format, detected from its first record or forced with ``data_format``:

============  ====================================================================
``alpaca``    ``{"instruction": str, "input": str (optional), "output": str}``
``chat``      ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}]}``
``sharegpt``  ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}]}``
``text``      ``{"text": str}``
============  ====================================================================

Every format but ``text`` becomes a conversation (a list of ``{"role", "content"}`` messages)
rendered with the tokenizer's chat template; alpaca's ``input``, when present, follows the
instruction after a blank line. Loss falls on the assistant's tokens only, each reply's
end-of-turn token included so the model learns to stop (``train_on_prompt=True``: on every
token). A ``text`` record is trained on every token, with eos appended.

Each record is checked as it is read (a user turn before the first reply, a reply with text,
one system turn at most, and first), so a bad one is named by file and line before any model
loads; ``skip_bad_records`` skips and counts bad records instead of stopping at the first.

Labels follow Hugging Face's convention: ``labels`` is aligned with ``input_ids``, -100 marks
no loss, and the model shifts by one to predict each token from those before it.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from .errors import LoraError

if TYPE_CHECKING:  # reading and checking data files needs no transformers
    from transformers import PreTrainedTokenizerBase

Conversation = list[dict[str, str]]
Example = Conversation | str  # a conversation, or the text of a ``text`` record
T = TypeVar("T")
IGNORE_INDEX = -100  # the label that carries no loss (PyTorch's cross_entropy default)
FORMATS = ("alpaca", "chat", "sharegpt", "text")
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# The key that gives each format away in a file's first record, checked in this order.
_FORMAT_KEYS = {
    "messages": "chat",
    "conversations": "sharegpt",
    "instruction": "alpaca",
    "text": "text",
}


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


class _BadRecord(LoraError):
    """One record that cannot be used; ``reason`` is how ``skip_bad_records`` counts it."""

    def __init__(self, where: str, reason: str, problem: str) -> None:
        super().__init__(
            f"{where}: {problem} Fix or remove the record (or skip bad records: "
            "--skip-bad-records)."
        )
        self.reason = reason


@dataclass
class DataFile:
    """A data file read by :func:`read_data`.

    Attributes:
        path: the file.
        examples: one per usable record, in file order.
        sources: where each example came from (``"data.jsonl, line 3"``), for messages.
        records: records in the file, skipped ones included.
        skipped: bad records skipped, by reason (``{"empty assistant text": 2}``).
    """

    path: Path
    examples: list[Example]
    sources: list[str]
    records: int
    skipped: Counter[str]

    def skip_report(self) -> str:
        """``"skipped 3 bad records of 120 in data.jsonl: 2 ..., 1 ..."``, or ``""``."""
        return skip_report(self.skipped, self.records, str(self.path))


def skip_report(skipped: Mapping[str, int], records: int, source: str) -> str:
    """How many records were skipped and why, or ``""`` when none was."""
    total = sum(skipped.values())
    if not total:
        return ""
    reasons = ", ".join(f"{count} {reason}" for reason, count in Counter(skipped).most_common())
    return f"skipped {total} bad records of {records} in {source}: {reasons}"


def read_examples(path: str | Path, data_format: str | None = None) -> list[Example]:
    """The examples of a data file (see :func:`read_data`); any bad record raises."""
    return read_data(path, data_format).examples


def read_data(
    path: str | Path, data_format: str | None = None, *, skip_bad_records: bool = False
) -> DataFile:
    """Read a JSON or JSONL data file into conversations (or texts, for the ``text`` format).

    Every record is checked here, so a bad one is named by file and line before it can reach
    a chat template: a conversation needs a user turn before the first reply, a non-empty
    reply, at most one system turn (the first), and strings of valid Unicode.

    Args:
        path: the file; JSON when its first character is ``[``, JSONL otherwise.
        data_format: one of :data:`FORMATS`; ``None`` detects it from the first record (with
            ``skip_bad_records``, from the first record that gives it away).
        skip_bad_records: skip bad records (counted in ``skipped``) instead of raising.

    Raises:
        LoraError: unreadable or empty file, unknown format, a bad record (the message names
            the file, the line or list index, the field and the fix), or no usable record.
    """
    path = Path(path)
    if data_format is not None and data_format not in FORMATS:
        raise LoraError(f"Unknown data format {data_format!r}; choose one of {', '.join(FORMATS)}.")
    records = _read_records(path)
    if not records:
        raise LoraError(
            f"{path} holds no examples: write one JSON object a line (JSONL) or a JSON list."
        )
    parse = _PARSERS[data_format or _detect_format(records, skip_bad_records)]
    data = DataFile(path, [], [], len(records), Counter())
    for where, record in records:
        try:
            if isinstance(record, _BadRecord):
                raise record
            data.examples.append(parse(record, where))
            data.sources.append(where)
        except _BadRecord as bad:
            if not skip_bad_records:
                raise
            data.skipped[bad.reason] += 1
    if not data.examples:
        raise LoraError(f"{path}: no usable record ({data.skip_report()}). Fix the records.")
    return data


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs, ``where`` being "FILE, line N" (JSONL) or "FILE, index N"
    (JSON); a JSONL line that is not JSON gives a :class:`_BadRecord` as its record."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise LoraError(
            f"Cannot read data file {path}: {error.strerror or error}. Pass a readable "
            "JSON/JSONL file."
        ) from error
    try:
        # utf-8-sig: a byte-order mark, as some editors write, is not part of the JSON.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise LoraError(
            f"{path}, line {line}: not UTF-8 text (byte {error.start + 1} of the file: "
            f"{error.reason}). Save the file as UTF-8."
        ) from error
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise LoraError(
                f"{path}, line {error.lineno}: not valid JSON ({error.msg})."
            ) from error
        except RecursionError as error:
            raise LoraError(f"{path}: JSON nested too deeply to read.") from error
        return [(f"{path}, index {i}", record) for i, record in enumerate(records)]
    pairs: list[tuple[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            where = f"{path}, line {number}"
            pairs.append((where, _json_line(line, where)))
    return pairs


def _json_line(line: str, where: str) -> Any:
    """One JSONL record, or a :class:`_BadRecord` saying why the line is not one."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        problem = f"not valid JSON ({error.msg}); JSONL wants one object a line."
    except RecursionError:
        problem = "JSON nested too deeply to read."
    return _BadRecord(where, "invalid JSON", problem)


def _detect_format(records: list[tuple[str, Any]], skip_bad_records: bool) -> str:
    """The format the first record gives away (any record, when bad ones are skipped)."""
    for _, record in records if skip_bad_records else records[:1]:
        if isinstance(record, dict):
            for key, fmt in _FORMAT_KEYS.items():
                if key in record:
                    return fmt
    where, first = records[0]
    if isinstance(first, _BadRecord):
        raise first
    keys = ", ".join(map(repr, first)) if isinstance(first, dict) else _show(first)
    raise LoraError(
        f"{where}: cannot tell the data format from the first record ({keys}). Expected keys: "
        "alpaca (instruction, input, output), chat (messages), sharegpt (conversations) or "
        "text (text). Rename the fields, or pass the format explicitly."
    )


def _show(value: Any) -> str:
    """A JSON value as the user wrote it, shortened for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _object(value: Any, where: str, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _BadRecord(
            where, "not an object", f"{name} must be a JSON object, got {_show(value)}."
        )
    return value


def _record(value: Any, where: str) -> dict[str, Any]:
    """A record: a JSON object with something in it."""
    if value == {}:
        raise _BadRecord(where, "empty record", "the record is empty ({}).")
    return _object(value, where, "the record")


def _field(record: dict[str, Any], name: str, where: str, optional: bool = False) -> str:
    """The string at ``name`` (``key`` or ``list[i].key``) in a record; "" for a missing or
    null optional field."""
    key = name.rsplit(".", 1)[-1]
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        raise _BadRecord(where, "missing field", f"field {name!r} is missing.")
    if not isinstance(value, str):
        raise _BadRecord(
            where, "not a string", f"field {name!r} must be a string, got {_show(value)}."
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise _BadRecord(
            where,
            "invalid Unicode",
            f"field {name!r} holds {value[error.start]!r} at character {error.start}, half of a "
            "surrogate pair: not text a tokenizer can read.",
        ) from None
    return value


def _reply(record: dict[str, Any], name: str, where: str) -> str:
    """The assistant's text at ``name``: a reply with no text teaches nothing."""
    text = _field(record, name, where)
    if not text.strip():
        raise _BadRecord(
            where, "empty assistant text", f"field {name!r} (the assistant's reply) is empty."
        )
    return text


def _parse_alpaca(record: Any, where: str) -> Conversation:
    record = _record(record, where)
    instruction = _field(record, "instruction", where)
    extra = _field(record, "input", where, optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _reply(record, "output", where)},
    ]


def _parse_turns(
    record: Any, where: str, key: str, role_key: str, text_key: str, roles: Mapping[str, str]
) -> Conversation:
    """Shared by chat and sharegpt: a non-empty list of turns, checked by :func:`_check_order`."""
    turns = _record(record, where).get(key)
    if not isinstance(turns, list) or not turns:
        raise _BadRecord(
            where,
            "no turns",
            f"field {key!r} must be a non-empty list of turns, got {_show(turns)}.",
        )
    messages = []
    for i, turn in enumerate(turns):
        turn = _object(turn, where, f"field '{key}[{i}]'")
        role = _field(turn, f"{key}[{i}].{role_key}", where)
        if role not in roles:
            raise _BadRecord(
                where,
                "unknown role",
                f"field '{key}[{i}].{role_key}' is {role!r}; expected one of {', '.join(roles)}.",
            )
        name = f"{key}[{i}].{text_key}"
        if roles[role] == "assistant":
            content = _reply(turn, name, where)
        else:
            content = _field(turn, name, where)
        messages.append({"role": roles[role], "content": content})
    _check_order([m["role"] for m in messages], where, key)
    return messages


def _check_order(roles: list[str], where: str, key: str) -> None:
    """A system turn only first, then a user turn before the first reply, and a reply."""
    if all(role == "system" for role in roles):
        raise _BadRecord(
            where,
            "system-only",
            f"field {key!r} holds only system turns: add the user's turn "
            "and the assistant's reply.",
        )
    for i, role in enumerate(roles[1:], start=1):
        if role == "system":
            raise _BadRecord(
                where,
                "system turn not first",
                f"field '{key}[{i}]' is a system turn after the first turn; a conversation "
                "has one system turn, first: merge it into the first.",
            )
    first = 1 if roles[0] == "system" else 0
    if roles[first] == "assistant":
        raise _BadRecord(
            where,
            "assistant-first",
            f"field '{key}[{first}]' is the assistant's, before any user turn: add the user's "
            "turn it answers.",
        )
    if "assistant" not in roles:
        raise _BadRecord(
            where, "no assistant turn", f"field {key!r} has no assistant turn, so nothing to learn."
        )


def _parse_chat(record: Any, where: str) -> Conversation:
    return _parse_turns(record, where, "messages", "role", "content", {r: r for r in _ROLES})


def _parse_sharegpt(record: Any, where: str) -> Conversation:
    return _parse_turns(record, where, "conversations", "from", "value", _SHAREGPT_ROLES)


def _parse_text(record: Any, where: str) -> str:
    text = _field(_record(record, where), "text", where)
    if not text.strip():
        raise _BadRecord(where, "empty text", "field 'text' is empty.")
    return text


_PARSERS = {
    "alpaca": _parse_alpaca,
    "chat": _parse_chat,
    "sharegpt": _parse_sharegpt,
    "text": _parse_text,
}


def read_chat_template(path: str | Path, flag: str = "--chat-template") -> str:
    """The Jinja chat template in file ``path``, checked to compile (before any model loads).

    Raises:
        LoraError: a missing, unreadable or non-UTF-8 file, or a template that does not
            compile (see :func:`check_chat_template`), naming ``flag`` and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{flag} {path}: file not found; pass a Jinja file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LoraError(
            f"{flag} {path}: not UTF-8 text (byte {error.start + 1}: {error.reason}). Save the "
            "template as UTF-8."
        ) from error
    except OSError as error:
        raise LoraError(f"{flag} {path}: cannot read it ({error.strerror}).") from error
    check_chat_template(text, f"{flag} {path}")
    return text


def check_chat_template(template: str, source: str) -> None:
    """Refuse a chat template that does not compile, naming ``source`` and the template line.

    Compiled as transformers compiles it (its Jinja environment and extensions), so what
    passes here renders later.
    """
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as error:
        raise LoraError(
            f"{source}: the chat template does not compile (template line {error.lineno}: "
            f"{error.message}). Fix the template."
        ) from error


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
    token carrying loss is dropped (counted). The first token of every example carries no
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
    for i, example in enumerate(examples):
        where = sources[i] if sources is not None else f"example {i + 1}"
        try:
            ids, labels = _encode(example, tokenizer, train_on_prompt, where)
        except _BadRecord as bad:
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


def _encode(
    example: Example, tokenizer: PreTrainedTokenizerBase, train_on_prompt: bool, where: str
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example, the first token without loss; what the chat
    template or the tokenizer refuses in it becomes a :class:`_BadRecord` naming ``where``."""
    from jinja2 import TemplateError, TemplateSyntaxError  # comes with transformers

    try:
        if isinstance(example, str):
            ids, labels = _encode_text(example, tokenizer)
        else:
            ids, labels = _encode_conversation(example, tokenizer, train_on_prompt)
    except TemplateSyntaxError as error:  # the template itself, not this example
        raise LoraError(
            f"The chat template does not compile (template line {error.lineno}: {error}). "
            "Fix the template file given with --chat-template, or leave it out."
        ) from error
    except TemplateError as error:
        raise _BadRecord(
            where, "refused by the chat template", f"the chat template refuses it: {error}."
        ) from error
    except (ValueError, TypeError) as error:
        if isinstance(error, LoraError):  # ours, about the tokenizer or template: as it is
            raise
        raise _BadRecord(
            where,
            "refused by the tokenizer",
            f"the chat template or tokenizer fails on it: {error!r}.",
        ) from error
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


def with_system(example: Example, system: str | None) -> Example:
    """``example`` with ``system`` as its first message, unless it has a system message already
    (or is a ``text`` record, or ``system`` is empty)."""
    if not system or isinstance(example, str) or any(m["role"] == "system" for m in example):
        return example
    return [{"role": "system", "content": system}, *example]


def common_system(examples: Sequence[Example]) -> str | None:
    """The system prompt every conversation starts with, or ``None`` if they do not share one."""
    firsts = {
        example[0]["content"] if example and example[0]["role"] == "system" else None
        for example in examples
        if not isinstance(example, str)
    }
    return firsts.pop() if len(firsts) == 1 else None


def split_examples(
    examples: Sequence[T], val_fraction: float, seed: int = 0
) -> tuple[list[T], list[T]]:
    """Hold out a random ``val_fraction`` of the examples (at least one), the same every run.

    Returns:
        ``(train, val)``, each in the original order.

    Raises:
        LoraError: ``val_fraction`` outside (0, 1), or a split leaving no training example.
    """
    if not 0 < val_fraction < 1:
        raise LoraError(f"val_fraction must be between 0 and 1, got {val_fraction}.")
    n_val = max(1, round(len(examples) * val_fraction))
    if n_val >= len(examples):
        raise LoraError(
            f"val_fraction={val_fraction} of {len(examples)} examples leaves none to train on; "
            "lower it or add examples."
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    train = [example for i, example in enumerate(examples) if i not in held_out]
    val = [example for i, example in enumerate(examples) if i in held_out]
    return train, val


def load_datasets(
    train_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    val_path: str | Path | None = None,
    val_fraction: float = 0.0,
    data_format: str | None = None,
    train_on_prompt: bool = False,
    pack: bool = False,
    seed: int = 0,
    system: str | None = None,
    skip_bad_records: bool = False,
) -> tuple[EncodedDataset, EncodedDataset | None]:
    """Read, split and encode the training data and the validation data, if any.

    Validation comes from ``val_path`` or, with ``val_fraction``, from the training file
    (see :func:`split_examples`). It is never packed, so its loss does not depend on
    ``pack``. ``data_format`` applies to both files; without it each file is detected alone.
    ``system`` goes first in every conversation that has no system message (:func:`with_system`).
    With ``skip_bad_records``, bad records are skipped and counted in each data set's
    ``skipped`` (those of the training file, read before the split, in the training set's).

    Returns:
        ``(train, val)``; ``val`` is ``None`` without ``val_path`` or ``val_fraction``.

    Raises:
        LoraError: both ``val_path`` and ``val_fraction`` given, or as in
            :func:`read_examples`, :func:`split_examples` and :func:`encode_examples`.
    """
    if val_path is not None and val_fraction:
        raise LoraError("Give a validation file or a validation fraction, not both.")
    train_file = read_data(train_path, data_format, skip_bad_records=skip_bad_records)
    train = _with_sources(train_file, system)
    val, val_file = None, train_file
    if val_path is not None:
        val_file = read_data(val_path, data_format, skip_bad_records=skip_bad_records)
        val = _with_sources(val_file, system)
    if val_fraction:
        train, val = split_examples(train, val_fraction, seed)

    def encode(pairs: list[tuple[Example, str]], data: DataFile, pack: bool) -> EncodedDataset:
        encoded = encode_examples(
            [e for e, _ in pairs],
            tokenizer,
            seq_len,
            train_on_prompt=train_on_prompt,
            pack=pack,
            sources=[s for _, s in pairs],
            skip_bad_records=skip_bad_records,
        )
        if data is not train_file or pairs is train:
            # The records skipped while reading count once: with the file's first data set.
            encoded.skipped = dict(Counter(encoded.skipped) + data.skipped)
            encoded.records = data.records
        encoded.source = str(data.path)
        return encoded

    encoded = encode(train, train_file, pack)
    return encoded, None if val is None else encode(val, val_file, False)


def _with_sources(data: DataFile, system: str | None) -> list[tuple[Example, str]]:
    """``(example, where it came from)`` pairs, ``system`` added (:func:`with_system`)."""
    return [(with_system(e, system), s) for e, s in zip(data.examples, data.sources, strict=True)]


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
