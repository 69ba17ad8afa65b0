"""Linear layers reading one input as one node (layers/shared_input.py, SharedLoraFunction):
which layers are grouped, and outputs and gradients equal to each layer run alone and to PEFT."""

from __future__ import annotations

import copy

import peft
import pytest
import tiny
import torch
from torch import nn

from lorakit import LoraConfig, add_lora, save_adapter, set_adapter
from lorakit.layers import LoraLinear

IDS = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))


def adapted(dropout: float = 0.0, **extra) -> nn.Module:
    model = tiny.llama()
    config = LoraConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear", init="random")
    add_lora(model, config)
    for name, cfg in extra.items():  # further adapters, all active
        add_lora(model, cfg, name)
    set_adapter(model, ["default", *extra])
    return model.train()


def groups(model: nn.Module) -> list[list[str]]:
    """The shared-input sets, by the layers' paths (in model order)."""
    found: dict[int, list[str]] = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear) and module._shared is not None:
            found.setdefault(id(module._shared), []).append(path.split("layers.")[-1])
    return list(found.values())


def alone(model: nn.Module) -> nn.Module:
    """A copy whose layers each run on their own (the path before shared inputs)."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, LoraLinear):
            module._shared = None
    return copied


def step(model: nn.Module, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, gradient of every trainable tensor) of one forward + backward."""
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def probe(model: nn.Module) -> None:
    """The forward that shows which layers read one tensor, and the next, where the sets
    take effect (between forwards: a step and its recomputation take one path)."""
    step(model)
    with torch.no_grad():
        model(IDS[:, :2])


def assert_same_step(a: nn.Module, b: nn.Module, tol: float = 1e-6) -> None:
    loss_a, grads_a = step(a)
    loss_b, grads_b = step(b)
    torch.testing.assert_close(loss_a, loss_b, atol=tol, rtol=tol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) >= 28  # 2 blocks x 7, A and B
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=tol, rtol=tol)


def test_the_first_forward_splits_candidates_by_the_tensor_they_read():
    model = adapted()
    # Before: every projection of a block with the hidden size as input is a candidate,
    # o_proj included (its input, heads x head_dim, has the same size as q's); the forward
    # that shows the inputs leaves the sets as they were until the next forward.
    attention = ["0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj"]
    step(model)
    assert groups(model)[0] == [*attention, "0.self_attn.o_proj"]
    with torch.no_grad():
        model(IDS[:, :2])
    assert groups(model) == [
        attention,
        ["0.mlp.gate_proj", "0.mlp.up_proj"],
        ["1.self_attn.q_proj", "1.self_attn.k_proj", "1.self_attn.v_proj"],
        ["1.mlp.gate_proj", "1.mlp.up_proj"],
    ]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_a_step_equals_each_layer_alone(dropout: float):
    model = adapted(dropout)
    probe(model)
    assert_same_step(model, alone(model))


def test_several_adapters_of_different_ranks_share_one_node():
    model = adapted(second=LoraConfig(r=2, alpha=3, target_modules=["q_proj", "k_proj"]))
    probe(model)
    assert ["0.self_attn.q_proj", "0.self_attn.k_proj", "0.self_attn.v_proj"] in groups(model)
    assert_same_step(model, alone(model))


def test_gradient_checkpointing_recomputes_the_shared_node():
    model = adapted()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    probe(model)
    reference = alone(model)
    assert_same_step(model, reference)


def test_inference_without_grad_equals_each_layer_alone():
    model = adapted().eval()
    with torch.no_grad():
        model(IDS)  # the probe
        model(IDS)
        torch.testing.assert_close(model(IDS).logits, alone(model)(IDS).logits, atol=1e-6, rtol=0)


def test_outputs_are_not_views_so_model_code_may_add_in_place():
    model = adapted()
    probe(model)
    attention = model.model.layers[0].self_attn
    hidden = torch.randn(2, 5, 32, requires_grad=True)
    q = attention.q_proj(hidden)
    k = attention.k_proj(hidden)
    k.add_(1.0)  # Llama-4's MoE adds to a projection's output in place
    (q.sum() + k.sum()).backward()
    reference = alone(model).model.layers[0].self_attn
    hidden_ref = hidden.detach().clone().requires_grad_(True)
    (reference.q_proj(hidden_ref).sum() + reference.k_proj(hidden_ref).sum()).backward()
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, atol=1e-6, rtol=0)


def test_a_member_that_cannot_share_runs_alone_and_so_do_its_siblings():
    model = adapted()
    probe(model)
    attention = model.model.layers[0].self_attn
    attention.k_proj.base_layer.register_forward_hook(lambda *_: None)  # a hook: generic path
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = [alone(model).model.layers[0].self_attn.v_proj(hidden)]
        assert attention.q_proj._shared.output(attention.q_proj, hidden) is None
        torch.testing.assert_close(attention.v_proj(hidden), expected[0], atol=1e-6, rtol=0)


def test_another_input_for_one_member_is_computed_for_it():
    model = adapted()
    probe(model)
    attention = model.model.layers[0].self_attn
    a, b = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    reference = alone(model).model.layers[0].self_attn
    with torch.no_grad():
        attention.q_proj(a)  # k's output for a is kept ...
        torch.testing.assert_close(attention.k_proj(b), reference.k_proj(b), atol=1e-6, rtol=0)
        # ... and not handed out for b: v of a still comes from the node for a
        torch.testing.assert_close(attention.v_proj(a), reference.v_proj(a), atol=1e-6, rtol=0)


def test_adding_an_adapter_makes_the_sets_anew():
    model = adapted()
    probe(model)
    add_lora(model, LoraConfig(r=2, target_modules=["o_proj"]), "other")
    assert len(groups(model)[0]) == 4  # candidates again, until the next forward shows them
    probe(model)
    assert len(groups(model)) == 4


def test_a_training_step_equals_peft(tmp_path):
    model = adapted()
    probe(model)
    save_adapter(model, tmp_path)
    base = tiny.llama().train()
    reference = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True).train()
    loss, grads = step(model)
    loss_peft, grads_peft = step(reference)
    torch.testing.assert_close(loss, loss_peft, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        peft_name = "base_model.model." + name.replace(".lora_A.", ".lora_A.").replace(
            "lora_A.default", "lora_A.default.weight"
        ).replace("lora_B.default", "lora_B.default.weight")
        torch.testing.assert_close(grad, grads_peft[peft_name], atol=1e-5, rtol=1e-5)
