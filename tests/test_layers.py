"""Each LoRA wrapper against the formula y = base(x) + scale · B A x computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, LoraError, add_lora
from lorakit.layers import (
    LoraConv,
    LoraEmbedding,
    LoraFused,
    LoraLinear,
    LoraParameter,
    ModulesToSave,
    TrainableTokens,
    iter_adapter_modules,
    lora_delta,
    unwrap,
)


def _fill(layer, name="a", seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=gen))
    return layer.lora_A[name].detach(), layer.lora_B[name].detach()


def test_lora_delta_is_scaled_product_in_fp32():
    B = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.5, -1.0]], dtype=torch.float16)
    A = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 1.0, 1.0, 0.0]], dtype=torch.float16)
    delta = lora_delta(B, A, 0.5)
    assert delta.dtype == torch.float32
    expected = (
        torch.tensor([[1.0, 2.0, 1.0, 2.0], [3.0, 4.0, 1.0, 6.0], [0.5, -1.0, -1.5, 1.0]]) * 0.5
    )
    torch.testing.assert_close(delta, expected)


def test_linear_starts_as_identity_and_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, scale=4 / 2)
    x = torch.randn(3, 4, 6)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: unchanged
    A, B = _fill(layer)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.base_layer is base
    torch.testing.assert_close(layer.delta_weight("a"), 2.0 * B @ A)


def test_kaiming_bound_and_gaussian_std():
    layer = LoraLinear(nn.Linear(400, 8))
    layer.add_adapter("k", r=4, scale=1.0)
    assert layer.lora_A["k"].abs().max() <= 1 / math.sqrt(400)
    assert layer.lora_A["k"].abs().max() > 0.8 / math.sqrt(400)
    layer.add_adapter("g", r=4, scale=1.0, init="gaussian")
    assert abs(layer.lora_A["g"].std().item() - 1 / 4) < 0.02
    assert torch.count_nonzero(layer.lora_B["g"]) == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoraLinear(nn.Linear(40, 8)),
        lambda: LoraParameter(Experts(False), parameter="weight"),
    ],
)
def test_nora_is_the_kaiming_draw_with_unit_columns(make):
    layer = make()
    torch.manual_seed(3)
    layer.add_adapter("k", r=4, scale=1.0)
    torch.manual_seed(3)
    layer.add_adapter("n", r=4, scale=1.0, init="nora")
    kaiming, nora = layer.lora_A["k"], layer.lora_A["n"]  # (r, in) or (experts, r, in)
    torch.testing.assert_close(nora, kaiming / kaiming.norm(dim=-2, keepdim=True))
    torch.testing.assert_close(nora.norm(dim=-2), torch.ones(nora.shape[:-2] + nora.shape[-1:]))
    assert torch.count_nonzero(layer.lora_B["n"]) == 0


def test_nora_on_a_layer_whose_a_has_no_columns_is_refused_by_name():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 4)})
    with pytest.raises(LoraError, match="emb: init='nora' needs a Linear"):
        add_lora(model, LoraConfig(r=2, init="nora", target_modules=["emb", "lin"]))
    assert type(model["lin"]) is nn.Linear  # nothing was changed


def test_gpt2_conv1d_uses_transposed_weight():
    torch.manual_seed(0)
    base = Conv1D(9, 4)  # weight (in=4, out=9)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, scale=1.5)
    A, B = _fill(layer)
    x = torch.randn(2, 4)
    expected = x @ base.weight + base.bias + 1.5 * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert layer.delta_weight("a").shape == base.weight.shape
    torch.testing.assert_close(layer.delta_weight("a"), (1.5 * B @ A).T)


def test_embedding_is_a_lookup_of_A_columns():
    torch.manual_seed(0)
    base = nn.Embedding(10, 6, padding_idx=0)
    layer = LoraEmbedding(base)
    layer.add_adapter("a", r=3, scale=2.0)
    ids = torch.tensor([[0, 3, 9], [1, 1, 4]])
    torch.testing.assert_close(layer(ids), base(ids), rtol=0, atol=0)
    A, B = _fill(layer)
    one_hot = F.one_hot(ids, 10).float()
    expected = base.weight[ids] + 2.0 * (one_hot @ A.T) @ B.T
    torch.testing.assert_close(layer(ids), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight("a"), (2.0 * B @ A).T)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, (3, 2), stride=2, padding=1, dilation=(1, 2)),
        nn.Conv3d(2, 4, 2, stride=1),
        nn.Conv2d(3, 6, 1),
    ],
    ids=["conv1d", "conv2d-strided-dilated", "conv3d", "conv2d-1x1"],
)
def test_conv_matches_merged_weight_convolution(conv):
    torch.manual_seed(0)
    layer = LoraConv(conv)
    layer.add_adapter("a", r=2, scale=0.5)
    x = torch.randn(2, conv.in_channels, *([7] * (conv.weight.dim() - 2)))
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)
    A, B = _fill(layer)
    # By hand: ΔW[o, i, k] = 0.5 · Σ_r B[o, r] A[r, i, k]; the adapted layer is conv with W + ΔW.
    delta = 0.5 * torch.einsum("or,rik->oik", B.flatten(1), A.flatten(2)).reshape(conv.weight.shape)
    torch.testing.assert_close(layer.delta_weight("a"), delta)
    functional = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[conv.weight.dim() - 2]
    expected = functional(
        x, conv.weight + delta, conv.bias, conv.stride, conv.padding, conv.dilation
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_grouped_conv_block_a_is_block_diagonal_and_merges():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    layer = LoraConv(conv)
    layer.add_adapter("a", r=4, scale=0.5)
    A, B = _fill(layer)
    assert A.shape == (4, 2, 3, 3) and B.shape == (6, 2, 1, 1)  # A grouped like the base
    x = torch.randn(1, 4, 5, 5)
    # By hand, group j: out channels 3j..3j+2 see in channels 2j, 2j+1 through hidden 2j, 2j+1.
    delta = torch.zeros_like(conv.weight)
    for j in range(2):
        Bj, Aj = B[3 * j : 3 * j + 3].flatten(1), A[2 * j : 2 * j + 2].flatten(1)
        delta[3 * j : 3 * j + 3] = 0.5 * (Bj @ Aj).view(3, 2, 3, 3)
    torch.testing.assert_close(layer.delta_weight("a"), delta)
    expected = F.conv2d(x, conv.weight + delta, conv.bias, padding=1, groups=2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # In PEFT's layout A is dense with zeros off the blocks; PEFT's forward gives the same.
    peft_A = layer.peft_tensors("a")["lora_A.weight"]
    assert peft_A.shape == (4, 4, 3, 3) and not peft_A[:2, 2:].any() and not peft_A[2:, :2].any()
    peft_out = conv(x) + 0.5 * F.conv2d(F.conv2d(x, peft_A, padding=1), B, groups=2)
    torch.testing.assert_close(peft_out, expected, rtol=1e-5, atol=1e-5)


def test_grouped_conv_dense_peft_a_runs_but_refuses_to_merge():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    layer = LoraConv(conv)
    layer.add_adapter("a", r=2, scale=1.0)
    dense_A, B = torch.randn(2, 4, 3, 3), torch.randn(6, 1, 1, 1)
    layer.load_peft_tensors("a", {"lora_A.weight": dense_A, "lora_B.weight": B})
    x = torch.randn(1, 4, 5, 5)
    expected = conv(x) + F.conv2d(F.conv2d(x, dense_A, padding=1), B, groups=2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(LoraError, match="mixes channels across groups"):
        layer.delta_weight("a")


@pytest.mark.parametrize("base", [nn.Linear(5, 9), Conv1D(9, 5)], ids=["linear", "gpt2-conv1d"])
def test_fused_slices_adapt_only_enabled_slices(base):
    torch.manual_seed(0)
    layer = LoraFused(base, slices=[True, False, True])
    layer.add_adapter("a", r=2, scale=3.0)
    A, B = _fill(layer)  # A (2, 2, 5), B (2, 3, 2)
    x = torch.randn(4, 5)
    out = layer(x) - base(x)
    q = 3.0 * x @ A[0].T @ B[0].T
    v = 3.0 * x @ A[1].T @ B[1].T
    torch.testing.assert_close(
        out, torch.cat([q, torch.zeros(4, 3), v], dim=-1), rtol=1e-5, atol=1e-5
    )
    delta = layer.delta_weight("a")
    assert delta.shape == base.weight.shape
    dense = delta.T if isinstance(base, Conv1D) else delta  # (out, in)
    torch.testing.assert_close(x @ dense.T, out, rtol=1e-5, atol=1e-5)


class Experts(nn.Module):
    def __init__(self, transposed=False):
        super().__init__()
        shape = (3, 5, 4) if transposed else (3, 4, 5)  # (E, in, out) or (E, out, in)
        self.is_transposed = transposed
        self.weight = nn.Parameter(torch.randn(shape))
        self.dense = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):  # x (E, T, in)
        w = self.weight if self.is_transposed else self.weight.transpose(1, 2)
        return torch.bmm(x, w) @ self.dense.T


@pytest.mark.parametrize("transposed", [False, True])
def test_parameter_3d_one_pair_per_expert(transposed):
    torch.manual_seed(0)
    experts = Experts(transposed)
    layer = LoraParameter(experts, parameter="weight")
    layer.add_adapter("a", r=2, scale=0.5)
    assert layer.lora_A["a"].shape == (3, 2, 5) and layer.lora_B["a"].shape == (3, 4, 2)
    A, B = _fill(layer)
    x = torch.randn(3, 7, 5)
    per_expert = torch.stack([0.5 * B[e] @ A[e] for e in range(3)])  # (E, out=4, in=5)
    expected = (
        torch.bmm(
            x,
            (experts.weight.transpose(1, 2) if not transposed else experts.weight)
            + per_expert.transpose(1, 2),
        )
        @ experts.dense.T
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # The module's own parameter is untouched: the adapted weight only exists during forward.
    assert layer.base_weight is experts.weight


def test_nested_parameter_wrappers_adapt_both():
    torch.manual_seed(0)
    experts = Experts()
    inner = LoraParameter(experts, parameter="weight")
    inner.add_adapter("a", r=2, scale=1.0)
    outer = LoraParameter(inner, parameter="dense")
    outer.add_adapter("a", r=2, scale=1.0)
    A1, B1 = _fill(inner, seed=1)
    A2, B2 = _fill(outer, seed=2)
    x = torch.randn(3, 2, 5)
    w = experts.weight + torch.stack([B1[e] @ A1[e] for e in range(3)])
    expected = torch.bmm(x, w.transpose(1, 2)) @ (experts.dense + B2 @ A2).T
    torch.testing.assert_close(outer(x), expected, rtol=1e-5, atol=1e-5)


def test_parameter_rejects_dropout():
    model = nn.ModuleDict({"experts": Experts()})
    with pytest.raises(LoraError, match="dropout=0.1 is not defined for LoraParameter"):
        add_lora(model, LoraConfig(target_parameters=["experts.weight"], dropout=0.1))
    assert not isinstance(model["experts"], LoraParameter)


def test_dropout_applies_in_training_only():
    torch.manual_seed(0)
    base = nn.Linear(50, 50)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=4, scale=1.0, dropout=0.5)
    A, B = _fill(layer)
    x = torch.ones(1, 50)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + (x @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    kept = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(y, base(x) + (kept @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, base(x) + (x @ A.T) @ B.T)


def test_half_precision_base_trains_fp32_adapters():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, scale=1.0)
    assert layer.lora_A["a"].dtype == torch.float32
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


# --- the wrapper contract: what io, inject, merge and export ask of every wrapper ---------------
WRAPPERS = {  # kind -> (its base module, add_adapter's settings, its extras)
    "lora": (LoraLinear, lambda: nn.Linear(6, 4), {"r": 2, "scale": 0.5}, []),
    "dora": (
        LoraLinear,
        lambda: nn.Linear(6, 4),
        {"r": 2, "scale": 0.5, "use_dora": True},
        ["use_dora"],
    ),
    "copy": (ModulesToSave, lambda: nn.Linear(6, 4), {}, ["modules_to_save"]),
    "tokens": (
        TrainableTokens,
        lambda: nn.Embedding(10, 3),
        {"indices": [1, 7]},
        ["trainable_token_indices"],
    ),
}


@pytest.mark.parametrize("kind", WRAPPERS)
def test_each_wrapper_is_what_its_class_predicts_before_wrapping(kind):
    """The plan's class methods (asked before anything is wrapped) agree with the wrapper
    built from the same settings: PEFT tensor names and shapes, trainable size, fingerprint."""
    cls, make, settings, extras = WRAPPERS[kind]
    base = make()
    shapes = cls.peft_shapes(base, settings)
    count = cls.trainable_count(base, settings)
    wrapper = cls(base)
    assert cls.existing(base) is None and cls.existing(wrapper) is wrapper
    wrapper.add_adapter("a", **settings)
    tensors = wrapper.peft_tensors("a")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    trained = [p for p in wrapper.adapter_parameters("a") if p.dim() > 1 or not cls.is_lora]
    assert sum(p.numel() for p in trained) == count  # a LoRA's count is A and B, as PEFT's
    assert wrapper.extras("a") == extras
    assert (wrapper.base_shape() is None) == cls.whole_copy
    assert wrapper.adapter_names() == ["a"] and wrapper.active == ["a"]
    wrapper.set_active([])
    assert wrapper.active == [] and unwrap(wrapper) is base


@pytest.mark.parametrize("kind", WRAPPERS)
def test_each_wrapper_loads_what_it_saves_and_unloads_to_its_base(kind):
    cls, make, settings, _ = WRAPPERS[kind]
    model = nn.Sequential(make())
    base = model[0]
    model[0] = wrapper = cls(base)
    wrapper.add_adapter("a", **settings)
    gen = torch.Generator().manual_seed(0)
    new = {k: torch.randn(v.shape, generator=gen) for k, v in wrapper.peft_tensors("a").items()}
    wrapper.load_peft_tensors("a", new)
    for key, value in wrapper.peft_tensors("a").items():
        torch.testing.assert_close(value.detach(), new[key], rtol=0, atol=0)
    assert [p for p, _ in iter_adapter_modules(model)] == ["0"]
    assert wrapper.unloaded(merge=False) is base
