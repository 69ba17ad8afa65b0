"""Records of data files: JSON or JSONL, the text formats' parsers and their checks.

The formats and their detection are :mod:`lorakit.data.files`'.
Every format but ``text`` becomes a conversation (a list of ``{"role", "content"}``
messages); alpaca's ``input``, when present, follows the instruction after a blank line.
Each record is checked as it is read (a user turn before the first reply, a reply with text,
one system turn at most, and first), so a bad one is named by file and line before any model
loads; ``skip_bad_records`` skips and counts bad records instead of stopping at the first.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraError, brief

Conversation = list[dict[str, str]]
Example = Conversation | str  # a conversation, or the text of a ``text`` record

_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


class BadRecord(LoraError):
    """One record that cannot be used; ``reason`` is how ``skip_bad_records`` counts it."""

    def __init__(self, where: str, reason: str, problem: str) -> None:
        super().__init__(
            f"{where}: {problem} Fix or remove the record (or skip bad records: "
            "--skip-bad-records)."
        )
        self.reason = reason
        self.problem = problem  # the message's own words, without the record's fix


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


def read_records(path: Path) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs, ``where`` being "FILE, line N" (JSONL) or "FILE, index N"
    (JSON); a JSONL line that is not JSON gives a :class:`BadRecord` as its record."""
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
    """One JSONL record, or a :class:`BadRecord` saying why the line is not one."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        problem = f"not valid JSON ({error.msg}); JSONL wants one object a line."
    except RecursionError:
        problem = "JSON nested too deeply to read."
    return BadRecord(where, "invalid JSON", problem)


def show(value: Any) -> str:
    """A JSON value as the user wrote it, shortened for an error message."""
    text = json.dumps(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _object(value: Any, where: str, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRecord(where, "not an object", f"{name} must be a JSON object, got {show(value)}.")
    return value


def _record(value: Any, where: str) -> dict[str, Any]:
    """A record: a JSON object with something in it."""
    if value == {}:
        raise BadRecord(where, "empty record", "the record is empty ({}).")
    return _object(value, where, "the record")


def _field(record: dict[str, Any], name: str, where: str, optional: bool = False) -> str:
    """The string at ``name`` (``key`` or ``list[i].key``) in a record; "" for a missing or
    null optional field."""
    key = name.rsplit(".", 1)[-1]
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        raise BadRecord(where, "missing field", f"field {name!r} is missing.")
    if not isinstance(value, str):
        raise BadRecord(
            where, "not a string", f"field {name!r} must be a string, got {show(value)}."
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRecord(
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
        raise BadRecord(
            where, "empty assistant text", f"field {name!r} (the assistant's reply) is empty."
        )
    return text


def parse_alpaca(record: Any, where: str) -> Conversation:
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
        raise BadRecord(
            where,
            "no turns",
            f"field {key!r} must be a non-empty list of turns, got {show(turns)}.",
        )
    messages = []
    for i, turn in enumerate(turns):
        turn = _object(turn, where, f"field '{key}[{i}]'")
        role = _field(turn, f"{key}[{i}].{role_key}", where)
        if role not in roles:
            raise BadRecord(
                where,
                "unknown role",
                f"field '{key}[{i}].{role_key}' is {brief(role)}; expected one of "
                f"{', '.join(roles)}.",
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
        raise BadRecord(
            where,
            "system-only",
            f"field {key!r} holds only system turns: add the user's turn "
            "and the assistant's reply.",
        )
    for i, role in enumerate(roles[1:], start=1):
        if role == "system":
            raise BadRecord(
                where,
                "system turn not first",
                f"field '{key}[{i}]' is a system turn after the first turn; a conversation "
                "has one system turn, first: merge it into the first.",
            )
    first = 1 if roles[0] == "system" else 0
    if roles[first] == "assistant":
        raise BadRecord(
            where,
            "assistant-first",
            f"field '{key}[{first}]' is the assistant's, before any user turn: add the user's "
            "turn it answers.",
        )
    if "assistant" not in roles:
        raise BadRecord(
            where, "no assistant turn", f"field {key!r} has no assistant turn, so nothing to learn."
        )


def parse_chat(record: Any, where: str) -> Conversation:
    return _parse_turns(record, where, "messages", "role", "content", {r: r for r in _ROLES})


def parse_sharegpt(record: Any, where: str) -> Conversation:
    return _parse_turns(record, where, "conversations", "from", "value", _SHAREGPT_ROLES)


def parse_text(record: Any, where: str) -> str:
    text = _field(_record(record, where), "text", where)
    if not text.strip():
        raise BadRecord(where, "empty text", "field 'text' is empty.")
    return text
