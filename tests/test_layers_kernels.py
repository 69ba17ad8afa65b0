"""The fused LoRA paths against the plain formulas.

``LoraLinearFunction``: every case compares the output and the gradients of x, every A and B,
and the bias when it trains, with y = x Wᵀ + b + Σᵢ sᵢ (dᵢ(x) Aᵢᵀ) Bᵢᵀ computed by hand, at
1e-5 in fp32. ``GroupedLoraFunction`` (routed experts): per expert group, y = x Wₑ +
Σᵢ sᵢ (x Pᵢₑ) Qᵢₑ by a loop over the experts, forward and backward, through torch's grouped
GEMM and through the per-group fallback.
"""

from __future__ import annotations

import pytest
import tiny
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, add_lora
from lorakit.adapters import route
from lorakit.layers import LoraLinear
from lorakit.layers.kernels import Groups, grouped_lora, input_grad
from lorakit.merge import merge

TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_layer(
    adapters: dict[str, tuple[int, float, float]],
    bias: bool = True,
    train_bias: bool = False,
    conv1d: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LoraLinear:
    """A frozen 16 -> 12 base with adapters name -> (r, scale, dropout), B random."""
    torch.manual_seed(0)
    base = Conv1D(12, 16) if conv1d else nn.Linear(16, 12, bias=bias)
    base.to(dtype).requires_grad_(False)
    if base.bias is not None:
        base.bias.requires_grad_(train_bias)
    layer = LoraLinear(base)
    for name, (r, scale, p) in adapters.items():
        layer.add_adapter(name, r, scale, p)
        with torch.no_grad():
            layer.lora_B[name].normal_()
    layer.set_active(list(adapters))
    return layer


def plain(layer: LoraLinear, x: torch.Tensor, names: list[str], seed: int | None = None):
    """The formula by hand; with ``seed`` the dropout masks are drawn as the layer draws them."""
    base = layer.base_layer
    weight = base.weight.T if layer.fan_in_fan_out else base.weight
    y = F.linear(x, weight, base.bias)
    if seed is not None:
        torch.manual_seed(seed)
    for n in names:
        A, B, s, p = layer.lora_A[n], layer.lora_B[n], layer.scale[n], layer.dropout[n]
        xd = x.to(A.dtype)
        if p > 0 and layer.training:
            xd = F.dropout(xd, p, training=True)
        y = y + (s * ((xd @ A.T) @ B.T)).to(y.dtype)
    return y


def grads(layer: LoraLinear, x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> list:
    names = [n for n in layer.active if n not in layer.merged]  # adapters in the graph
    params = [x, *(layer.lora_A[n] for n in names), *(layer.lora_B[n] for n in names)]
    if layer.base_layer.bias is not None and layer.base_layer.bias.requires_grad:
        params.append(layer.base_layer.bias)
    return list(torch.autograd.grad(y, params, g))


def check(layer: LoraLinear, names: list[str], shape=(3, 5, 16), seed: int | None = None):
    dtype = layer.base_layer.weight.dtype
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    if seed is not None:
        torch.manual_seed(seed)
    y_fast = layer(x)
    assert type(y_fast.grad_fn).__name__ == "LoraLinearFunctionBackward"
    y_plain = plain(layer, x, names, seed)
    g = torch.randn_like(y_plain)
    torch.testing.assert_close(y_fast, y_plain, **TOL)
    for fast, ref in zip(grads(layer, x, y_fast, g), grads(layer, x, y_plain, g), strict=True):
        torch.testing.assert_close(fast, ref, **TOL)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("train_bias", [False, True])
def test_single_adapter_matches_formula(bias: bool, train_bias: bool) -> None:
    layer = make_layer({"a": (4, 2.0, 0.0)}, bias=bias, train_bias=train_bias and bias)
    check(layer, ["a"])


def test_several_active_adapters_add_up() -> None:
    layer = make_layer({"a": (4, 2.0, 0.0), "b": (2, 0.5, 0.0), "c": (3, 1.0, 0.0)})
    check(layer, ["a", "b", "c"], shape=(7, 16))


def test_dropout_matches_formula_with_same_masks() -> None:
    layer = make_layer({"a": (4, 2.0, 0.3), "b": (2, 0.5, 0.0)}, train_bias=True).train()
    check(layer, ["a", "b"], seed=123)


def test_dropout_is_identity_in_eval() -> None:
    layer = make_layer({"a": (4, 2.0, 0.5)}).eval()
    check(layer, ["a"])


def test_gpt2_conv1d_base() -> None:
    layer = make_layer({"a": (4, 2.0, 0.0)}, conv1d=True, train_bias=True)
    assert layer.fan_in_fan_out
    check(layer, ["a"])


def test_merged_adapter_is_not_added_twice() -> None:
    model = tiny.llama()
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), "a")
    add_lora(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj"]), "b")
    layer = model.model.layers[0].self_attn.q_proj
    for n in ("a", "b"):
        with torch.no_grad():
            layer.lora_B[n].normal_()
    layer.set_active(["a", "b"])
    merge(model, ["a"])
    assert layer.merged == ["a"]
    # The base weight now holds W + ΔW_a; only b is added on top.
    check(layer, ["b"], shape=(2, 3, 32))


def test_inference_path_matches_formula() -> None:
    layer = make_layer({"a": (4, 2.0, 0.1), "b": (2, 0.5, 0.0)}).eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, plain(layer, x, ["a", "b"]), **TOL)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), plain(layer, x, ["a", "b"]), **TOL)


