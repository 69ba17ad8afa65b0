"""Several adapters on one base: activate, disable, delete, route rows."""

import pytest
import tiny
import torch

from lorakit import (
    LoraConfig,
    LoraError,
    active_adapters,
    add_lora,
    combine,
    delete_adapter,
    disable_adapters,
    merge,
    route,
    set_adapter,
)
from lorakit.layers import LoraLayer
from lorakit.state import adapter_configs

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
    assert "b" not in adapter_configs(model)
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
    assert all(m._route is None for m in model.modules() if isinstance(m, LoraLayer))


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


def _delta_sum(model, weights):
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer) and not path.endswith("base_layer"):
            deltas = [w * m.delta_weight(n) for n, w in weights.items() if n in m.lora_A]
            if deltas:
                out[path] = sum(deltas)
    return out


@pytest.mark.parametrize("factory", ["llama", "gpt2-fused", "cnn"])
def test_combine_cat_is_exact_weighted_sum(factory):
    if factory == "llama":
        model, *_ = two_adapters()
    else:
        model = tiny.gpt2() if factory == "gpt2-fused" else tiny.cnn()
        targets = {
            "gpt2-fused": (["c_attn", "c_fc"], {"c_attn": [True, False, True]}),
            "cnn": (["conv1"], {}),
        }[factory]
        add_lora(
            model, LoraConfig(r=2, alpha=4, target_modules=targets[0], fused_slices=targets[1]), "a"
        )
        add_lora(
            model, LoraConfig(r=3, alpha=3, target_modules=targets[0], fused_slices=targets[1]), "b"
        )
        tiny.randomize_adapters(model, seed=5)
    expected = _delta_sum(model, {"a": 0.7, "b": -0.3})
    combine(model, {"a": 0.7, "b": -0.3}, name="ab", method="cat")
    assert active_adapters(model) == ["ab"]
    for path, delta in expected.items():
        torch.testing.assert_close(
            model.get_submodule(path).delta_weight("ab"), delta, rtol=1e-5, atol=1e-6
        )


def test_combine_svd_full_rank_exact_and_truncation_error():
    model, *_ = two_adapters()
    expected = _delta_sum(model, {"a": 0.5, "b": 0.5})
    errors = combine(model, {"a": 0.5, "b": 0.5}, name="full", method="svd", rank=5)
    v = "model.layers.0.self_attn.v_proj"  # a (r=2) + b (r=3) on v: rank ≤ 5 — exact
    assert errors[v] < 1e-6
    torch.testing.assert_close(
        model.get_submodule(v).delta_weight("full"), expected[v], rtol=1e-4, atol=1e-6
    )
    errors = combine(model, {"a": 0.5, "b": 0.5}, name="low", method="svd", rank=1)
    S = torch.linalg.svdvals(expected[v])
    assert abs(errors[v] - (S[1:].norm() / S.norm()).item()) < 1e-5  # Eckart-Young tail


def test_combine_linear_needs_equal_ranks_and_matches_single_adapter():
    model, *_ = two_adapters()
    with pytest.raises(LoraError, match="needs every adapter on every module with equal ranks"):
        combine(model, {"a": 0.5, "b": 0.5}, name="x", method="linear")
    assert "x" not in adapter_configs(model)
    expected = _delta_sum(model, {"a": 0.4})
    combine(model, {"a": 0.4}, name="a04", method="linear")
    for path, delta in expected.items():
        torch.testing.assert_close(
            model.get_submodule(path).delta_weight("a04"), delta, rtol=1e-5, atol=1e-6
        )


def test_combined_adapter_saves_and_loads(tmp_path):
    from lorakit import load_adapter, save_adapter

    model, *_ = two_adapters()
    combine(model, {"a": 1.0, "b": 1.0}, name="ab", method="cat")
    out = model(IDS).logits
    save_adapter(model, tmp_path, "ab")
    fresh = tiny.llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(IDS).logits, out, rtol=1e-5, atol=1e-5)


