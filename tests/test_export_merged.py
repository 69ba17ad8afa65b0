"""Merged GGUFs of Hugging Face bases: lorakit's file equals llama.cpp's converter's.

For every family of tests/export_families.py (Llama and Mistral, Qwen2/3, GPT-2, Gemma 2/3,
Phi-3; the bundled byte-level BPE tokenizer, and SentencePiece where the family uses it),
``lorakit export ADAPTER --to gguf --merged`` (no other flag: the base comes from the
adapter) is compared with what llama.cpp's ``convert_hf_to_gguf.py`` wrote for ``lorakit
merge`` of the same adapter (tests/data/llamacpp_merged, made by
scripts/make_gguf_reference.py): every tensor bit for bit (the weights are exact, see
export_families), every key with its GGUF type and value.

Where the files may differ, the difference is named below and checked to mean the same to
llama.cpp (``llama_vocab::impl::load`` in src/llama-vocab.cpp):

- lorakit writes add_bos / add_eos / add_space_prefix from what the tokenizer does; the
  converter leaves some to llama.cpp's default, and writes add_sep (false) for SentencePiece.
  A key one side lacks must hold llama.cpp's default for that tokenizer type.
- Phi-3's converter marks every token transformers lists as added as CONTROL with score
  -1000, SentencePiece's own <unk> (UNKNOWN, 0) included; lorakit keeps a piece's own type
  and score when the added token is that piece.
"""

from __future__ import annotations

import json

import export_families as ef
import gguf
import pytest
import torch

from lorakit import LoraError
from lorakit.cli import main
from lorakit.export.gguf_read import Header

T = gguf.TokenType
# llama.cpp's value for a key the file leaves out, per tokenizer.ggml.model (gpt2: BPE).
LLAMA_CPP_DEFAULTS = {
    "gpt2": {"add_bos_token": False, "add_eos_token": False, "add_sep_token": False},
    "llama": {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_sep_token": False,
        "add_space_prefix": True,
    },
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smollm2_tokenizer):
    """Family -> (its merged GGUF written by the CLI from the adapter alone, printed text)."""
    cache = {}

    def export(name: str):
        if name not in cache:
            work = tmp_path_factory.mktemp(name)
            base = ef.base_folder(name, work / "base", smollm2_tokenizer)
            adapter = ef.adapter_folder(name, base, work / "adapters" / name)
            out = work / f"{name}.gguf"
            argv = ["export", str(adapter), "--to", "gguf", "--merged", "--outtype", "f32"]
            code = main([*argv, "--output", str(out), "--verify"])
            cache[name] = (code, out)
        return cache[name]

    return export


def _same_meaning(key: str, ours: list | None, theirs: list | None, model: str) -> bool:
    """A key only one file has: the other's value must be llama.cpp's default."""
    short = key.removeprefix("tokenizer.ggml.")
    present = ours if ours is not None else theirs
    default = LLAMA_CPP_DEFAULTS[model].get(short)
    return default is not None and present == ["BOOL", default]


def _phi3_added(ours: dict, theirs: dict) -> list[int]:
    """Ids where Phi-3's converter overrode SentencePiece's own piece as an added token."""
    our_types = ours["tokenizer.ggml.token_type"][1]
    their_types = theirs["tokenizer.ggml.token_type"][1]
    their_scores = theirs["tokenizer.ggml.scores"][1]
    return [
        i
        for i, (a, b) in enumerate(zip(our_types, their_types, strict=True))
        if a != b or ours["tokenizer.ggml.scores"][1][i] != their_scores[i]
    ]


@pytest.mark.parametrize("name", list(ef.FAMILIES))
def test_merged_gguf_equals_llama_cpps_converter(exported, name):
    code, out = exported(name)
    assert code == 0
    ours = ef.summarize(out)
    theirs = json.loads((ef.DATA / f"{name}.json").read_text())
    assert ours["tensors"] == theirs["tensors"]  # names, types, shapes, every bit
    keys_ours, keys_theirs = ours["keys"], theirs["keys"]
    model = keys_theirs["tokenizer.ggml.model"][1]
    differing = {
        k for k in set(keys_ours) | set(keys_theirs) if keys_ours.get(k) != keys_theirs.get(k)
    }
    if name == "phi3-spm":
        overridden = _phi3_added(keys_ours, keys_theirs)
        assert overridden == [0, 1, 2]  # <unk>, <s>, </s>: tokenizer.json's added tokens
        assert [keys_theirs["tokenizer.ggml.token_type"][1][i] for i in overridden] == [3, 3, 3]
        assert [keys_ours["tokenizer.ggml.token_type"][1][i] for i in overridden] == [2, 3, 3]
        differing -= {"tokenizer.ggml.token_type", "tokenizer.ggml.scores"}
    for key in sorted(differing):
        ours_value, theirs_value = keys_ours.get(key), keys_theirs.get(key)
        assert None in (ours_value, theirs_value), (key, ours_value, theirs_value)
        assert _same_meaning(key, ours_value, theirs_value, model), (key, ours_value, theirs_value)


