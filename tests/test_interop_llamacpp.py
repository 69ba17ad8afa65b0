"""llama.cpp itself runs lorakit's GGUF exports: the same greedy text, logits and perplexity,
from a GGUF base and from a Hugging Face folder (tokenizer and hyperparameters written by
lorakit, no llama.cpp converter).

Runs with ``make interop`` only (LORAKIT_INTEROP=1): it needs ``llama-cpp-python``, which
builds llama.cpp from source (the Makefile builds its wheel once and caches it).

Set-up, all on the bundled SmolLM2-135M-Instruct: lorakit's float32 model (the shipped Q4_1
GGUF dequantized) is exported as an f32 GGUF base, so llama.cpp and lorakit start from the same
weights. The adapter is deliberately awkward: rsLoRA with rank and alpha patterns on all seven
projections, B random, so every module's scale differs from llama.cpp's alpha / rank and a
forgotten fold or a wrong permutation shows at once.

Tolerance. Both sides compute in float32 (llama.cpp with an f32 KV cache); they differ only in
the order of floating-point sums (ggml's SIMD dot products against PyTorch's GEMM), expf, RoPE
and RMSNorm. Each op is exact to a few ulp (~1e-7 relative); across 30 layers the logits
(magnitude ~20) drift by ~1e-4 to 1e-3. LOGIT_TOL = 5e-3 allows that, and is about a thousand
times smaller than what the adapter itself changes (max |Δlogit| > 5): an adapter scaled by
sqrt(r) the wrong way, or q/k rows in the wrong order, is far outside it (checked below with
llama.cpp's own converter, which does mis-scale rsLoRA). f16 weights round each weight by up
to 2^-11 relative, so the f16 merged model gets F16_TOL = 0.25; Q8_0 is reported, not bounded.
GELU is the exception among the ops: ggml's CPU GELU rounds its input to f16 and reads the
result from an f16 table (``GGML_GELU_FP16`` in ggml-cpu/vec.h), an error of up to 2^-11
relative per activation, so the families that use it (Gemma, GPT-2) get GELU_TOL = 2e-2, still
250 times smaller than the adapter's effect (measured on the tiny Gemma-2: 6.9e-3).
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("LORAKIT_INTEROP") != "1",
    reason="llama.cpp interop: run `make interop` (builds llama-cpp-python once)",
)

LOGIT_TOL = 5e-3
GELU_TOL = 2e-2
F16_TOL = 0.25
NEW_TOKENS = 32
PROMPTS = [
    [{"role": "user", "content": "Order for 12 Elm St: two large pepperoni pizzas"}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "three small coffees and a muffin to 5 Oak Road please"}],
]
RESULTS: dict[str, object] = {}  # printed at the end (make interop shows them)


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def setup(smollm2, tmp_path_factory):
    """(adapted lorakit model, tokenizer, folder with base.f32.gguf, adapter.gguf, adapter/)."""
    from lorakit import LoraConfig, add_lora, save_adapter
    from lorakit.export import to_gguf, to_gguf_model
    from lorakit.targeting import lora_layers

    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("interop")
    to_gguf_model(model, folder / "base.f32.gguf", None, outtype="f32")
    adapted = copy.deepcopy(model)
    torch.manual_seed(0)  # A's init: the same adapter, and the same numbers, every run
    config = LoraConfig(
        r=8,
        alpha=16,
        use_rslora=True,
        rank_pattern={"q_proj": 4, "down_proj": 12},
        alpha_pattern={"v_proj": 24.0},
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        base_model_name_or_path="smollm2-135m",
    )
    add_lora(adapted, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(adapted):
            B = layer.lora_B["default"]
            B.copy_(torch.randn(B.shape, generator=gen) * 0.02)
    to_gguf(adapted, folder / "adapter.gguf")
    save_adapter(adapted, folder / "adapter")
    return adapted, tokenizer, folder


def prompt_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def torch_run(model, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """lorakit's greedy continuation of ``ids`` (argmax, EOS not special: the same loop as
    ``llama_run``), and its logits over prompt + continuation."""
    new = []
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(NEW_TOKENS):
            new.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([[new[-1]]]), past_key_values=out.past_key_values)
        logits = model(torch.tensor([ids + new])).logits[0].double().numpy()
    return new, logits


def llama_run(llm, ids: list[int], forced: list[int]) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of ``ids``, and its logits over ``ids + forced`` (the
    positions lorakit's logits cover, whatever llama.cpp would have picked)."""
    llm.reset()
    llm.eval(ids)
    new = []
    for _ in range(NEW_TOKENS):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    llm.reset()
    llm.eval(ids + forced)
    return new, np.asarray(llm.scores[: llm.n_tokens], dtype=np.float64)


