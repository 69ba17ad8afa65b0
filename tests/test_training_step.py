"""The pieces of one optimizer step: schedule, data order, loss normalisation, optimizer groups."""

from __future__ import annotations

import math

import pytest
import tiny
import torch

from lorakit import add_lora
from lorakit.data import IGNORE_INDEX
from lorakit.training.config import TrainConfig
from lorakit.training.step import (
    BatchStream,
    build_optimizer,
    lr_factor,
    row_losses,
    step_loss,
    target_count,
)


def test_lr_factor_matches_hand_computed_values():
    # warmup 2 of 10 steps: (s + 1) / 3 during warmup, then progress = (s - 2) / 8.
    assert lr_factor(0, 2, 10, "cosine") == pytest.approx(1 / 3)
    assert lr_factor(1, 2, 10, "cosine") == pytest.approx(2 / 3)
    assert lr_factor(2, 2, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)  # cos(pi / 2) = 0
    assert lr_factor(4, 2, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(6, 2, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 2, 10, "linear") == pytest.approx(1 / 8)
    assert lr_factor(9, 2, 10, "constant") == 1.0


# --- data order -------------------------------------------------------------------------------


def test_batch_stream_covers_each_epoch_and_replays_from_its_state():
    stream = BatchStream(size=10, batch_size=4, seed=3)
    first = [stream.next_batch() for _ in range(5)]  # 20 indices = 2 epochs
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # a fresh shuffle each epoch
    replay = BatchStream(size=10, batch_size=4, seed=3)
    replay.next_batch()
    state = replay.state_dict()
    resumed = BatchStream(size=10, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(4)] == first[1:]


def test_target_count_shifts_labels_and_selects_a_task_s_rows():
    x = IGNORE_INDEX
    labels = torch.tensor([[5, 6, 7, x], [x, x, 8, 9], [1, x, x, x]])
    batch = {"labels": labels}
    # Position t predicts token t + 1: the first label of each row never carries loss.
    assert target_count(batch) == 2 + 2 + 0
    assert target_count(batch, ["a", "b", "a"], "a") == 2
    assert target_count(batch, ["a", "b", "a"], "b") == 2


def test_row_and_step_losses_are_summed_cross_entropy_over_the_step_s_targets():
    model = tiny.llama()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    labels = ids.clone()
    labels[1, :2] = IGNORE_INDEX  # the prompt of row 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    logits = model(input_ids=ids).logits.float()
    by_hand = [
        -torch.log_softmax(logits[r, t], -1)[labels[r, t + 1]]
        for r in range(2)
        for t in range(3)
        if labels[r, t + 1] != IGNORE_INDEX
    ]
    rows = row_losses(model, batch)
    torch.testing.assert_close(rows.sum(), torch.stack(by_hand).sum())
    (loss,) = step_loss(model, batch, ["default"] * 2, {"default": 10.0}).values()
    torch.testing.assert_close(loss, rows.sum() / 10.0)


def test_loraplus_gives_b_a_higher_lr():
    from lorakit import LoraConfig

    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, loraplus_ratio=16, data="x"))
    b_ids = {id(p) for n, p in model.named_parameters() if "lora_B" in n}
    for group in optimizer.param_groups:
        is_b = {id(p) in b_ids for p in group["params"]}
        assert len(is_b) == 1
        assert group["lr"] == pytest.approx(1.6e-2 if is_b.pop() else 1e-3)


def test_no_weight_decay_on_biases_and_norms():
    from lorakit import LoraConfig

    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"], bias="all"))
    model.model.norm.weight.requires_grad_(True)
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1, data="x"))
    for group in optimizer.param_groups:
        dims = {p.ndim for p in group["params"]}
        assert group["weight_decay"] == (0.1 if dims == {2} else 0.0)


def _three_steps(model, optimizer) -> dict[str, torch.Tensor]:
    """Three AdamW updates on a fixed batch; the trainable parameters after them."""
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(3):
        row_losses(model, batch).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_fused_optimizer_gives_the_default_loop_s_parameters():
    import copy

    from lorakit import LoraConfig

    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules="all-linear", bias="all"))
    reference = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = TrainConfig(lr=1e-2, weight_decay=0.1, loraplus_ratio=4, data="x")
    optimizer = build_optimizer(model, config)
    assert optimizer.defaults["fused"] is True  # torch has a CPU kernel
    # The same groups, run by torch's per-tensor loop (its CPU default).
    groups = build_optimizer(reference, config).param_groups
    plain = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in groups],
        foreach=False,
        fused=False,
    )
    ours, theirs = _three_steps(model, optimizer), _three_steps(reference, plain)
    assert ours.keys() == theirs.keys() == start.keys()
    for name, param in ours.items():
        assert not torch.equal(param, start[name]), name  # every parameter was updated
        torch.testing.assert_close(param, theirs[name], rtol=1e-6, atol=1e-6, msg=name)


def test_parameters_without_a_fused_kernel_use_foreach():
    from lorakit import LoraConfig

    with torch.device("meta"):  # no fused AdamW kernel on the meta device
        model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = build_optimizer(model, TrainConfig(data="x"))
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
