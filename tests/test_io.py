"""Adapter files: round trip, PEFT reads ours and we read PEFT's, strict validation."""

import json

import pytest
import tiny
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, LoraError, add_lora, load_adapter, save_adapter
from lorakit.layers import LoraLayer


def _out(model, inputs):
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _close(a, b, tol):
    assert ((a - b).norm() / b.norm()).item() < tol


TOKENS = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}
IMAGES = {"x": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}

# name: (model factory, lorakit config, PEFT config with the same meaning, inputs)
CASES = {
    "linear": (
        tiny.llama,
        LoraConfig(
            r=4,
            alpha=8,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
        PeftLoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
        TOKENS,
    ),
    "embedding": (
        tiny.llama,
        LoraConfig(r=3, alpha=6, target_modules=["embed_tokens", "q_proj"]),
        PeftLoraConfig(r=3, lora_alpha=6, target_modules=["embed_tokens", "q_proj"]),
        TOKENS,
    ),
    "conv+head": (
        tiny.cnn,
        LoraConfig(r=2, alpha=3, target_modules=["conv1", "conv2"], modules_to_save=["head"]),
        PeftLoraConfig(
            r=2, lora_alpha=3, target_modules=["conv1", "conv2"], modules_to_save=["head"]
        ),
        IMAGES,
    ),
    "gpt2-conv1d": (
        tiny.gpt2,
        LoraConfig(r=2, alpha=4, target_modules=["c_attn", "c_fc", "c_proj"]),
        PeftLoraConfig(
            r=2, lora_alpha=4, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True
        ),
        TOKENS,
    ),
    "patterns+rslora": (
        tiny.llama,
        LoraConfig(
            r=4,
            alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.0\.self_attn\.q_proj": 3},
        ),
        PeftLoraConfig(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.0\.self_attn\.q_proj": 3},
        ),
        TOKENS,
    ),
    "target_parameters": (
        tiny.deepseek_v2,
        LoraConfig(
            r=2,
            alpha=4,
            target_modules=["q_b_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
        PeftLoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["q_b_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
        TOKENS,
    ),
    "bias=all": (
        tiny.cnn,
        LoraConfig(r=2, alpha=2, target_modules=["conv1"], bias="all"),
        PeftLoraConfig(r=2, lora_alpha=2, target_modules=["conv1"], bias="all"),
        IMAGES,
    ),
}


def _trained_lorakit(case):
    make, cfg, _, inputs = CASES[case]
    model = make()
    add_lora(model, cfg)
    tiny.randomize_adapters(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_" not in n:
                p.add_(0.1)  # biases / modules_to_save copies trained too
    return model, _out(model, inputs)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip(case, tmp_path):
    model, expected = _trained_lorakit(case)
    save_adapter(model, tmp_path)
    fresh = CASES[case][0]()
    load_adapter(fresh, tmp_path)
    _close(_out(fresh, CASES[case][3]), expected, 1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_loads_ours(case, tmp_path):
    model, expected = _trained_lorakit(case)
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(CASES[case][0](), tmp_path).eval()
    _close(_out(peft_model, CASES[case][3]), expected, 1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_we_load_peft(case, tmp_path):
    make, _, peft_cfg, inputs = CASES[case]
    peft_model = get_peft_model(make(), peft_cfg).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _n, p in peft_model.named_parameters():
            if p.requires_grad:  # PEFT starts embeddings' A at zero: move every factor
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    expected = _out(peft_model, inputs)
    peft_model.save_pretrained(tmp_path)
    ours = make()
    load_adapter(ours, tmp_path)
    _close(_out(ours, inputs), expected, 1e-5)


def test_fused_slices_load_in_peft_as_plain_lora(tmp_path):
    model = tiny.gpt2()
    add_lora(
        model,
        LoraConfig(
            r=2, alpha=4, target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]}
        ),
    )
    tiny.randomize_adapters(model)
    expected = _out(model, TOKENS)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"][r"transformer\.h\.0\.attn\.c_attn"] == 4
    peft_model = PeftModel.from_pretrained(tiny.gpt2(), tmp_path).eval()
    _close(_out(peft_model, TOKENS), expected, 1e-5)
    fresh = tiny.gpt2()
    load_adapter(fresh, tmp_path)  # lorakit's metadata brings the fused layout back
    assert fresh.transformer.h[0].attn.c_attn.lora_B["default"].shape == (2, 24, 2)
    _close(_out(fresh, TOKENS), expected, 1e-6)


def test_exclusion_makes_peft_adapt_the_same_modules(tmp_path):
    model = tiny.llava()
    add_lora(
        model,
        LoraConfig(r=2, target_modules=["q_proj", "v_proj"], exclude_modules=["vision_tower"]),
    )
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny.llava(), tmp_path)
    ours = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    theirs = sorted(
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})
    )
    assert theirs == ours and len(ours) == 4


def test_the_json_is_built_by_the_config_from_the_facts_io_gathers(tmp_path):
    from lorakit.io import file_facts

    model = tiny.llama()
    config = LoraConfig(
        r=2,
        alpha=4,
        target_modules=["q_proj", "v_proj"],
        fused_slices={"layers.0.self_attn.q_proj": [True, True]},
        exclude_modules=["layers.1"],
        base_model_name_or_path="org/base",
    )
    add_lora(model, config)
    save_adapter(model, tmp_path / "a")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    facts = file_facts(model)
    assert written == config.to_peft_file(facts)
    assert facts.ranks == {"model.layers.0.self_attn.q_proj": 4}  # two slices: one wide pair
    assert written["alpha_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 8.0}  # scale 2
    assert written["base_model_name_or_path"] == "org/base"  # as recorded: io resolves nothing
    save_adapter(model, tmp_path / "b", base_model="/models/base")  # what the caller resolved
    assert (
        json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"]
        == "/models/base"
    )


def test_load_adapter_plans_the_model_once(tmp_path, monkeypatch):
    import lorakit.inject as inject

    model = tiny.llama()
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], bias="all")
    add_lora(model, config)
    tiny.randomize_adapters(model)
    save_adapter(model, tmp_path)
    walks, find_targets = [], inject.find_targets
    monkeypatch.setattr(inject, "find_targets", lambda m, c: walks.append(c) or find_targets(m, c))
    loaded = load_adapter(tiny.llama(), tmp_path)
    assert len(walks) == 1
    assert tiny.max_diff(tiny.logits(loaded), tiny.logits(model)) == 0


def test_file_layout_and_metadata(tmp_path):
    model = tiny.llama()
    add_lora(
        model,
        LoraConfig(
            r=2, alpha=4, target_modules=["q_proj", "embed_tokens"], base_model_name_or_path="tiny"
        ),
    )
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (2, 64)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == 4 and config["r"] == 2
    assert config["base_model_name_or_path"] == "tiny"
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        fingerprint = json.loads(f.metadata()["lorakit.fingerprint"])
    assert fingerprint["model.layers.1.self_attn.q_proj"] == [32, 32]
    assert fingerprint["model.embed_tokens"] == [64, 32]


def _saved(tmp_path):
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path)
    return tmp_path / "adapter_model.safetensors"