def test_merge_chosen_adapters_then_unmerge():
    model, *_ = two_adapters()
    set_adapter(model, ["a", "b"])
    both = model(IDS).logits
    merge(model, adapter_names=["a"])
    assert model.model.layers[0].self_attn.q_proj.merged == ["a"]
    torch.testing.assert_close(model(IDS).logits, both, rtol=1e-5, atol=1e-5)
    from lorakit import unmerge

    unmerge(model)
    torch.testing.assert_close(model(IDS).logits, both, rtol=1e-5, atol=1e-5)


def _train(model, batches, names, steps=3):
    """AdamW steps on rows routed to adapters; loss = Σ per-adapter mean token loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(steps):
        ids = batches[step]
        with route(model, names):
            logits = model(ids).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)
        loss = sum(
            token_loss[[i for i, n in enumerate(names) if n == a]].mean() for a in set(names)
        )
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_joint_training_equals_separate_training():
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 64, (4, 6), generator=gen) for _ in range(3)]
    names = ["a", "b", "a", "b"]

    def fresh(*adapters):
        model = tiny.llama()
        for n in adapters:
            add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]), n)
        # Same starting A per adapter name in both runs (add_lora's random A depends on order).
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLayer):
                    for n in m.lora_A:
                        g = torch.Generator().manual_seed({"a": 1, "b": 2}[n])
                        m.lora_A[n].copy_(torch.randn(m.lora_A[n].shape, generator=g) * 0.1)
        return model

    joint = fresh("a", "b")
    _train(joint, batches, names)
    for adapter, rows in (("a", [0, 2]), ("b", [1, 3])):
        alone = fresh(adapter)
        _train(alone, [b[rows] for b in batches], [adapter, adapter])
        for path, m in alone.named_modules():
            if isinstance(m, LoraLayer):
                other = joint.get_submodule(path)
                torch.testing.assert_close(
                    other.lora_A[adapter], m.lora_A[adapter], rtol=1e-5, atol=1e-6
                )
                torch.testing.assert_close(
                    other.lora_B[adapter], m.lora_B[adapter], rtol=1e-5, atol=1e-6
                )
                assert m.lora_B[adapter].abs().sum() > 0


def test_route_rows_for_convolutions_and_param_wrappers_refuse():
    model = tiny.cnn()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    base = model(x)
    outs = {}
    for seed, name in ((1, "a"), (2, "b")):
        add_lora(model, LoraConfig(r=2, target_modules=["conv1", "conv2"]), name)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoraLayer) and name in m.lora_B:
                    m.lora_B[name].copy_(
                        torch.randn(
                            m.lora_B[name].shape, generator=torch.Generator().manual_seed(seed)
                        )
                    )
        outs[name] = model(x)
    with route(model, ["b", None, "a"]):
        mixed = model(x)
    torch.testing.assert_close(mixed[0], outs["b"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[2], outs["a"][2], rtol=1e-5, atol=1e-5)

    moe = tiny.deepseek_v2()
    add_lora(moe, LoraConfig(r=2, target_parameters=["mlp.experts.gate_up_proj"]))
    with (
        pytest.raises(LoraError, match=r"Cannot route these adapters: .*LoraParameter"),
        route(moe, ["default"] * 2),
    ):
        moe(torch.randint(0, 64, (2, 5)))


def test_delete_pissa_adapter_restores_the_original_weight():
    model = tiny.llama()
    ref = model(IDS).logits
    add_lora(model, LoraConfig(r=4, init="pissa", target_modules=["v_proj"]), "p")
    delete_adapter(model, "p")
    torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_route_refuses_adapters_with_modules_to_save():
    model = tiny.cnn()
    add_lora(model, LoraConfig(r=2, target_modules=["conv1"], modules_to_save=["head"]), "a")
    with (
        pytest.raises(
            LoraError, match=r"Cannot route these adapters: \['head \(ModulesToSave\)'\]"
        ),
        route(model, ["a"]),
    ):
        pass
