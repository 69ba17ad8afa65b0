"""Tests for lorakit.data (reading, masking, truncation, packing, batching) and lorakit.data.demo."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lorakit.data import (
    IGNORE_INDEX,
    EncodedDataset,
    collate,
    encode_examples,
    load_datasets,
    read_data,
    read_examples,
    split_examples,
)
from lorakit.data.demo import DEMO_SPLITS, demo_path
from lorakit.data.encode import TextCodec
from lorakit.errors import LoraError
from lorakit.generate import exact_match

X = IGNORE_INDEX
REPO = Path(__file__).resolve().parent.parent

# SmolLM2's rendering of [system "S", user "Hi", assistant "Yo"], token by token:
# <|im_start|> system \n S <|im_end|> \n <|im_start|> user \n Hi <|im_end|> \n
# <|im_start|> ass istant \n | Y o <|im_end|> | \n
TINY_CHAT = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
]
TINY_PROMPT_IDS = [1, 9690, 198, 67, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]
TINY_REPLY_IDS = [73, 95, 2]  # "Y", "o", "<|im_end|>"
NEWLINE = 198


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


# --- reading ------------------------------------------------------------------------------------


def test_reads_each_format_into_conversations(tmp_path):
    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Add", "input": "1 2", "output": "3"},
            {"instruction": "Greet", "output": "Hi"},
            {"instruction": "Greet", "input": None, "output": "Hi"},
        ],
    )
    assert read_examples(alpaca) == [
        [{"role": "user", "content": "Add\n\n1 2"}, {"role": "assistant", "content": "3"}],
        [{"role": "user", "content": "Greet"}, {"role": "assistant", "content": "Hi"}],
        [{"role": "user", "content": "Greet"}, {"role": "assistant", "content": "Hi"}],
    ]
    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Q"},
                    {"from": "gpt", "value": "A"},
                ]
            }
        ],
    )
    assert read_examples(sharegpt) == [
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
        ]
    ]
    chat = tmp_path / "chat.json"  # a JSON list, not JSONL
    chat.write_text(json.dumps([{"messages": TINY_CHAT}], indent=2))
    assert read_examples(chat) == [TINY_CHAT]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "one"}, {"text": "two"}])
    assert read_examples(text) == ["one", "two"]


def test_format_override_beats_detection(tmp_path):
    # Detection would say alpaca (an "instruction" key); forced to text, only "text" counts.
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "x", "text": "body"}])
    assert read_examples(path, data_format="text") == ["body"]


def test_unknown_format_lists_the_choices(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(LoraError, match="choose one of alpaca, chat, sharegpt, text"):
        read_examples(path, data_format="csv")


def test_undetectable_format_names_the_keys_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(LoraError) as error:
        read_examples(path)
    message = str(error.value)
    assert f"{path}, line 1" in message
    assert "'prompt', 'completion'" in message
    assert "pass the format explicitly" in message


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_data_set_is_refused(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(LoraError, match="holds no examples"):
        read_examples(path)


def test_malformed_jsonl_record_names_file_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"messages": TINY_CHAT})
    bad = json.dumps({"messages": [TINY_CHAT[0], {"role": "bot", "content": "x"}]})
    path.write_text(f"{good}\n\n{good}\n{bad}\n")  # the blank line 2 still counts
    with pytest.raises(LoraError) as error:
        read_examples(path)
    assert str(error.value) == (
        f"{path}, line 4: field 'messages[1].role' is 'bot'; expected one of "
        "system, user, assistant. Fix or remove the record (or skip bad records: "
        "--skip-bad-records)."
    )


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"instruction": "x"}, "index 1: field 'output' is missing"),
        (
            {"instruction": "x", "output": None},
            "index 1: field 'output' must be a string, got null",
        ),
        (
            {"instruction": "x", "input": [], "output": "y"},
            "field 'input' must be a string, got \\[\\]",
        ),
        ("just a string", 'index 1: the record must be a JSON object, got "just a string"'),
    ],
)
def test_malformed_json_record_names_index_and_field(tmp_path, record, fragment):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "x", "output": "y"}, record]))
    with pytest.raises(LoraError, match=fragment):
        read_examples(path)


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "x"}]}, "'messages' has no assistant turn"),
        ({"messages": [{"role": "user"}]}, r"line 1: field 'messages\[0\].content' is missing"),
        ({"messages": ["hi"]}, r"field 'messages\[0\]' must be a JSON object, got \"hi\""),
        (
            {"conversations": [{"from": "gpt", "value": 1}]},
            r"'conversations\[0\].value' must .* got 1\.",
        ),
        ({"conversations": [{"from": "user", "value": "x"}]}, "expected one of system, human, gpt"),
    ],
)
def test_malformed_turns_are_named(tmp_path, record, fragment):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    with pytest.raises(LoraError, match=fragment):
        read_examples(path)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(LoraError, match=r"d\.jsonl, line 2: not valid JSON"):
        read_examples(path)


# --- bad records: named by file and line, or skipped and counted -----------------------------------

HI = {"role": "user", "content": "Hi"}
YO = {"role": "assistant", "content": "Yo"}
SYSTEM = {"role": "system", "content": "S"}
GOOD = {  # one good record of each format, by the key that gives the format away
    "messages": {"messages": [HI, YO]},
    "conversations": {
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
    },
    "instruction": {"instruction": "Add", "output": "3"},
    "text": {"text": "fine"},
}
SKIP_HINT = "Fix or remove the record (or skip bad records: --skip-bad-records)."


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        (
            {"messages": [HI, {"role": "assistant", "content": " \n"}]},
            "field 'messages[1].content' (the assistant's reply) is empty.",
        ),
        (
            {"instruction": "Add", "output": ""},
            "field 'output' (the assistant's reply) is empty.",
        ),
        (
            {"messages": [YO, HI, YO]},
            "field 'messages[0]' is the assistant's, before any user turn: add the user's turn "
            "it answers.",
        ),
        (
            {"messages": [SYSTEM, YO]},
            "field 'messages[1]' is the assistant's, before any user turn: add the user's turn "
            "it answers.",
        ),
        (
            {"messages": [SYSTEM]},
            "field 'messages' holds only system turns: add the user's turn and the assistant's "
            "reply.",
        ),
        (
            {"messages": [SYSTEM, HI, SYSTEM, YO]},
            "field 'messages[2]' is a system turn after the first turn; a conversation has one "
            "system turn, first: merge it into the first.",
        ),
        (
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]},
            "field 'conversations[1].value' (the assistant's reply) is empty.",
        ),
        ({}, "the record is empty ({})."),
        ({"text": "  "}, "field 'text' is empty."),
        (
            {"messages": [{"role": "user", "content": "\ud800"}, YO]},
            "field 'messages[0].content' holds '\\ud800' at character 0, half of a surrogate "
            "pair: not text a tokenizer can read.",
        ),
        (
            {"messages": [HI, {"role": "assistant", "content": ["Yo"]}]},
            "field 'messages[1].content' must be a string, got [\"Yo\"].",
        ),
    ],
)
def test_bad_record_is_named_by_file_and_line_with_the_fix(tmp_path, record, problem):
    # A good first record gives the format away (an empty record would not).
    key = next((k for k in GOOD if k in record), "text")
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD[key], record])
    with pytest.raises(LoraError) as error:
        read_examples(path)
    assert str(error.value) == f"{path}, line 2: {problem} {SKIP_HINT}"


def test_skipped_records_are_counted_by_reason(tmp_path):
    good = {"messages": [HI, YO]}
    bad = [
        {"messages": [HI, {"role": "assistant", "content": ""}]},
        {"messages": [YO]},
        {"messages": [HI, {"role": "assistant", "content": ""}]},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", [good, bad[0], good, bad[1], bad[2]])
    with path.open("a") as file:
        file.write('{"messages": [\n')  # line 6: not JSON
    data = read_data(path, skip_bad_records=True)
    assert data.examples == [[HI, YO], [HI, YO]]
    assert data.sources == [f"{path}, line 1", f"{path}, line 3"]
    assert (data.records, dict(data.skipped)) == (
        6,
        {"empty assistant text": 2, "assistant-first": 1, "invalid JSON": 1},
    )
    assert data.skip_report() == (
        f"skipped 4 bad records of 6 in {path}: 2 empty assistant text, 1 assistant-first, "
        "1 invalid JSON"
    )
    assert read_data(write_jsonl(tmp_path / "ok.jsonl", [good])).skip_report() == ""


def test_skipping_detects_the_format_past_bad_first_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('not json\n{}\n{"text": "body"}\n')
    with pytest.raises(LoraError, match=r"d\.jsonl, line 1: not valid JSON"):
        read_examples(path)
    data = read_data(path, skip_bad_records=True)
    assert (data.examples, dict(data.skipped)) == (["body"], {"invalid JSON": 1, "empty record": 1})


def test_a_file_of_bad_records_only_is_refused_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [YO]}, {"messages": [SYSTEM]}])
    with pytest.raises(LoraError) as error:
        read_data(path, skip_bad_records=True)
    assert str(error.value) == (
        f"{path}: no usable record (skipped 2 bad records of 2 in {path}: 1 assistant-first, "
        "1 system-only). Fix the records."
    )


def test_byte_order_mark_is_read_and_non_utf8_named(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "caf\u00e9"}).encode())
    assert read_examples(path) == ["caf\u00e9"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(LoraError) as error:
        read_examples(latin)
    assert str(error.value) == (
        f"{latin}, line 2: not UTF-8 text (byte 29 of the file: invalid continuation byte). "
        "Save the file as UTF-8."
    )


def test_unreadable_path_and_deep_nesting_are_named(tmp_path):
    with pytest.raises(LoraError) as error:
        read_examples(tmp_path)
    assert str(error.value) == (
        f"Cannot read data file {tmp_path}: Is a directory. Pass a readable JSON/JSONL file."
    )
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(LoraError, match=r"deep\.json: JSON nested too deeply to read\."):
        read_examples(deep)


# --- encoding and masking -------------------------------------------------------------------------


def test_chat_mask_covers_the_reply_and_its_end_of_turn_token(smollm2_tokenizer):
    data = encode_examples([TINY_CHAT], smollm2_tokenizer, seq_len=64)
    assert data.input_ids == [[*TINY_PROMPT_IDS, *TINY_REPLY_IDS, NEWLINE]]
    assert data.labels == [[X] * len(TINY_PROMPT_IDS) + TINY_REPLY_IDS + [X]]
    assert (data.tokens, data.target_tokens, data.truncated, data.dropped) == (20, 3, 0, 0)


def test_multi_turn_mask_covers_every_reply_and_no_prompt(smollm2_tokenizer):
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there!"},
        {"role": "user", "content": "More"},
        {"role": "assistant", "content": " ok"},
    ]
    data = encode_examples([conversation], smollm2_tokenizer, seq_len=128)
    ids, labels = data.input_ids[0], data.labels[0]
    trained = [
        smollm2_tokenizer.convert_ids_to_tokens(token)
        for token, label in zip(ids, labels, strict=True)
        if label != X
    ]
    assert trained == ["Hello", "Ġthere", "!", "<|im_end|>", "Ġok", "<|im_end|>"]
    assert all(label in (X, token) for token, label in zip(ids, labels, strict=True))


def test_train_on_prompt_puts_loss_on_every_token_but_the_first(smollm2_tokenizer):
    data = encode_examples([TINY_CHAT], smollm2_tokenizer, seq_len=64, train_on_prompt=True)
    ids = [*TINY_PROMPT_IDS, *TINY_REPLY_IDS, NEWLINE]
    assert data.labels == [[X, *ids[1:]]]


def test_text_gets_eos_and_loss_everywhere(smollm2_tokenizer):
    data = encode_examples(["Hello world"], smollm2_tokenizer, seq_len=64)
    assert data.input_ids == [[19556, 905, 2]]  # Hello, Ġworld, <|im_end|> (no bos for SmolLM2)
    assert data.labels == [[X, 905, 2]]


def test_truncation_and_dropping_are_counted(smollm2_tokenizer):
    long_reply = [*TINY_CHAT[:2], {"role": "assistant", "content": "Yo " * 20}]
    data = encode_examples([TINY_CHAT, long_reply], smollm2_tokenizer, seq_len=18)
    # TINY_CHAT (20 tokens) keeps "Y", "o" within 18 tokens; long_reply too.
    assert (data.examples, len(data), data.truncated, data.dropped) == (2, 2, 2, 0)
    assert data.labels[0] == [X] * 16 + [73, 95]
    # Within 16 tokens neither conversation keeps a reply token; the short text survives.
    data = encode_examples([TINY_CHAT, long_reply, "Hello world"], smollm2_tokenizer, seq_len=16)
    assert (data.examples, len(data), data.truncated, data.dropped) == (3, 1, 2, 2)
    assert data.input_ids == [[19556, 905, 2]]


def test_every_example_dropped_says_raise_seq_len(smollm2_tokenizer):
    with pytest.raises(LoraError, match="Raise --seq-len"):
        encode_examples([TINY_CHAT], smollm2_tokenizer, seq_len=16)


def test_summary_line(smollm2_tokenizer):
    data = encode_examples([TINY_CHAT, "Hello world"], smollm2_tokenizer, seq_len=64)
    assert data.summary() == (
        "2 examples -> 2 sequences (<= 64 tokens): 23 tokens, 5 with loss; 0 truncated, 0 dropped"
    )


def test_packing_concatenates_whole_examples_and_keeps_masks(smollm2_tokenizer):
    examples = [TINY_CHAT, "Hello world", TINY_CHAT, "Hello world"]
    plain = encode_examples(examples, smollm2_tokenizer, seq_len=24)
    packed = encode_examples(examples, smollm2_tokenizer, seq_len=24, pack=True)
    # 20 + 3 tokens fit in 24; the next 20 do not, so two sequences of 23.
    assert [len(ids) for ids in packed.input_ids] == [23, 23]
    assert packed.input_ids[0] == plain.input_ids[0] + plain.input_ids[1]
    assert packed.labels[0] == plain.labels[0] + plain.labels[1]
    assert (packed.tokens, packed.target_tokens) == (plain.tokens, plain.target_tokens)


def test_template_that_renders_prefixes_differently_is_refused(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    # Starts with the number of messages, so the prefix renders differently from the whole.
    tokenizer.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(LoraError, match="--train-on-prompt"):
        encode_examples([TINY_CHAT], tokenizer, seq_len=64)
    assert len(encode_examples([TINY_CHAT], tokenizer, seq_len=64, train_on_prompt=True)) == 1


def test_tokenizer_without_chat_template_is_refused_for_conversations(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(LoraError, match="no chat template"):
        encode_examples([TINY_CHAT], tokenizer, seq_len=64)
    assert len(encode_examples(["Hello"], tokenizer, seq_len=64)) == 1


# Llama-2 style: roles must alternate, starting with the user (a system turn first aside).
ALTERNATING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'system' and (m['role'] == 'user') != "
    "(loop.index0 % 2 == (1 if messages[0]['role'] == 'system' else 0)) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_template_refusal_names_the_record_and_can_be_skipped(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = ALTERNATING_TEMPLATE
    twice = [HI, HI, YO]  # read_examples accepts it; this template does not
    with pytest.raises(LoraError) as error:
        encode_examples(
            [[HI, YO], twice], tokenizer, 64, sources=["d.jsonl, line 1", "d.jsonl, line 2"]
        )
    assert str(error.value) == (
        "d.jsonl, line 2: the chat template refuses it: Conversation roles must alternate "
        f"user/assistant/user/assistant. {SKIP_HINT}"
    )
    with pytest.raises(LoraError, match="^example 2: the chat template refuses it"):
        encode_examples([[HI, YO], twice], tokenizer, 64)
    data = encode_examples([[HI, YO], twice, [HI, YO]], tokenizer, 64, skip_bad_records=True)
    plain = encode_examples([[HI, YO]], tokenizer, 64)
    assert (data.input_ids, data.labels) == (plain.input_ids * 2, plain.labels * 2)
    assert (data.examples, data.skipped) == (2, {"refused by the chat template": 1})
    assert data.summary().endswith(
        "; skipped 1 bad records of 3 in the data: 1 refused by the chat template"
    )


def test_template_that_does_not_compile_is_named_not_skipped(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(LoraError) as error:
        encode_examples([TINY_CHAT], tokenizer, 64, skip_bad_records=True)
    assert str(error.value) == (
        "The chat template does not compile (template line 1: unexpected '}'). Fix the "
        "template file given with --chat-template, or leave it out."
    )


def test_tokenizer_failure_names_the_example(smollm2_tokenizer):
    # Built in Python, not read from a file: nothing checked it before the template.
    with pytest.raises(LoraError) as error:
        encode_examples([[]], smollm2_tokenizer, 64)
    assert str(error.value).startswith(
        "example 1: the chat template or tokenizer fails on it: ValueError('Cannot apply chat "
        "template to an empty conversation"
    )


def test_encoded_dataset_rejects_mismatched_sequences():
    with pytest.raises(LoraError, match="Sequence 0: 2 tokens and 1 labels"):
        EncodedDataset(input_ids=[[1, 2]], labels=[[1]], seq_len=8, examples=1)


# --- splitting, loading, batching ---------------------------------------------------------------


def test_split_is_seeded_disjoint_and_complete():
    examples = [f"text {i}" for i in range(20)]
    train, val = split_examples(examples, 0.25, seed=3)
    assert (len(train), len(val)) == (15, 5)
    assert sorted(train + val) == sorted(examples)
    assert train == [e for e in examples if e in train]  # original order kept
    assert split_examples(examples, 0.25, seed=3) == (train, val)
    assert split_examples(examples, 0.25, seed=4) != (train, val)


@pytest.mark.parametrize(
    ("fraction", "fragment"),
    [(0.0, "between 0 and 1"), (1.0, "between 0 and 1"), (0.9, "leaves none")],
)
def test_bad_split_is_refused(fraction, fragment):
    with pytest.raises(LoraError, match=fragment):
        split_examples(["a", "b"], fraction)


def test_load_datasets_with_fraction_and_with_file(tmp_path, smollm2_tokenizer):
    train_path = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(10)])
    val_path = write_jsonl(tmp_path / "val.jsonl", [{"messages": TINY_CHAT}])
    train, val = load_datasets(train_path, TextCodec(smollm2_tokenizer), 32, val_fraction=0.2)
    assert (train.examples, val.examples) == (8, 2)
    train, val = load_datasets(
        train_path, TextCodec(smollm2_tokenizer), 32, val_path=val_path, pack=True
    )
    assert (train.examples, len(train), val.examples) == (10, 1, 1)  # only train is packed
    assert load_datasets(train_path, TextCodec(smollm2_tokenizer), 32)[1] is None
    with pytest.raises(LoraError, match="not both"):
        load_datasets(
            train_path, TextCodec(smollm2_tokenizer), 32, val_path=val_path, val_fraction=0.2
        )


def test_load_datasets_skips_and_reports_bad_records(tmp_path, smollm2_tokenizer):
    good = [{"messages": [{"role": "user", "content": f"Q{i}"}, YO]} for i in range(8)]
    bad = [{"messages": [YO]}, {"messages": [HI, {"role": "assistant", "content": ""}]}]
    train_path = write_jsonl(tmp_path / "train.jsonl", [*good[:4], bad[0], *good[4:], bad[1]])
    val_path = write_jsonl(tmp_path / "val.jsonl", [bad[0], *good[:2]])
    with pytest.raises(LoraError, match=r"train\.jsonl, line 5: field 'messages\[0\]' is the"):
        load_datasets(train_path, TextCodec(smollm2_tokenizer), 64)
    train, val = load_datasets(
        train_path, TextCodec(smollm2_tokenizer), 64, val_path=val_path, skip_bad_records=True
    )
    assert (train.examples, len(train), val.examples) == (8, 8, 2)
    assert train.summary().endswith(
        f"; skipped 2 bad records of 10 in {train_path}: 1 assistant-first, 1 empty assistant text"
    )
    assert val.summary().endswith(f"; skipped 1 bad records of 3 in {val_path}: 1 assistant-first")
    # Held out of the training file: the file's skips are reported once, with the training set.
    train, val = load_datasets(
        train_path, TextCodec(smollm2_tokenizer), 64, val_fraction=0.25, skip_bad_records=True
    )
    assert (train.examples, val.examples, val.skipped) == (6, 2, {})
    assert "skipped 2 bad records of 10 in" in train.summary()


def test_collate_pads_right():
    batch = [{"input_ids": [5, 6, 7], "labels": [X, 6, 7]}, {"input_ids": [8], "labels": [X]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[X, 6, 7], [X, X, X]]
    assert {t.dtype for t in out.values()} == {torch.long}


# --- the demo task ----------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match(' {"a": 1, "b": [2]}\n', '{"b":[2],"a":1}')
    assert not exact_match('{"qty": true}', '{"qty": 1}')
    assert not exact_match('{"qty": 1.0}', '{"qty": 1}')
    assert exact_match("  plain answer ", "plain answer")
    assert not exact_match('{"a": 1', '{"a": 1}')


def test_demo_splits_are_compact_json_chats_with_unseen_test_orders():
    splits = {split: read_examples(demo_path(split)) for split in DEMO_SPLITS}
    assert {split: len(examples) for split, examples in splits.items()} == {
        "train": 500,
        "val": 50,
        "test": 50,
    }
    for examples in splits.values():
        for conversation in examples:
            assert [m["role"] for m in conversation] == ["system", "user", "assistant"]
            answer = conversation[-1]["content"]
            assert json.dumps(json.loads(answer), separators=(",", ":")) == answer
            assert list(json.loads(answer)) == ["items", "address"]
    orders = {split: {c[1]["content"] for c in examples} for split, examples in splits.items()}
    assert not orders["test"] & (orders["train"] | orders["val"])
    with pytest.raises(LoraError, match="choose one of train, val, test"):
        demo_path("dev")


def test_demo_data_is_what_the_generator_writes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "make_demo_data", REPO / "scripts" / "make_demo_data.py"
    )
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    monkeypatch.setattr(generator, "OUT_DIR", tmp_path)
    generator.main()
    for split in DEMO_SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_text() == demo_path(split).read_text()


def test_permission_denied_names_the_file_and_the_fix(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(LoraError) as error:
        read_examples(path)
    assert str(error.value) == (
        f"Cannot read data file {path}: Permission denied. Pass a readable JSON/JSONL file."
    )
