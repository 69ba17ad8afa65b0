"""What lorakit writes and refuses for mixture-of-experts models, rule by rule.

PEFT 0.21 rewrites an adapter's config for transformers 5's fused experts before it adapts
anything; lorakit writes every target by its full path, and a module PEFT would rewrite as the
parameter target ``<path>.weight``, so PEFT reads the same adapter. Options PEFT refuses on
parameter targets (dropout, DoRA, lora_bias) are refused by name before anything changes, and
``lorakit train`` applies its default dropout only where PEFT can. vLLM's MoE layouts and the
llama.cpp refusal close the file.
"""

from __future__ import annotations

import json
import re
import warnings

import peft
import pytest
import tiny
import torch
from peft.utils import transformers_weight_conversion as conversion
from safetensors.torch import load_file
from test_moe import IDS, assert_same, base_folder, build, logits, root  # noqa: F401 (fixture)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, plan, save_adapter
from lorakit.cli import main
from lorakit.export.gguf_adapter import to_gguf
from lorakit.export.vllm import check_vllm, to_vllm
from lorakit.inject import moe_plan
from lorakit.targeting import PEFT_MOE_RENAMES


def test_the_peft_conversion_table_is_the_installed_peft_and_transformers():
    # What PEFT's _convert_peft_config_moe rewrites, per model type, as it runs here.
    installed = {
        model_type: tuple(sorted(conversion._MOE_TARGET_MODULE_MAPPING[pattern]))
        for model_type, pattern in conversion._MODEL_TO_CONVERSION_PATTERN.items()
        if pattern in conversion._MOE_TARGET_MODULE_MAPPING
        and get_checkpoint_conversion_mapping(model_type) is not None
        and model_type.islower()  # class-name keys never match a config's model_type
    }
    assert {t: tuple(sorted(n)) for t, n in PEFT_MOE_RENAMES.items()} == installed