def test_what_the_families_exercise():
    """The references cover each tokenizer type and layout rule the issue names."""
    summary = {n: json.loads((ef.DATA / f"{n}.json").read_text())["keys"] for n in ef.FAMILIES}
    models = {n: k["tokenizer.ggml.model"][1] for n, k in summary.items()}
    assert {n for n, m in models.items() if m == "llama"} == {
        "llama-spm",
        "mistral-spm",
        "gemma2-spm",
        "gemma3-spm",
        "phi3-spm",
    }
    assert summary["llama"]["tokenizer.ggml.pre"] == ["STRING", "smollm"]
    assert summary["qwen2"]["tokenizer.ggml.pre"] == ["STRING", "qwen2"]
    assert summary["gemma2-spm"]["tokenizer.ggml.add_space_prefix"] == ["BOOL", False]
    assert summary["gemma2-spm"]["gemma2.attn_logit_softcapping"] == ["FLOAT32", 50.0]
    assert summary["gemma3"]["gemma3.rope.freq_base_swa"] == ["FLOAT32", 10000.0]


def test_gemma_norms_are_shifted_and_llama_qk_permuted(tmp_path, smollm2_tokenizer):
    """The layout rules on the bases themselves, checked without lorakit's mapping code."""
    from lorakit.export.gguf_model import to_gguf_model
    from lorakit.models.load import load_model

    def stored(name: str, tensor: str) -> tuple[torch.Tensor, dict]:
        model, tokenizer = load_model(str(ef.base_folder(name, tmp_path / name, smollm2_tokenizer)))
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = to_gguf_model(
            model, tmp_path / f"{name}.gguf", None, outtype="f32", tokenizer=tokenizer
        )
        header = Header(out)
        info = next(t for t in header.tensors if t.name == tensor)
        return torch.from_numpy(header.tensor(info)), params

    norm, params = stored("gemma2-spm", "blk.0.attn_norm.weight")  # HF scales by 1 + w
    assert torch.equal(norm, params["model.layers.0.input_layernorm.weight"] + 1)
    q, params = stored("llama", "blk.0.attn_q.weight")  # rows (heads, 2, d/2) -> (heads, d/2, 2)
    hf = params["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, hf.reshape(2, 2, 4, 16).swapaxes(1, 2).reshape(16, 16))
    assert not torch.equal(q, hf)


@pytest.mark.parametrize(
    ("outtype", "types"), [("f16", {"F16"}), ("bf16", {"BF16"}), ("q8_0", {"Q8_0", "F16"})]
)
def test_outtypes_verify_within_their_encoding(tmp_path, smollm2_tokenizer, capsys, outtype, types):
    base = ef.base_folder("llama-spm", tmp_path / "base", smollm2_tokenizer)
    adapter = ef.adapter_folder("llama-spm", base, tmp_path / "adapter")
    out = tmp_path / "m.gguf"
    argv = ["export", str(adapter), "--to", "gguf", "--merged", "--outtype", outtype]
    assert main([*argv, "--output", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "TOO LARGE" not in printed and "ffn_down.weight" in printed
    matrices = {t.qtype.name for t in Header(out).tensors if len(t.shape) == 2}
    # q8_0: rows of 16 values are no Q8_0 blocks of 32, so they fall back to F16, as in llama.cpp
    assert matrices == types


def test_verify_reports_a_damaged_tensor(tmp_path, smollm2_tokenizer):
    from lorakit.export.gguf_model import to_gguf_model
    from lorakit.export.verify import verify_gguf
    from lorakit.models.load import load_model

    base = ef.base_folder("llama-spm", tmp_path / "base", smollm2_tokenizer)
    model, tokenizer = load_model(str(base))
    out = to_gguf_model(model, tmp_path / "m.gguf", None, outtype="f32", tokenizer=tokenizer)
    assert verify_gguf(model, out).ok
    info = next(t for t in Header(out).tensors if t.name == "blk.1.attn_k.weight")
    with open(out, "r+b") as f:  # one float of k's weight changed by 2^-10
        f.seek(info.offset)
        value = torch.frombuffer(bytearray(f.read(4)), dtype=torch.float32) + 2.0**-10
        f.seek(info.offset)
        f.write(value.numpy().tobytes())
    report = verify_gguf(model, out)
    bad = [r for r in report.rows if not r.ok]
    assert [(r.kind, r.qtype) for r in bad] == [("attn_k.weight", "F32")]
    assert bad[0].largest_diff == pytest.approx(2.0**-10, rel=1e-3)
    assert "TOO LARGE" in str(report) and not report.ok


def test_a_library_adapter_without_a_base_is_told_to_pass_one(tmp_path, smollm2_tokenizer, capsys):
    from lorakit import LoraConfig, add_lora, save_adapter
    from lorakit.models.load import load_model

    base = ef.base_folder("mistral-spm", tmp_path / "base", smollm2_tokenizer)
    model, _ = load_model(str(base))
    model.name_or_path = model.config._name_or_path = ""  # as a model built from a config
    config = LoraConfig(r=2, target_modules=["q_proj"], base_model_name_or_path=None)
    adapter = save_adapter(add_lora(model, config), tmp_path / "adapter")
    out = tmp_path / "m.gguf"
    assert main(["export", str(adapter), "--to", "gguf", "--merged", "--output", str(out)]) == 2
    assert "records no base model; pass --model" in capsys.readouterr().err
    argv = ["export", str(adapter), "--to", "gguf", "--merged", "--model", str(base)]
    assert main([*argv, "--output", str(out)]) == 0
    assert Header(out).get("general.architecture") == "llama"  # Mistral runs as llama


def test_a_rope_scaling_llama_cpp_lacks_is_refused_before_merging(tmp_path, smollm2_tokenizer):
    from lorakit.export.gguf_model import to_gguf_model
    from lorakit.models.load import load_model

    base = ef.base_folder("qwen2", tmp_path / "base", smollm2_tokenizer)
    model, tokenizer = load_model(str(base))
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    with pytest.raises(LoraError, match="RoPE scaling 'dynamic': llama.cpp's Qwen2"):
        to_gguf_model(model, tmp_path / "m.gguf", None, tokenizer=tokenizer)
    assert not (tmp_path / "m.gguf").exists()


def test_bundled_smollm2_as_a_folder_says_what_its_shipped_gguf_says(smollm2, tmp_path):
    """A real model: SmolLM2's config and tokenizer (its own tokenizer.json splitting) give
    the hyperparameters and vocabulary llama.cpp's converter wrote into the shipped GGUF."""
    from lorakit.export.archs import ArchMap
    from lorakit.export.hparams import write_hparams
    from lorakit.export.vocab import read_vocab, write_vocab
    from lorakit.models.gguf import bundled_gguf

    model, tokenizer = smollm2
    writer = gguf.GGUFWriter(tmp_path / "vocab.gguf", "llama")
    write_hparams(writer, model, ArchMap(model))
    tokenizer = ef.smollm2_tokenizer_json(tokenizer)
    write_vocab(writer, read_vocab(tokenizer, len(tokenizer), model.config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours = {k: v for k, (_, _, v) in Header(tmp_path / "vocab.gguf").fields.items()}
    shipped = {k: v for k, (_, _, v) in Header(bundled_gguf()).fields.items()}
    assert (
        len(ours["tokenizer.ggml.tokens"]) == 49152 and len(ours["tokenizer.ggml.merges"]) == 48900
    )
    # what only lorakit writes: head_dim from the config (llama.cpp's default: 576 / 9 heads)
    # and add_eos_token (llama.cpp's default false)
    extra = {"llama.attention.key_length": 64, "llama.attention.value_length": 64}
    extra["tokenizer.ggml.add_eos_token"] = False
    assert {k: ours[k] for k in set(ours) - set(shipped)} == extra
    differing = sorted(k for k in set(ours) & set(shipped) if ours[k] != shipped[k])
    assert differing == []


def test_a_gemma_query_scale_llama_cpp_ignores_is_refused(tmp_path, smollm2_tokenizer):
    from lorakit.export.gguf_model import to_gguf_model
    from lorakit.models.load import load_model

    model, tokenizer = load_model(
        str(ef.base_folder("gemma2-spm", tmp_path / "b", smollm2_tokenizer))
    )
    model.config.query_pre_attn_scalar = 256  # transformers' default; head_dim is 8 here
    with pytest.raises(LoraError, match=r"query_pre_attn_scalar 256: .* 1/sqrt\(8\)"):
        to_gguf_model(model, tmp_path / "m.gguf", None, tokenizer=tokenizer)
