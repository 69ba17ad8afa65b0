"""A whole model, merged with an adapter, as a GGUF file llama.cpp runs.

The tensors are the merged model lorakit computes (``unload(merge=True)``: LoRA, DoRA,
``modules_to_save`` and trainable tokens folded in), named and laid out as llama.cpp's
converter would (``archs``) and encoded per ``--outtype`` (``gguf_file``).

Everything else a runnable GGUF needs, the tokenizer and the hyperparameters, is copied from
a GGUF of the same base model: the file the model was loaded from (the bundled SmolLM2 ships
as GGUF, so GGUF -> fine-tune -> GGUF closes the loop), or one given as ``source_gguf``, e.g.
``convert_hf_to_gguf.py --vocab-only`` of a Hugging Face base. Tensors of the source that the
model does not hold (``rope_freqs``) are copied as they are.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import gguf
import torch
from torch import Tensor, nn

from ..errors import LoraError
from ..progress import progress
from ..state import adapter_configs
from .archs import ArchMap
from .gguf_file import add_tensor, check_outtype, write_atomic
from .gguf_read import Header

# The writer adds the architecture and the alignment itself; the file type is the outtype's.
SKIPPED_KEYS = ("general.architecture", "general.file_type", "general.alignment")


def source_gguf(model: nn.Module) -> Path | None:
    """The GGUF file ``model`` was loaded from (``lorakit.models.load_model``), if any."""
    from ..models.gguf import gguf_source

    return gguf_source(str(getattr(model, "name_or_path", "") or ""))


def merged_copy(model: nn.Module, adapter_name: str | None, in_place: bool = False) -> nn.Module:
    """``model`` with adapter ``adapter_name`` folded in and every wrapper gone.

    A copy unless ``in_place``; ``adapter_name=None`` takes the model as it is (no adapters).
    """
    from .. import set_adapter, unload

    configs = adapter_configs(model)
    if adapter_name is None:
        if configs:
            raise LoraError(f"The model holds adapters {sorted(configs)}; name the one to merge.")
        return model
    if adapter_name not in configs:
        raise LoraError(f"No adapter {adapter_name!r} in the model; it has {sorted(configs)}.")
    merged = model if in_place else copy.deepcopy(model)
    set_adapter(merged, [adapter_name])
    return unload(merged, merge=True)


def model_tensors(merged: nn.Module, arch: ArchMap) -> dict[str, Tensor]:
    """GGUF name -> tensor (GGUF layout) for every parameter of a plain HF model.

    Tied parameters appear once (the embedding), as llama.cpp's converter writes them.
    """
    tensors, unmapped = {}, []
    for hf_name, param in merged.named_parameters():
        name = arch.gguf_name(hf_name)
        if name is None:
            unmapped.append(hf_name)
            continue
        value = param.detach().T if arch.transposed(hf_name) else param.detach()
        tensors[name] = arch.permute_rows(hf_name, value)
    if unmapped:
        raise LoraError(
            f"llama.cpp's {arch.arch_name} has no tensor for {', '.join(unmapped[:5])}"
            + (f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else "")
            + "; this model does not fit llama.cpp's architecture."
        )
    return tensors


def _check_source(header: Header, arch: ArchMap, tensors: dict, source: Path) -> None:
    """The source GGUF must be this architecture, with this model's tensor shapes."""
    found = header.get(gguf.Keys.General.ARCHITECTURE)
    problems = [] if found == arch.arch_name else [f"architecture {found!r}, not {arch.arch_name}"]
    blocks = header.get(f"{arch.arch_name}.block_count")
    if blocks != arch.n_blocks:
        problems.append(f"{blocks} blocks there, {arch.n_blocks} here")
    for t in header.tensors:
        if t.name in tensors and tuple(tensors[t.name].shape) != t.shape:
            problems.append(f"{t.name} is {t.shape} there, {tuple(tensors[t.name].shape)} here")
    tokens = header.get(gguf.Keys.Tokenizer.LIST)
    vocab = tensors.get("token_embd.weight")
    if tokens is not None and vocab is not None and len(tokens) != vocab.shape[0]:
        problems.append(f"{len(tokens)} tokens there, {vocab.shape[0]} embedding rows here")
    if problems:
        raise LoraError(
            f"{source} is not a GGUF of this model's base: "
            + "; ".join(problems[:4])
            + ". Give the GGUF of the base model the adapter was trained on (source_gguf / "
            "--gguf-metadata); an embedding with extra rows needs a tokenizer that has them."
        )


def _copy_metadata(header: Header, writer: gguf.GGUFWriter, outtype: str) -> None:
    """Every key of the source (tokenizer, hyperparameters, names) but the file type."""
    for key, (kind, sub, value) in header.fields.items():
        if key not in SKIPPED_KEYS:
            writer.add_key_value(key, value, kind, sub_type=sub)
    writer.add_file_type(check_outtype(outtype)[0])


def to_gguf_model(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = "default",
    *,
    outtype: str = "f16",
    source: str | os.PathLike | None = None,
    in_place: bool = False,
) -> Path:
    """Write ``model`` merged with ``adapter_name`` (None: as it is) as a runnable GGUF.

    Args:
        outtype: f32, f16 (default), bf16 or q8_0 for the 2-D weights (norms stay f32).
        source: a GGUF of the base model to take the tokenizer and hyperparameters from;
            default: the GGUF the model was loaded from.
        in_place: merge into ``model`` itself (no copy; it is left merged and unwrapped).

    Raises:
        LoraError: no source GGUF, a source of another model, a model llama.cpp's
            architecture does not fit, or an adapter that cannot merge; nothing is written.
    """
    check_outtype(outtype)
    arch = ArchMap(model)
    source = Path(source) if source is not None else source_gguf(model)
    if source is None or not source.is_file():
        raise LoraError(
            "A merged GGUF takes its tokenizer and hyperparameters from a GGUF of the base "
            f"model, and {'no such file: ' + str(source) if source else 'none is known'}. "
            "Load the base from a .gguf file, or give one (--gguf-metadata FILE; make it with "
            "llama.cpp's convert_hf_to_gguf.py BASE --vocab-only)."
        )
    header = Header(source)
    with torch.no_grad():
        tensors = model_tensors(merged_copy(model, adapter_name, in_place), arch)
    _check_source(header, arch, tensors, source)
    writer = gguf.GGUFWriter(path=None, arch=arch.arch_name)
    _copy_metadata(header, writer, outtype)
    kept = {t.name: t for t in header.tensors if t.name not in tensors}  # rope_freqs, ...
    order = list(dict.fromkeys([*(t.name for t in header.tensors), *tensors]))
    for name in progress(order, "encoding tensors", len(order), "tensor"):
        value = tensors[name] if name in tensors else torch.from_numpy(header.tensor(kept[name]))
        add_tensor(writer, name, value, outtype)
    return write_atomic(writer, path)