def test_fp32_adapter_on_bf16_base() -> None:
    layer = make_layer({"a": (4, 2.0, 0.0)}, dtype=torch.bfloat16)
    assert layer.lora_A["a"].dtype == torch.float32
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    y_fast, y_plain = layer(x), plain(layer, x, ["a"])
    assert y_fast.dtype == torch.bfloat16
    g = torch.randn_like(y_plain)
    # The same operations in the same dtypes: only the order of bf16 additions may differ.
    torch.testing.assert_close(y_fast, y_plain, atol=2e-2, rtol=1e-2)
    fast, ref = grads(layer, x, y_fast, g), grads(layer, x, y_plain, g)
    torch.testing.assert_close(fast[0], ref[0], atol=2e-2, rtol=1e-2)  # x, bf16
    for f, r in zip(fast[1:], ref[1:], strict=True):  # A, B: fp32 from the same bf16 inputs
        assert f.dtype == torch.float32
        torch.testing.assert_close(f, r, **TOL)


def test_trainable_base_weight_takes_the_generic_path() -> None:
    layer = make_layer({"a": (4, 2.0, 0.0)})
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(4, 16, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ != "LoraLinearFunctionBackward"
    w = layer.base_layer.weight
    g = torch.randn_like(y)
    fast = torch.autograd.grad(y, [x, w], g)
    ref = torch.autograd.grad(plain(layer, x, ["a"]), [x, w], g)
    for f, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(f, r, **TOL)


def test_no_active_adapter_is_the_base() -> None:
    layer = make_layer({"a": (4, 2.0, 0.0)})
    layer.set_active([])
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)


def test_routing_in_place_matches_formula_per_row() -> None:
    model = tiny.llama()
    for n in ("a", "b"):
        add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]), n)
    layer = model.model.layers[0].self_attn.q_proj
    for n in ("a", "b"):
        with torch.no_grad():
            layer.lora_B[n].normal_()
    layer.set_active(["a", "b"])  # for ``grads``; routing itself ignores ``active``
    x = torch.randn(3, 5, 32, requires_grad=True)
    names = ["b", None, "a"]
    with route(model, names):
        y = layer(x)
    rows = [plain(layer, x[i : i + 1], [n] if n else []) for i, n in enumerate(names)]
    y_plain = torch.cat(rows)
    torch.testing.assert_close(y, y_plain, **TOL)
    g = torch.randn_like(y)
    for f, r in zip(grads(layer, x, y, g), grads(layer, x, y_plain, g), strict=True):
        torch.testing.assert_close(f, r, **TOL)


@pytest.mark.parametrize("shape", [(4, 5, 32), (4, 32)])
def test_batched_routing_with_unequal_ranks(shape: tuple[int, ...]) -> None:
    model = tiny.llama()
    for n, r in (("a", 4), ("b", 2), ("c", 3)):
        add_lora(model, LoraConfig(r=r, alpha=2 * r, target_modules=["q_proj"]), n)
    layer = model.model.layers[0].self_attn.q_proj
    layer.set_active(["a", "b", "c"])
    for n in layer.active:
        with torch.no_grad():
            layer.lora_B[n].normal_()
    x = torch.randn(*shape, requires_grad=True)
    names = ["c", "a", None, "a"]
    with route(model, names):
        y = layer(x)
    rows = [plain(layer, x[i : i + 1], [n] if n else []) for i, n in enumerate(names)]
    y_plain = torch.cat(rows)
    torch.testing.assert_close(y, y_plain, **TOL)
    g = torch.randn_like(y)
    params = [x, *(layer.lora_A[n] for n in "ac"), *(layer.lora_B[n] for n in "ac")]
    fast = torch.autograd.grad(y, params, g)
    ref = torch.autograd.grad(y_plain, params, g)
    for f, r in zip(fast, ref, strict=True):
        torch.testing.assert_close(f, r, **TOL)


