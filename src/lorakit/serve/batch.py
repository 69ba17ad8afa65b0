"""The rows that decode together: one KV cache, left-padded, and their forward passes.

Rows of different lengths share one cache by padding on the left: row i holds ``pads[i]``
empty columns, then its own tokens, so every row's next token goes in the same (last) column::

    columns   0   1   2   3   4   5
    row 0     .   .   p   p   p   g     pads[0] = 2  (p: prompt, g: generated)
    row 1     p   p   p   p   g   g     pads[1] = 0

The attention mask hides the pads, and each row's position ids count its own tokens only, so
a row computes what it would alone. Rows join (their prefill cache is padded to the common
width) and leave (their cache rows are dropped, then pad columns every row has) between
decoding steps; the cache is rebuilt only then, not at each step.

Each forward runs inside :func:`lorakit.route`, which gives row i the adapter ``adapters[i]``
(``None``: the base model): requests for different adapters share every forward pass.
:class:`Routing` keeps one ``route`` block open while the rows stay the same, since entering
it walks every module of the model: it is re-entered when rows join or leave, not per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import route
from ..errors import LoraError


def check_model(model: nn.Module) -> None:
    """Refuse models whose cache this module cannot pad and cut (sliding windows, states).

    Raises:
        LoraError: the model's cache has layers other than plain growing key/value ones.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=model.config).layers
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise LoraError(
            f"lorakit serve needs a model with full attention in every layer; this one has "
            f"cache layers of kind {odd} (sliding windows or recurrent state), which it cannot "
            "pad and batch."
        )


class Routing:
    """One open :func:`lorakit.route` block for ``model``, re-entered only for other rows."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._names: list[str | None] | None = None
        self._block: ExitStack | None = None

    def use(self, names: Sequence[str | None]) -> None:
        """Route row i to ``names[i]`` from now on (a no-op for the rows already routed)."""
        if list(names) == self._names:
            return
        self.close()
        block = ExitStack()
        block.enter_context(route(self.model, list(names)))
        self._block, self._names = block, list(names)

    def close(self) -> None:
        """Leave the block (before adapters are loaded or deleted)."""
        if self._block is not None:
            self._block.close()
        self._block = self._names = None


def _forward(model: nn.Module, cache: object, **inputs: Tensor) -> Tensor:
    """Last-position logits (B, V) of one forward pass over ``cache`` (routed by the caller)."""
    accepted = inspect.signature(model.forward).parameters
    if "logits_to_keep" in accepted:
        inputs["logits_to_keep"] = 1  # the head on the last position only
    # transformers 5.x renames past_key_values to cache (the old name warns, then goes)
    inputs["cache" if "cache" in accepted else "past_key_values"] = cache
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    return out.logits[:, -1].float()


def prefill(model: nn.Module, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, object, list[int]]:
    """Run the prompts in one forward, left-padded to the longest (rows routed by the caller).

    Returns:
        (logits (n, V) at each prompt's last token, the cache, pads per row).
    """
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    ids = torch.tensor([[0] * pad + list(p) for p, pad in zip(prompts, pads, strict=True)])
    mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in pads])  # (n, width)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts its own tokens from 0
    cache = DynamicCache()
    device = model.device
    logits = _forward(
        model,
        cache,
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
    )
    return logits, cache, pads


class Batch:
    """Rows decoding together: their shared left-padded cache and each row's padding.

    Attributes:
        cache: a ``transformers.DynamicCache`` of shape (rows, heads, width, head_dim) per
            layer; ``None`` while there are no rows.
        pads: empty columns at the left of each row.
    """

    def __init__(self) -> None:
        self.cache: object | None = None
        self.pads: list[int] = []

    def __len__(self) -> int:
        return len(self.pads)

    @property
    def width(self) -> int:
        """Columns of the cache: pads plus tokens, the same for every row."""
        return self.cache.get_seq_length() if self.cache is not None else 0

    def decode(self, model: nn.Module, tokens: list[int]) -> Tensor:
        """Feed each row its last token in one forward; logits (rows, V) for the next ones."""
        width, device = self.width, model.device
        mask = torch.ones(len(self), width + 1, dtype=torch.long)  # (rows, width + 1)
        for row, pad in enumerate(self.pads):
            mask[row, :pad] = 0
        positions = torch.tensor([[width - pad] for pad in self.pads])  # (rows, 1)
        return _forward(
            model,
            self.cache,
            input_ids=torch.tensor(tokens).unsqueeze(-1).to(device),  # (rows, 1)
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
        )

    def join(self, cache: object, pads: list[int]) -> None:
        """Append the rows of a prefill ``cache`` below the current ones (padding either)."""
        if self.cache is None:
            self.cache, self.pads = cache, list(pads)
            return
        width = max(self.width, cache.get_seq_length())
        grow_old, grow_new = width - self.width, width - cache.get_seq_length()
        pairs = [
            tuple(
                # (rows, heads, T, d) padded on the left of T, then new rows below
                torch.cat([F.pad(old, (0, 0, grow_old, 0)), F.pad(new, (0, 0, grow_new, 0))])
                for old, new in ((mine.keys, theirs.keys), (mine.values, theirs.values))
            )
            for mine, theirs in zip(self.cache.layers, cache.layers, strict=True)
        ]
        self.cache = _cache(pairs)
        self.pads = [p + grow_old for p in self.pads] + [p + grow_new for p in pads]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in order), then drop the pad columns all of them share."""
        if not rows:
            self.cache, self.pads = None, []
            return
        pads = [self.pads[r] for r in rows]
        common = min(pads)
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        pairs = [
            (layer.keys[index, :, common:], layer.values[index, :, common:])
            for layer in self.cache.layers
        ]  # (rows, heads, T, d) -> (kept, heads, T - common, d)
        self.cache = _cache(pairs)
        self.pads = [p - common for p in pads]


def _cache(pairs: list[tuple[Tensor, Tensor]]) -> object:
    """A ``DynamicCache`` holding these (keys, values) per layer."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=pairs)
