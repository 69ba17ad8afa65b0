"""The precision of a base model's weights: ``--dtype`` and ``--quantize`` (QLoRA).

``--dtype`` picks the float type of the base weights; ``auto`` is bfloat16 on a CUDA device
that supports it and float32 elsewhere (the CPU demo stays exact). ``--quantize`` loads the
linear layers through bitsandbytes, as transformers' ``BitsAndBytesConfig`` describes them
(:mod:`lorakit.models.quantize` builds the model from it one tensor at a time):

- ``nf4``: 4-bit NormalFloat with double quantization (the quantization constants are
  quantized too, ~0.4 bit/param less), computing in the ``--dtype`` (bf16 or fp32, as QLoRA does);
- ``int8``: 8-bit rows with an absmax scale each (LLM.int8()).

Adapters stay float32 either way. bitsandbytes, not torchao's ``NF4Tensor``: bitsandbytes is
what transformers loads, what PEFT users arrive with (their models wrap ``Linear4bit``), and
it has a CPU backend, so one path serves CPU tests, CUDA and PEFT interop; torchao gives no
int8 twin of it and would need a second wrapper.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import LoraError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
QUANTIZATIONS = ("nf4", "int8")


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype for ``--dtype name`` on ``device`` (``auto``: bf16 on a CUDA device
    that supports it, else float32).

    Raises:
        LoraError: an unknown name, or a dtype this torch cannot multiply on ``device``.
    """
    if isinstance(name, torch.dtype):
        return name
    device = torch.device(device)
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise LoraError(f"--dtype {name!r} is not one of {', '.join(DTYPE_CHOICES)}.")
    dtype = DTYPES[name]
    try:
        _matmul_probe(dtype, device)
    except RuntimeError as error:
        raise LoraError(
            f"--dtype {name} is not supported on {device.type} by this torch ({error}); "
            "use --dtype float32 (or bfloat16)."
        ) from None
    return dtype


def _matmul_probe(dtype: torch.dtype, device: torch.device) -> None:
    """A 2x2 product in ``dtype``: older torch builds have no half-precision CPU kernels."""
    ones = torch.ones(2, 2, dtype=dtype, device=device)
    ones @ ones


def recorded_quantization(folder: Path) -> str | None:
    """The ``quant_method`` a model folder's ``config.json`` records, if it is quantized."""
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # not a folder of ours to judge; loading reports it
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not quant:
        return None
    return str(quant.get("quant_method", "unknown")) if isinstance(quant, dict) else "unknown"


def quantization_config(quantize: str, compute_dtype: torch.dtype, folder: Path) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``--quantize`` (``nf4`` or ``int8``).

    Raises:
        LoraError: an unknown method, a folder that is already quantized, or bitsandbytes
            missing.
    """
    if quantize not in QUANTIZATIONS:
        raise LoraError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)}.")
    already = recorded_quantization(folder)
    if already:
        raise LoraError(
            f"{folder} is already quantized ({already}, its config.json has a "
            f"quantization_config); drop --quantize {quantize} to load it as it is."
        )
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; say so before it does)
    except ImportError:
        raise LoraError(
            f"--quantize {quantize} needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or drop --quantize)."
        ) from None
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,  # the dtype dequant(W) is multiplied in
    )
