"""A Hugging Face tokenizer as llama.cpp's vocabulary keys (``tokenizer.ggml.*`` in a GGUF).

llama.cpp tokenizes text itself, from what the GGUF says (``src/llama-vocab.cpp``):

    tokenizer.ggml.model        "gpt2": byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM);
                                "llama": SentencePiece (Llama 2, Mistral, Gemma, Phi-3)
    tokenizer.ggml.pre          how text is split before BPE: one of llama.cpp's names, each a
                                fixed set of regexes (see PRE_TOKENIZERS)
    tokens, token_type          every id's text, and NORMAL / CONTROL / USER_DEFINED / BYTE /
                                UNKNOWN / UNUSED (padding rows beyond the tokenizer)
    merges (BPE), scores (SPM)  the merge order: BPE's ranked pairs, SentencePiece's scores
    *_token_id, add_bos/eos     special tokens, and which ones encoding adds
    add_space_prefix (SPM)      whether a leading "▁" is added, as SentencePiece's dummy prefix
    chat_template               the Jinja template (the run's system prompt baked in)

Everything is read from the tokenizer the model was trained with (transformers), and what it
does is taken from what it does: ``add_bos_token`` is whether encoding "a" adds the BOS id.
A SentencePiece model's pieces, scores and types come from its ``tokenizer.model`` (read with
the ``sentencepiece`` package) when the folder has one, as llama.cpp's converter reads them; a
folder with only ``tokenizer.json`` (what transformers 5 saves), or no ``sentencepiece``
installed, gets scores from the merge ranks, which give llama.cpp the same merge order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from ..errors import LoraError

T = gguf.TokenType
SPECIAL = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# HF's pre-tokenizer regexes (tokenizer.json, "Split" before a regex-free ByteLevel).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
# A byte-level tokenizer's splitting (its pre_tokenizer, see ``_splits``) -> llama.cpp's name
# for the same regexes (``llama_vocab::impl::load`` and ``llm_tokenizer_bpe`` in
# src/llama-vocab.cpp): GPT-2's, SmolLM's (digits first), Llama 3's and Qwen2's.
PRE_TOKENIZERS: dict[tuple, str] = {
    ("gpt2-regex",): "gpt-2",
    ("digits", "gpt2-regex"): "smollm",
    (LLAMA3_REGEX, "bytes"): "llama-bpe",
    (QWEN2_REGEX, "bytes"): "qwen2",
}
SPM_REPLACEMENT = "\u2581"  # SentencePiece's "▁" for a space


@dataclass
class Vocab:
    """What a GGUF says about its tokenizer (see the module docstring)."""

    model: str  # "gpt2" or "llama"
    pre: str  # llama.cpp's pre-tokenizer name ("default" for SentencePiece)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    merges: list[str] | None = None  # BPE only: "left right"
    special: dict[str, int] = field(default_factory=dict)  # "bos" -> id, ...
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None  # SentencePiece only
    chat_template: str | list[dict[str, str]] | None = None


def _backend(tokenizer: Any) -> dict:
    """The tokenizer's ``tokenizer.json`` (its fast backend), or ``LoraError``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LoraError(
            f"{type(tokenizer).__name__} has no tokenizer.json (a slow tokenizer): lorakit "
            "writes a GGUF's vocabulary from a fast tokenizer. Save the base's tokenizer with "
            "a current transformers, or give a GGUF of the base (--gguf-metadata)."
        )
    return json.loads(backend.to_str())


def _flatten(node: dict | None) -> list[dict]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or []
        return [leaf for child in inner for leaf in _flatten(child)]
    return [node]


def _splits(pre_tokenizer: dict | None) -> tuple:
    """The splitting a pre-tokenizer does, as keys of PRE_TOKENIZERS: GPT-2's regex (a
    ByteLevel with ``use_regex``), bytes (one without), single digits, or a Split's regex.
    Anything else keeps its JSON, so an unknown splitting never matches a known one."""
    steps: list = []
    for step in _flatten(pre_tokenizer):
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space"):
            # with its regex: GPT-2's splitting (and bytes); without: the bytes only
            steps.append("gpt2-regex" if step.get("use_regex", True) else "bytes")
        elif kind == "Digits" and step.get("individual_digits"):
            steps.append("digits")
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            steps.append(step.get("pattern", {}).get("Regex"))
        else:
            steps.append(json.dumps(step, sort_keys=True))
    return tuple(steps)


def pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer (its tokenizer.json).

    Raises:
        LoraError: a splitting llama.cpp has no name for among those lorakit knows.
    """
    splits = _splits(backend.get("pre_tokenizer"))
    if splits not in PRE_TOKENIZERS:
        known = ", ".join(PRE_TOKENIZERS.values())
        raise LoraError(
            f"the tokenizer splits text as {backend.get('pre_tokenizer')}, which is none of the "
            f"pre-tokenizers lorakit can name for llama.cpp ({known}); a wrong name would "
            "tokenize differently. Give a GGUF of the base model made by llama.cpp's "
            "convert_hf_to_gguf.py BASE --vocab-only (--gguf-metadata FILE)."
        )
    return PRE_TOKENIZERS[splits]


def _added(tokenizer: Any) -> dict[int, Any]:
    """id -> AddedToken (content, special) of every added token."""
    return dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})


def _padded(tokens: list[str | None]) -> list[str]:
    """Token texts for every embedding row: a row no token uses is ``[PAD<id>]``."""
    return [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]


def _id_texts(tokenizer: Any, rows: int) -> list[str | None]:
    vocab = tokenizer.get_vocab()
    if max(vocab.values(), default=-1) >= rows:
        raise LoraError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's embedding "
            f"has {rows} rows; export the model the tokenizer was resized with."
        )
    texts: list[str | None] = [None] * rows
    for text, i in vocab.items():
        texts[i] = text
    return texts


def bpe_vocab(tokenizer: Any, backend: dict, rows: int) -> Vocab:
    """A byte-level BPE tokenizer's tokens, types and merges, ``rows`` long."""
    pre = pre_tokenizer_name(backend)
    texts = _id_texts(tokenizer, rows)
    added = _added(tokenizer)
    types = []
    for i, text in enumerate(texts):
        if text is None:
            types.append(T.UNUSED)
        elif i in added:
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
    merges = backend["model"].get("merges") or []
    # llama.cpp splits a merge at its first space; byte-level BPE spells a space U+0120.
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    spelled = [" ".join(p.replace(" ", "\u0120") for p in pair) for pair in pairs]
    return Vocab("gpt2", pre, _padded(texts), types, merges=spelled)


