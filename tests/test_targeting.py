"""What a config selects: one walk gives every target and every entry that matched nothing."""

import pytest
import tiny
import torch
from torch import nn

import lorakit.targeting as targeting
from lorakit import LoraConfig, add_lora
from lorakit.targeting import ends_with, find_targets, inside, matches


def test_the_suffix_and_subtree_rules_go_by_whole_dotted_parts():
    assert ends_with("model.layers.0.q_proj", "q_proj")
    assert ends_with("model.layers.0.q_proj", "0.q_proj") and ends_with("q_proj", "q_proj")
    assert not ends_with("model.layers.0.xq_proj", "q_proj")
    assert inside("head.dense", "head") and inside("head", "head")
    assert not inside("header", "head") and not inside("head", "head.dense")
    assert matches(["q_proj"], "a.q_proj") and matches(r".*\.q_proj", "a.q_proj")
    assert not matches(r"q_proj", "a.q_proj")  # a regex matches the whole path


def _counting_walks(monkeypatch):
    """Count the walks of a model (``walk`` recurses: only calls at the root count)."""
    calls = []
    walk = targeting.walk

    def counted(module, prefix=""):
        if prefix == "":
            calls.append(module)
        return walk(module, prefix)

    monkeypatch.setattr(targeting, "walk", counted)
    return calls


def test_one_walk_gives_modules_parameters_tokens_and_copies(monkeypatch):
    model = tiny.llama()
    walks = _counting_walks(monkeypatch)
    config = LoraConfig(
        r=2,
        target_modules=["q_proj"],
        target_parameters=["1.mlp.up_proj.weight"],
        trainable_token_indices=[3, 5],  # the input embedding's rows
        modules_to_save=["lm_head"],
        fused_slices={"layers.0.self_attn.q_proj": [True, False]},
    )
    found = find_targets(model, config)
    assert len(walks) == 1
    assert [(p, s) for p, _, s in found.modules] == [
        ("model.layers.0.self_attn.q_proj", [True, False]),
        ("model.layers.1.self_attn.q_proj", None),
    ]
    assert [(p, n) for p, _, n in found.parameters] == [("model.layers.1.mlp.up_proj", "weight")]
    assert [(p, m, ids) for p, m, ids in found.tokens] == [
        ("model.embed_tokens", model.model.embed_tokens, [3, 5])
    ]
    assert [p for p, _ in found.copies] == ["lm_head"]
    assert found.unmatched == []


def test_every_entry_that_matches_nothing_is_named_with_the_closest_names():
    model = tiny.llama()
    config = LoraConfig(
        r=2,
        target_modules=["q_prj", "v_proj"],
        target_parameters=["experts.weight"],
        trainable_token_indices={"embed_tokn": [1], "proj": [2]},
        modules_to_save=["lm_had"],
        fused_slices={"nothing": [True]},
    )
    found = find_targets(model, config)
    assert found.unmatched == [
        "fused_slices['nothing'] names no targeted module",
        "target_modules entry 'q_prj' matched no module; closest module names: "
        "['q_proj', 'v_proj', 'o_proj', 'k_proj', 'up_proj']",
        "target_parameters entry 'experts.weight' matched no parameter; closest parameter "
        "names: ['weight']",
        "trainable_token_indices entry 'embed_tokn' matched no module; closest module names: "
        "['embed_tokens']",
        "trainable_token_indices entry 'proj' matched no module; closest module names: "
        "['v_proj', 'q_proj', 'o_proj', 'k_proj', 'up_proj']",
        "modules_to_save entry 'lm_had' matched no module; closest module names: ['lm_head']",
    ]