def save(model, tmp_path) -> dict:
    save_adapter(model, tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def peft_logits(family: str, folder) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return logits(peft.PeftModel.from_pretrained(build(family), folder))


def test_modules_peft_would_rewrite_are_written_as_weight_targets_with_their_rank(tmp_path):
    model = build("deepseek_v2")  # layer 0: a dense MLP named gate_proj / up_proj / down_proj
    config = LoraConfig(
        r=4,
        alpha=8,
        init="random",
        target_modules=["q_a_proj", "gate_proj", "up_proj"],
        rank_pattern={"gate_proj": 2},
        alpha_pattern={"up_proj": 2.0},
    )
    add_lora(model, config)
    written = save(model, tmp_path)
    assert written["target_modules"] == [f"model.layers.{i}.self_attn.q_a_proj" for i in (0, 1)]
    assert written["target_parameters"] == [
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.shared_experts.gate_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
    ]
    gate = re.escape("model.layers.0.mlp.gate_proj.weight")
    up = re.escape("model.layers.0.mlp.up_proj.weight")
    assert written["rank_pattern"][gate] == 2  # PEFT keys a parameter's rank by name.weight
    assert written["alpha_pattern"][up] == 2.0
    assert_same(peft_logits("deepseek_v2", tmp_path), logits(model), "PEFT")
    assert (logits(model) - logits(build("deepseek_v2"))).abs().max() > 1e-3
    reloaded = build("deepseek_v2")
    load_adapter(reloaded, tmp_path)
    assert_same(logits(reloaded), logits(model), "lorakit")


def test_a_regex_is_listed_by_path_on_an_moe_model(tmp_path):
    # PEFT cuts a regex to leaf names on these models (every layer's v_proj, not layer 1's).
    model = build("qwen3_moe")
    add_lora(model, LoraConfig(r=2, init="random", target_modules=r".*layers\.1\..*v_proj"))
    assert save(model, tmp_path)["target_modules"] == ["model.layers.1.self_attn.v_proj"]
    assert_same(peft_logits("qwen3_moe", tmp_path), logits(model), "PEFT")


def test_a_dense_model_keeps_its_rules(tmp_path):
    dense = tiny.llama()
    add_lora(dense, LoraConfig(r=2, target_modules="all-linear"))
    written = save(dense, tmp_path)
    assert written["target_modules"] == "all-linear" and written["target_parameters"] is None


@pytest.mark.parametrize(
    ("family", "config", "named"),
    [
        (
            "qwen3_moe",
            {"target_modules": "all-linear", "dropout": 0.1},
            "dropout=0.1 is not defined for LoraParameter",
        ),
        (
            "deepseek_v2",
            {"target_modules": ["gate_proj"], "dropout": 0.1},
            "PEFT reads deepseek_v2's target_modules named gate/gate_proj/up_proj/down_proj",
        ),
        (
            "mixtral",
            {"target_modules": "all-linear", "use_dora": True},
            "use_dora is not supported on parameter targets",
        ),
        (
            "gpt_oss",
            {"target_parameters": ["gate_up_proj"], "lora_bias": True},
            "lora_bias is not supported on parameter targets",
        ),
    ],
)
def test_what_peft_refuses_on_parameter_targets_is_refused_once_by_name(family, config, named):
    model = build(family)
    with pytest.raises(LoraError, match=re.escape(named)) as raised:
        add_lora(model, LoraConfig(r=2, **config))
    lines = str(raised.value).split("\n  - ")[1:]
    assert len(lines) == 1 and "PEFT" in lines[0], lines  # one line, however many experts
    assert not any("lora_A" in n for n, _ in model.named_parameters())  # nothing changed


def test_train_applies_its_default_dropout_only_where_peft_can():
    config = LoraConfig(r=2, dropout=0.05, target_modules="all-linear")
    moe, lines = moe_plan(build("olmoe"), config, default_dropout=0.05)
    assert moe.dropout == 0.0 and lines[-1].startswith("dropout: 0, not the default 0.05")
    assert lines[0] == "mixture of experts in 2 layers:"
    attention_only = config.replace(target_modules=["q_proj", "v_proj"])
    kept, lines = moe_plan(build("olmoe"), attention_only, default_dropout=0.05)
    assert kept.dropout == 0.05 and "frozen" in lines[3]  # the experts, not adapted
    dense, lines = moe_plan(tiny.llama(), config, default_dropout=0.05)
    assert dense.dropout == 0.05 and lines == []
    with pytest.raises(LoraError, match="dropout=0.1 is not defined"):
        moe_plan(build("olmoe"), config.replace(dropout=0.1), default_dropout=0.05)


def test_train_refuses_another_dropout_on_experts_without_a_traceback(root, capsys):  # noqa: F811
    argv = ["train", "--model", str(base_folder(root, "olmoe")), "--data", str(root / "data.jsonl")]
    code = main([*argv, "--max-steps", "1", "--dropout", "0.1", "--output", str(root / "drop")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "dropout=0.1 is not defined for LoraParameter" in err and "use dropout=0" in err


def test_the_plan_names_experts_routers_and_shared_experts():
    text = str(plan(build("qwen2_moe"), LoraConfig(r=2, target_modules=["q_proj"])))
    assert text.splitlines()[-7:] == [
        "mixture of experts in 2 layers:",
        "part            modules                                adapter 'default'",
        "--------------  -------------------------------------  -----------------",
        "routed experts  model.layers.*.mlp.experts             frozen",
        "routers         model.layers.*.mlp.gate                frozen",
        "routers         model.layers.*.mlp.shared_expert_gate  frozen",
        "shared experts  model.layers.*.mlp.shared_expert       frozen",
    ]
    one = str(plan(build("qwen2_moe"), LoraConfig(r=2, target_parameters=["1.mlp.gate.weight"])))
    assert (
        "routers         model.layers.*.mlp.gate                LoRA on weight (in 1 of 2)" in one
    )


def test_vllm_gets_one_pair_per_expert_where_it_reads_them_so(tmp_path):
    model = build("qwen3_moe")
    add_lora(model, LoraConfig(r=8, alpha=32, init="random", target_modules="all-linear"))
    report = to_vllm(model, tmp_path)
    assert report.ok and "one pair per expert (gate_proj, up_proj, down_proj)" in str(report)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    experts = model.model.layers[0].mlp.experts  # down_proj wraps gate_up_proj
    gate_up = experts.base_layer.delta_weight("default")  # (E, 2I, H), I = 16
    prefix = "base_model.model.model.layers.0.mlp.experts"
    g = 32 / 8  # vLLM's one scale
    for e in range(4):
        for name, rows in (("gate_proj", slice(0, 16)), ("up_proj", slice(16, 32))):
            A = tensors[f"{prefix}.{e}.{name}.lora_A.weight"]
            B = tensors[f"{prefix}.{e}.{name}.lora_B.weight"]
            torch.testing.assert_close(g * B @ A, gate_up[e, rows], rtol=1e-5, atol=1e-6)
    down = experts.delta_weight("default")[3]
    A, B = (tensors[f"{prefix}.3.down_proj.lora_{k}.weight"] for k in "AB")
    torch.testing.assert_close(g * B @ A, down, rtol=1e-5, atol=1e-6)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] is None and "gate_proj" in config["target_modules"]


def test_vllm_gets_peft_s_3d_layout_for_gpt_oss_and_refuses_half_the_experts(tmp_path):
    model = build("gpt_oss")
    add_lora(model, LoraConfig(r=8, alpha=8, init="random", target_modules="all-linear"))
    assert "PEFT's 3D layout" in str(to_vllm(model, tmp_path / "v"))
    save_adapter(model, tmp_path / "peft")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "v" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys()  # one scale already: the same tensors
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value)
    half = build("gpt_oss")
    add_lora(half, LoraConfig(r=8, target_parameters=["down_proj"]))
    failures = {c.rule: c.detail for c in check_vllm(half).failures()}
    assert (
        "all projections" in failures
        and "model.layers.0.mlp.experts (down_proj)" in (failures["all projections"])
    )
    with pytest.raises(LoraError, match="all projections"):
        to_vllm(half, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_vllm_refuses_a_router_by_name():
    model = build("mixtral")
    add_lora(model, LoraConfig(r=4, target_parameters=["gate.weight"]))
    failures = {c.rule: c.detail for c in check_vllm(model).failures()}
    assert failures["routers"].startswith("model.layers.0.mlp.gate, model.layers.1.mlp.gate")


def test_gguf_export_refuses_expert_lora_by_name(tmp_path):
    model = build("qwen3_moe")
    add_lora(model, LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(LoraError, match=r"routed experts \(model\.layers\.0\.mlp\.experts\."):
        to_gguf(model, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()


def test_target_parameters_is_a_yaml_key_and_a_flag(tmp_path):
    from lorakit.training.config import resolve_config

    (tmp_path / "run.yaml").write_text("data: d.jsonl\ntarget_parameters: [gate_up_proj]\n")
    from_yaml = resolve_config(tmp_path / "run.yaml").lora_config(None)
    assert from_yaml.target_parameters == ["gate_up_proj"]
    assert from_yaml.target_modules == "all-linear"
    flags = {"data": "d.jsonl", "targets": "", "target_parameters": "gate_up_proj,down_proj"}
    only_experts = resolve_config(None, flags).lora_config(None)
    assert only_experts.target_modules is None
    assert only_experts.target_parameters == ["gate_up_proj", "down_proj"]


def test_naming_the_experts_module_gives_its_parameters_to_name():
    with pytest.raises(LoraError) as raised:
        add_lora(build("qwen3_moe"), LoraConfig(r=2, target_modules=["experts"]))
    assert (
        "model.layers.0.mlp.experts: Qwen3MoeExperts is not a supported module type"
        in str(raised.value)
        and "its routed experts are parameters: target_parameters ['gate_up_proj', 'down_proj'] "
        "(--target-parameters gate_up_proj,down_proj), or 'all-linear', which adapts them"
        in str(raised.value)
    )
