"""Adapted linear layers that read one input tensor run as one autograd node.

An attention's q/k/v projections read the same normed hidden states, an MLP's gate and up
another; each would run its own small (N, in) @ (in, r) product forward and two backward, and
autograd would add their input gradients. ``SharedLoraFunction`` does all of them in one node
(one product for every A, one input-gradient accumulation; the base products unchanged).

Who reads what is found in two steps. ``LoraLinear.link_shared_inputs`` (every ``add_lora`` /
``load_adapter``) makes candidates from the structure: ``LoraLinear`` children of one module
with the same input size, weight dtype and device. The first forward then shows the module
graph: a candidate set is split by the tensor each member was called with (the same object,
not equal values), so an o_proj of the same size as q/k/v leaves; the split takes effect at
the next forward (``settle_probes``). Until then, and whenever a member cannot take the fused
path (DoRA, lora_bias, a quantized or trainable base, hooks, routing, autocast), and for a set
with a member that is never called, each layer runs its own.

At run time the first member called computes every member's output and keeps the others'
until they are called with that same tensor; a set whose outputs are not taken is recomputed
(an interrupted recomputation under gradient checkpointing leaves such a set behind).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from .kernels import SharedLayout, SharedLoraFunction, shared_lora_linear, shared_outputs

# Members are linear.LoraLinear layers; linear imports this module, so they are typed as
# modules here.
LoraLinear = nn.Module


class SharedInput:
    """``members`` (LoraLinear layers) that read, or may read, one input tensor."""

    def __init__(self, members: list[LoraLinear], probing: bool = True) -> None:
        self.members = members
        self.probing = probing
        self._seen: dict[int, weakref.ref] = {}  # probing: member index -> its input
        self._split: list[list[LoraLinear]] | None = None  # probed: the members by input
        self._pending: tuple[Tensor, dict[int, Tensor]] | None = None  # (x, outputs to take)

    def output(self, member: LoraLinear, x: Tensor) -> Tensor | None:
        """``member``'s output for input ``x`` from the shared node, or None: run alone."""
        index = next(i for i, m in enumerate(self.members) if m is member)
        if self.probing:
            self._probe(index, x)
            return None
        if self._pending is not None:
            held, outputs = self._pending
            if held is x and index in outputs:
                y = outputs.pop(index)
                if not outputs:
                    self._pending = None
                return y
            if held is x:  # called twice with one input: this call alone
                return None
        if not all(m._shareable(x) for m in self.members):
            self._pending = None
            return None
        ys = _run(self.members, x)
        self._pending = (x, {i: y for i, y in enumerate(ys) if i != index})
        return ys[index]

    def _probe(self, index: int, x: Tensor) -> None:
        """Record the tensor member ``index`` read; at the last member's call, while the
        tensors are alive, group the members by the tensor they read (``settle`` applies it)."""
        self._seen[index] = weakref.ref(x)
        if len(self._seen) < len(self.members) or self._split is not None:
            return
        classes: list[tuple[Tensor | None, list[LoraLinear]]] = []
        for i, member in enumerate(self.members):
            seen = self._seen[i]()
            same = next((c for c in classes if seen is not None and c[0] is seen), None)
            if same is None:
                classes.append((seen, [member]))
            else:
                same[1].append(member)
        self._seen.clear()
        self._split = [members for _, members in classes]

    def settle(self) -> bool:
        """Give each member its set from the probe (sets of one leave); True while the probe
        has not seen every member called."""
        if self._split is None:
            return True
        for members in self._split:
            group = SharedInput(members, probing=False) if len(members) > 1 else None
            for member in members:
                member._shared = group
        return False

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle) starts with nothing held: the held outputs belong to a
        # graph of this model, and weak references cannot be pickled.
        return {**self.__dict__, "_seen": {}, "_pending": None}  # _split: modules, copied


def settle_probes(model: nn.Module, args: Any) -> None:
    """Forward pre-hook of the model ``link_shared_inputs`` was given: sets whose first
    forward showed their inputs take effect at the next forward, never inside one, so that a
    step's forward and its recomputation under gradient checkpointing take the same path."""
    if not getattr(model, "_lorakit_probing", False):
        return
    probing = False
    for module in model.modules():
        shared = getattr(module, "_shared", None)
        if isinstance(shared, SharedInput) and shared.probing:
            probing |= shared.settle()
    model._lorakit_probing = probing


def _run(members: list[LoraLinear], x: Tensor) -> list[Tensor]:
    """Every member's output for ``x``: base(x) + Σ its pending adapters (plain, no bias)."""
    tensors: list[Tensor | None] = []
    adapters: list[Tensor | None] = []
    owner, scales = [], []
    for j, member in enumerate(members):
        tensors += [member._fused_weight(), member.base_layer.bias]
        for n in member.pending():
            dropped = member.dropout[n] > 0 and member.training
            adapters += [member._dropped(n, x) if dropped else None]
            adapters += [member.lora_A[n], member.lora_B[n]]
            owner.append(j)
            scales.append(member.scale[n])
    layout = SharedLayout(len(members), owner, scales)
    if torch.is_grad_enabled():
        return list(SharedLoraFunction.apply(x, layout, *tensors, *adapters))
    ys, outs = shared_outputs(x, tensors[0::2])
    shared_lora_linear(x.reshape(-1, x.shape[-1]), layout, [*tensors, *adapters], outs)
    return ys