def test_nothing_inside_a_copy_or_an_excluded_module_is_a_target():
    model = nn.Sequential()
    model.add_module("head", nn.Sequential(nn.Linear(4, 4)))
    model.add_module("body", nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    config = LoraConfig(
        r=2, target_modules=["0", "1"], modules_to_save=["head"], exclude_modules=["body.1"]
    )
    found = find_targets(model, config)
    assert [p for p, _, _ in found.modules] == ["body.0"]
    assert [p for p, _ in found.copies] == ["head"]


def test_a_wrapped_module_is_one_target_and_its_parameters_are_its_wrappers():
    model = nn.Sequential(nn.Linear(4, 4))
    add_lora(model, LoraConfig(r=2, target_modules=["0"]))
    found = find_targets(model, LoraConfig(r=2, target_modules=["0"], target_parameters=["weight"]))
    assert [(p, type(m).__name__) for p, m, _ in found.modules] == [("0", "LoraLinear")]
    assert found.parameters == []
    assert found.unmatched == [  # LoRA wraps it: its weight is not a raw parameter target
        "target_parameters entry 'weight' matched no parameter; closest parameter names: ['weight']"
    ]


@pytest.mark.parametrize("ids", [[0], [0, 1]])
def test_a_token_entry_naming_several_modules_asks_for_the_full_path(ids):
    model = nn.Sequential(nn.Embedding(4, 2), nn.Sequential(nn.Embedding(4, 2)))
    model[1].add_module("0", model[1][0])
    found = find_targets(model, LoraConfig(r=2, trainable_token_indices={"0": ids}))
    assert found.tokens == [] and found.unmatched == [
        "trainable_token_indices['0'] matches 2 modules; give the full path"
    ]


def test_moe_parts_and_what_all_linear_takes_on_a_mixture_of_experts():
    model = tiny.deepseek_v2()  # layer 0 dense, layer 1: 4 routed experts, a router, a shared one
    found = find_targets(model, LoraConfig(r=2, target_modules="all-linear"))
    parts = found.parts
    assert parts.experts == {"model.layers.1.mlp.experts": ["gate_up_proj", "down_proj"]}
    assert parts.routers == ["model.layers.1.mlp.gate"]
    assert parts.shared == ["model.layers.1.mlp.shared_experts"]
    assert parts.role("model.layers.1.mlp.shared_experts.up_proj") == "shared expert"
    assert parts.role("model.layers.0.mlp.up_proj") is None
    modules = [p for p, _, _ in found.modules]
    assert "model.layers.0.mlp.gate_proj" in modules  # the dense MLP
    assert "model.layers.1.mlp.shared_experts.down_proj" in modules
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa" in modules  # MLA's low-rank parts
    assert "model.layers.1.mlp.gate" not in modules  # the router stays frozen
    assert [(p, n) for p, _, n in found.parameters] == [
        ("model.layers.1.mlp.experts", "gate_up_proj"),
        ("model.layers.1.mlp.experts", "down_proj"),
    ]
    assert found.unmatched == []
    dense = find_targets(tiny.llama(), LoraConfig(r=2, target_modules="all-linear"))
    assert dense.parts.all() == [] and dense.parameters == []


def test_a_linear_router_is_left_out_of_all_linear_but_can_be_named():
    class Moe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(8, 4, bias=False)  # one row per expert: the router
            self.experts = nn.Module()
            self.experts.num_experts = 4  # what says "experts"; a 3D parameter alone does not
            self.experts.register_parameter("up", nn.Parameter(torch.randn(4, 6, 8)))
            self.shared = nn.Sequential(nn.Linear(8, 8))

    model = nn.Sequential(Moe())
    found = find_targets(model, LoraConfig(r=2, target_modules="all-linear"))
    assert [p for p, _, _ in found.modules] == ["0.shared.0"]
    assert found.parts.routers == ["0.gate"] and found.parts.shared == ["0.shared"]
    named = find_targets(model, LoraConfig(r=2, target_modules=["gate"]))
    assert [p for p, _, _ in named.modules] == ["0.gate"]  # frozen by default, not forbidden
    del model[0].experts.num_experts
    assert find_targets(model, LoraConfig(r=2, target_modules="all-linear")).parts.all() == []


def test_a_module_entry_naming_an_expert_parameter_says_target_parameters():
    found = find_targets(tiny.deepseek_v2(), LoraConfig(r=2, target_modules=["gate_up_proj"]))
    assert found.unmatched == [
        "target_modules entry 'gate_up_proj' names a parameter "
        "(model.layers.1.mlp.experts.gate_up_proj), not a module: give it in target_parameters "
        "(--target-parameters)"
    ]
