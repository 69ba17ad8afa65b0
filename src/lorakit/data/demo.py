"""The bundled demo task: pizza orders in free text -> one compact JSON object.

``lorakit train`` with no data trains on it. Each example (``chat`` format) is a short system
instruction, an order such as "Can I get two large pepperoni pizzas and a small coke, deliver
to 12 Elm Street", and the answer
``{"items":[{"name":"pepperoni pizza","size":"large","qty":2},...],"address":"12 Elm Street"}``.
The files are written by ``scripts/make_demo_data.py``.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..errors import LoraError

DEMO_SPLITS = ("train", "val", "test")


def demo_path(split: str) -> Path:
    """Path of a bundled demo split: ``train`` (500), ``val`` (50) or ``test`` (50) examples.

    Raises:
        LoraError: for any other split name.
    """
    if split not in DEMO_SPLITS:
        raise LoraError(f"Unknown demo split {split!r}; choose one of {', '.join(DEMO_SPLITS)}.")
    # lorakit is installed as plain files (never zipped), so the resource is a real file.
    return Path(str(files("lorakit").joinpath("demo", f"{split}.jsonl")))
