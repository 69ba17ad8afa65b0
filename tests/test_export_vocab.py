"""A tokenizer as llama.cpp's vocabulary: pre-tokenizer names, SentencePiece pieces and what
encoding adds, read from what the tokenizer does (export/vocab.py)."""

from __future__ import annotations

import copy
import json

import export_families as ef
import gguf
import pytest
from tokenizers import Regex, pre_tokenizers

from lorakit import LoraError
from lorakit.export.vocab import LLAMA3_REGEX, QWEN2_REGEX, _backend, pre_tokenizer_name, read_vocab

T = gguf.TokenType


def _split(regex: str):
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


PRE = {
    "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    ),
    "llama-bpe": _split(LLAMA3_REGEX),
    "qwen2": _split(QWEN2_REGEX),
}


@pytest.mark.parametrize("name", list(PRE))
def test_pre_tokenizer_names_follow_the_splitting(smollm2_tokenizer, name):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = PRE[name]
    assert pre_tokenizer_name(_backend(tokenizer)) == name
    assert read_vocab(tokenizer, len(tokenizer)).pre == name


def test_the_regexes_are_the_ones_llama_cpp_names():
    """llama.cpp's src/llama-vocab.cpp keeps each tokenizer.json regex in a comment beside its
    own rewrite; these are those regexes, Qwen2's differing from Llama 3's in single digits."""
    assert r"\p{N}{1,3}" in LLAMA3_REGEX and r"|\p{N}|" in QWEN2_REGEX
    assert LLAMA3_REGEX.startswith(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|")


def test_an_unknown_splitting_is_refused_with_the_way_out(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(LoraError) as err:
        read_vocab(tokenizer, len(tokenizer))
    message = str(err.value)
    assert "Whitespace" in message and "gpt-2, smollm, llama-bpe, qwen2" in message
    assert "--vocab-only (--gguf-metadata FILE)" in message


def test_bpe_tokens_types_merges_and_padding_rows(smollm2_tokenizer):
    tokenizer = ef.bundled_tokenizer(smollm2_tokenizer)
    vocab = read_vocab(tokenizer, len(tokenizer) + 3)
    assert vocab.model == "gpt2" and vocab.pre == "smollm"
    assert vocab.tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert vocab.types[:3] == [T.CONTROL] * 3 and vocab.types[100] == T.NORMAL
    assert vocab.tokens[-3:] == [f"[PAD{len(tokenizer) + i}]" for i in range(3)]
    assert vocab.types[-3:] == [T.UNUSED] * 3
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert vocab.merges[:2] == [" ".join(m) for m in merges[:2]] and len(vocab.merges) == 48900
    assert (vocab.add_bos, vocab.add_eos, vocab.special) == (
        False,
        False,
        {"bos": 1, "eos": 2, "unk": 0, "pad": 2},
    )


def test_more_ids_than_embedding_rows_is_refused(smollm2_tokenizer):
    with pytest.raises(LoraError, match="ids up to 49151 but the model's embedding has 100 rows"):
        read_vocab(smollm2_tokenizer, 100)


@pytest.mark.parametrize("name", ["llama-spm", "gemma-spm"])
def test_sentencepiece_from_its_model_file_and_what_encoding_adds(tmp_path, name):
    tokenizer = ef.spm_tokenizer(name, tmp_path)
    vocab = read_vocab(tokenizer, len(tokenizer))
    assert vocab.model == "llama" and vocab.pre == "default" and len(vocab.tokens) == 400
    assert T.BYTE in vocab.types and vocab.tokens[vocab.types.index(T.BYTE)] == "<0x00>"
    assert vocab.add_bos and not vocab.add_eos  # tokenizer_config: add_bos_token true
    assert vocab.add_space_prefix is (name == "llama-spm")  # Gemma: no dummy prefix
    bos = {"llama-spm": "<s>", "gemma-spm": "<bos>"}[name]
    assert vocab.tokens[vocab.special["bos"]] == bos
    assert vocab.types[vocab.special["bos"]] == T.CONTROL
    assert vocab.types[vocab.special["unk"]] == T.UNKNOWN


def test_sentencepiece_without_its_model_file_scores_by_merge_rank(tmp_path):
    """A folder with tokenizer.json only (what transformers 5 saves): scores from the merge
    order give llama.cpp the same merge order as SentencePiece's own scores."""
    from transformers import AutoTokenizer

    tokenizer = ef.spm_tokenizer("llama-spm", tmp_path / "with")
    from_file = read_vocab(tokenizer, len(tokenizer))
    tokenizer.save_pretrained(tmp_path / "json-only")
    json_only = AutoTokenizer.from_pretrained(tmp_path / "json-only")
    assert not (tmp_path / "json-only" / "tokenizer.model").exists()
    derived = read_vocab(json_only, len(json_only))
    assert (derived.tokens, derived.types) == (from_file.tokens, from_file.types)
    merged = [i for i, s in enumerate(derived.scores) if s < 0]
    assert len(merged) > 50  # every piece a merge makes
    by_derived = sorted(merged, key=lambda i: -derived.scores[i])
    by_spm = sorted(merged, key=lambda i: -from_file.scores[i])
    assert by_derived == by_spm


def test_a_user_defined_piece_keeps_its_sentencepiece_type(tmp_path):
    """Pieces are typed by the SentencePiece model itself (its proto's types are GGUF's)."""
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"order {i} for pizza" for i in range(200)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "m"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=["<tool>"],
        num_threads=1,
    )
    folder = tmp_path / "tok"
    folder.mkdir()
    (tmp_path / "m.model").rename(folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = read_vocab(tokenizer, len(tokenizer))
    assert vocab.types[vocab.tokens.index("<tool>")] == T.USER_DEFINED


def test_a_split_without_byte_level_is_no_byte_level_bpe(smollm2_tokenizer):
    """Llama 3's regex alone, without the ByteLevel step that maps bytes to the vocabulary's
    characters, is not what llama.cpp's llama-bpe does."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(LLAMA3_REGEX), behavior="isolated"
    )
    with pytest.raises(LoraError, match="none of the pre-tokenizers lorakit can name"):
        read_vocab(tokenizer, len(tokenizer))
