"""A whole model, merged with an adapter, as a GGUF file llama.cpp runs.

The tensors are the merged model lorakit computes (``unload(merge=True)``: LoRA, DoRA,
``modules_to_save`` and trainable tokens folded in), named and laid out as llama.cpp's
converter would (``archs``) and encoded per ``--outtype`` (``gguf_file``).

Everything else a runnable GGUF needs, the tokenizer and the hyperparameters, comes from
one of two places:

- a Hugging Face base (the usual case): written from the model's config (``hparams``) and
  its tokenizer (``vocab``), as llama.cpp's ``convert_hf_to_gguf.py`` would, without it;
- a GGUF of the same base: the file the model was loaded from (the bundled SmolLM2 ships as
  GGUF, so GGUF -> fine-tune -> GGUF closes the loop), or one given as ``source``. Its keys
  are copied, and tensors the model does not hold (``rope_freqs``) as they are.

Either way the chat template can be replaced (the run's, with its system prompt baked in).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import Tensor, nn

from ..errors import LoraError
from ..progress import progress
from ..state import adapter_configs
from .archs import ArchMap
from .gguf_file import add_tensor, check_outtype, write_atomic
from .gguf_read import Header
from .hparams import extra_tensors, write_hparams
from .vocab import Vocab, read_vocab, write_vocab

# The writer adds the architecture and the alignment itself; the file type is the outtype's.
SKIPPED_KEYS = ("general.architecture", "general.file_type", "general.alignment")
TEMPLATE_KEY = gguf.Keys.Tokenizer.CHAT_TEMPLATE


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
        tensors[name] = arch.to_gguf(hf_name, param.detach())
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


def _copy_metadata(
    header: Header, writer: gguf.GGUFWriter, outtype: str, chat_template: str | None
) -> None:
    """Every key of the source (tokenizer, hyperparameters, names) but the file type, and
    ``chat_template`` in place of the source's when given."""
    for key, (kind, sub, value) in header.fields.items():
        if key not in SKIPPED_KEYS and not (chat_template and key == TEMPLATE_KEY):
            writer.add_key_value(key, value, kind, sub_type=sub)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_file_type(check_outtype(outtype)[0])


def base_tokenizer(model: nn.Module) -> Any:
    """The tokenizer saved in the folder ``model`` was loaded from.

    Raises:
        LoraError: the model names no folder with a tokenizer.
    """
    from transformers import AutoTokenizer

    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise LoraError(
            f"A merged GGUF needs the base model's tokenizer, and {str(folder) or 'the model'} "
            "is no folder holding one: pass tokenizer= (the CLI loads the base's own), or a "
            "GGUF of the base as source= (llama.cpp's convert_hf_to_gguf.py BASE --vocab-only)."
        )
    return AutoTokenizer.from_pretrained(folder)


def _built_metadata(
    writer: gguf.GGUFWriter,
    model: nn.Module,
    arch: ArchMap,
    vocab: Vocab,
    card: Path | None,
    name: str,
) -> None:
    """general.*, the hyperparameters and the vocabulary, as the converter writes them: the
    name and model card from ``card`` (a folder) as gguf's ``Metadata`` reads one, else
    ``name``."""
    total, shared, expert, experts = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, card, None, total)
    meta.name = meta.name or name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, experts)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    write_hparams(writer, model, arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab)


def _embedding_rows(model: nn.Module) -> int:
    from ..targeting import unwrap

    return int(unwrap(model.get_input_embeddings()).weight.shape[0])


def to_gguf_model(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = "default",
    *,
    outtype: str = "f16",
    source: str | os.PathLike | None = None,
    in_place: bool = False,
    tokenizer: Any = None,
    chat_template: str | None = None,
    metadata_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``model`` merged with ``adapter_name`` (None: as it is) as a runnable GGUF.

    Args:
        outtype: f32, f16 (default), bf16 or q8_0 for the 2-D weights (norms stay f32).
        source: a GGUF of the base model to copy the tokenizer and hyperparameters from;
            default: the GGUF the model was loaded from, else none: they are written from
            the model's config and ``tokenizer``.
        in_place: merge into ``model`` itself (no copy; it is left merged and unwrapped).
        tokenizer: the model's tokenizer (default: the one in the folder it was loaded from).
        chat_template: the template to write (default: the tokenizer's or the source's).
        metadata_dir: a folder whose name and model card give ``general.*`` (default: the
            output file's name).

    Raises:
        LoraError: a missing source, a source of another model, a model llama.cpp's
            architecture does not fit, a tokenizer or RoPE scaling llama.cpp cannot be told
            about, or an adapter that cannot merge; all before anything is merged or written.
    """
    check_outtype(outtype)
    arch = ArchMap(model)
    source = Path(source) if source is not None else source_gguf(model)
    if source is not None and not source.is_file():
        raise LoraError(f"No such GGUF file: {source} (--gguf-metadata).")
    header = Header(source) if source is not None else None
    vocab = None
    if header is None:
        tok = tokenizer if tokenizer is not None else base_tokenizer(model)
        vocab = read_vocab(tok, _embedding_rows(model), model.config, chat_template)
        write_hparams(gguf.GGUFWriter(None, arch.arch_name), model, arch)  # refusals first
    with torch.no_grad():
        extra = extra_tensors(model, arch)
        tensors = model_tensors(merged_copy(model, adapter_name, in_place), arch)
    writer = gguf.GGUFWriter(path=None, arch=arch.arch_name)
    if header is not None:
        _check_source(header, arch, tensors, source)
        _copy_metadata(header, writer, outtype, chat_template)
        kept = {t.name: t for t in header.tensors if t.name not in tensors}  # rope_freqs, ...
        extra = {n: torch.from_numpy(header.tensor(kept[n])) for n in kept}
        order = [*(t.name for t in header.tensors), *tensors]
    else:
        writer.add_file_type(check_outtype(outtype)[0])
        order = [*extra, *tensors]
    values = {**extra, **tensors}
    order = list(dict.fromkeys(order))
    for name in progress(order, "encoding tensors", len(order), "tensor"):
        add_tensor(writer, name, values[name], outtype)
    if vocab is not None:
        card = Path(metadata_dir) if metadata_dir is not None else None
        _built_metadata(writer, model, arch, vocab, card, Path(path).stem)
    return write_atomic(writer, path)
