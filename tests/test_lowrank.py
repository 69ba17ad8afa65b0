"""Low-rank tools against Eckart–Young, hand counts, reference outputs and PEFT."""

import argparse
import copy
import itertools
import json
import math

import pytest
import tiny
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter
from lorakit.cli import lowrank as cli
from lorakit.factorize import FACTORIZED_KEY, LowRankLinear, factorize, load_factorized
from lorakit.lowrank import (
    extract_adapter,
    factored_svd,
    low_rank,
    rank_for_energy,
    resize_adapter,
)
from lorakit.models import load_model
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
IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _with_singular_values(s, rows, cols, seed=0):
    """A (rows, cols) matrix whose singular values are exactly ``s``."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(rows, len(s), generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(cols, len(s), generator=gen, dtype=torch.float64))[0]
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T


def _tail(s, r):
    """Eckart–Young: ‖W − W_r‖_F / ‖W‖_F from the singular values."""
    s = torch.as_tensor(s, dtype=torch.float64)
    return float(s[r:].square().sum().sqrt() / s.square().sum().sqrt())


# --- low_rank --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 8), (8, 12)])
def test_full_rank_reconstructs_exactly(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    B, A, info = low_rank(W, rank=8)
    assert B.shape == (shape[0], 8) and A.shape == (8, shape[1])
    torch.testing.assert_close(B @ A, W, atol=1e-5, rtol=0)
    assert info["rank"] == 8 and info["rel_error"] < 1e-6 and info["energy"] == pytest.approx(1.0)


def test_rank_r_error_is_the_singular_value_tail():
    s = [5.0, 3.0, 2.0, 1.0, 0.5, 0.25]
    W = _with_singular_values(s, 10, 7)
    for r in range(1, 6):
        B, A, info = low_rank(W, rank=r)
        measured = float((W - B @ A).norm() / W.norm())
        assert measured == pytest.approx(_tail(s, r), rel=1e-9)
        assert info["rel_error"] == pytest.approx(_tail(s, r), rel=1e-9)
        assert info["energy"] == pytest.approx(sum(x * x for x in s[:r]) / sum(x * x for x in s))
        # Balanced split: B = U sqrt(S), A = sqrt(S) Vᵀ, so Bᵀ B = A Aᵀ = diag(S_r).
        torch.testing.assert_close(B.T @ B, A @ A.T)
        torch.testing.assert_close(torch.diag(B.T @ B), torch.tensor(s[:r], dtype=torch.float64))


@pytest.mark.parametrize(
    ("energy", "rank"),
    # Σσ² = 16 + 4 + 1 + 0.25 = 21.25; kept shares 0.753, 0.941, 0.988, 1.
    [(0.5, 1), (0.75, 1), (0.76, 2), (0.94, 2), (0.95, 3), (0.988, 3), (0.99, 4), (1.0, 4)],
)
def test_energy_picks_the_smallest_sufficient_rank(energy, rank):
    W = _with_singular_values([4.0, 2.0, 1.0, 0.5], 9, 6).float()
    assert low_rank(W, energy=energy)[2]["rank"] == rank


def test_energy_one_finds_the_numerical_rank():
    W = _with_singular_values([3.0, 2.0, 1.0], 8, 6).float()  # rank 3 stored in fp32
    B, _, info = low_rank(W, energy=1.0)
    assert info["rank"] == 3 and B.shape == (8, 3)
    assert rank_for_energy(torch.zeros(4), 0.9) == 1  # a zero matrix still gets a factor


def test_randomized_svd_states_its_measured_error():
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(300, 20, generator=gen) @ torch.randn(20, 200, generator=gen)
    W += 1e-2 * torch.randn(300, 200, generator=gen)
    B, A, info = low_rank(W, rank=20, randomized=True)
    exact = low_rank(W, rank=20, randomized=False)[2]
    assert info["method"] == "randomized_svd" and exact["method"] == "svd"
    assert info["rel_error"] == pytest.approx(float((W - B @ A).norm() / W.norm()), rel=1e-4)
    # Eckart–Young bounds it from below (up to fp32 rounding); 4 power iterations get close.
    assert 0.9999 * exact["rel_error"] <= info["rel_error"] <= 1.01 * exact["rel_error"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "positive integer"),
        ({"rank": 9}, "exceeds min(out, in) = 8"),
        ({"energy": 0.0}, "(0, 1]"),
        ({"energy": 1.5}, "(0, 1]"),
        ({"rank": 2, "energy": 0.5}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_bad_rank_or_energy_raises(kwargs, message):
    with pytest.raises(LoraError, match=re_escape(message)):
        low_rank(torch.randn(12, 8), **kwargs)


def re_escape(text):
    import re

    return re.escape(text)


def test_non_matrix_input_raises():
    with pytest.raises(LoraError, match="2D"):
        low_rank(torch.randn(2, 3, 4), rank=1)
    with pytest.raises(LoraError, match="NaN"):
        low_rank(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), rank=1)


# --- extract_adapter from a real full fine-tune -----------------------------------------------
@pytest.fixture(scope="module")
def finetune():
    """(base, tuned): a tiny Llama and a copy trained for 5 AdamW steps on all its weights."""
    base = tiny.llama()
    tuned = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=1e-2)
    data = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    for _ in range(5):
        tuned(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return base, tuned.eval().requires_grad_(False)


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
    assert _max_diff(_logits(model), _logits(tuned)) < 1e-4
    assert all(row.rel_error < 1e-4 for row in report.rows)
    assert sorted(report.kept) == sorted(report.untargeted) and len(report.kept) == 5
    assert "model.norm.weight" in report.kept and len(report.rows) == 16
    assert "model.layers.0.input_layernorm" in report.config.modules_to_save
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "model.norm" in written["modules_to_save"]
    peft_model = PeftModel.from_pretrained(tiny.llama(), tmp_path).eval()
    assert _max_diff(_logits(peft_model), _logits(tuned)) < 1e-4


def test_extraction_degrades_smoothly_with_rank(finetune):
    base, tuned = finetune
    errors = []
    for rank in (1, 2, 4, 8, 16):
        model = copy.deepcopy(base)
        report = extract_adapter(model, tuned, LLAMA_TARGETS, rank=rank, keep_untargeted=True)
        errors.append(_max_diff(_logits(model), _logits(tuned)))
        if rank == 4:
            deltas = _deltas(base, tuned, [row.path for row in report.rows])
            for row in report.rows:
                s = torch.linalg.svdvals(deltas[row.path].double())
                assert row.rank == 4
                assert row.rel_error == pytest.approx(_tail(s, 4), rel=1e-3)
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
    assert _max_diff(_logits(peft_model), _logits(model)) < 1e-5


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
    assert _max_diff(_logits(base), _logits(tuned)) < 1e-4
    save_adapter(base, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny.gpt2(), tmp_path).eval()
    assert _max_diff(_logits(peft_model), _logits(tuned)) < 1e-4


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


# --- PiSSA / OLoRA ---------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("make", [tiny.llama, tiny.gpt2])
def test_weight_inits_start_from_the_unchanged_output(init, make):
    model = make()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _logits(model)
    targets = "all-linear" if make is tiny.llama else ["c_attn", "c_fc"]
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=targets, init=init))
    assert _max_diff(_logits(model), before) < 1e-5
    layer = model.get_submodule(
        "model.layers.0.self_attn.q_proj" if make is tiny.llama else "transformer.h.0.attn.c_attn"
    )
    W = original[_weight_name(model, layer)]
    residual = layer.base_weight.detach()
    torch.testing.assert_close(residual + layer.delta_weight("default"), W, atol=1e-5, rtol=0)
    W = W.T if layer.fan_in_fan_out else W  # (out, in)
    B = layer.lora_B["default"].detach()
    if init == "pissa":  # the residual keeps W's spectrum minus its top 4 values
        tail = torch.linalg.svdvals(W)[4:]
        torch.testing.assert_close(
            torch.linalg.svdvals(residual)[: len(tail)], tail, atol=1e-5, rtol=0
        )
    else:  # B = Q_r of W = QR has orthonormal columns
        torch.testing.assert_close(B.T @ B, torch.eye(4), atol=1e-5, rtol=0)


def _weight_name(model, layer):
    return next(n for n, p in model.named_parameters() if p is layer.base_weight).replace(
        ".base_layer", ""
    )


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_match_peft(init):
    ours = add_lora(tiny.llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init=init))
    peft_cfg = PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init)
    theirs = get_peft_model(tiny.llama(), peft_cfg)
    mine = ours.get_submodule("model.layers.1.self_attn.q_proj")
    peft_layer = theirs.base_model.model.get_submodule("model.layers.1.self_attn.q_proj")
    torch.testing.assert_close(mine.lora_A["default"], peft_layer.lora_A["default"].weight)
    torch.testing.assert_close(mine.lora_B["default"], peft_layer.lora_B["default"].weight)
    torch.testing.assert_close(mine.base_weight, peft_layer.base_layer.weight)


@pytest.mark.parametrize(("init", "rslora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_saved_weight_init_adapter_is_a_plain_lora_on_the_original_base(init, rslora, tmp_path):
    model = tiny.llama()
    config = LoraConfig(r=4, alpha=8, target_modules="all-linear", init=init, use_rslora=rslora)
    add_lora(model, config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = _logits(model.eval())
    assert _max_diff(trained, _logits(tiny.llama())) > 1e-2  # training changed something
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["r"] == 8 and written["init_lora_weights"] is True
    assert written["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if rslora else 2))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (
        8,
        32,
    )
    peft_model = PeftModel.from_pretrained(tiny.llama(), tmp_path).eval()
    assert _max_diff(_logits(peft_model), trained) < 1e-4
    assert _max_diff(_logits(load_adapter(tiny.llama(), tmp_path)), trained) < 1e-4


def test_weight_init_on_unsupported_layers_raises_before_changes():
    model = tiny.llama()
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(LoraError, match="embed_tokens: init='pissa' needs a Linear"):
        add_lora(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init="pissa"))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
    with pytest.raises(LoraError, match="lm_head: its weight is tied"):
        add_lora(tiny.llama(tie=True), LoraConfig(r=4, target_modules=["lm_head"], init="olora"))


def test_weight_init_names_follow_peft():
    assert (
        LoraConfig(target_modules=["q"], init="olora").to_peft_dict()["init_lora_weights"]
        == "olora"
    )
    for value, init in [
        ("pissa", "pissa"),
        ("pissa_niter_4", "pissa"),
        ("olora", "olora"),
        (True, "kaiming"),
    ]:
        assert (
            LoraConfig.from_peft_dict(
                {"r": 4, "target_modules": ["q"], "init_lora_weights": value}
            ).init
            == init
        )


# --- resize_adapter --------------------------------------------------------------------------
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
    before = _logits(adapted)
    report = resize_adapter(adapted, 8)
    assert _max_diff(_logits(adapted), before) < 1e-5
    assert all(row.old_rank == 8 and row.rank == 8 and row.rel_error < 1e-5 for row in report.rows)
    q = adapted.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.scale["default"] == 1.0 and report.config.alpha == 8


def test_resize_error_is_the_tail_of_the_delta_spectrum(adapted, tmp_path):
    deltas = _layer_deltas(adapted)
    report = resize_adapter(adapted, 3)
    for row in report.rows:
        assert row.rel_error == pytest.approx(
            _tail(torch.linalg.svdvals(deltas[row.path].double()), 3), rel=1e-3
        )
        assert (row.params_before, row.params_after) == (8 * sum(row.shape), 3 * sum(row.shape))
    q = adapted.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.r["default"] == 3 and q.lora_A["default"].shape == (3, 32)
    save_adapter(adapted, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny.llama(), tmp_path).eval()
    assert _max_diff(_logits(peft_model), _logits(adapted)) < 1e-5


def test_resize_by_energy_gives_per_module_ranks(adapted, tmp_path):
    deltas = _layer_deltas(adapted)
    report = resize_adapter(adapted, energy=0.7)
    for row in report.rows:
        assert row.rank == rank_for_energy(torch.linalg.svdvals(deltas[row.path]), 0.7)
    save_adapter(adapted, tmp_path)
    assert _max_diff(_logits(load_adapter(tiny.llama(), tmp_path)), _logits(adapted)) < 1e-5


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


# --- factorize -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny.llama, tiny.gpt2])
def test_full_rank_factorization_keeps_outputs(make):
    model = make()
    before = _logits(model)
    targets = "all-linear" if make is tiny.llama else ["c_attn", "c_proj", "c_fc"]
    report = factorize(model, targets, energy=1.0)
    assert _max_diff(_logits(model), before) < 1e-5
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
    assert q.rel_error == pytest.approx(_tail(torch.linalg.svdvals(W.double()), 4), rel=1e-4)
    model.save_pretrained(tmp_path)
    layout = json.loads((tmp_path / "config.json").read_text())[FACTORIZED_KEY]
    assert layout["model.layers.1.mlp.gate_proj"] == 4 and len(layout) == 4
    loaded = load_factorized(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.gate_proj, LowRankLinear)
    assert _max_diff(_logits(loaded), _logits(model)) < 1e-6


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


# --- CLI -------------------------------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", *[f"w{i}" for i in range(61)]]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _call(name, argv):
    add_arguments, run = cli.COMMANDS[name]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, finetune):
    """Base and tuned model folders with a tokenizer, and a text data file."""
    root = tmp_path_factory.mktemp("cli")
    for name, model in zip(("base", "tuned"), finetune, strict=True):
        model.save_pretrained(root / name)
        _tokenizer().save_pretrained(root / name)
    gen = torch.Generator().manual_seed(4)
    lines = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, 61, (15,), generator=gen)) for _ in range(6)
    ]
    (root / "data.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return root


def test_perplexity_is_exp_of_the_mean_token_loss(folders):
    model, tokenizer = load_model(str(folders / "base"))
    ppl = cli.perplexity(model, tokenizer, folders / "data.jsonl")
    losses = []
    for line in (folders / "data.jsonl").read_text().splitlines():
        ids = tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([ids])
        losses.append(F.cross_entropy(_logits(model, ids)[0, :-1], ids[0, 1:], reduction="none"))
    assert ppl == pytest.approx(math.exp(torch.cat(losses).mean().item()), rel=1e-5)


def test_cli_extract_resize_factorize(folders, finetune, capsys):
    out = folders / "out"
    assert _call("extract", ["--base", str(folders / "base"), "--tuned", str(folders / "tuned"),
                             "--rank", "4", "--output", str(out / "extracted")]) == 0  # fmt: skip
    assert "model.norm.weight" in capsys.readouterr().out  # listed as changed, not targeted
    written = json.loads((out / "extracted" / "adapter_config.json").read_text())
    assert written["r"] == 4 and written["base_model_name_or_path"] == str(folders / "base")
    expected = copy.deepcopy(finetune[0])
    extract_adapter(expected, finetune[1], "all-linear", rank=4)
    adapted = load_adapter(load_model(str(folders / "base"))[0], out / "extracted")
    assert _max_diff(_logits(adapted), _logits(expected)) < 1e-5

    assert (
        _call("resize", [str(out / "extracted"), "--rank", "2", "--output", str(out / "r2")]) == 0
    )
    assert "4 -> 2" in capsys.readouterr().out
    tensors = load_file(out / "r2" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (2, 32)

    assert _call("factorize", ["--model", str(folders / "base"), "--targets", "q_proj", "v_proj",
                               "--rank", "3", "--data", str(folders / "data.jsonl"),
                               "--output", str(out / "factorized")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "perplexity on" in printed and "before" in printed and "after" in printed
    loaded, _ = load_model(str(out / "factorized"))
    reference = copy.deepcopy(finetune[0])
    factorize(reference, ["q_proj", "v_proj"], rank=3)
    assert _max_diff(_logits(loaded), _logits(reference)) < 1e-6


@pytest.mark.parametrize(
    ("b_shape", "a_shape"),
    [((40, 4), (4, 30)), ((3, 20, 6), (3, 6, 12)), ((5, 9), (9, 7))],
    ids=["low-rank", "batched", "k-above-m"],
)
def test_factored_svd_is_the_svd_of_the_product(b_shape, a_shape):
    gen = torch.Generator().manual_seed(0)
    B, A = torch.randn(b_shape, generator=gen), torch.randn(a_shape, generator=gen)
    U, S, Vh = factored_svd(B, A)
    M = B @ A
    j = min(M.shape[-2], M.shape[-1], B.shape[-1])
    assert S.shape[-1] == j
    torch.testing.assert_close(S, torch.linalg.svdvals(M)[..., :j], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(U * S.unsqueeze(-2) @ Vh, M, rtol=1e-4, atol=1e-4)
    eye = torch.eye(j).expand(*S.shape[:-1], j, j)
    torch.testing.assert_close(U.mT @ U, eye, rtol=0, atol=1e-4)  # orthonormal columns
    torch.testing.assert_close(Vh @ Vh.mT, eye, rtol=0, atol=1e-4)


def test_svd_threads_leave_busy_cores_alone_and_come_back(monkeypatch):
    import os

    from lorakit.lowrank import spare_threads, torch_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    before = torch.get_num_threads()
    with torch_threads(8):
        monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # only this process
        assert spare_threads() == 8
        monkeypatch.setattr(os, "getloadavg", lambda: (4.5, 1.0, 1.0))  # 3.5 cores' worth busy
        assert spare_threads() == 4
        monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 1.0, 1.0))
        assert spare_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the user's choice stands
        assert spare_threads() == 8
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 8
    assert torch.get_num_threads() == before
