"""Mixture-of-experts models, nine families: lorakit's adapters are PEFT's, exactly.

Tiny random models from configs (no download) of every MoE family transformers 5 stores with
fused 3D experts. For each, ``lorakit train`` with its defaults ("all-linear": attention,
dense and shared-expert MLPs and the routed experts, routers frozen) and with the experts
named (``--target-parameters``) writes an adapter that PEFT's ``PeftModel``, transformers'
``load_adapter`` and ``AutoPeftModelForCausalLM`` load, after PEFT's own MoE conversion, with
the outputs lorakit gives (1e-5, and the adapter moves them by far more); ``lorakit merge``
folds it into the 3D weights of a model plain transformers loads; PEFT's own MoE adapters load
in lorakit the same; and the experts' fast path (LoRA per routed token group) computes what
the module's own forward with W + ΔW computes, in train mode, gradients included.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers as T
from torch import nn
from torch.nn import functional as F

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter
from lorakit.cli import main
from lorakit.layers import LoraParameter
from lorakit.layers import parameter as parameter_module

ATOL = 1e-5
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)
MLA = dict(q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
ROUTED = dict(moe_intermediate_size=16, num_experts_per_tok=2, intermediate_size=48)
# family -> (config class, model class, the family's own settings)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**ROUTED, "num_experts": 4}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            **ROUTED,
            **MLA,
            "num_key_value_heads": 4,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
        },
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            **ROUTED,
            **MLA,
            "num_key_value_heads": 4,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        {
            **ROUTED,
            "num_experts": 4,
            "shared_expert_intermediate_size": 16,
            "head_dim": 8,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 8,
            "linear_value_head_dim": 8,
            "layer_types": ["linear_attention", "full_attention"],
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {**ROUTED, "num_experts": 4, "shared_expert_intermediate_size": 16},
    ),
    "llama4_text": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        dict(
            intermediate_size=16,
            intermediate_size_mlp=48,
            num_local_experts=4,
            num_experts_per_tok=1,
            head_dim=8,
            interleave_moe_layer_step=1,
            no_rope_layers=[1, 1],
        ),
    ),
}
NAMES = list(FAMILIES)


def build(family: str, seed: int = 0) -> nn.Module:
    """A tiny random model of ``family`` (two layers, four experts), in eval mode."""
    config_class, model_class, own = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(T, config_class)(**{**COMMON, **own})
    return getattr(T, model_class)(config).eval()


def tokenizer() -> T.PreTrainedTokenizerFast:
    """A 64-word tokenizer (pad 0, eos 1) matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>", *[f"w{i}" for i in range(61)]]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return T.PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{what}: max |Δlogit| {diff:.3g} > {ATOL}"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A text data file of 8 short lines."""
    folder = tmp_path_factory.mktemp("moe")
    gen = torch.Generator().manual_seed(4)
    lines = [" ".join(f"w{int(i)}" for i in torch.randint(0, 61, (10,), generator=gen))]
    lines += [" ".join(f"w{(7 * k + j) % 61}" for j in range(10)) for k in range(7)]
    (folder / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return folder


def base_folder(root: Path, family: str) -> Path:
    folder = root / family
    if not folder.exists():
        build(family).save_pretrained(folder)
        tokenizer().save_pretrained(folder)
    return folder


def train(root: Path, family: str, name: str, *flags: str) -> Path:
    """``lorakit train`` on ``family``'s folder: 3 steps at a high lr, so B moves."""
    out = root / f"{family}-{name}"
    argv = ["train", "--model", str(base_folder(root, family)), "--data", str(root / "data.jsonl")]
    argv += ["--max-steps", "3", "--lr", "1e-2", "--warmup-steps", "0", "--rank", "4"]
    assert main([*argv, "--batch-size", "4", "--output", str(out), *flags]) == 0
    return out


def lorakit_logits(family: str, adapter: Path) -> torch.Tensor:
    model = build(family)
    load_adapter(model, adapter)
    return logits(model.eval())


