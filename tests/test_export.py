"""Export to llama.cpp (GGUF adapters and merged models) and vLLM, checked without either.

llama.cpp's side is represented by what it computes from a file: ``s_ll · B (A x)`` with
``s_ll = alpha / rank`` (``get_scale`` in src/llama-adapter.h), rows of ``lora_a`` looked up
for ``token_embd``, and q/k rows permuted as ``LlamaModel.permute`` in its converter (copied
below, not imported from lorakit). The byte-for-byte reference in tests/data/llamacpp_lora was
written by llama.cpp's own convert_lora_to_gguf.py (scripts/make_gguf_reference.py).
tests/test_interop_llamacpp.py (``make interop``) runs llama.cpp itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import tiny
import torch
from disk import files_on, small_disk  # noqa: F401
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter, unload
from lorakit.cli import main
from lorakit.export import check_vllm, export_adapter, to_gguf, to_gguf_model, to_vllm
from lorakit.export.archs import ArchMap
from lorakit.export.gguf_model import model_tensors
from lorakit.export.gguf_read import Header
from lorakit.state import adapter_configs
from lorakit.targeting import lora_layers

DATA = Path(__file__).parent / "data" / "llamacpp_lora"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- llama.cpp's side, written independently of lorakit -------------------------------------
def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's LlamaModel.permute (rows of q/k: halves -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(key -> value, tensor name -> float tensor in numpy order, name -> ggml type)."""
    reader = gguf.GGUFReader(path)
    kv = {f.name: f.contents() for f in reader.fields.values()}
    values = {
        t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        for t in reader.tensors
    }
    return kv, values, {t.name: t.tensor_type.name for t in reader.tensors}


def llama_cpp_delta(kv: dict, tensors: dict, weight: str) -> torch.Tensor:
    """ΔW llama.cpp adds to ``weight`` (its GGUF layout): alpha / rank · B A (embedding: rows)."""
    A, B = tensors[weight + ".lora_a"].double(), tensors[weight + ".lora_b"].double()
    scale = kv["adapter.lora.alpha"] / B.shape[1]  # rank = lora_b's ne[0]
    if weight == "token_embd.weight":
        return scale * A @ B.T  # (vocab, r) rows looked up, times B: (vocab, dim)
    return scale * B @ A


def lorakit_deltas(model) -> dict[str, torch.Tensor]:
    """Module path -> ΔW of the default adapter as the matrix (out, in)."""
    return {p: m.as_matrix(m.delta_weight("default")).double() for p, m in lora_layers(model)}


def reference_model():
    """The tiny Llama of tests/data/llamacpp_lora (random weights) with its adapter loaded."""
    config = AutoConfig.from_pretrained(DATA / "base")
    model = AutoModelForCausalLM.from_config(config).eval()
    return load_adapter(model, DATA / "adapter")


def adapted_llama(**options) -> torch.nn.Module:
    model = tiny.llama(tie=options.pop("tie", False))
    options.setdefault("target_modules", PROJECTIONS)
    add_lora(model, LoraConfig(**{"r": 4, "alpha": 8, **options}))
    tiny.randomize_adapters(model)
    return model


# --- the plain adapter: byte for byte what llama.cpp's converter writes ----------------------
def test_plain_adapter_is_byte_for_byte_the_converters(tmp_path):
    out = to_gguf(reference_model(), tmp_path / "a.gguf", metadata_dir=DATA / "adapter")
    assert out.read_bytes() == (DATA / "reference.gguf").read_bytes()


