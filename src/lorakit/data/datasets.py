"""Training and validation sets from files: system prompts, a seeded split, encoding."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import LoraError
from .encode import EncodedDataset
from .files import read_data
from .records import DataFile, Example

if TYPE_CHECKING:
    from .encode import TextCodec


T = TypeVar("T")


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
    codec: TextCodec,
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

    ``codec`` encodes: :class:`~lorakit.data.encode.TextCodec` for a tokenizer, its image
    subclass for a processor (:mod:`lorakit.vlm.collate`). Validation comes from ``val_path`` or, with ``val_fraction``, from the training file
    (see :func:`split_examples`). It is never packed, so its loss does not depend on
    ``pack``. ``data_format`` applies to both files; without it each file is detected alone.
    ``system`` goes first in every conversation that has no system message (:func:`with_system`).
    With ``skip_bad_records``, bad records are skipped and counted in each data set's
    ``skipped`` (those of the training file, read before the split, in the training set's).

    Returns:
        ``(train, val)``; ``val`` is ``None`` without ``val_path`` or ``val_fraction``.

    Raises:
        LoraError: both ``val_path`` and ``val_fraction`` given, or as in
            :func:`read_data`, :func:`split_examples` and ``codec.encode``.
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
        encoded = codec.encode(
            [e for e, _ in pairs],
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
