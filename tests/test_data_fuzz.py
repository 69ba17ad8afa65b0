"""Fuzzing lorakit.data with hypothesis: any data file gives examples or a LoraError.

Generated records mix the shapes of the four formats with wrong types, unknown roles, empty
and whitespace strings, unpaired surrogates, deep nesting and lines that are not JSON; each
file is read (format detected or forced, bad records skipped or not) and what was read is
encoded with SmolLM2's tokenizer and chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.data import FORMATS, encode_examples, read_data
from lorakit.errors import LoraError

KEYS = ["messages", "conversations", "instruction", "input", "output", "text"]
TURN_KEYS = ["role", "content", "from", "value"]
ROLES = ["system", "user", "assistant", "human", "gpt", "bot", ""]
SHAREGPT_ROLES = {"user": "human", "assistant": "gpt"}

# Strings users write, and now and then odd ones: empty, blank, unpaired surrogates, control
# characters, emoji, a special token.
odd = st.sampled_from(["", " ", "\n", "\ud800", "a\udfffb", "\x00", "\U0001f600", "<|im_end|>"])
plain = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=12)
strings = st.one_of(plain, plain, plain, odd)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    strings,
)
# Any JSON value, nested a few levels.
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS + TURN_KEYS) | strings, inner, max_size=3)
    ),
    max_leaves=8,
)
# Turns and records right in shape but for their strings, and ones wrong anywhere.
roles = st.sampled_from(["user", "assistant"]) | st.sampled_from(ROLES) | values
turns = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": strings}),
    st.fixed_dictionaries({"from": roles, "value": strings | values}),
    values,
)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, str]]:
    """System (maybe), then user and assistant turns in turn: the shape the template wants."""
    messages = [{"role": "system", "content": draw(strings)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [{"role": role, "content": draw(strings)} for role in ("user", "assistant")]
    return messages


# One strategy per format, right in shape but for its strings.
shaped = [
    st.builds(lambda messages: {"messages": messages}, conversations()),
    st.builds(
        lambda messages: {
            "conversations": [
                {"from": SHAREGPT_ROLES.get(m["role"], m["role"]), "value": m["content"]}
                for m in messages
            ]
        },
        conversations(),
    ),
    st.fixed_dictionaries(
        {"instruction": strings, "output": strings}, optional={"input": strings | st.none()}
    ),
    st.fixed_dictionaries({"text": strings}),
]
# Records wrong anywhere.
records = st.one_of(
    st.builds(lambda turns: {"messages": turns}, st.lists(turns, max_size=5)),
    st.dictionaries(st.sampled_from(KEYS), strings | values, max_size=4),
    values,
)


@st.composite
def data_files(draw: st.DrawFn) -> str:
    """The text of a JSONL or JSON data file: records of one format, with bad ones among them."""
    kind = draw(st.sampled_from(shaped))
    rows = draw(st.lists(kind | kind | records, min_size=1, max_size=6))
    if draw(st.booleans()):
        return json.dumps(rows)
    lines = [json.dumps(row) for row in rows]
    extras = st.sampled_from(["", "{", "not json", "[" * 3000 + "]" * 3000, '{"text": NaN}'])
    for _ in range(draw(st.integers(0, 2))):
        lines.insert(draw(st.integers(0, len(lines))), draw(extras))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    text=data_files(),
    data_format=st.sampled_from([None, None, None, *FORMATS]),  # mostly detected
    skip=st.booleans(),
    train_on_prompt=st.booleans(),
)
def test_any_data_file_gives_examples_or_a_lora_error(
    folder, smollm2_tokenizer, text, data_format, skip, train_on_prompt
):
    path = folder / "data.jsonl"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        data = read_data(path, data_format, skip_bad_records=skip)
    except LoraError:
        return
    assert len(data.examples) == len(data.sources) == data.records - sum(data.skipped.values())
    try:
        encoded = encode_examples(
            data.examples,
            smollm2_tokenizer,
            64,
            train_on_prompt=train_on_prompt,
            sources=data.sources,
            skip_bad_records=skip,
        )
    except LoraError:
        return
    assert encoded.examples + sum(encoded.skipped.values()) == len(data.examples)