def test_reference_names_shapes_alpha_and_values_match_the_adapter():
    model = reference_model()
    kv, tensors, types = read_gguf(DATA / "reference.gguf")
    assert (kv["general.architecture"], kv["general.type"], kv["adapter.type"]) == (
        "llama",
        "adapter",
        "lora",
    )
    assert kv["adapter.lora.alpha"] == 8.0
    assert len(tensors) == 2 * 2 * len(PROJECTIONS) and set(types.values()) == {"F32"}
    gguf_of = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    gguf_of |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    heads = {"q_proj": 4, "k_proj": 2}  # tiny.llama: 4 heads, 2 kv heads
    for path, layer in lora_layers(model):
        block, leaf = path.split(".")[2], path.split(".")[-1]
        name = f"blk.{block}.{gguf_of[leaf]}.weight"
        A, B = layer.lora_A["default"].detach(), layer.lora_B["default"].detach()
        assert torch.equal(tensors[name + ".lora_a"], A)
        expected_b = llama_permute(B, heads[leaf]) if leaf in heads else B
        assert torch.equal(tensors[name + ".lora_b"], expected_b)
        delta = layer.as_matrix(layer.delta_weight("default")).double()
        expected = llama_permute(delta, heads[leaf]) if leaf in heads else delta
        torch.testing.assert_close(llama_cpp_delta(kv, tensors, name), expected)


# --- scales llama.cpp's single alpha cannot express, folded into B --------------------------
def check_deltas(model, path: Path, n_head: int = 4, n_kv: int = 2) -> dict:
    """Every adapted weight: llama.cpp's ΔW from the file == lorakit's ΔW (GGUF layout)."""
    kv, tensors, _ = read_gguf(path)
    arch = ArchMap(model)
    for module, delta in lorakit_deltas(model).items():
        name = arch.gguf_name(module + ".weight")
        if module.endswith("q_proj"):
            delta = llama_permute(delta, n_head)
        elif module.endswith("k_proj"):
            delta = llama_permute(delta, n_kv)
        if name == "token_embd.weight":
            delta = delta.T
        torch.testing.assert_close(llama_cpp_delta(kv, tensors, name), delta)
    return tensors


def test_rslora_and_patterns_are_exact_in_llama_cpp(tmp_path):
    model = adapted_llama(
        use_rslora=True,
        rank_pattern={"q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3.0, "down_proj": 5.0},
    )
    tensors = check_deltas(model, to_gguf(model, tmp_path / "a.gguf"))
    # What llama.cpp's converter writes (B as saved) would be off by alpha/rank over the true
    # scale: sqrt(r) for rsLoRA; the folded B is what makes the check above pass.
    layer = dict(lora_layers(model))["model.layers.0.self_attn.v_proj"]
    B = layer.lora_B["default"].detach()
    assert not torch.allclose(tensors["blk.0.attn_v.weight.lora_b"], B)
    torch.testing.assert_close(tensors["blk.0.attn_v.weight.lora_b"], B * 3.0 / 2 / (8 / 4))


def test_embedding_and_head_lora(tmp_path):
    model = adapted_llama(target_modules=["embed_tokens", "q_proj", "lm_head"])
    tensors = check_deltas(model, to_gguf(model, tmp_path / "a.gguf"))
    assert tuple(tensors["token_embd.weight.lora_a"].shape) == (64, 4)  # (vocab, rank)
    assert tuple(tensors["token_embd.weight.lora_b"].shape) == (32, 4)  # (dim, rank)
    assert tuple(tensors["output.weight.lora_a"].shape) == (4, 32)  # the head: an ordinary pair


def test_fused_slices_and_conv1d_of_gpt2(tmp_path):
    model = tiny.gpt2()
    config = LoraConfig(
        r=2,
        alpha=6,
        target_modules=["c_attn", "c_proj"],
        fused_slices={"c_attn": [True, False, True]},
    )
    add_lora(model, config)
    tiny.randomize_adapters(model)
    kv, tensors, _ = read_gguf(to_gguf(model, tmp_path / "a.gguf"))
    # q and v slices of the fused projection: one pair on attn_qkv of rank 2 · 2, k untouched
    assert tuple(tensors["blk.0.attn_qkv.weight.lora_a"].shape) == (4, 24)
    assert tuple(tensors["blk.0.attn_qkv.weight.lora_b"].shape) == (72, 4)
    for module, layer in lora_layers(model):  # Conv1D: GGUF holds (out, in)
        delta = layer.delta_weight("default").double()  # in the Conv1D weight's (in, out)
        name = ArchMap(model).gguf_name(module + ".weight")
        torch.testing.assert_close(llama_cpp_delta(kv, tensors, name), delta.T)
    k_rows = llama_cpp_delta(kv, tensors, "blk.1.attn_qkv.weight")[24:48]
    assert torch.count_nonzero(k_rows) == 0


def test_qwen2_is_not_permuted(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = Qwen2ForCausalLM(config).eval()
    add_lora(model, LoraConfig(r=4, alpha=4, target_modules=["q_proj"]))
    tiny.randomize_adapters(model)
    kv, tensors, _ = read_gguf(to_gguf(model, tmp_path / "a.gguf"))
    assert kv["general.architecture"] == "qwen2"
    layer = dict(lora_layers(model))["model.layers.1.self_attn.q_proj"]
    assert torch.equal(tensors["blk.1.attn_q.weight.lora_b"], layer.lora_B["default"].detach())


# --- refused by name, nothing written --------------------------------------------------------
def opt_model():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
    )
    model = OPTForCausalLM(config).eval()
    return add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))


