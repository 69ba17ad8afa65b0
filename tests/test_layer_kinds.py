"""The layer kinds added with the registry, each against its formula computed by hand:
DoRA (Linear, GPT-2 Conv1D, Embedding, Conv), lora_bias, MultiheadAttention, trainable
tokens, attribute pass-through, and the registry itself."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import (
    LoraConfig,
    LoraError,
    add_lora,
    load_adapter,
    merge,
    save_adapter,
    unload,
    unmerge,
)
from lorakit.layers import (
    LoraConv,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    LoraMultiheadAttention,
    TrainableTokens,
    layer_class_for,
    register,
)
from lorakit.layers.registry import _LAYERS

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _randomize(layer: LoraLayer, name: str = "a", seed: int = 0) -> None:
    """B, biases and DoRA's magnitude away from their identity start."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def _dora_expected(W: torch.Tensor, delta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """m ⊙ (W + ΔW) / ‖W + ΔW‖, rows of the (out, in) matrices."""
    adapted = W + delta
    return m[:, None] * adapted / adapted.norm(dim=1, keepdim=True)


def test_dora_linear_matches_the_paper_formula_and_starts_at_identity():
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, scale=0.5, use_dora=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer.lora_magnitude["a"], base.weight.norm(dim=1))
    torch.testing.assert_close(layer(x), base(x), **TOL)  # m = ‖W‖ and B = 0: unchanged
    _randomize(layer)
    A, B, m = layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude["a"]
    weight = _dora_expected(base.weight, 0.5 * B @ A, m)
    expected = x @ weight.T + base.bias
    torch.testing.assert_close(layer(x), expected, **TOL)  # fused path
    with torch.no_grad():  # the inference branch of the fused path
        torch.testing.assert_close(layer(x), expected, **TOL)
    layer.base_layer.weight.requires_grad_(True)  # forces the generic path
    torch.testing.assert_close(layer(x), expected, **TOL)


def test_dora_gradient_reaches_magnitude_but_not_through_the_norm():
    torch.manual_seed(0)
    base = nn.Linear(5, 3).requires_grad_(False)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, scale=1.0, use_dora=True)
    _randomize(layer)
    x = torch.randn(4, 5)
    layer(x).sum().backward()
    A, B, m = (t.detach().clone().requires_grad_(True) for t in layer.adapter_parameters("a"))
    # Reference: the norm as a constant (detached), as in the paper and PEFT.
    norm = (base.weight + B.detach() @ A.detach()).norm(dim=1)
    ((x @ (base.weight + B @ A).T) * (m / norm) + base.bias).sum().backward()
    for got, ref in zip(layer.adapter_parameters("a"), (A, B, m), strict=True):
        torch.testing.assert_close(got.grad, ref.grad, **TOL)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Linear(6, 4),
        lambda: Conv1D(4, 6),
        lambda: nn.Embedding(10, 4),
        lambda: nn.Conv2d(3, 4, 3, padding=1),
        lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    ],
    ids=["linear", "gpt2-conv1d", "embedding", "conv2d", "grouped-conv2d"],
)
def test_dora_merge_is_exact_and_unmerge_restores(make):
    torch.manual_seed(0)
    base = make()
    layer = layer_class_for(base)(base)
    layer.add_adapter("a", r=2, scale=0.7, use_dora=True)
    _randomize(layer)
    x = (
        torch.randint(0, 10, (3, 5))
        if isinstance(base, nn.Embedding)
        else torch.randn(2, 6)
        if not isinstance(base, nn.Conv2d)
        else torch.randn(2, base.in_channels, 5, 5)
    )
    w0 = layer.base_weight.detach().clone()
    before = layer(x)
    weight, bias = layer.merged_weight("a")
    layer.merge("a", weight, bias)
    torch.testing.assert_close(layer(x), before, **TOL)
    torch.testing.assert_close(layer.base_layer(x), before, **TOL)
    layer.unmerge("a")
    torch.testing.assert_close(layer.base_weight, w0, **TOL)


