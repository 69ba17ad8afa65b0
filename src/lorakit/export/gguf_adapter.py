"""llama.cpp LoRA adapters: a GGUF file of type ``adapter`` (``llama-cli --lora``, Ollama).

What llama.cpp's ``convert_lora_to_gguf.py`` writes and ``src/llama-adapter.cpp`` reads::

    general.architecture, general.type = "adapter", adapter.type = "lora", general.name,
    adapter.lora.alpha (one float for the file), general.quantization_version
    <weight>.lora_a   (rank, in)      e.g. blk.0.attn_q.weight.lora_a; ggml ne = [in, rank]
    <weight>.lora_b   (out, rank)     B's rows in the GGUF weight's row order (q/k permuted)
    token_embd.weight.lora_a  (vocab, rank)   Aᵀ: llama.cpp looks rows of it up per token

llama.cpp adds ``s_ll · B (A x)`` with ``s_ll = alpha / rank`` (rank: B's columns), one alpha
for every tensor. A module's true scale s can differ: rsLoRA (alpha / sqrt(r)),
``alpha_pattern``, a fused-slice adapter written as one wider pair. So B is written as
``B · s / s_ll`` and llama.cpp's product is exact; for a plain adapter the factor is 1 and the
file is byte for byte what the converter writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
from torch import Tensor, nn

from ..config import lora_scale
from ..errors import LoraError
from ..io import top_level
from ..targeting import moe_parts, unwrap
from .archs import ArchMap
from .gguf_file import add_tensor, check_outtype, write_atomic
from .pairs import Collected, Pair, collect

MERGED_HINT = "or export the whole model merged (--merged; Python: to_gguf_model)"


def llama_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to a pair of this rank (``get_scale`` in llama-adapter.h)."""
    alpha32 = float(np.float32(alpha))  # the file stores alpha as float32
    return lora_scale(alpha32, rank, use_rslora=False) if alpha32 else 1.0


def refusals(found: Collected) -> list[str]:
    """What llama.cpp cannot apply, one line per module (empty when everything can go)."""
    why = {
        "DoRA (a learned magnitude per output channel)": found.dora,
        "lora_bias (a trained bias on B)": found.lora_bias,
        "modules_to_save (a full trained copy of the module)": found.saved,
        "trainable_token_indices (replaced embedding rows)": found.tokens,
    }
    lines = [f"{path}: {what}" for what, paths in why.items() for path in paths]
    lines += [f"{what}: llama.cpp applies LoRA to 2-D weights only" for what in found.other]
    if found.config.bias != "none":
        lines.append(f"bias={found.config.bias!r}: the adapter carries trained biases")
    return lines


def refuse_experts(model: nn.Module, adapter_name: str) -> None:
    """Refuse, by name, LoRA on routed experts: llama.cpp keeps each projection of all
    experts as one 3D tensor (``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``), and
    lorakit writes no LoRA tensors for those (one pair per expert)."""
    experts = moe_parts(model).experts
    adapted = sorted(
        wrapper.target_name(path)
        for path, wrapper in top_level(model, adapter_name)
        if wrapper.is_lora and path.split(".base_layer")[0] in experts
    )
    if adapted:
        more = f" and {len(adapted) - 3} more" if len(adapted) > 3 else ""
        raise LoraError(
            f"Cannot export this adapter as a llama.cpp LoRA: it adapts routed experts "
            f"({', '.join(adapted[:3])}{more}: one LoRA pair per expert of a 3D weight), and "
            "lorakit writes no llama.cpp LoRA for expert tensors (ffn_*_exps). Retrain without "
            f"the experts (--targets without all-linear, no --target-parameters), {MERGED_HINT}."
        )


def adapter_tensors(model: nn.Module, arch: ArchMap, found: Collected) -> list[tuple[str, Tensor]]:
    """(GGUF name, tensor) for every pair, in the converter's order; ``LoraError`` listing
    every module llama.cpp cannot take."""
    problems = refusals(found)
    tensors = []
    alpha = found.config.alpha
    for pair in sorted(found.pairs, key=lambda p: p.path + "."):
        placed = _place(model, arch, pair, alpha)
        if isinstance(placed, str):
            problems.append(placed)
        else:
            tensors += placed
    if problems:
        raise LoraError(
            "Cannot export this adapter as a llama.cpp LoRA; llama.cpp adapters hold plain "
            f"LoRA pairs on its {arch.arch_name} tensors only:\n  - "
            + "\n  - ".join(problems)
            + f"\nRetrain without these options, {MERGED_HINT}."
        )
    return tensors


def _place(
    model: nn.Module, arch: ArchMap, pair: Pair, alpha: float
) -> list[tuple[str, Tensor]] | str:
    """The pair's two GGUF tensors, or why llama.cpp has no place for it."""
    hf_name = f"{pair.path}.weight"
    name = arch.gguf_name(hf_name)
    if name is None:
        return f"{pair.path}: llama.cpp's {arch.arch_name} has no tensor for {hf_name}"
    if arch.tied and name in ("output.weight", "token_embd.weight"):
        return (
            f"{pair.path}: {name} is tied (one matrix for the embedding and the head) and "
            "llama.cpp would apply the adapter to one use only"
        )
    weight = tuple(unwrap(model.get_submodule(pair.path)).weight.shape)
    if arch.transposed(hf_name):
        weight = weight[::-1]
    matrix = (pair.B.shape[0], pair.A.shape[1])  # (out, in) of B @ A
    B = pair.B * (pair.scale / llama_scale(alpha, pair.rank))  # fold the true scale into B
    if name == "token_embd.weight":  # llama.cpp looks rows of lora_a up (build_inp_embd)
        if weight == matrix[::-1]:
            return [(f"{name}.lora_a", pair.A.T), (f"{name}.lora_b", B)]
    elif weight == matrix:
        return [(f"{name}.lora_a", pair.A), (f"{name}.lora_b", arch.permute_rows(hf_name, B))]
    return f"{pair.path}: llama.cpp applies LoRA to {name} of shape {weight} as {matrix}"


def to_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    outtype: str = "f32",
    metadata_dir: str | os.PathLike | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of ``model`` as a llama.cpp LoRA adapter GGUF at ``path``.

    Args:
        model: a Hugging Face model (see ``archs.SUPPORTED``) holding the adapter.
        outtype: f32 (default, as the adapter trained), f16, bf16 or q8_0.
        metadata_dir: a folder whose name and model card give ``general.name``, as llama.cpp's
            converter reads the adapter folder (default: the output file's stem).

    Raises:
        LoraError: an architecture lorakit does not map, or modules llama.cpp cannot apply
            (DoRA, lora_bias, modules_to_save, trainable tokens, biases, tied weights, other
            layer kinds), all named at once; nothing is written.
    """
    check_outtype(outtype)
    found = collect(model, adapter_name)
    refuse_experts(model, adapter_name)
    arch = ArchMap(model)
    tensors = adapter_tensors(model, arch, found)
    writer = gguf.GGUFWriter(path=None, arch=arch.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    for name, tensor in tensors:
        add_tensor(writer, name, tensor, outtype)
    folder = Path(metadata_dir) if metadata_dir is not None else None
    meta = gguf.Metadata.load(None, folder, None, writer.get_total_parameter_count()[0])
    meta.name = meta.name or Path(path).stem
    meta.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(found.config.alpha))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return write_atomic(writer, path)
