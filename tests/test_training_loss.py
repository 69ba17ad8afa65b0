"""The chunked cross-entropy: equal to the plain loss over full logits, and only where exact."""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lorakit import LoraConfig, add_lora
from lorakit.data import IGNORE_INDEX
from lorakit.errors import LoraError
from lorakit.training.config import TrainConfig
from lorakit.training.loss import (
    DEFAULT_CHUNK_TOKENS,
    chunk_size,
    chunked_cross_entropy,
    chunked_problem,
)
from lorakit.training.step import evaluate_loss, row_losses

X = IGNORE_INDEX


def _adapted(tie: bool = False, **lora) -> torch.nn.Module:
    """A tiny Llama with LoRA on every projection and random B (so A gets gradients too)."""
    model = tiny.llama(tie=tie, vocab=61)  # 61: no chunk or power of two divides it
    add_lora(model, LoraConfig(r=4, target_modules="all-linear", **lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model.train()


def _padded_batch() -> dict[str, torch.Tensor]:
    """Three rows of lengths 9, 6 and 4, right-padded, prompts masked: 8 + 3 + 2 targets."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 61, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, X)
    labels[1, :2] = X  # a prompt
    labels[2, :1] = X
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model: torch.nn.Module, batch: dict, chunk: int | None):
    """Per-row losses, d(sum)/d(final hidden states) and d(sum)/d(each LoRA parameter)."""
    kept = {}

    def keep(_module, _args, output):
        output.retain_grad()
        kept["hidden"] = output

    hook = model.model.norm.register_forward_hook(keep)
    try:
        rows = row_losses(model, batch, chunk)
        model.zero_grad(set_to_none=True)
        (rows * torch.tensor([1.0, 0.5, 2.0])).sum().backward()  # rows weighted unequally
    finally:
        hook.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return rows.detach(), kept["hidden"].grad.clone(), grads


def test_chunked_cross_entropy_equals_f_cross_entropy_on_random_tensors():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 8, generator=gen, requires_grad=True)
    weight, bias = torch.randn(37, 8, generator=gen), torch.randn(37, generator=gen)
    labels = torch.randint(0, 37, (23,), generator=gen)
    labels[[0, 5, 6, 22]] = X
    grad_out = torch.rand(23, generator=gen)
    ours = chunked_cross_entropy(hidden, weight, bias, labels, chunk_tokens=4)  # 19 = 4*4 + 3
    (g_ours,) = torch.autograd.grad(ours, hidden, grad_out)
    plain = F.cross_entropy(F.linear(hidden, weight, bias), labels, reduction="none")
    (g_plain,) = torch.autograd.grad(plain, hidden, grad_out)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-5, atol=1e-6)
    assert ours[[0, 5, 6, 22]].eq(0).all() and g_ours[[0, 5, 6, 22]].eq(0).all()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [5, None])  # 13 targets: 5 does not divide; None: auto
def test_chunked_loss_and_gradients_equal_the_plain_loss_on_a_tiny_llama(tie, chunk):
    model, batch = _adapted(tie=tie), _padded_batch()
    assert chunk_size(model, chunk) == (chunk or DEFAULT_CHUNK_TOKENS)
    plain_rows, plain_hidden, plain_grads = _loss_and_grads(model, batch, 0)
    rows, hidden, grads = _loss_and_grads(model, batch, chunk)
    torch.testing.assert_close(rows, plain_rows, rtol=1e-5, atol=0)
    torch.testing.assert_close(hidden, plain_hidden, rtol=1e-5, atol=1e-6)
    assert plain_hidden[1, 6:].abs().sum() == 0  # padding carries no gradient
    assert grads.keys() == plain_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert "forward" not in vars(model.lm_head)  # the head computes logits again
    logits = model(input_ids=batch["input_ids"]).logits
    assert logits.shape == (3, 9, 61)


def test_the_chunked_loss_never_holds_more_than_one_chunk_of_logits():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen)
    labels = torch.randint(0, 50, (40,), generator=gen)

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor):
                    Largest.numel = max(Largest.numel, tensor.numel())
            return out

    with Largest():
        chunked_cross_entropy(hidden, weight, None, labels, chunk_tokens=8).sum().backward()
    assert Largest.numel == 8 * 50  # one (chunk, V) block; the full logits would be 40 * 50
    with Largest():
        F.cross_entropy(hidden @ weight.T, labels).backward()
    assert Largest.numel == 40 * 50  # the same probe sees the plain loss's logits


def test_evaluate_loss_is_the_same_with_either_loss():
    from lorakit.data import EncodedDataset

    model, batch = _adapted(), _padded_batch()
    keep = [m.bool() for m in batch["attention_mask"]]
    ids = [row[k].tolist() for row, k in zip(batch["input_ids"], keep, strict=True)]
    labels = [row[k].tolist() for row, k in zip(batch["labels"], keep, strict=True)]
    dataset = EncodedDataset(ids, labels, seq_len=9, examples=3)
    plain = evaluate_loss(model, dataset, 2, pad_id=0, chunk_tokens=0)
    chunked = evaluate_loss(model, dataset, 2, pad_id=0, chunk_tokens=3)
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert model.training  # put back in training mode


@pytest.mark.parametrize(
    ("adapt", "why"),
    [
        (lambda m: add_lora(m, LoraConfig(r=2, target_modules=["lm_head"])), "LoraLinear"),
        (
            lambda m: add_lora(
                m, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
            ),
            "ModulesToSave",
        ),
        (lambda m: m.lm_head.weight.requires_grad_(True), "trainable"),
        (lambda m: m.lm_head.register_forward_hook(lambda *a: None), "hooks"),
    ],
)
def test_a_head_that_is_not_frozen_and_plain_takes_the_plain_loss_or_is_refused(adapt, why):
    model = tiny.llama(vocab=61).requires_grad_(False)  # frozen, as add_lora leaves a base
    adapt(model)
    assert why in chunked_problem(model)
    assert chunk_size(model, None) == 0  # automatic: the plain loss
    with pytest.raises(LoraError, match=rf"loss_chunk_tokens 64.*{why}.*loss-chunk-tokens 0"):
        chunk_size(model, 64)
    batch = _padded_batch()
    with pytest.raises(LoraError, match="loss_chunk_tokens 64"):
        row_losses(model, batch, 64)


def test_gemma2_softcapped_logits_fall_back_to_the_plain_loss():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        final_logit_softcapping=3.0,  # small, so the softcap really changes these logits
    )
    model = Gemma2ForCausalLM(config)
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert "final_logit_softcapping=3.0" in chunked_problem(model)
    batch = _padded_batch()
    auto = row_losses(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.abs().max() < 3.0  # softcapped: a chunked loss from head(hidden) would differ
    by_hand = F.cross_entropy(
        logits[:, :-1].reshape(-1, 61), batch["labels"][:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(auto, by_hand.view(3, 8).sum(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(LoraError, match="gemma2 post-processes its logits"):
        row_losses(model, batch, 16)


def test_logits_changed_after_the_head_without_a_config_attribute_are_caught():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    model = Scaled(tiny.llama(vocab=61).config).requires_grad_(False)
    assert chunked_problem(model) is None  # nothing in its config says so
    with pytest.raises(LoraError, match="Scaled changes what its head returns"):
        row_losses(model, _padded_batch())
    assert "forward" not in vars(model.lm_head)  # restored after the error too
    assert model(input_ids=torch.tensor([[1, 2]])).logits.shape == (1, 2, 61)


def test_loss_chunk_tokens_setting_is_validated():
    assert TrainConfig(data="x").loss_chunk_tokens is None
    assert TrainConfig(data="x", loss_chunk_tokens="512").loss_chunk_tokens == 512
    with pytest.raises(LoraError, match="loss_chunk_tokens must be 0 or more, got -1"):
        TrainConfig(data="x", loss_chunk_tokens=-1)
    with pytest.raises(LoraError, match="loss_chunk_tokens must be an integer"):
        TrainConfig(data="x", loss_chunk_tokens="auto")