def _rewrite(path, change):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_missing_and_unexpected_keys_listed_model_unchanged(tmp_path):
    path = _saved(tmp_path)

    def change(t):
        t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
        t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(2, 32)

    _rewrite(path, change)
    model = tiny.llama()
    with pytest.raises(LoraError) as err:
        load_adapter(model, tmp_path)
    message = str(err.value)
    assert (
        "missing tensor base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message
    )
    assert (
        "missing tensor base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in message
    )
    assert "unexpected tensor base_model.model.model.layers.0.mlp.up_proj.lora_A.weight" in message
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_shape_mismatch_named(tmp_path):
    path = _saved(tmp_path)
    _rewrite(
        path,
        lambda t: t.__setitem__(
            "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", torch.zeros(8, 2)
        ),
    )
    model = tiny.llama()
    with pytest.raises(
        LoraError, match=r"v_proj.lora_B.weight: file has shape \(8, 2\), model expects \(16, 2\)"
    ):
        load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_fingerprint_mismatch(tmp_path):
    _saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    with pytest.raises(LoraError) as err:
        load_adapter(other, tmp_path)
    message = str(err.value)
    assert message.count("\n") <= 3  # a few lines, not one per module
    assert "made for: (not recorded); this model: LlamaForCausalLM" in message
    assert "2 of 4 adapted weights differ" in message
    assert "model.layers.0.self_attn.v_proj: [16, 32] vs [32, 32]" in message


