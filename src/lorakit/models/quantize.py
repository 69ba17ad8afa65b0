"""A quantizing loader: a bitsandbytes model built from its safetensors one tensor at a time.

transformers' ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` reads the
checkpoint through one memory map per file: every page it touches stays resident until the
whole load ends, so a ``--quantize nf4`` load peaks above the float model it avoids holding
(3.97 GiB against 2.79 GiB for float32 on a 506M Llama). Here::

    skeleton (parameters on meta, buffers real)   nothing allocated for the weights
      -> transformers' own quantizer swaps in Linear4bit / Linear8bitLt (same selection:
         lm_head, tied and llm_int8_skip_modules stay float)
      -> for each checkpoint tensor: open its file, read it, close it (the map goes with it);
         a quantized layer's weight is cast to the compute dtype and quantized at once
         (bitsandbytes' Params4bit / Int8Params, as transformers does), the rest is cast to
         the dtype its meta parameter has; the heap it freed goes back (``malloc_trim``)
      -> tie_weights, then the quantizer's post-processing (config.quantization_config,
         is_loaded_in_4bit / is_loaded_in_8bit, hf_quantizer)

so the peak is the quantized model plus one float tensor. The model equals transformers' load
of the same folder bit for bit (tests/test_models_quantize.py). A folder whose checkpoint keys
are not exactly the model's own (renamed legacy keys, extra or missing tensors, non-safetensors
weights) is not guessed at: :func:`load_streaming` says why and the caller loads it through
transformers instead.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import LoraError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class NotStreamable(Exception):
    """The folder cannot be mapped tensor for tensor onto the model (the message says why):
    load it through transformers."""


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (one file, or a sharded index).

    Raises:
        NotStreamable: no ``model.safetensors`` nor ``model.safetensors.index.json``.
        LoraError: an index that is not JSON, or names a shard that is missing.
    """
    from safetensors import safe_open

    if (folder / _INDEX).is_file():
        try:
            weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
            files = {str(key): folder / str(name) for key, name in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise LoraError(
                f"{folder / _INDEX} is not a safetensors index (a JSON object with a "
                f"weight_map): {error}. Re-save the model (save_pretrained)."
            ) from error
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise LoraError(
                f"{folder / _INDEX} names shards that are not in the folder: "
                f"{', '.join(missing[:5])}. Copy the whole model folder."
            )
        return files
    if not (folder / _SINGLE).is_file():
        raise NotStreamable(f"{folder} has no {_SINGLE} (nor a sharded {_INDEX})")
    with safe_open(folder / _SINGLE, framework="pt") as reader:
        return dict.fromkeys(reader.keys(), folder / _SINGLE)


def load_streaming(
    folder: Path,
    dtype: torch.dtype,
    quant: BitsAndBytesConfig,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The causal LM in ``folder`` with its linear layers quantized as ``quant`` says, built
    without ever holding the float model: what ``from_pretrained(folder, dtype=dtype,
    quantization_config=quant, device_map={"": device})`` returns, tensor for tensor.

    Args:
        folder: a Hugging Face model folder with safetensors weights.
        dtype: the dtype of the unquantized layers and the quantized layers' compute dtype
            input (transformers' ``dtype``).
        quant: transformers' ``BitsAndBytesConfig`` (4-bit or 8-bit).
        device: where the model goes (bitsandbytes quantizes on it).
        trust_remote_code: let a folder's own modelling code run.

    Returns:
        The model in eval mode.

    Raises:
        NotStreamable: the checkpoint's keys are not exactly the model's (see
            :func:`unmapped`), or its weights are not safetensors: load through transformers.
        LoraError: a broken index (see :func:`checkpoint_files`).
    """
    from transformers.quantizers import AutoHfQuantizer

    files = checkpoint_files(folder)
    if torch.device(device).type == "cpu":
        _map_large_blocks()
    model = _skeleton(folder, dtype, trust_remote_code)
    quantizer = AutoHfQuantizer.from_config(quant, pre_quantized=False)
    device_map = {"": device}
    quantizer.validate_environment(device_map=device_map)
    checkpoints = sorted({str(p) for p in files.values()})
    quantizer.preprocess_model(
        model=model, dtype=dtype, device_map=device_map, checkpoint_files=checkpoints
    )
    problem = unmapped(model, set(files))
    if problem:
        raise NotStreamable(problem)
    for key, path in sorted(files.items()):
        _place(model, key, _read(path, key), dtype, torch.device(device))
        _trim()
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # unmapped() ruled this out: a model whose tying is not what it declares
        raise NotStreamable(f"the checkpoint leaves {', '.join(left[:5])} unset")
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    _generation_config(model, folder)
    return model.eval()


def _skeleton(folder: Path, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """The model of ``folder``'s config with every parameter on meta.

    Buffers are made for real (``include_buffers=False``): the rotary ``inv_freq`` and other
    non-persistent buffers are computed by the modules' own ``__init__``, as they would be
    for a model built from the config, and they are not in the checkpoint.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        folder, local_files_only=True, trust_remote_code=trust_remote_code
    )
    config.name_or_path = str(folder)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=trust_remote_code
        )


def unmapped(model: nn.Module, keys: set[str]) -> str | None:
    """Why the checkpoint ``keys`` are not exactly ``model``'s own tensors, or ``None``.

    Exact means: every key is a parameter or persistent buffer of the model under the same
    name, and every one of those is in the checkpoint except the targets of tied weights
    (``lm_head.weight`` of a tied Llama), which ``tie_weights`` sets. Anything else (a legacy
    name transformers would rename, a tensor it would drop, a weight it would initialize at
    random, fp32-kept modules) needs transformers' own loading rules.
    """
    expected = set(model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    extra, missing = keys - expected, (expected - tied) - keys
    problems = []
    if extra:
        problems.append(f"tensors the model does not have ({', '.join(sorted(extra)[:3])})")
    if missing:
        problems.append(f"no tensor for {', '.join(sorted(missing)[:3])}")
    if keys & tied:
        problems.append(f"tied weights stored twice ({', '.join(sorted(keys & tied)[:3])})")
    if getattr(model, "_keep_in_fp32_modules", None):
        problems.append("modules kept in float32 (_keep_in_fp32_modules)")
    return f"its checkpoint holds {'; '.join(problems)}" if problems else None


def _read(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors file, the file opened for it alone.

    safetensors reads through a memory map, and the pages a read touched count in the
    process's RSS until the map closes: kept open, a 1 GB file ends up all resident. Opening
    per tensor costs about 0.5 ms each (the header is parsed again) and holds one tensor.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as reader:
        return reader.get_tensor(key)


def _place(
    model: nn.Module, key: str, value: torch.Tensor, dtype: torch.dtype, device: torch.device
) -> None:
    """Set ``model``'s tensor ``key`` from the checkpoint's ``value``: a quantized layer's
    weight quantized (from ``value`` cast to ``dtype``, as transformers casts it), any other
    tensor in the dtype of its meta placeholder, on ``device``.

    Raises:
        LoraError: ``value``'s shape is not the placeholder's (config and weights disagree).
    """
    path, _, name = key.rpartition(".")
    module = model.get_submodule(path)
    old = getattr(module, name)
    quantizes = name == "weight" and _quantizes(module)
    if quantizes and _is_conv1d(module):
        value = value.T  # Conv1D stores (in, out); the placeholder is (out, in)
    if value.shape != old.shape:
        raise LoraError(
            f"The checkpoint's {key} has shape {tuple(value.shape)}, the model's config asks "
            f"for {tuple(old.shape)}: config.json and the weights do not belong together."
        )
    if quantizes:
        setattr(module, name, _quantized(module, value.to(device=device, dtype=dtype), device))
    elif name in module._buffers:
        module._buffers[name] = value.to(device=device, dtype=old.dtype)
    else:
        value = value.to(device=device, dtype=old.dtype)
        setattr(module, name, nn.Parameter(value, requires_grad=value.is_floating_point()))


def _quantizes(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes layer that quantizes the weight it is given."""
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def _is_conv1d(module: nn.Module) -> bool:
    """Whether the quantizer made ``module`` from a transformers ``Conv1D`` (GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return issubclass(getattr(module, "source_cls", nn.Linear), Conv1D)


def _quantized(module: nn.Module, value: torch.Tensor, device: torch.device) -> nn.Parameter:
    """``value`` (out, in) quantized into ``module``'s parameter type, with the settings the
    quantizer gave its placeholder (blocksize, quant type, double quant, storage dtype; the
    int8 threshold is on the module): transformers' ``Bnb4bitQuantize`` / ``Bnb8bitQuantize``.
    """
    import bitsandbytes as bnb

    settings: dict[str, Any] = dict(module.weight.__dict__)
    if isinstance(module, bnb.nn.Linear4bit):
        weight = bnb.nn.Params4bit(value, requires_grad=False, **settings)
    else:
        settings.pop("SCB", None)  # computed from the weight
        weight = bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **settings)
    return weight.to(device)  # the move is what quantizes (on ``device``)


def _trim() -> None:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``; a no-op
    elsewhere).

    Each quantized tensor leaves its float input and bitsandbytes' temporaries freed between
    small live blocks (the packed weight, absmax); glibc keeps such holes resident, which
    under its default settings more than doubled the load's peak (2.3 GiB against 0.96 GiB
    for a 506M Llama in nf4).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _map_large_blocks() -> None:
    """From now on, glibc gives every block of 128 KiB or more its own mapping, returned to
    the system when freed (``mallopt(M_MMAP_THRESHOLD, 128 KiB)``; a no-op elsewhere).

    A quantized layer's forward and backward on the CPU dequantize its weight into a float
    temporary (4-16 MiB per layer on a 0.5B model). glibc's default threshold adapts upward
    and keeps those in the heap, where the holes they leave between small live activations
    grow the resident size step after step: a 506M Llama's nf4 training run peaked at 0.69x
    the float32 run's memory by default, 0.44x with this setting. It is set for the whole
    process, as the environment's ``MALLOC_MMAP_THRESHOLD_`` would be.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


@functools.cache
def _glibc() -> Any:
    """The C library if it is glibc (it has ``malloc_trim``), else ``None``."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def _generation_config(model: nn.Module, folder: Path) -> None:
    """The folder's ``generation_config.json``, as ``from_pretrained`` reads it."""
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
