"""Shared fixtures: the bundled SmolLM2 model and tokenizer (loaded once per test session), and
a small chat data set.

They load through lorakit's own cache (``$LORAKIT_CACHE`` or ``~/.cache/lorakit``), the same
one ``lorakit train`` uses: the GGUF is converted at most once, on the first run ever, and
later sessions load the converted copy in well under a second.
"""

from __future__ import annotations

import json
import multiprocessing
from multiprocessing.context import BaseContext
from pathlib import Path

import pytest
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorakit.models.load import DEFAULT_MODEL, load_model


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer. Shared: tests must not modify them."""
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2) -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer. Shared: tests must not modify it (copy it first)."""
    return smollm2[1]


@pytest.fixture(scope="session")
def child_processes() -> BaseContext:
    """A multiprocessing context whose children fork from a fresh, single-threaded server.

    Forking the test process itself is unsafe: a lock that another thread (tqdm's monitor,
    an OpenMP or tokenizer pool) holds at the moment of the fork stays held forever in the
    child. A CI run stalled for 80 minutes waiting on such a child. The server imports the
    heavy modules once, so each child starts in a fraction of a second.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        ["torch", "transformers", "peft", "lorakit.training.loop", "tiny"]
    )
    return context


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """16 short chat examples whose answers vary in length (so padding differs by batch)."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = []
    for i in range(16):
        answer = " ".join(["pizza"] * (1 + i % 5)) + f" {i}"
        messages = [
            {"role": "user", "content": f"Order number {i}?"},
            {"role": "assistant", "content": answer},
        ]
        rows.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(rows) + "\n")
    return path
