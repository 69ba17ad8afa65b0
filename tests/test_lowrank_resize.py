"""Resizing an adapter: exact at the same rank, the error is its ΔW spectrum's tail."""

import pytest
import tiny
import torch
from peft import PeftModel

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter
from lorakit.lowrank import rank_for_energy, resize_adapter


@pytest.fixture
def adapted():
    model = add_lora(tiny.llama(), LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    tiny.randomize_adapters(model)
    return model


def _layer_deltas(model):
    return {
        p: m.delta_weight("default").detach()
        for p, m in model.named_modules()
        if hasattr(m, "lora_A")
    }


def test_resize_to_the_same_rank_is_exact(adapted):
    before = tiny.logits(adapted)
    report = resize_adapter(adapted, 8)
    assert tiny.max_diff(tiny.logits(adapted), before) < 1e-5
    assert all(row.old_rank == 8 and row.rank == 8 and row.rel_error < 1e-5 for row in report.rows)
    q = adapted.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.scale["default"] == 1.0 and report.config.alpha == 8


def test_resize_error_is_the_tail_of_the_delta_spectrum(adapted, tmp_path):
    deltas = _layer_deltas(adapted)
    report = resize_adapter(adapted, 3)
    for row in report.rows:
        assert row.rel_error == pytest.approx(
            tiny.spectrum_tail(torch.linalg.svdvals(deltas[row.path].double()), 3), rel=1e-3
        )
        assert (row.params_before, row.params_after) == (8 * sum(row.shape), 3 * sum(row.shape))
    q = adapted.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.r["default"] == 3 and q.lora_A["default"].shape == (3, 32)
    save_adapter(adapted, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny.llama(), tmp_path).eval()
    assert tiny.max_diff(tiny.logits(peft_model), tiny.logits(adapted)) < 1e-5


def test_resize_by_energy_gives_per_module_ranks(adapted, tmp_path):
    deltas = _layer_deltas(adapted)
    report = resize_adapter(adapted, energy=0.7)
    for row in report.rows:
        assert row.rank == rank_for_energy(torch.linalg.svdvals(deltas[row.path]), 0.7)
    save_adapter(adapted, tmp_path)
    assert (
        tiny.max_diff(tiny.logits(load_adapter(tiny.llama(), tmp_path)), tiny.logits(adapted))
        < 1e-5
    )


def test_resize_rejects_bad_requests(adapted):
    with pytest.raises(LoraError, match="positive integer"):
        resize_adapter(adapted, 0)
    with pytest.raises(
        LoraError, match=r"of 4 module\(s\), e\.g\. model\.layers\.0\.self_attn\.k_proj: 16"
    ):
        resize_adapter(adapted, 17)
    with pytest.raises(LoraError, match="Unknown adapter"):
        resize_adapter(adapted, 2, adapter_name="other")
    pissa = add_lora(tiny.llama(), LoraConfig(r=4, target_modules=["q_proj"], init="pissa"))
    with pytest.raises(LoraError, match="pissa adapter"):
        resize_adapter(pissa, 2)
