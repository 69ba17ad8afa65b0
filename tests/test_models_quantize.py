"""lorakit.models.quantize: the streaming quantizing loader against transformers' own
``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` on the same folder.

Equal means bit for bit: every state-dict tensor (the packed 4-bit / int8 weights and the
quantization state transformers serializes: absmax, nested absmax, quant maps, SCB), every
buffer (rotary inv_freq), the config (quantization_config included), the logits and a LoRA
training step. Both models run on this machine's bitsandbytes CPU kernels (AVX2 or AVX-512
BF16), so the comparisons hold on either.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import tiny
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

from lorakit import LoraConfig, LoraError, add_lora
from lorakit.models import quantize
from lorakit.models.load import load_model
from lorakit.models.quantize import NotStreamable, load_streaming

bnb = pytest.importorskip("bitsandbytes")
warnings.filterwarnings("ignore", message="MatMul8bitLt")


def _llama(tie: bool) -> LlamaForCausalLM:
    """A 2-layer Llama whose every quantized layer has out % 32 == 0 and in % 64 == 0, the
    shapes bitsandbytes' AVX-512 BF16 eval kernel accepts (tiny.llama's 32-wide ones it
    rejects, transformers' model included)."""
    return tiny.llama(tie=tie, hidden=64, intermediate=128)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tied" if request.param else "untied")
    _llama(request.param).save_pretrained(folder)
    return folder


def _config(kind: str, dtype: torch.dtype = torch.float32, **extra) -> BitsAndBytesConfig:
    """lorakit's --quantize settings (models/precision.quantization_config), plus ``extra``."""
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, **extra)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        **extra,
    )


def _transformers(folder, dtype: torch.dtype, config: BitsAndBytesConfig):
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=config, device_map={"": "cpu"}
    )


def _assert_same_model(ours, theirs) -> None:
    """Same classes, tensors (values, dtypes, ties), buffers, quant states and config."""
    assert [type(m) for m in ours.modules()] == [type(m) for m in theirs.modules()]
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    buffers = dict(theirs.named_buffers())
    assert {k: torch.equal(v, buffers[k]) for k, v in ours.named_buffers()} == dict.fromkeys(
        buffers, True
    )
    for (name, mine), other in zip(ours.named_modules(), theirs.modules(), strict=True):
        if isinstance(mine, bnb.nn.Linear4bit):
            s, t = mine.weight.quant_state, other.weight.quant_state
            assert (s.blocksize, s.quant_type, s.dtype, s.shape, s.nested) == (
                t.blocksize,
                t.quant_type,
                t.dtype,
                t.shape,
                t.nested,
            ), name
            assert torch.equal(s.absmax, t.absmax) and torch.equal(s.code, t.code), name
            assert torch.equal(s.state2.absmax, t.state2.absmax), name
            assert mine.weight.dtype == other.weight.dtype == torch.uint8
        if isinstance(mine, bnb.nn.Linear8bitLt):
            assert torch.equal(mine.weight.SCB, other.weight.SCB), name
            assert mine.state.threshold == other.state.threshold == 6.0
    assert ours.config.to_dict() == theirs.config.to_dict()
    assert (
        ours.lm_head.weight is ours.model.embed_tokens.weight or not ours.config.tie_word_embeddings
    )


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [("nf4", torch.float32), ("nf4", torch.bfloat16), ("int8", torch.float32)],
    ids=["nf4-fp32", "nf4-bf16", "int8-fp32"],
)
def test_streamed_model_is_transformers_quantized_model(folder, kind, dtype):
    ours = load_streaming(folder, dtype, _config(kind, dtype))
    theirs = _transformers(folder, dtype, _config(kind, dtype))
    _assert_same_model(ours, theirs)
    assert (
        getattr(ours, f"is_loaded_in_{'8' if kind == 'int8' else '4'}bit"),
        ours.is_quantized,
    ) == (
        True,
        True,
    )
    assert ours.hf_quantizer.quantization_config is ours.config.quantization_config
    assert not ours.training
    lm_head = type(ours.lm_head)
    assert lm_head is torch.nn.Linear and ours.lm_head.weight.dtype == dtype  # kept float
    assert tiny.max_diff(tiny.logits(ours), tiny.logits(theirs)) <= 1e-6


def test_skip_modules_stay_float_as_transformers_leaves_them(folder):
    config = _config("nf4", llm_int8_skip_modules=["down_proj", "lm_head"])
    ours = load_streaming(folder, torch.float32, config)
    _assert_same_model(ours, _transformers(folder, torch.float32, config))
    layer = ours.model.layers[0].mlp
    assert type(layer.down_proj) is torch.nn.Linear and isinstance(layer.up_proj, bnb.nn.Linear4bit)


def test_sharded_checkpoint_streams_shard_by_shard(tmp_path):
    _llama(tie=False).save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    config = _config("nf4")
    ours = load_streaming(tmp_path, torch.float32, config)
    _assert_same_model(ours, _transformers(tmp_path, torch.float32, config))


