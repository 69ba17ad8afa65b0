"""Encoding records far longer than ``--seq-len``: cut before they are tokenised, to the same
first ``seq_len`` tokens."""

from __future__ import annotations

from typing import Any

import pytest

from lorakit.data.encode import char_budget, encode_examples


class _Spy:
    """A tokenizer that records the longest text it was asked to tokenise."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.longest = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        self.longest = max(self.longest, len(text))
        return self._tokenizer(text, **kwargs)


def _words(n: int) -> str:
    return " ".join(f"word{i % 97}" for i in range(n))


def test_the_budget_covers_seq_len_tokens_of_any_vocabulary_entry(smollm2_tokenizer):
    longest = max(map(len, smollm2_tokenizer.get_vocab()))
    assert char_budget(smollm2_tokenizer, 64) == 2 * 64 * max(longest, 16)


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_a_huge_record_is_cut_before_tokenising_to_the_same_sequence(smollm2_tokenizer, kind):
    seq_len, budget = 64, char_budget(smollm2_tokenizer, 64)
    long, huge = _words(budget // 4), _words(2_000_000)  # ~20 KB past the budget; ~17 MB
    if kind == "text":
        examples = [long, huge]
    else:
        examples = [
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text}]
            for text in (long, huge)
        ]
    spy = _Spy(smollm2_tokenizer)
    cut = encode_examples(examples, spy, seq_len)
    assert spy.longest < budget + 1000  # the template's own text around the cut content
    whole = encode_examples(examples[:1], smollm2_tokenizer, seq_len)  # tokenised whole
    assert cut.input_ids[0] == cut.input_ids[1] == whole.input_ids[0]
    assert cut.labels[0] == cut.labels[1] == whole.labels[0]
    assert (cut.truncated, cut.dropped) == (2, 0)


def test_a_reply_past_the_cut_is_dropped_as_it_would_be_uncut(smollm2_tokenizer):
    seq_len = 64
    budget = char_budget(smollm2_tokenizer, seq_len)
    late_reply = [
        {"role": "user", "content": _words(budget)},  # the whole budget and more
        {"role": "assistant", "content": "far past seq_len"},
    ]
    short = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    spy = _Spy(smollm2_tokenizer)
    data = encode_examples([late_reply, short], spy, seq_len)
    assert (data.examples, data.dropped, data.truncated, len(data)) == (2, 1, 1, 1)
    assert spy.longest < budget + 1000