@pytest.mark.parametrize("family", NAMES)
def test_train_defaults_load_in_peft_three_ways_and_merge(family, root, capsys):
    adapter = train(root, family, "defaults")
    printed = capsys.readouterr().out
    assert "routed experts" in printed and "LoRA on down_proj, gate_up_proj" in printed
    assert "routers" in printed and "dropout: 0, not the default 0.05" in printed
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert written["lora_dropout"] == 0.0
    assert any(p.endswith("experts.gate_up_proj") for p in written["target_parameters"])
    ours = lorakit_logits(family, adapter)
    effect = (ours - logits(build(family))).abs().max().item()
    assert effect > 1e-3, f"the adapter barely changes the outputs ({effect:.2g})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes about its MoE conversion
        assert_same(logits(peft.PeftModel.from_pretrained(build(family), adapter)), ours, "PEFT")
        model = build(family)
        model.load_adapter(str(adapter))
        assert_same(logits(model), ours, "transformers' load_adapter")
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
        assert_same(logits(auto), ours, "AutoPeftModelForCausalLM")
    merged = root / f"{family}-merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged)]) == 0
    plain = T.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in n for n, _ in plain.named_parameters())
    assert_same(logits(plain), ours, "merged, loaded by plain transformers")


@pytest.mark.parametrize("family", NAMES)
def test_train_with_experts_named_loads_in_peft(family, root):
    flags = ("--targets", "o_proj", "--target-parameters", "gate_up_proj,down_proj")
    adapter = train(root, family, "experts", *flags, "--dropout", "0")
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert all(p.endswith(".o_proj") for p in written["target_modules"])
    assert all(
        p.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj") for p in written["target_parameters"]
    )
    ours = lorakit_logits(family, adapter)
    assert (ours - logits(build(family))).abs().max().item() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_same(logits(peft.PeftModel.from_pretrained(build(family), adapter)), ours, "PEFT")
        model = build(family)
        model.load_adapter(str(adapter))
        assert_same(logits(model), ours, "transformers' load_adapter")
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
        assert_same(logits(auto), ours, "AutoPeftModelForCausalLM")


def peft_config(family: str) -> peft.LoraConfig:
    """PEFT's own MoE adapter: its "all-linear" (PEFT's conversion adds the experts and the
    router), or explicit names for Llama-4, whose Linear router PEFT cannot wrap."""
    if family == "llama4_text":
        return peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
            target_parameters=["experts.gate_up_proj", "experts.down_proj", "router.weight"],
            init_lora_weights=False,
        )
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


@pytest.mark.parametrize("family", NAMES)
def test_peft_written_adapter_loads_in_lorakit(family, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(family), peft_config(family)).eval()
        expected = logits(theirs)
        theirs.save_pretrained(tmp_path)
    assert (expected - logits(build(family))).abs().max().item() > 1e-3
    assert_same(lorakit_logits(family, tmp_path), expected, "lorakit")


def spy_on_experts_path(monkeypatch) -> list[str | None]:
    """Record what ``LoraParameter._experts_path`` answers on each call."""
    taken, original = [], LoraParameter._experts_path

    def spy(self, args, kwargs):
        taken.append(original(self, args, kwargs))
        return taken[-1]

    monkeypatch.setattr(LoraParameter, "_experts_path", spy)
    return taken