def test_dora_embedding_scales_each_dimension():
    torch.manual_seed(0)
    base = nn.Embedding(10, 4)
    layer = LoraEmbedding(base)
    layer.add_adapter("a", r=2, scale=0.5, use_dora=True)
    _randomize(layer)
    ids = torch.tensor([[1, 7, 3]])
    # (dim, num) matrix: m per embedding dimension, the norm taken over the vocabulary.
    A, B, m = layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude["a"]
    weight = _dora_expected(base.weight.T, 0.5 * B @ A, m).T  # (num, dim)
    torch.testing.assert_close(layer(ids), weight[ids], **TOL)


def test_dora_conv_matches_formula():
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1)
    layer = LoraConv(base)
    layer.add_adapter("a", r=2, scale=0.5, use_dora=True)
    _randomize(layer)
    A, B, m = layer.lora_A["a"], layer.lora_B["a"], layer.lora_magnitude["a"]
    assert m.shape == (1, 4, 1, 1)  # PEFT's layout
    delta = 0.5 * B.flatten(1) @ A.flatten(1)
    weight = _dora_expected(base.weight.flatten(1), delta, m.flatten()).view_as(base.weight)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(layer(x), F.conv2d(x, weight, base.bias, padding=1), **TOL)


def test_lora_bias_adds_scaled_bias_and_merges_into_the_base_bias():
    torch.manual_seed(0)
    base = nn.Linear(5, 3)
    layer = LoraLinear(base)
    layer.add_adapter("a", r=2, scale=0.25, lora_bias=True)
    _randomize(layer)
    A, B, b = layer.lora_A["a"], layer.lora_B["a"], layer.lora_bias["a"]
    x = torch.randn(4, 5)
    expected = base(x) + 0.25 * (x @ A.T @ B.T + b)
    torch.testing.assert_close(layer(x), expected, **TOL)
    bias0 = base.bias.detach().clone()
    layer.merge("a", *layer.merged_weight("a"))
    torch.testing.assert_close(base.bias, bias0 + 0.25 * b.detach(), **TOL)
    torch.testing.assert_close(base(x), expected, **TOL)


def test_lora_bias_on_a_layer_without_bias_refuses_to_merge():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    add_lora(model, LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    with pytest.raises(LoraError, match="lora_bias needs a base layer with a bias"):
        merge(model)


def test_dora_with_lora_bias_or_on_attention_is_refused_by_name():
    with pytest.raises(LoraError, match="lora_bias=True is not supported with use_dora"):
        LoraConfig(target_modules=["x"], use_dora=True, lora_bias=True)
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2)})
    with pytest.raises(LoraError, match="use_dora is not supported by LoraMultiheadAttention"):
        add_lora(model, LoraConfig(r=2, target_modules=["mha"], use_dora=True))


def test_multihead_attention_is_attention_with_both_projections_adapted():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    reference = nn.MultiheadAttention(8, 2).eval()
    reference.load_state_dict(mha.state_dict())
    model = nn.ModuleDict({"mha": mha})
    add_lora(model, LoraConfig(r=2, alpha=4, target_modules=["mha"]))
    layer = model["mha"]
    assert isinstance(layer, LoraMultiheadAttention) and isinstance(layer.out_proj, LoraLinear)
    for wrapper in (layer, layer.out_proj):
        _randomize(wrapper, "default")
    x = torch.randn(5, 1, 8)
    with torch.no_grad():
        reference.in_proj_weight += 2 * layer.lora_B["default"] @ layer.lora_A["default"]
        out = layer.out_proj
        reference.out_proj.weight += 2 * out.lora_B["default"] @ out.lora_A["default"]
    expected = reference(x, x, x)[0]
    torch.testing.assert_close(layer(x, x, x)[0], expected, **TOL)
    merge(model)
    torch.testing.assert_close(layer(x, x, x)[0], expected, **TOL)
    unload(model)
    assert type(model["mha"]) is nn.MultiheadAttention
    assert type(model["mha"].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    torch.testing.assert_close(model["mha"](x, x, x)[0], expected, **TOL)


def test_attention_children_are_not_separate_targets():
    model = nn.ModuleDict({"mha": nn.MultiheadAttention(8, 2)})
    with pytest.raises(LoraError, match="'out_proj' matched no module"):
        add_lora(model, LoraConfig(r=2, target_modules=["out_proj"]))


def test_trainable_tokens_replace_only_their_rows():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4)})
    original = model["emb"].weight.detach().clone()
    add_lora(model, LoraConfig(trainable_token_indices={"emb": [2, 5]}))
    layer = model["emb"]
    assert isinstance(layer, TrainableTokens)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "emb.token_values.default"
    ]
    with torch.no_grad():
        layer.token_values["default"].copy_(torch.ones(2, 4))
    ids = torch.tensor([[2, 3, 5]])
    expected = torch.stack([torch.ones(4), original[3], torch.ones(4)])[None]
    torch.testing.assert_close(layer(ids), expected)
    merge(model)
    torch.testing.assert_close(layer.base_weight[[2, 5]], torch.ones(2, 4))
    unmerge(model)
    torch.testing.assert_close(layer.base_weight, original)


