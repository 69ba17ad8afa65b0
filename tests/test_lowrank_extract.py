"""A full fine-tune extracted into an adapter: exact at full rank, PEFT-readable, checked."""

import copy
import itertools
import json

import pytest
import tiny
import torch
from peft import PeftModel

from lorakit import LoraError, save_adapter
from lorakit.lowrank import extract_adapter, rank_for_energy
from lorakit.state import adapter_configs

LLAMA_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "embed_tokens",
    "lm_head",
]


@pytest.fixture(scope="module")
def finetune():
    return tiny.full_finetune()


def _deltas(base, tuned, paths):
    """Each target's ΔW as the (out, in) matrix (embeddings transposed, as B @ A gives it)."""
    out = {}
    for path in paths:
        delta = (tuned.get_submodule(path).weight - base.get_submodule(path).weight).detach()
        out[path] = delta.T if path.endswith("embed_tokens") else delta
    return out


def test_full_rank_extraction_reproduces_the_tuned_model(finetune, tmp_path):
    base, tuned = finetune
    model = copy.deepcopy(base)
    report = extract_adapter(model, tuned, LLAMA_TARGETS, energy=1.0, keep_untargeted=True)
    assert tiny.max_diff(tiny.logits(model), tiny.logits(tuned)) < 1e-4
    assert all(row.rel_error < 1e-4 for row in report.rows)
    assert sorted(report.kept) == sorted(report.untargeted) and len(report.kept) == 5
    assert "model.norm.weight" in report.kept and len(report.rows) == 16
    assert "model.layers.0.input_layernorm" in report.config.modules_to_save
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "model.norm" in written["modules_to_save"]
    peft_model = PeftModel.from_pretrained(tiny.llama(), tmp_path).eval()
    assert tiny.max_diff(tiny.logits(peft_model), tiny.logits(tuned)) < 1e-4


def test_extraction_degrades_smoothly_with_rank(finetune):
    base, tuned = finetune
    errors = []
    for rank in (1, 2, 4, 8, 16):
        model = copy.deepcopy(base)
        report = extract_adapter(model, tuned, LLAMA_TARGETS, rank=rank, keep_untargeted=True)
        errors.append(tiny.max_diff(tiny.logits(model), tiny.logits(tuned)))
        if rank == 4:
            deltas = _deltas(base, tuned, [row.path for row in report.rows])
            for row in report.rows:
                s = torch.linalg.svdvals(deltas[row.path].double())
                assert row.rank == 4
                assert row.rel_error == pytest.approx(tiny.spectrum_tail(s, 4), rel=1e-3)
    assert all(a > b for a, b in itertools.pairwise(errors))  # better with each rank
    assert errors[0] > 4 * errors[-1] > 0


def test_energy_extraction_writes_per_module_ranks(finetune, tmp_path):
    base, tuned = finetune
    model = copy.deepcopy(base)
    report = extract_adapter(model, tuned, ["q_proj", "k_proj", "down_proj"], energy=0.8)
    deltas = _deltas(base, tuned, [row.path for row in report.rows])
    for row in report.rows:
        assert row.rank == rank_for_energy(torch.linalg.svdvals(deltas[row.path]), 0.8)
        assert model.get_submodule(row.path).r["default"] == row.rank
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["rank_pattern"] and len({row.rank for row in report.rows}) > 1
    peft_model = PeftModel.from_pretrained(tiny.llama(), tmp_path).eval()
    assert tiny.max_diff(tiny.logits(peft_model), tiny.logits(model)) < 1e-5


def test_untargeted_changes_are_listed_not_kept_by_default(finetune):
    base, tuned = finetune
    model = copy.deepcopy(base)
    report = extract_adapter(model, tuned, ["q_proj", "v_proj"], rank=2)
    assert report.kept == [] and report.config.modules_to_save is None
    for name in ("model.norm.weight", "lm_head.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert report.untargeted[name] > 0
    assert "model.layers.1.self_attn.q_proj.weight" not in report.untargeted
    assert "lm_head.weight" in str(report) and "dropped" in str(report)


def test_extraction_from_gpt2_conv1d_keeps_biases_and_tied_head(tmp_path):
    base = tiny.gpt2()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    report = extract_adapter(
        base, tuned, ["c_attn", "c_proj", "c_fc"], energy=1.0, keep_untargeted=True
    )
    assert report.config.bias == "lora_only" and "lm_head" in report.config.modules_to_save
    assert "transformer.h.0.attn.c_attn.bias" in report.kept and report.kept == list(
        report.untargeted
    )
    assert tiny.max_diff(tiny.logits(base), tiny.logits(tuned)) < 1e-4
    save_adapter(base, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny.gpt2(), tmp_path).eval()
    assert tiny.max_diff(tiny.logits(peft_model), tiny.logits(tuned)) < 1e-4


def test_extraction_into_a_convolution(tmp_path):
    base = tiny.cnn()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    report = extract_adapter(base, tuned, ["conv1", "head"], energy=1.0, keep_untargeted=True)
    assert report.rows[0].rank == 8 and base.conv1.lora_A["default"].shape == (8, 3, 3, 3)
    torch.testing.assert_close(base(images), tuned(images), atol=1e-5, rtol=0)
    with pytest.raises(LoraError, match="conv2: .*groups=2"):
        extract_adapter(tiny.cnn(), tuned, ["conv2"], rank=2)


def test_mismatched_architectures_raise():
    with pytest.raises(LoraError, match="share one architecture"):
        extract_adapter(tiny.llama(), tiny.gpt2(), ["q_proj"], rank=2)
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(
        LlamaConfig(**{**tiny.llama().config.to_dict(), "intermediate_size": 40})
    )
    with pytest.raises(LoraError, match=r"shape \(48, 32\) in the base, \(40, 32\)"):
        extract_adapter(tiny.llama(), wider, ["q_proj"], rank=2)


def test_extraction_rank_above_a_module_raises_before_changes(finetune):
    base, tuned = finetune
    model = copy.deepcopy(base)
    with pytest.raises(
        LoraError,
        match=r"rank 17 exceeds min\(out, in\) of 2 module\(s\), e\.g\. \S+\.0\.self_attn\.k_proj: 16",
    ):
        extract_adapter(model, tuned, ["q_proj", "k_proj"], rank=17)
    assert not adapter_configs(model)