def test_autocast_takes_the_generic_path_and_trains() -> None:
    from lorakit import LoraConfig, add_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    add_lora(model, LoraConfig(r=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B["default"].normal_()
    x = torch.randn(5, 16)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert (
        model[0].lora_A["default"].grad is not None
        and model[0].lora_B["default"].grad.abs().sum() > 0
    )


def test_routing_without_grad_reuses_its_stacks_within_a_route_only() -> None:
    model = tiny.llama()
    for n, r in (("a", 4), ("b", 2)):
        add_lora(model, LoraConfig(r=r, alpha=2 * r, target_modules=["q_proj"]), n)
    layer = model.model.layers[0].self_attn.q_proj
    for n in ("a", "b"):
        with torch.no_grad():
            layer.lora_B[n].normal_()
    x = torch.randn(3, 5, 32)
    for names in (["a", "b", None], ["b", None, "a"], [None, "b", None]):
        with torch.no_grad(), route(model, names):
            first, second = layer(x), layer(x)  # the second forward uses the cached stacks
        expected = torch.cat(
            [plain(layer, x[i : i + 1], [n] if n else []) for i, n in enumerate(names)]
        )
        torch.testing.assert_close(first, expected, **TOL)
        torch.testing.assert_close(second, expected, **TOL)
    assert layer._route_stack is None  # dropped with the route


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])  # GPT-2's Conv1D passes Wᵀ's view
def test_input_grad_is_g_times_w_in_any_layout(dtype: torch.dtype, transposed: bool) -> None:
    torch.manual_seed(0)
    g = torch.randn(7, 24).to(dtype)
    weight = torch.randn(16, 24).t() if transposed else torch.randn(24, 16)  # (out, in)
    weight = weight.to(dtype)
    expected = g.double() @ weight.double()
    got = input_grad(g, weight)
    assert got.dtype == dtype and got.shape == (7, 16)
    # Exact inputs, one rounding of the result (plus fp32 accumulation for half precision).
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.double(), expected, atol=tol * 20, rtol=tol)


def test_fused_output_can_be_modified_in_place_under_autograd() -> None:
    # Llama-4's MoE does ``out = shared_expert(x); out.add_(routed)``: the fused node's output
    # must not be a view it made, and the gradients must be those of the plain formula.
    layer = make_layer({"a": (4, 2.0, 0.0)}).train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    extra = torch.randn(3, 5, 12, requires_grad=True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "LoraLinearFunctionBackward" and y._base is None
    y.add_(extra)
    y.view(-1, 12).mul_(2.0)  # a view made outside the node may be written too
    g = torch.randn(3, 5, 12)
    reference = 2.0 * (plain(layer, x, ["a"]) + extra)
    params = [x, extra, layer.lora_A["a"], layer.lora_B["a"]]
    torch.testing.assert_close(y, reference, **TOL)
    for fast, ref in zip(
        torch.autograd.grad(y, params, g), torch.autograd.grad(reference, params, g), strict=True
    ):
        torch.testing.assert_close(fast, ref, **TOL)


def grouped_by_hand(x, weight, counts, pairs):
    """y = x Wₑ + Σᵢ sᵢ (x Pᵢₑ) Qᵢₑ, one expert at a time."""
    rows, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n]
        ye = xe @ weight[e]
        for P, Q, s in pairs:
            ye = ye + s * ((xe.to(P.dtype) @ P[e]) @ Q[e]).to(ye.dtype)
        rows.append(ye)
        start += n
    return torch.cat(rows)


@pytest.mark.parametrize("r", [4, 3])  # 4: torch's grouped GEMM takes it; 3: one mm per group
@pytest.mark.parametrize("counts", [[3, 0, 5, 4], [0, 0, 12, 0]])  # empty experts too
def test_grouped_lora_matches_the_loop_over_experts(r: int, counts: list[int]) -> None:
    torch.manual_seed(0)
    experts, inp, out = 4, 8, 12
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), inp, requires_grad=True)
    weight = torch.randn(experts, inp, out)  # frozen, applied as x @ W
    factors = [
        (
            torch.randn(experts, inp, r, requires_grad=True),
            torch.randn(experts, r, out, requires_grad=True),
            scale,
        )
        for scale in (0.5, 2.0)
    ]
    y = grouped_lora(x, weight, Groups(counts), factors)
    expected = grouped_by_hand(x, weight, counts, factors)
    torch.testing.assert_close(y, expected, **TOL)
    params = [x, *(t for P, Q, _ in factors for t in (P, Q))]
    g = torch.randn_like(y)
    for fast, ref in zip(
        torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g), strict=True
    ):
        torch.testing.assert_close(fast, ref, **TOL)


def test_grouped_lora_takes_a_sums_expanded_gradient_and_half_precision_bases() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([4, 4])
    x = torch.randn(8, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(2, 8, 8, dtype=torch.bfloat16)
    P = torch.randn(2, 8, 4, requires_grad=True)  # adapters stay fp32 on a bf16 base
    Q = torch.randn(2, 4, 8, requires_grad=True)
    y = grouped_lora(x, weight, Groups(counts), [(P, Q, 1.0)])
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()  # a sum's gradient is expanded (zero strides)
    expected = grouped_by_hand(x.detach().float(), weight.float(), counts, [(P, Q, 1.0)])
    torch.testing.assert_close(y.float(), expected.detach(), atol=0.2, rtol=0.02)
    assert x.grad.dtype == torch.bfloat16 and P.grad.abs().sum() > 0 and Q.grad.abs().sum() > 0
