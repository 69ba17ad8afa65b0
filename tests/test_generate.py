"""Exact-match references: the prompt is every turn before the last reply, and records that
have no reply to compare with are refused by number."""

import pytest

from lorakit import LoraError
from lorakit.generate import split_references


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def test_the_last_assistant_turn_is_the_reference():
    record = [_turn("system", "s"), _turn("user", "q"), _turn("assistant", "a")]
    prompts, references = split_references([record])
    assert prompts == [record[:2]] and references == ["a"]


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        (["plain text"], "text records have no reference answer"),
        (
            [[_turn("user", "q"), _turn("assistant", "a")], [_turn("user", "q")]],
            "record 2 ends with a user turn. Add the expected reply to it, or remove it.",
        ),
    ],
)
def test_records_without_a_reply_are_refused(examples, message):
    with pytest.raises(LoraError, match=message):
        split_references(examples)
