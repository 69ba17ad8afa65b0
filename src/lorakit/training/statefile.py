"""Nested training state in one safetensors file, so that no checkpoint is ever a pickle.

A checkpoint's state is a tree: dicts (optimizer state is keyed by int), lists, tuples
(``random.getstate()`` must come back as tuples), numbers, strings, ``None`` and tensors.
The tensors are stored as safetensors tensors under the names ``t0, t1, ...``; the rest of
the tree is JSON in the file's metadata, each tensor replaced by ``{"$t": "t0"}``. Reading it
back runs no code, whatever the file holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomic import follow_umask
from ..errors import LoraError

_TREE_KEY = "lorakit.tree"


def save_tree(tree: Any, path: str | os.PathLike) -> None:
    """Write ``tree`` to ``path`` (safetensors; tensors copied to contiguous CPU memory), with
    the mode any file of this process gets (safetensors alone makes it owner-only)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(tree, tensors)
    save_file(tensors, str(path), metadata={_TREE_KEY: json.dumps(skeleton)})
    follow_umask(path)


def load_tree(path: str | os.PathLike) -> Any:
    """The tree :func:`save_tree` wrote to ``path``.

    Raises:
        LoraError: the file is missing, truncated, corrupt or not a lorakit state file.
    """
    path = Path(path)
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            skeleton = json.loads((f.metadata() or {})[_TREE_KEY])
        return _decode(skeleton, tensors)
    except Exception as err:  # safetensors raises its own error types for every corruption
        raise LoraError(
            f"{path} is not a readable lorakit training state ({type(err).__name__}: {err}). "
            "Resume from another checkpoint, or start the run again without --resume."
        ) from None


def _encode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = node.detach().cpu().contiguous().clone()
        return {"$t": name}
    if isinstance(node, dict):
        if all(isinstance(key, str) for key in node):
            return {"$d": {key: _encode(value, tensors) for key, value in node.items()}}
        return {"$kv": [[_encode(k, tensors), _encode(v, tensors)] for k, v in node.items()]}
    if isinstance(node, tuple):
        return {"$tuple": [_encode(item, tensors) for item in node]}
    if isinstance(node, list):
        return [_encode(item, tensors) for item in node]
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot store a {type(node).__name__} in a training state file")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(item, tensors) for item in node]
    if not isinstance(node, dict):
        return node
    if "$t" in node:
        return tensors[node["$t"]]
    if "$d" in node:
        return {key: _decode(value, tensors) for key, value in node["$d"].items()}
    if "$kv" in node:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in node["$kv"]}
    if "$tuple" in node:
        return tuple(_decode(item, tensors) for item in node["$tuple"])
    raise ValueError(f"unknown node {sorted(node)[:3]}")