def test_gpt2_conv1d_weights_are_transposed_as_transformers_does(tmp_path):
    tiny.gpt2().save_pretrained(tmp_path)
    for kind in ("nf4", "int8"):
        ours = load_streaming(tmp_path, torch.float32, _config(kind))
        _assert_same_model_gpt2(ours, _transformers(tmp_path, torch.float32, _config(kind)))


def _assert_same_model_gpt2(ours, theirs) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(ours.transformer.h[0].attn.c_attn, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_trains_the_same_on_either_load(folder, kind):
    """A step on each: equal loss, gradients and, after AdamW, the next loss."""
    losses = []
    for model in (
        load_streaming(folder, torch.float32, _config(kind)),
        _transformers(folder, torch.float32, _config(kind)),
    ):
        torch.manual_seed(0)  # the same A on both
        add_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
        tiny.randomize_adapters(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        ids = tiny.IDS
        first = model(input_ids=ids, labels=ids).loss
        first.backward()
        grads = [p.grad.clone() for p in params]
        optimizer.step()
        with torch.no_grad():
            losses.append((first.item(), grads, model(input_ids=ids, labels=ids).loss.item()))
    (loss_a, grads_a, next_a), (loss_b, grads_b, next_b) = losses
    assert loss_a == loss_b and next_a == next_b and next_a != loss_a
    assert all(torch.equal(g, h) for g, h in zip(grads_a, grads_b, strict=True))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_load_model_quantizes_by_streaming_not_through_from_pretrained(
    folder, kind, tmp_path, smollm2_tokenizer, monkeypatch
):
    copy = shutil.copytree(folder, tmp_path / "model")
    smollm2_tokenizer.save_pretrained(copy)
    theirs = _transformers(copy, torch.float32, _config(kind))

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained would hold the float weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    model, _ = load_model(str(copy), quantize=kind)
    theirs.name_or_path = theirs.config.name_or_path = model.name_or_path
    _assert_same_model(model, theirs)


def test_a_checkpoint_with_foreign_keys_falls_back_to_transformers_with_a_warning(tmp_path):
    from safetensors.torch import load_file, save_file

    _llama(tie=False).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    # A legacy per-layer rotary buffer: transformers drops it, we do not guess.
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NotStreamable, match="tensors the model does not have.*rotary_emb"):
        load_streaming(tmp_path, torch.float32, _config("nf4"))
    from lorakit.models.load import _load_weights

    with pytest.warns(UserWarning, match="loads through transformers instead"):
        model = _load_weights(tmp_path, torch.float32, _config("nf4"), "cpu", False)
    _assert_same_model(model, _transformers(tmp_path, torch.float32, _config("nf4")))


def test_a_checkpoint_missing_a_tensor_is_not_streamed(tmp_path):
    from safetensors.torch import load_file, save_file

    _llama(tie=False).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]  # transformers would initialize it at random
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NotStreamable, match="no tensor for model.norm.weight"):
        load_streaming(tmp_path, torch.float32, _config("int8"))


def test_weights_that_are_not_safetensors_are_not_streamed(tmp_path):
    from safetensors.torch import load_file

    _llama(tie=False).save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(NotStreamable, match="has no model.safetensors"):
        load_streaming(tmp_path, torch.float32, _config("nf4"))


def test_a_shape_the_config_does_not_ask_for_is_refused(tmp_path):
    _llama(tie=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"intermediate_size": 256}))
    with pytest.raises(LoraError, match=r"down_proj.weight has shape \(64, 128\).*\(64, 256\)"):
        load_streaming(tmp_path, torch.float32, _config("nf4"))


def test_a_broken_index_or_a_missing_shard_is_named(tmp_path):
    _llama(tie=False).save_pretrained(tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    shard = sorted(tmp_path.glob("model-0000*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(LoraError, match=f"names shards that are not in the folder: {shard.name}"):
        load_streaming(tmp_path, torch.float32, _config("nf4"))
    index.write_text("[1, 2]")
    with pytest.raises(LoraError, match="is not a safetensors index"):
        load_streaming(tmp_path, torch.float32, _config("nf4"))


def test_a_cpu_load_gives_large_blocks_their_own_mapping(folder, monkeypatch):
    """glibc's mmap threshold is pinned at 128 KiB for a CPU run: the dequantized float
    temporaries of training would otherwise fragment the heap (0.69x float32's peak, not
    0.44x, on a 506M Llama)."""
    calls = []

    class FakeGlibc:
        def mallopt(self, param, value):
            calls.append((param, value))

        def malloc_trim(self, pad):
            return 1

    monkeypatch.setattr(quantize, "_glibc", lambda: FakeGlibc())
    quantize.load_streaming(folder, torch.float32, _config("nf4"))
    assert calls == [(-3, 128 * 1024)]  # M_MMAP_THRESHOLD (malloc.h)