def test_trainable_tokens_on_a_tied_embedding_is_refused():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    with pytest.raises(LoraError, match="tied to another module"):
        add_lora(model, LoraConfig(trainable_token_indices={"emb": [1]}))


def test_wrappers_pass_attributes_through_to_the_wrapped_layer():
    model = nn.ModuleDict({"lin": nn.Linear(4, 3), "conv": nn.Conv2d(2, 4, 3)})
    add_lora(model, LoraConfig(r=2, target_modules=["lin", "conv"]))
    assert model["lin"].weight is model["lin"].base_layer.weight
    assert model["conv"].kernel_size == (3, 3) and model["conv"].bias is not None
    with pytest.raises(AttributeError):
        _ = model["lin"].no_such_attribute


class Dense(nn.Module):
    """A module lorakit has never heard of: y = x Wᵀ, W stored as ``kernel`` (out, in)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.kernel.T


class LoraDense(LoraLayer):
    """A new layer kind: the class and its registration are all it takes."""

    @classmethod
    def weight_shape(cls, module: nn.Module, **options) -> tuple[int, ...]:
        return tuple(module.kernel.shape)

    @classmethod
    def matrix_shape(cls, module: nn.Module, **options) -> tuple[int, int]:
        return tuple(module.kernel.shape)

    @property
    def base_weight(self) -> nn.Parameter:
        return self.base_layer.kernel

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.scale[name] * self.lora_B[name] @ self.lora_A[name]

    def lora_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.scale[name] * self._dropped(name, x) @ self.lora_A[name].T @ self.lora_B[name].T


def test_a_new_layer_kind_needs_only_its_class_and_registration(tmp_path):
    class MyLinear(nn.Linear):
        pass

    assert layer_class_for(MyLinear(2, 2)) is LoraLinear  # inherited registration
    assert layer_class_for(Conv1D(2, 2)) is LoraLinear  # registered by dotted name
    assert layer_class_for(Dense(2, 2)) is None
    register(Dense)(LoraDense)
    try:
        torch.manual_seed(0)
        model = nn.ModuleDict({"dense": Dense(5, 3)})
        x = torch.randn(4, 5)
        add_lora(model, LoraConfig(r=2, alpha=4, target_modules=["dense"]))
        layer = model["dense"]
        _randomize(layer, "default")
        A, B = layer.lora_A["default"], layer.lora_B["default"]
        expected = x @ (layer.base_layer.kernel + 2 * B @ A).T
        torch.testing.assert_close(layer(x), expected, **TOL)
        save_adapter(model, tmp_path)  # PEFT's names come from the base class
        fresh = nn.ModuleDict({"dense": Dense(5, 3)})
        fresh["dense"].load_state_dict(layer.base_layer.state_dict())
        load_adapter(fresh, tmp_path)
        torch.testing.assert_close(fresh["dense"](x), expected, **TOL)
        unload(fresh)  # merges through the base class
        assert type(fresh["dense"]) is Dense
        torch.testing.assert_close(fresh["dense"](x), expected, **TOL)
    finally:
        _LAYERS.pop(Dense, None)


def test_rank_above_min_round_trips_its_warning_and_layout():
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(20, 2)})
    with pytest.warns(UserWarning, match=r"rank 8 exceeds min\(in, out\) = 2"):
        add_lora(model, LoraConfig(r=8, target_modules=["lin"]))
    assert model["lin"].lora_B["default"].shape == (2, 8)