def open_llama(llama_cpp, model_path: Path, lora: Path | None = None):
    kwargs = {"lora_path": str(lora)} if lora else {}
    return llama_cpp.Llama(
        model_path=str(model_path),
        n_ctx=512,
        n_batch=512,
        n_threads=2,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32: no f16 rounding in the KV cache
        type_v=0,
        flash_attn=False,
        verbose=False,
        **kwargs,
    )


def compare(name: str, model, tokenizer, llm) -> tuple[int, float]:
    """(prompts whose greedy text differs, max |Δlogit| on lorakit's tokens) between lorakit
    and llama.cpp, over every prompt and continuation position."""
    differ, worst = 0, 0.0
    for messages in PROMPTS:
        ids = prompt_ids(tokenizer, messages)
        ours, our_logits = torch_run(model, ids)
        theirs, their_logits = llama_run(llm, ids, ours)
        differ += ours != theirs
        worst = max(worst, float(np.abs(our_logits - their_logits).max()))
        RESULTS.setdefault(f"{name} text", []).append(tokenizer.decode(theirs)[:60])
    RESULTS[f"{name}: prompts with different greedy text"] = f"{differ} of {len(PROMPTS)}"
    RESULTS[f"{name}: max |Δlogit|"] = f"{worst:.2e}"
    return differ, worst


def test_adapter_gguf_in_llama_cpp(setup, llama_cpp):
    from lorakit.models.gguf import bundled_gguf

    model, tokenizer, folder = setup
    llm = open_llama(llama_cpp, folder / "base.f32.gguf", folder / "adapter.gguf")
    differ, worst = compare("adapter", model, tokenizer, llm)
    assert differ == 0 and worst < LOGIT_TOL
    # The adapter matters: without it llama.cpp's logits move far beyond the tolerance.
    base = open_llama(llama_cpp, folder / "base.f32.gguf")
    _, base_worst = compare("llama.cpp without the adapter", model, tokenizer, base)
    assert base_worst > 1000 * LOGIT_TOL
    # Reported only: the same adapter on the shipped Q4_1 file, which llama.cpp multiplies in
    # 4 bits (activations rounded to 8 bits), not as the dequantized float32 lorakit trains on.
    shipped = open_llama(llama_cpp, bundled_gguf(), folder / "adapter.gguf")
    compare("adapter on the shipped Q4_1 base", model, tokenizer, shipped)


def test_merged_gguf_in_llama_cpp(setup, llama_cpp):
    from lorakit.export import to_gguf_model

    model, tokenizer, folder = setup
    to_gguf_model(model, folder / "merged.f32.gguf", outtype="f32")
    differ, worst = compare(
        "merged f32", model, tokenizer, open_llama(llama_cpp, folder / "merged.f32.gguf")
    )
    assert differ == 0 and worst < LOGIT_TOL
    to_gguf_model(model, folder / "merged.f16.gguf", outtype="f16")
    differ, worst = compare(
        "merged f16", model, tokenizer, open_llama(llama_cpp, folder / "merged.f16.gguf")
    )
    assert differ == 0 and worst < F16_TOL
    to_gguf_model(model, folder / "merged.q8_0.gguf", outtype="q8_0")
    compare("merged q8_0", model, tokenizer, open_llama(llama_cpp, folder / "merged.q8_0.gguf"))


def test_merged_gguf_of_a_hugging_face_base_in_llama_cpp(setup, llama_cpp, smollm2):
    """No GGUF anywhere on the way: SmolLM2 as a Hugging Face folder (its weights saved with
    save_pretrained, its own tokenizer.json's digit-first splitting), the same adapter, and the
    merged GGUF's tokenizer and hyperparameters written by lorakit from that folder. llama.cpp
    tokenizes every prompt to transformers' ids and answers with lorakit's greedy text."""
    import export_families

    from lorakit import load_adapter
    from lorakit.export import to_gguf_model
    from lorakit.export.gguf_read import Header
    from lorakit.models.load import load_model

    model, tokenizer, folder = setup
    hf = folder / "hf-base"
    smollm2[0].save_pretrained(hf)
    export_families.smollm2_tokenizer_json(tokenizer).save_pretrained(hf)
    base, hf_tokenizer = load_model(str(hf))
    load_adapter(base, folder / "adapter")
    out = to_gguf_model(base, folder / "merged-hf.f32.gguf", outtype="f32", in_place=True)
    assert Header(out).get("tokenizer.ggml.pre") == "smollm"
    llm = open_llama(llama_cpp, out)
    for messages in PROMPTS:
        text = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert theirs == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    differ, worst = compare("merged f32 of a Hugging Face folder", model, tokenizer, llm)
    assert differ == 0 and worst < LOGIT_TOL


@pytest.fixture(scope="module")
def families():
    import export_families

    return export_families