@pytest.mark.parametrize("family", NAMES)
def test_experts_fast_path_equals_the_modules_own_forward_in_training(family, monkeypatch):
    def run(fast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = build(family).train()
        add_lora(model, LoraConfig(r=3, alpha=6, init="random", target_modules="all-linear"))
        if fast:
            taken = spy_on_experts_path(monkeypatch)
        else:  # the generic path: the module's own forward with W + ΔW swapped in
            monkeypatch.setattr(LoraParameter, "_experts_path", lambda *a: None)
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        monkeypatch.undo()
        if fast:  # every MoE layer's experts on the fast path
            assert taken and set(taken) == {"dense" if family == "llama4_text" else "routed"}
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.detach(), grads

    fast_logits, fast_grads = run(fast=True)
    slow_logits, slow_grads = run(fast=False)
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-5, atol=1e-5)
    assert fast_grads.keys() == slow_grads.keys() and len(fast_grads) >= 12
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, slow_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_experts_fast_path_under_bf16_autocast(monkeypatch):
    # ``lorakit train --bf16`` runs the model under CPU autocast: the fast path runs there too
    # (no ΔW formed) and gives the module's own autocast forward to bf16 accuracy. Measured:
    # |fast - slow| 0.03 and the slow path's own error against fp32 0.03, while the experts'
    # LoRA moves the logits by 0.29 (of 0.37).
    def refuse(*args):
        raise AssertionError("an expert's ΔW was formed in the forward")

    def run(fast: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model = build("qwen3_moe").train()
        add_lora(model, LoraConfig(r=3, alpha=6, init="random", target_modules="all-linear"))
        if fast:
            monkeypatch.setattr(LoraParameter, "delta_weight", refuse)
        else:
            monkeypatch.setattr(LoraParameter, "_experts_path", lambda *a: None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=IDS, labels=IDS)
            out.loss.backward()
        monkeypatch.undo()
        grads = {
            n: p.grad for n, p in model.named_parameters() if "experts" in n and p.grad is not None
        }
        return out.logits.detach().float(), grads

    fast_logits, fast_grads = run(fast=True)
    slow_logits, slow_grads = run(fast=False)
    torch.testing.assert_close(fast_logits, slow_logits, rtol=0, atol=0.06)
    assert fast_grads.keys() == slow_grads.keys() and len(fast_grads) == 8
    for name, grad in fast_grads.items():  # bf16 gradients: the same direction
        cosine = F.cosine_similarity(grad.flatten(), slow_grads[name].flatten(), dim=0)
        assert cosine > 0.99, f"{name}: cosine {cosine:.4f}"


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "llama4_text"])
def test_experts_fast_path_forms_no_delta_weight(family, monkeypatch):
    model = build(family)
    add_lora(model, LoraConfig(r=4, init="random", target_parameters=["gate_up_proj", "down_proj"]))

    def refuse(*args):
        raise AssertionError("an expert's ΔW was formed in the forward")

    monkeypatch.setattr(LoraParameter, "delta_weight", refuse)
    out = model(input_ids=IDS).logits  # grad enabled: the training graph
    seen, todo = set(), [out.grad_fn]
    while todo:  # every node of the autograd graph
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [n for n, _ in node.next_functions]
    assert "GroupedLoraFunctionBackward" in {type(node).__name__ for node in seen}


def test_llama4_trains_with_its_in_place_shared_expert_sum():
    # Llama-4's MoE adds the routed experts to the shared expert's output in place
    # (``out.add_``); that output is a fused LoRA Linear's, which must not be a view.
    model = build("llama4_text").train()
    add_lora(model, LoraConfig(r=4, init="random", target_modules="all-linear"))
    shared = model.model.layers[0].feed_forward.shared_expert.down_proj
    assert shared._path(torch.zeros(1, 16), extra_args=False) == "fused"
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in shared.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_llama4_router_is_frozen_by_all_linear_and_refused_by_name():
    model = add_lora(build("llama4_text"), LoraConfig(r=2, target_modules="all-linear"))
    assert type(model.model.layers[0].feed_forward.router).__name__ == "Llama4Router"
    assert logits(model).isfinite().all()  # the router's tuple reaches the MoE block intact
    with pytest.raises(LoraError, match=r"router: Llama4Router is a router whose forward does"):
        add_lora(build("llama4_text"), LoraConfig(r=2, target_modules=["router"]))
    adapted = build("llama4_text")
    add_lora(adapted, LoraConfig(r=2, init="random", target_parameters=["router.weight"]))
    assert isinstance(adapted.model.layers[0].feed_forward.router, LoraParameter)
    assert (logits(adapted) - logits(build("llama4_text"))).abs().max() > 1e-4


def test_save_adapter_writes_the_explicit_form_for_library_users(tmp_path):
    model = build("qwen3_moe")
    add_lora(model, LoraConfig(r=2, init="random", target_modules="all-linear"))
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kvoq"
    )
    assert written["target_parameters"] == [
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("down_proj", "gate_up_proj")
    ]
    assert parameter_module._EXPERT_WEIGHTS  # the fast path's parameters