REFUSED = {
    "architecture": (opt_model, ["OPTForCausalLM", "LlamaForCausalLM"]),
    "modules_to_save": (
        lambda: adapted_llama(modules_to_save=["lm_head"]),
        ["lm_head: modules_to_save"],
    ),
    "dora": (
        lambda: adapted_llama(use_dora=True),
        ["model.layers.0.self_attn.q_proj: DoRA", "model.layers.1.mlp.down_proj: DoRA"],
    ),
    "lora_bias": (
        lambda: adapted_llama(target_modules=["q_proj"], lora_bias=True),
        ["model.layers.1.self_attn.q_proj: lora_bias"],
    ),
    "tied embedding": (
        lambda: adapted_llama(tie=True, target_modules=["embed_tokens"]),
        ["model.embed_tokens: token_embd.weight is tied"],
    ),
    "trainable tokens": (
        lambda: adapted_llama(trainable_token_indices=[1, 2]),
        ["model.embed_tokens: trainable_token_indices"],
    ),
    "several at once": (
        lambda: adapted_llama(use_dora=True, modules_to_save=["lm_head"]),
        ["lm_head: modules_to_save", "model.layers.0.self_attn.k_proj: DoRA", "--merged"],
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_gguf_refusals_name_the_module_and_write_nothing(tmp_path, case):
    build, phrases = REFUSED[case]
    with pytest.raises(LoraError) as err:
        to_gguf(build(), tmp_path / "a.gguf")
    for phrase in phrases:
        assert phrase in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_refused_adapter_exports_merged_on_request(tmp_path):
    model = adapted_llama(use_dora=True, modules_to_save=["lm_head"])
    source = tiny_source(tmp_path / "src.gguf", model.config)
    to_gguf_model(model, tmp_path / "m.gguf", outtype="f32", source=source)
    check_merged(model, tmp_path / "m.gguf")


# --- merged models -----------------------------------------------------------------------------
def tiny_source(path: Path, cfg) -> Path:
    """A GGUF with what a tiny Llama needs besides its tensors: hyperparameters, tokenizer."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def check_merged(model, path: Path, atol: float = 0.0) -> None:
    """Every GGUF tensor == the merged model's parameter (q/k permuted), to ``atol``."""
    merged = unload(copy.deepcopy(model), merge=True)
    _, tensors, _ = read_gguf(path)
    arch = ArchMap(merged)
    expected = {}
    for name, param in merged.named_parameters():
        value = param.detach()
        if name.endswith("q_proj.weight"):
            value = llama_permute(value, 4)
        elif name.endswith("k_proj.weight"):
            value = llama_permute(value, 2)
        expected[arch.gguf_name(name)] = value
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(tensors[name], value, atol=atol, rtol=atol)


def test_merged_f32_equals_lorakits_merge_and_transformers_reads_it(tmp_path):
    model = adapted_llama(use_rslora=True, alpha_pattern={"o_proj": 2.0})
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(x).logits
    source = tiny_source(tmp_path / "src.gguf", model.config)
    out = to_gguf_model(model, tmp_path / "m.gguf", outtype="f32", source=source)
    check_merged(model, out)
    kv, _, types = read_gguf(out)
    assert kv["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert kv["tokenizer.ggml.tokens"][:2] == ["t0", "t1"]
    assert set(types.values()) == {"F32"}
    with torch.no_grad():
        # the model itself is untouched (not bit for bit: the first forward after add_lora
        # runs each layer alone, later ones share q/k/v's node, layers/shared_input.py)
        torch.testing.assert_close(model(x).logits, before, atol=1e-6, rtol=0)
        # transformers' GGUF loader undoes llama.cpp's layout on its own
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
        torch.testing.assert_close(theirs(x).logits, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("outtype", "atol", "matrix_types"),
    [("f16", 1e-3, {"F16"}), ("bf16", 8e-3, {"BF16"}), ("q8_0", 2e-2, {"Q8_0", "F16"})],
)
def test_merged_outtypes(tmp_path, outtype, atol, matrix_types):
    model = adapted_llama()
    source = tiny_source(tmp_path / "src.gguf", model.config)
    out = to_gguf_model(model, tmp_path / "m.gguf", outtype=outtype, source=source)
    check_merged(model, out, atol=atol)
    _, _, types = read_gguf(out)
    assert {t for n, t in types.items() if n.endswith("_norm.weight")} == {"F32"}
    assert {t for n, t in types.items() if not n.endswith("_norm.weight")} == matrix_types
    if outtype == "q8_0":  # rows of 48 values are not Q8_0 blocks of 32: F16, as llama.cpp
        assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.attn_q.weight"] == "Q8_0"


def test_merged_needs_a_source_of_the_same_model(tmp_path):
    model = adapted_llama()
    with pytest.raises(LoraError, match="--vocab-only"):
        to_gguf_model(model, tmp_path / "m.gguf")
    other = tiny.llama().config
    other.num_hidden_layers = 3
    source = tiny_source(tmp_path / "src.gguf", other)
    with pytest.raises(LoraError, match="3 blocks there, 2 here"):
        to_gguf_model(model, tmp_path / "m.gguf", source=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


def test_bundled_smollm2_maps_onto_its_own_gguf(smollm2):
    """Every SmolLM2 weight has the name and shape of its tensor in the shipped GGUF."""
    from lorakit.models.gguf import bundled_gguf

    model, _ = smollm2
    with torch.no_grad():
        ours = {n: tuple(t.shape) for n, t in model_tensors(model, ArchMap(model)).items()}
    theirs = {t.name: t.shape for t in Header(bundled_gguf()).tensors}
    assert ours == theirs and len(ours) == 272


def test_gguf_header_reader_agrees_with_the_gguf_package(tmp_path):
    path = tiny_source(tmp_path / "src.gguf", tiny.llama().config)
    header, reader = Header(path), gguf.GGUFReader(path)
    for field in reader.fields.values():
        if not field.name.startswith("GGUF."):
            assert header.get(field.name) == field.contents(), field.name


# --- vLLM ------------------------------------------------------------------------------------
def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_vllm_folder_is_exact_in_peft_and_under_vllms_one_scale(tmp_path):
    from peft import PeftModel

    model = adapted_llama(
        use_rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0}
    )
    report = to_vllm(model, tmp_path / "v")
    assert report.ok and "scale otherwise" in str(report)
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["modules_to_save"] is None
    x = torch.randint(0, 64, (2, 9))
    peft_model = PeftModel.from_pretrained(tiny.llama(), tmp_path / "v").eval()
    torch.testing.assert_close(logits(peft_model, x), logits(model, x), atol=1e-5, rtol=1e-5)
    # vLLM's rule (PEFTHelper): one scale lora_alpha / r for every module, patterns unread
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "v" / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    for path, delta in lorakit_deltas(model).items():
        key = f"base_model.model.{path}"
        A, B = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
        torch.testing.assert_close(scale * B.double() @ A.double(), delta)


def test_vllm_json_is_the_adapter_files_with_one_scale_and_writes_no_adapter_first(monkeypatch):
    """vLLM's JSON comes from the config (``LoraConfig.to_peft_file``), not from an adapter
    saved to a temporary folder and read back."""
    import lorakit.io
    from lorakit.export.vllm import vllm_files

    def no_saving(*args, **kwargs):
        raise AssertionError("vllm_files saved an adapter")

    monkeypatch.setattr(lorakit.io, "write_adapter_files", no_saving)
    model = adapted_llama(use_rslora=True, rank_pattern={"q_proj": 2}, init="pissa")
    config, _ = vllm_files(model)
    saved = adapter_configs(model)["default"].on_original_weight()  # PiSSA: rank 2r
    g = saved.scale
    assert (config["r"], config["use_rslora"]) == (8, False)
    assert config["lora_alpha"] == pytest.approx(g * 8)
    assert config["rank_pattern"] == {"q_proj": 4}
    assert config["alpha_pattern"] == {  # rank 4 given the same global scale g
        rf"model\.layers\.{i}\.self_attn\.q_proj": pytest.approx(g * 4) for i in (0, 1)
    }


VLLM_FAILS = {
    "architecture": (opt_model, "architecture", "OPTForCausalLM"),
    "modules_to_save": (
        lambda: adapted_llama(modules_to_save=["lm_head"]),
        "modules_to_save",
        "lm_head",
    ),
    "dora": (lambda: adapted_llama(use_dora=True), "DoRA", "model.layers.0.self_attn.q_proj"),
    "bias": (lambda: adapted_llama(bias="all"), "bias", "bias='all'"),
    "embedding": (
        lambda: adapted_llama(target_modules=["embed_tokens", "q_proj"]),
        "embeddings, lm_head",
        "model.embed_tokens",
    ),
    "rank": (lambda: adapted_llama(r=20, target_modules=["q_proj"]), "rank", "--max-lora-rank 32"),
    "target": (
        lambda: adapted_llama(target_modules=["q_proj", "lm_head"]),
        "embeddings, lm_head",
        "lm_head",
    ),
}


@pytest.mark.parametrize("case", list(VLLM_FAILS))
def test_vllm_rules_fail_by_name_and_nothing_is_written(tmp_path, case):
    build, rule, phrase = VLLM_FAILS[case]
    model = build()
    report = check_vllm(model)
    failed = {c.rule: c.detail for c in report.failures()}
    assert rule in failed and phrase in failed[rule], str(report)
    with pytest.raises(LoraError, match=rule):
        to_vllm(model, tmp_path / "v")
    assert list(tmp_path.iterdir()) == []


def test_vllm_rank_check_follows_max_lora_rank():
    model = adapted_llama(r=20, target_modules=["q_proj"])
    assert check_vllm(model, max_lora_rank=32).ok


# --- from a folder, and the command line ------------------------------------------------------
@pytest.fixture
def tiny_folder(tmp_path, smollm2_tokenizer) -> Path:
    """A tiny Llama saved as a model folder (a tokenizer beside it, as load_model wants)."""
    folder = tmp_path / "base"
    tiny.llama().save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


def saved_adapter(tmp_path, base: Path, **options) -> Path:
    from lorakit.models.load import load_model

    model, _ = load_model(str(base))
    options = {"r": 4, "alpha": 8, "target_modules": PROJECTIONS, **options}
    add_lora(model, LoraConfig(**options, base_model_name_or_path=str(base)))
    tiny.randomize_adapters(model)
    return save_adapter(model, tmp_path / "adapter")


def test_export_adapter_from_a_folder(tmp_path, tiny_folder):
    adapter = saved_adapter(tmp_path, tiny_folder, use_rslora=True)
    out = export_adapter(adapter, "gguf", tmp_path / "a.gguf")
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_folder), adapter)
    check_deltas(model, out)
    export_adapter(adapter, "vllm", tmp_path / "v")
    assert (tmp_path / "v" / "adapter_model.safetensors").is_file()


def test_whole_embedding_weights_refused_as_adapter_exported_merged(tmp_path, tiny_folder):
    from safetensors import safe_open
    from safetensors.torch import save_file

    adapter = saved_adapter(tmp_path, tiny_folder, target_modules=["embed_tokens", "q_proj"])
    weights = adapter / "adapter_model.safetensors"
    with safe_open(weights, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    rows = torch.randn(64, 32)  # PEFT saves a resized / retrained embedding in full
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] = rows
    save_file(tensors, weights, metadata=metadata)
    for target, out in (("gguf", tmp_path / "a.gguf"), ("vllm", tmp_path / "v")):
        with pytest.raises(LoraError, match=r"whole weights \(model\.embed_tokens\.base_layer"):
            export_adapter(adapter, target, out)
        assert not out.exists()
    source = tiny_source(tmp_path / "src.gguf", tiny.llama().config)
    out = export_adapter(
        adapter, "gguf", tmp_path / "m.gguf", merged=True, outtype="f32", gguf_metadata=source
    )
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_folder), adapter)
    delta = dict(lora_layers(model))["model.embed_tokens"].delta_weight("default")
    _, merged, _ = read_gguf(out)
    torch.testing.assert_close(merged["token_embd.weight"], rows + delta)