def test_wrong_base_with_other_module_names_names_the_recorded_base(tmp_path):
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path="org/a"))
    save_adapter(model, tmp_path)
    with pytest.raises(LoraError, match=r"made for: org/a; this model: SmallCNN\n  2 of 2"):
        load_adapter(tiny.cnn(), tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(LoraError, match="adapter_config.json not found"):
        load_adapter(tiny.llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LoraError, match="no adapter_model.safetensors"):
        load_adapter(tiny.llama(), tmp_path)


def test_legacy_bin_is_read_without_unpickling_code(tmp_path):
    model, expected = _trained_lorakit("linear")
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    fresh = tiny.llama()
    load_adapter(fresh, tmp_path)  # no lorakit metadata: the PEFT config is used
    _close(_out(fresh, TOKENS), expected, 1e-6)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(LoraError, match="never unpickles code"):
        load_adapter(tiny.llama(), tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = tiny.llama()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()
    import lorakit.io

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lorakit.io, "save_file", explode)
    with pytest.raises(LoraError, match="disk full.*unchanged"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_task_type_lets_peft_auto_class_and_transformers_load_it(tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    base = tiny.llama()
    base.save_pretrained(tmp_path / "base")
    model = tiny.llama()
    config = LoraConfig(
        r=2, target_modules=["q_proj"], base_model_name_or_path=str(tmp_path / "base")
    )
    add_lora(model, config)
    tiny.randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM"
    expected = _out(model, TOKENS)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(_out(peft_model, TOKENS), expected, rtol=0, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()  # auto-detection
    torch.testing.assert_close(_out(plain, TOKENS), expected, rtol=0, atol=1e-5)


def test_task_type_is_none_for_plain_torch_modules(tmp_path):
    cnn = tiny.cnn()
    add_lora(cnn, LoraConfig(r=2, target_modules=["conv1"]))
    save_adapter(cnn, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] is None


# The base an adapter of the bundled model records, loaded by transformers and PEFT alone, in a
# process where the Hub is off: their logits on TOKENS are written to the file argv[2].
_OFFLINE_LOADERS = """
import sys
import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

ids = torch.tensor(%s)
logits = {}
with torch.no_grad():
    plain = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()  # adapter auto-detection
    logits["transformers"] = plain(input_ids=ids).logits
    peft_model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    logits["peft"] = peft_model(input_ids=ids).logits
save_file(logits, sys.argv[2])
"""


def test_bundled_base_is_recorded_as_a_folder_transformers_and_peft_load_offline(smollm2, tmp_path):
    import copy
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lorakit.models.gguf import DEFAULT_MODEL, cache_dir, transformers_path
    from lorakit.models.load import resolve_model_spec

    model = copy.deepcopy(smollm2[0])  # the fixture is shared
    config = LoraConfig(r=4, target_modules=["q_proj", "down_proj"])
    add_lora(model, config.replace(base_model_name_or_path=model.name_or_path))
    tiny.randomize_adapters(model, std=0.02)
    # The caller resolves the base as transformers loads it (io reaches no model loading).
    save_adapter(model, tmp_path / "adapter", base_model=transformers_path(model.name_or_path))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = Path(recorded["base_model_name_or_path"])  # the converted folder, not the alias
    assert base.parent == cache_dir() and (base / "config.json").is_file()
    assert resolve_model_spec(str(base)) == DEFAULT_MODEL  # lorakit still reads the alias
    assert resolve_model_spec(str(tmp_path / "adapter")) == DEFAULT_MODEL  # --adapter alone
    ids = [[1, 504, 3458, 314, 253, 1345, 30], [2, 66, 7, 900, 12, 4, 31]]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids)).logits
        without = smollm2[0](input_ids=torch.tensor(ids)).logits
    assert (expected - without).abs().max() > 1e-2  # the adapter shows in the logits
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    script = _OFFLINE_LOADERS % ids
    out = tmp_path / "logits.safetensors"
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "adapter"), str(out)],
        env=env,
        check=True,
        timeout=300,
    )
    logits = load_file(out)
    for loader in ("transformers", "peft"):
        torch.testing.assert_close(logits[loader], expected, rtol=0, atol=1e-5)


