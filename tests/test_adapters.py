"""Several adapters on one base: activate, disable, delete, route rows."""

import pytest
import tiny
import torch

from lorakit import (
    LoraConfig,
    LoraError,
    active_adapters,
    add_lora,
    delete_adapter,
    disable_adapters,
    merge,
    route,
    set_adapter,
)
from lorakit.layers import LoraLayer

IDS = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))


def two_adapters():
    model = tiny.llama()
    base = model(IDS).logits
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    tiny.randomize_adapters(model, seed=1)
    out_a = model(IDS).logits
    add_lora(model, LoraConfig(r=3, target_modules=["v_proj", "down_proj", "embed_tokens"]), "b")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer) and "b" in m.lora_B:
                m.lora_B["b"].normal_(std=0.1)
    out_b = model(IDS).logits
    return model, base, out_a, out_b


def test_set_adapter_single_and_sum():
    model, _base, out_a, _out_b = two_adapters()
    assert active_adapters(model) == ["b"]
    set_adapter(model, "a")
    torch.testing.assert_close(model(IDS).logits, out_a)
    set_adapter(model, ["a", "b"])
    assert active_adapters(model) == ["a", "b"]
    # Deltas add: (a + b) - base = (a - base) + (b - base), up to nonlinearity — check on one layer.
    v = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    expected = v.base_layer(x) + v.lora_output("a", x) + v.lora_output("b", x)
    torch.testing.assert_close(v(x), expected)
    with pytest.raises(
        LoraError, match=r"Unknown adapter\(s\) \['c'\]; this model has \['a', 'b'\]"
    ):
        set_adapter(model, "c")


def test_disable_adapters_gives_base_and_restores_on_error():
    model, base, _out_a, out_b = two_adapters()
    merge(model)
    with pytest.raises(RuntimeError), disable_adapters(model):
        torch.testing.assert_close(model(IDS).logits, base, rtol=1e-5, atol=1e-5)
        raise RuntimeError("boom")
    assert active_adapters(model) == ["b"]
    assert model.model.layers[0].self_attn.v_proj.merged == ["b"]
    torch.testing.assert_close(model(IDS).logits, out_b, rtol=1e-5, atol=1e-5)


def test_delete_merged_adapter_restores_weights_and_unwraps():
    model, _base, out_a, _out_b = two_adapters()
    merge(model)
    delete_adapter(model, "b")
    assert "b" not in model.lorakit_configs
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    set_adapter(model, "a")
    torch.testing.assert_close(model(IDS).logits, out_a, rtol=1e-5, atol=1e-5)


def test_route_rows_equal_single_adapter_runs():
    model, base, out_a, out_b = two_adapters()
    with route(model, ["a", "b", None, "a"]):
        mixed = model(IDS).logits
    torch.testing.assert_close(mixed[0], out_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], out_b[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], base[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[3], out_a[3], rtol=1e-5, atol=1e-5)
    assert all(m.route is None for m in model.modules() if isinstance(m, LoraLayer))


def test_route_errors():
    model, *_ = two_adapters()
    with pytest.raises(LoraError, match=r"Unknown adapter\(s\) \['z'\]"), route(model, ["a", "z"]):
        pass
    with (
        pytest.raises(LoraError, match="given 3 adapter names but the batch has 4 rows"),
        route(model, ["a", "b", "a"]),
    ):
        model(IDS)
    merge(model)
    with pytest.raises(LoraError, match="unmerge"), route(model, ["a"] * 4):
        pass


def test_deactivating_merged_adapter_is_refused():
    model, *_ = two_adapters()
    merge(model)
    with pytest.raises(LoraError, match=r"\['b'\] are merged"):
        set_adapter(model, "a")