def test_output_paths_of_the_wrong_kind(tmp_path):
    model = adapted_llama()
    with pytest.raises(LoraError, match="Could not write"):
        to_gguf(model, tmp_path)  # a folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraError, match="is a file"):
        to_vllm(model, tmp_path / "file")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_cli_export_gguf_and_vllm(tmp_path, tiny_folder, capsys):
    adapter = saved_adapter(tmp_path, tiny_folder)
    assert main(["export", str(adapter), "--to", "gguf", "--output", str(tmp_path / "a.gguf")]) == 0
    assert "--lora" in capsys.readouterr().out
    kv, tensors, _ = read_gguf(tmp_path / "a.gguf")
    assert kv["general.type"] == "adapter" and len(tensors) == 4 * len(PROJECTIONS)
    assert main(["export", str(adapter), "--to", "vllm", "--output", str(tmp_path / "v")]) == 0
    printed = capsys.readouterr().out
    assert "FAIL" not in printed and "pass" in printed and "--lora-modules" in printed


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["--to", "gguf"], "lm_head: modules_to_save"),
        (["--to", "vllm"], "modules_to_save"),
        (["--to", "vllm", "--merged"], "--merged, --outtype and --gguf-metadata are for"),
        (["--to", "gguf", "--gguf-metadata", "x.gguf"], "add --merged"),
    ],
)
def test_cli_refusals_without_traceback(tmp_path, tiny_folder, capsys, extra, phrase):
    adapter = saved_adapter(tmp_path, tiny_folder, modules_to_save=["lm_head"])
    out = tmp_path / "out"
    assert main(["export", str(adapter), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err
    assert not out.exists()


def test_cli_not_an_adapter(tmp_path, capsys):
    assert main(["export", str(tmp_path), "--to", "gguf", "--output", "x.gguf"]) == 2
    assert "not an adapter folder" in capsys.readouterr().err


def test_core_import_stays_light():
    code = (
        "import sys, lorakit, lorakit.cli; lorakit.cli.build_parser(); "
        "print(sorted(m for m in ('gguf', 'lorakit.export', 'numpy.linalg') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert "gguf" not in out.stdout and "lorakit.export" not in out.stdout


def test_an_adapter_gguf_on_a_full_disk_is_one_line_naming_it_and_leaves_nothing(
    small_disk,  # noqa: F811
):
    # The disk filled to its last byte.
    with open(small_disk / "fill", "wb", buffering=0) as fill, contextlib.suppress(OSError):
        while True:
            fill.write(bytes(1024))
    before = files_on(small_disk)
    out = small_disk / "a.gguf"
    with pytest.raises(LoraError) as error:
        to_gguf(adapted_llama(), out)
    assert str(error.value).startswith(f"Could not write {out} (No space left on device)")
    assert files_on(small_disk) == before