# --- reloading in place (what resuming a Trainer run needs) ----------------------------------


def test_reload_adapter_copies_values_into_the_same_parameters(tmp_path):
    from lorakit.io import reload_adapter

    saved = tiny.llama()
    config = LoraConfig(r=4, alpha=8, target_modules="all-linear", bias="lora_only", init="random")
    add_lora(saved, config)
    save_adapter(saved, tmp_path)
    model = tiny.llama()
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", bias="lora_only"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert tiny.max_diff(_out(model, TOKENS), _out(saved, TOKENS)) > 1e-3
    reload_adapter(model, tmp_path)
    assert tiny.max_diff(_out(model, TOKENS), _out(saved, TOKENS)) < 1e-6
    assert all(p is params[n] for n, p in model.named_parameters() if p.requires_grad), (
        "an optimizer holding the parameters must see the reloaded values"
    )


def test_reload_adapter_refuses_another_adapter_listing_every_difference(tmp_path):
    from lorakit.io import reload_adapter

    other = tiny.llama()
    add_lora(other, LoraConfig(r=2, alpha=8, target_modules=["q_proj", "v_proj"]))
    save_adapter(other, tmp_path)
    model = tiny.llama()
    add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        LoraError,
        match=r"(?s)r: the file has 2, the adapter 4.*unexpected tensor.*v_proj.*load_adapter",
    ):
        reload_adapter(model, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "changed nothing"
    pissa = tiny.llama()
    add_lora(pissa, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"), "p")
    with pytest.raises(LoraError, match=r"init='pissa' adapter is saved as an equivalent pair"):
        reload_adapter(pissa, tmp_path, "p")


def test_base_of_a_folder_model_is_read_back_from_the_metadata_and_older_files(tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.io import read_adapter

    tiny.llama().save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init="random"))
    save_adapter(model, tmp_path / "ad")
    folder, weights = tmp_path / "ad", tmp_path / "ad" / "adapter_model.safetensors"
    assert json.loads((folder / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tmp_path / "base")
    assert read_adapter(folder)[0].base_model_name_or_path == str(tmp_path / "base")
    # A file from before the metadata kept the base: the JSON's is read.
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        metadata = f.metadata()
    old = {**json.loads(metadata["lorakit.config"]), "base_model_name_or_path": None}
    save_file(load_file(weights), weights, metadata={**metadata, "lorakit.config": json.dumps(old)})
    assert read_adapter(folder)[0].base_model_name_or_path == str(tmp_path / "base")
    # The JSON must still say what was saved: an edited base is refused.
    edited = json.loads((folder / "adapter_config.json").read_text())
    edited["base_model_name_or_path"] = str(tmp_path / "other")
    (folder / "adapter_config.json").write_text(json.dumps(edited))
    with pytest.raises(LoraError, match="changed after the adapter was saved"):
        read_adapter(folder)