@pytest.mark.parametrize(
    "name",
    [
        "llama",
        "llama-spm",
        "mistral-spm",
        "qwen2",
        "qwen3",
        "gpt2",
        "gemma2-spm",
        "gemma3",
        "gemma3-spm",
        "phi3-spm",
    ],
)
def test_every_family_runs_in_llama_cpp(llama_cpp, families, smollm2, tmp_path, name):
    """Each family's tiny merged GGUF (tests/export_families.py): llama.cpp tokenizes as
    transformers does and continues greedily as lorakit does, logits within LOGIT_TOL
    (GELU_TOL for the GELU families)."""
    from lorakit import load_adapter, unload
    from lorakit.cli import main
    from lorakit.models.load import load_model

    base = families.base_folder(name, tmp_path / "base", smollm2[1])
    # general.name comes from the adapter folder; llama.cpp gives a "phi3" name Phi-3's
    # special tokens (<|endoftext|>), which the tiny vocabulary has not
    adapter = families.adapter_folder(name, base, tmp_path / "tiny-adapter")
    out = tmp_path / "merged.gguf"
    argv = ["export", str(adapter), "--to", "gguf", "--merged", "--outtype", "f32"]
    assert main([*argv, "--output", str(out)]) == 0
    model, tokenizer = load_model(str(base))
    load_adapter(model, adapter)
    model = unload(model, merge=True).eval()
    llm = open_llama(llama_cpp, out)
    text = "Order for 12 Elm St: two large pepperoni pizzas, 3 colas!"
    ids = tokenizer(text)["input_ids"]
    add_bos = ids[:1] == [tokenizer.bos_token_id]
    assert llm.tokenize(text.encode(), add_bos=add_bos, special=False) == ids
    ours, our_logits = torch_run(model, ids)
    theirs, their_logits = llama_run(llm, ids, ours)
    RESULTS[f"{name}: greedy equal, max |Δlogit|"] = (
        f"{ours == theirs}, {np.abs(our_logits - their_logits).max():.2e}"
    )
    activation = {k: v for k, v in model.config.to_dict().items() if "act" in k}
    tol = GELU_TOL if any("gelu" in str(v) for v in activation.values()) else LOGIT_TOL
    assert ours == theirs and np.abs(our_logits - their_logits).max() < tol


def perplexity(logits: np.ndarray, ids: list[int], start: int) -> tuple[float, int]:
    """(sum of -log p(next token), count) from position ``start`` on."""
    shifted = logits[start:-1] - logits[start:-1].max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    targets = np.asarray(ids[start + 1 :])
    return float(-logp[np.arange(len(targets)), targets].sum()), len(targets)


def test_perplexity_on_demo_validation(setup, llama_cpp):
    model, tokenizer, folder = setup
    llm = open_llama(llama_cpp, folder / "base.f32.gguf", folder / "adapter.gguf")
    lines = resources.files("lorakit").joinpath("demo/val.jsonl").read_text().splitlines()
    totals = {"lorakit": [0.0, 0], "llama.cpp": [0.0, 0]}
    for line in lines[:20]:
        text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0].double().numpy()
        llm.reset()
        llm.eval(ids)
        theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        for key, logits in (("lorakit", ours), ("llama.cpp", theirs)):
            nll, n = perplexity(logits, ids, 0)
            totals[key][0] += nll
            totals[key][1] += n
    ppl = {k: math.exp(s / n) for k, (s, n) in totals.items()}
    RESULTS["perplexity, 20 demo val conversations (lorakit, llama.cpp)"] = (
        f"{ppl['lorakit']:.6f}, {ppl['llama.cpp']:.6f}"
    )
    assert abs(ppl["lorakit"] - ppl["llama.cpp"]) / ppl["lorakit"] < 1e-4


def test_llama_cpp_converter_misscales_rslora(setup, llama_cpp):
    """llama.cpp's own convert_lora_to_gguf.py on the same adapter: one alpha / r for every
    module, so rsLoRA and the patterns come out wrong; lorakit's file (above) does not."""
    model, tokenizer, folder = setup
    converter = os.environ.get("LLAMA_CPP_CONVERTER")
    if not converter:
        pytest.skip("LLAMA_CPP_CONVERTER (convert_lora_to_gguf.py) not given")
    base_folder = folder / "hf-config"  # the converter reads only the base's config.json
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(base_folder)
    out = folder / "converter.gguf"
    command = [sys.executable, converter, "--base", str(base_folder), "--outfile", str(out)]
    subprocess.run([*command, str(folder / "adapter")], check=True, capture_output=True)
    llm = open_llama(llama_cpp, folder / "base.f32.gguf", out)
    _, worst = compare("llama.cpp's converter", model, tokenizer, llm)
    assert worst > 100 * LOGIT_TOL


def test_zz_report():
    """Print the numbers (pytest -s, as make interop runs it)."""
    for key, value in RESULTS.items():
        print(f"{key}: {value}")