def _spm_file(tokenizer: Any) -> Path | None:
    """The tokenizer's SentencePiece ``tokenizer.model``, where it kept or loaded one."""
    for candidate in (
        getattr(tokenizer, "vocab_file", None),
        Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "tokenizer.model",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _spm_pieces(path: Path) -> list[tuple[str, float, int]] | None:
    """(piece, score, type) of a SentencePiece model (its types are GGUF's token types);
    ``None`` without the ``sentencepiece`` package, when tokenizer.json's reading serves."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # protobuf or sentencepiece missing
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return [(p.piece, p.score, p.type) for p in proto.pieces]


def _json_pieces(backend: dict, unk: str | None) -> list[tuple[str, float, int]]:
    """(piece, score, type) from a SentencePiece-style BPE ``tokenizer.json``: a piece made by
    merge k (from 0) scores -(k + 1), since SentencePiece merges the highest score first;
    pieces no merge makes (characters, bytes, specials) score 0. Types: ``unk`` UNKNOWN,
    added tokens CONTROL (special) or USER_DEFINED, ``<0xNN>`` BYTE, the rest NORMAL."""
    model = backend["model"]
    rank: dict[str, int] = {}
    for k, m in enumerate(model.get("merges") or []):
        left, right = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(left + right, k)
    kinds = {f"<0x{b:02X}>": T.BYTE for b in range(256)}
    for token in backend.get("added_tokens") or []:
        kinds[token["content"]] = T.CONTROL if token.get("special") else T.USER_DEFINED
    if unk:
        kinds[unk] = T.UNKNOWN
    pieces = sorted(model["vocab"].items(), key=lambda item: item[1])
    return [
        (text, -rank[text] - 1.0 if text in rank else 0.0, kinds.get(text, T.NORMAL))
        for text, _ in pieces
    ]


def spm_vocab(tokenizer: Any, backend: dict, rows: int) -> Vocab:
    """A SentencePiece tokenizer's pieces, scores and types, ``rows`` long; tokens added to it
    (HF's added tokens beyond its pieces) are CONTROL when special, else USER_DEFINED."""
    path = _spm_file(tokenizer)
    unk = getattr(tokenizer, "unk_token", None)
    pieces = (_spm_pieces(path) if path else None) or _json_pieces(backend, unk)
    texts = _id_texts(tokenizer, rows)
    if any(texts[i] not in (None, p) for i, (p, _, _) in enumerate(pieces[:rows])):
        pieces = _json_pieces(backend, unk)  # a stale tokenizer.model: the tokenizer rules
    tokens, scores, types = _padded([None] * rows), [-10000.0] * rows, [T.UNUSED] * rows
    for i, (piece, score, kind) in enumerate(pieces[:rows]):
        tokens[i], scores[i], types[i] = piece, float(score), int(kind)
    for i, token in _added(tokenizer).items():
        if i < rows and tokens[i] != token.content:
            tokens[i], scores[i] = token.content, -1000.0
            types[i] = T.CONTROL if token.special else T.USER_DEFINED
    first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    vocab = Vocab("llama", "default", tokens, [int(t) for t in types], scores=scores)
    vocab.add_space_prefix = bool(first) and first[0].startswith(SPM_REPLACEMENT)
    return vocab


def _is_sentencepiece(backend: dict) -> bool:
    """SentencePiece-style: BPE over "▁"-spelled text with byte fallback (no byte level)."""
    model = backend.get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _special_ids(tokenizer: Any, config: Any, rows: int) -> dict[str, int]:
    """bos/eos/... ids: the tokenizer's, and the model config's where the tokenizer has none."""
    ids = {}
    for kind in SPECIAL:
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if value is None:
            value = getattr(config, f"{kind}_token_id", None)
        if isinstance(value, int) and 0 <= value < rows:
            ids[kind] = value
    return ids


def _adds(tokenizer: Any, special: dict[str, int]) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what encoding "a" with special tokens puts around it."""
    bare = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    start = next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), 0)
    before, after = full[:start], full[start + len(bare) :]
    return before[-1:] == [special.get("bos")], after[:1] == [special.get("eos")]


def _template(template: str | dict | None) -> str | list[dict[str, str]] | None:
    if isinstance(template, dict):  # named templates: GGUF's list form, "default" first
        names = sorted(template, key=lambda n: (n != "default", n))
        return [{"name": n, "template": template[n]} for n in names]
    return template


def read_vocab(
    tokenizer: Any, rows: int, config: Any = None, chat_template: str | dict | None = None
) -> Vocab:
    """The GGUF vocabulary of ``tokenizer`` for a model whose embedding has ``rows`` rows.

    Args:
        config: the model's config, for special ids the tokenizer does not set.
        chat_template: the template to write (default: the tokenizer's own).

    Raises:
        LoraError: a slow tokenizer, a kind llama.cpp's loader cannot be told about (Unigram,
            WordPiece), an unknown pre-tokenizer, or more ids than embedding rows.
    """
    backend = _backend(tokenizer)
    if _is_sentencepiece(backend):
        vocab = spm_vocab(tokenizer, backend, rows)
    elif backend.get("model", {}).get("type") == "BPE":
        vocab = bpe_vocab(tokenizer, backend, rows)
    else:
        raise LoraError(
            f"a {backend.get('model', {}).get('type')} tokenizer: lorakit writes llama.cpp "
            "vocabularies for byte-level BPE and SentencePiece tokenizers only. Give a GGUF "
            "of the base model (--gguf-metadata FILE)."
        )
    vocab.special = _special_ids(tokenizer, config, rows)
    vocab.add_bos, vocab.add_eos = _adds(tokenizer, vocab.special)
    vocab.chat_template = _template(chat_template or getattr(tokenizer, "chat_template", None))
    return vocab


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Add ``vocab``'s ``tokenizer.*`` keys to ``writer``."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
