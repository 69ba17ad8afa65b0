"""A Linear replaced by two low-rank Linears: outputs, parameter counts, round trip."""

import json

import pytest
import tiny
import torch

from lorakit import LoraConfig, LoraError, add_lora
from lorakit.lowrank.factorize import FACTORIZED_KEY, LowRankLinear, factorize, load_factorized


@pytest.mark.parametrize("make", [tiny.llama, tiny.gpt2])
def test_full_rank_factorization_keeps_outputs(make):
    model = make()
    before = tiny.logits(model)
    targets = "all-linear" if make is tiny.llama else ["c_attn", "c_proj", "c_fc"]
    report = factorize(model, targets, energy=1.0)
    assert tiny.max_diff(tiny.logits(model), before) < 1e-5
    assert all(isinstance(model.get_submodule(row.path), LowRankLinear) for row in report.rows)


def test_factorization_counts_parameters_and_round_trips(tmp_path):
    model = tiny.llama()
    total = sum(p.numel() for p in model.parameters())
    report = factorize(model, ["q_proj", "gate_proj"], rank=4)
    rows = {row.path: row for row in report.rows}
    q, gate = rows["model.layers.0.self_attn.q_proj"], rows["model.layers.1.mlp.gate_proj"]
    assert (q.params_before, q.params_after) == (32 * 32, 4 * (32 + 32))
    assert (gate.params_before, gate.params_after) == (48 * 32, 4 * (32 + 48))
    assert (
        sum(p.numel() for p in model.parameters())
        == total - report.params_before + report.params_after
    )
    W = tiny.llama().model.layers[0].self_attn.q_proj.weight.detach()
    assert q.rel_error == pytest.approx(
        tiny.spectrum_tail(torch.linalg.svdvals(W.double()), 4), rel=1e-4
    )
    model.save_pretrained(tmp_path)
    layout = json.loads((tmp_path / "config.json").read_text())[FACTORIZED_KEY]
    assert layout["model.layers.1.mlp.gate_proj"] == 4 and len(layout) == 4
    loaded = load_factorized(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.gate_proj, LowRankLinear)
    assert tiny.max_diff(tiny.logits(loaded), tiny.logits(model)) < 1e-6


def test_factorize_rejects_bad_requests():
    with pytest.raises(LoraError, match=r"rank 17 exceeds .*k_proj: 16; use rank <= 16"):
        factorize(tiny.llama(), ["q_proj", "k_proj"], rank=17)
    with pytest.raises(LoraError, match=r"Cannot factorize:\n.*'q_prj' matched no module"):
        factorize(tiny.llama(), ["q_prj"], rank=2)
    with pytest.raises(LoraError, match="Embedding is not a Linear"):
        factorize(tiny.llama(), ["embed_tokens"], rank=2)
    with pytest.raises(LoraError, match="tied"):
        factorize(tiny.llama(tie=True), ["lm_head"], rank=2)
    with pytest.raises(LoraError, match=r"\(0, 1\]"):
        factorize(tiny.llama(), "all-linear", energy=0.0)
    adapted = add_lora(tiny.llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(LoraError, match="unload"):
        factorize(adapted, ["v_proj"], rank=2)


def test_load_factorized_refuses_a_plain_model(tmp_path):
    tiny.llama().save_pretrained(tmp_path)
    with pytest.raises(LoraError, match="not a factorised model"):
        load_factorized(tmp_path)
