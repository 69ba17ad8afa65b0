"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's (``base_model.model.<path>.lora_A.weight``, ``lora_embedding_A``,
``<path>.<param>`` for ``modules_to_save`` copies), so ``peft.PeftModel.from_pretrained``
reads what ``save_adapter`` writes and ``load_adapter`` reads what PEFT writes.

Layouts PEFT lacks are written as equivalent plain LoRA: a fused-slice adapter becomes one
rank ``n_on · r`` pair on the whole projection with a block-structured B (``rank_pattern`` and
``alpha_pattern`` keep the scale), and 3D expert adapters use PEFT's stacked layout. lorakit's
own config and a fingerprint of the base model (adapted names and shapes) travel in the
safetensors metadata, so a lorakit file loads back exactly and onto the right model only.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import WEIGHT_INITS, LoraConfig
from .errors import LoraError
from .inject import (
    PlanEntry,
    adapter_configs,
    add_lora,
    iter_adapter_modules,
    logical_path,
    make_wrapper,
    plan,
    unwrap,
    walk,
)
from .layers import LoraEmbedding, LoraFused, LoraLayer, LoraParameter, ModulesToSave
from .merge import check_adapter_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


# --- layout conversion: lorakit layer <-> PEFT tensors ---------------------------------------
def _lora_keys(layer: LoraLayer) -> tuple[str, str]:
    if isinstance(layer, LoraEmbedding):
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A.weight", "lora_B.weight"


def _to_peft(A: Tensor, B: Tensor, layer: LoraLayer) -> tuple[Tensor, Tensor]:
    """(A, B) in lorakit's layout -> PEFT's layout for ``layer``."""
    if isinstance(layer, LoraFused):
        n_on, r, _ = A.shape
        # Block j of B's columns feeds only the rows of the j-th enabled slice.
        full = B.new_zeros(len(layer.enabled), layer.slice_size, n_on * r)
        for j, s in enumerate(layer.slice_index.tolist()):
            full[s, :, j * r : (j + 1) * r] = B[j]
        return A.reshape(n_on * r, -1), full.reshape(-1, n_on * r)
    if isinstance(layer, LoraParameter) and A.dim() == 3:
        # PEFT stacks experts: A (E·r, in) by expert; B (out, r·E) with expert as fastest index.
        experts, r, _ = A.shape
        return A.reshape(experts * r, -1), B.permute(1, 2, 0).reshape(B.shape[1], r * experts)
    return A, B


def _from_peft(A: Tensor, B: Tensor, layer: LoraLayer, r: int) -> tuple[Tensor, Tensor]:
    """Inverse of ``_to_peft``: PEFT's (A, B) -> lorakit's layout for ``layer``."""
    if isinstance(layer, LoraFused):
        slices = layer.slice_index.tolist()
        blocks = B.reshape(len(layer.enabled), layer.slice_size, len(slices) * r)
        B = torch.stack([blocks[s, :, j * r : (j + 1) * r] for j, s in enumerate(slices)])
        return A.reshape(len(slices), r, -1), B
    if isinstance(layer, LoraParameter) and layer.num_experts:
        experts = layer.num_experts
        return A.reshape(experts, r, -1), B.reshape(B.shape[0], r, experts).permute(2, 0, 1)
    return A, B


def _pattern_overrides(config: LoraConfig, model: nn.Module, name: str) -> dict:
    """rank/alpha patterns that make PEFT build a fused adapter as one wider LoRA pair."""
    rank, alpha = {}, {}
    for path, layer in iter_adapter_modules(model):
        if isinstance(layer, LoraFused) and name in layer.lora_A:
            n_on, r = len(layer.slice_index), layer.r[name]
            key = re.escape(path)
            rank[key] = n_on * r
            # Keep scale = alpha / r (or alpha / sqrt(r)) unchanged at rank n_on · r.
            alpha[key] = config.alpha_for(path) * (math.sqrt(n_on) if config.use_rslora else n_on)
    # Exact-path patterns go first: PEFT takes the first pattern that matches.
    return {
        "rank_pattern": {**rank, **config.rank_pattern},
        "alpha_pattern": {**alpha, **config.alpha_pattern},
    }


def _peft_exclude(spec: list[str] | str | None) -> str | None:
    # PEFT excludes only the named module; lorakit excludes its whole subtree. A regex that
    # also matches everything below says the same thing to PEFT.
    if not spec:
        return None
    core = spec if isinstance(spec, str) else r"(?:.*\.)?(?:" + "|".join(map(re.escape, spec)) + ")"
    return rf"(?:{core})(?:\..*)?"


# --- PiSSA / OLoRA: saved as a plain LoRA on the original weights --------------------------
def _plain_pair(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor]:
    """(A, B) of adapter ``name`` as a plain LoRA relative to the weight before its init.

    PiSSA / OLoRA moved scale · B0 A0 out of the base: W = W_res + scale · B0 A0. The trained
    model is W_res + scale · B A = W + scale · (B A - B0 A0) = W + scale · [B, -B0] [A; A0],
    a rank-2r LoRA on the original W (PEFT's ``path_initial_model_for_weight_conversion``).
    """
    A, B = layer.lora_A[name], layer.lora_B[name]
    initial = layer.initial_lora(name)
    if initial is None:
        return A, B
    A0, B0 = initial
    # (r, in) + (r, in) -> (2r, in);  (out, r) + (out, r) -> (out, 2r)
    return torch.cat([A, A0.to(A.dtype)]), torch.cat([B, -B0.to(B.dtype)], dim=1)


def _plain_config(config: LoraConfig) -> LoraConfig:
    """The config of ``_plain_pair``'s adapter: rank 2r at the same scale, a plain init."""
    if config.init not in WEIGHT_INITS:
        return config
    # scale = alpha / r (alpha / sqrt(r) with rsLoRA) stays the same at rank 2r.
    factor = math.sqrt(2) if config.use_rslora else 2.0
    return config.replace(
        r=2 * config.r,
        alpha=config.alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
        init="kaiming",
    )


# --- saving --------------------------------------------------------------------------------
def _bias_keys(
    model: nn.Module, config: LoraConfig, adapted: set[str], saved: set[str]
) -> dict[str, nn.Parameter]:
    """PEFT key -> bias parameter that ``config.bias`` puts in the file.

    ``adapted``: paths of the adapter's LoRA modules; ``saved``: its modules_to_save paths
    (their biases travel with the copy). Works before or after wrapping: a wrapped module's
    bias is named ``<path>.base_layer.bias`` in the file, as in PEFT.
    """
    if config.bias == "none":
        return {}
    wrapped = adapted | {p for p, m in iter_adapter_modules(model) if isinstance(m, LoraLayer)}
    keys = {}
    for path, module in walk(model):
        bias = getattr(unwrap(module), "bias", None)
        if not isinstance(bias, nn.Parameter) or any(
            path == s or path.startswith(s + ".") for s in saved
        ):
            continue
        if config.bias == "lora_only" and path not in adapted:
            continue
        keys[f"{PREFIX}{path}{'.base_layer' if path in wrapped else ''}.bias"] = bias
    return keys


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter_name``'s tensors under PEFT's names (what ``save_adapter`` writes)."""
    check_adapter_names(model, [adapter_name])
    config = adapter_configs(model)[adapter_name]
    tensors: dict[str, Tensor] = {}
    for path, module in iter_adapter_modules(model):
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for name, p in module.modules_to_save[adapter_name].named_parameters():
                tensors[f"{PREFIX}{path}.{name}"] = p
        elif isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            key_a, key_b = _lora_keys(module)
            A, B = _to_peft(*_plain_pair(module, adapter_name), module)
            tensors[f"{PREFIX}{path}.{key_a}"] = A
            tensors[f"{PREFIX}{path}.{key_b}"] = B
    adapted = {
        p
        for p, m in iter_adapter_modules(model)
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A
    }
    saved = {p for p, m in iter_adapter_modules(model) if isinstance(m, ModulesToSave)}
    tensors.update(_bias_keys(model, config, adapted, saved))
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _fingerprint(model: nn.Module, adapter_name: str) -> dict[str, list[int]]:
    prints = {}
    for path, module in iter_adapter_modules(model):
        if isinstance(module, LoraParameter) and adapter_name in module.lora_A:
            owner_path = logical_path(path)
            prints[f"{owner_path}.{module.parameter_name}"] = list(module.base_weight.shape)
        elif isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            prints[path] = list(module.base_weight.shape)
    return prints


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> Path:
    """Write adapter ``adapter_name`` to ``directory`` in PEFT's format; return the folder.

    Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (with lorakit's config and
    the base model fingerprint in its metadata). Each file is written to a temporary name and
    renamed, so an interrupted save never leaves a half-written file. A PiSSA / OLoRA adapter
    is written as a plain rank-2r LoRA (see ``_plain_pair``): it loads, in PEFT or lorakit,
    onto the unchanged base model, not onto the residual this model now holds.
    """
    tensors = adapter_state_dict(model, adapter_name)
    config = _plain_config(adapter_configs(model)[adapter_name])
    peft = config.to_peft_dict()
    peft.update(_pattern_overrides(config, model, adapter_name))
    peft["exclude_modules"] = _peft_exclude(config.exclude_modules)
    peft["fan_in_fan_out"] = any(
        getattr(m, "fan_in_fan_out", False) for _, m in iter_adapter_modules(model)
    )
    metadata = {
        "format": "pt",
        "lorakit.config": json.dumps(config.to_dict()),
        "lorakit.fingerprint": json.dumps(_fingerprint(model, adapter_name)),
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    _atomic_write(
        out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(peft, indent=2) + "\n")
    )
    return out


# --- loading -------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, Tensor], dict]:
    """Read an adapter folder: (config, tensors under PEFT names, fingerprint or {}).

    Reads safetensors, or a legacy ``adapter_model.bin`` with ``weights_only=True`` (no
    arbitrary unpickling). Raises ``LoraError`` for a missing folder or file.
    """
    folder = Path(directory)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise LoraError(
            f"{config_file} not found: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(as written by save_adapter, lorakit train or PEFT's save_pretrained)."
        )
    metadata: dict = {}
    if (folder / WEIGHTS_NAME).is_file():
        with safe_open(folder / WEIGHTS_NAME, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    elif (folder / LEGACY_WEIGHTS_NAME).is_file():
        try:
            tensors = torch.load(
                folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True
            )
        except Exception as err:  # pickle errors vary by torch version
            raise LoraError(
                f"Refusing to load {folder / LEGACY_WEIGHTS_NAME}: it holds more than plain "
                f"tensors ({err.__class__.__name__}), and lorakit never unpickles code. "
                "Convert it to safetensors in a trusted environment."
            ) from err
    else:
        raise LoraError(
            f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME})."
        )
    try:
        peft_json = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise LoraError(f"{config_file} is not valid JSON: {err}") from err
    if "lorakit.config" in metadata:
        config = LoraConfig.from_dict(json.loads(metadata["lorakit.config"]))
    else:
        config = LoraConfig.from_peft_dict(peft_json)
    return config, tensors, json.loads(metadata.get("lorakit.fingerprint", "{}"))


def _expected(model: nn.Module, entries: list[PlanEntry], config: LoraConfig) -> dict:
    """PEFT key -> (entry, role, shape) for every tensor the file must hold.

    Shapes come from a probe wrapper built on the unwrapped module (no side effects), so every
    mismatch is found before the model changes.
    """
    expected: dict[str, tuple[PlanEntry | None, str, tuple[int, ...]]] = {}
    for i, entry in enumerate(entries):
        module = model.get_submodule(entry.path)
        if entry.kind == "modules_to_save":
            for name, p in unwrap(module).named_parameters():
                expected[f"{PREFIX}{entry.path}.{name}"] = (entry, name, tuple(p.shape))
            continue
        path = entry.path
        if entry.kind == "parameter":
            # PEFT nests one wrapper per parameter; the first one targeted is innermost.
            later = sum(1 for e in entries[i + 1 :] if e.kind == "parameter" and e.path == path)
            path += ".base_layer" * later
        probe = make_wrapper(entry, module if entry.kind == "parameter" else unwrap(module))
        shape_a, shape_b = probe._shapes(entry.r)
        peft_a, peft_b = _to_peft(torch.empty(shape_a), torch.empty(shape_b), probe)
        key_a, key_b = _lora_keys(probe)
        expected[f"{PREFIX}{path}.{key_a}"] = (entry, "A", tuple(peft_a.shape))
        expected[f"{PREFIX}{path}.{key_b}"] = (entry, "B", tuple(peft_b.shape))
    adapted = {e.path for e in entries if e.kind != "modules_to_save"}
    saved = {e.path for e in entries if e.kind == "modules_to_save"}
    for key, bias in _bias_keys(model, config, adapted, saved).items():
        expected[key] = (None, "bias", tuple(bias.shape))
    return expected


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Add the adapter saved in ``directory`` (by lorakit or PEFT) to ``model`` and load it.

    Strict: missing or unexpected tensors, shape mismatches and a base-model fingerprint that
    does not match raise one ``LoraError`` listing every problem, before the model changes.
    The loaded adapter becomes the active one.
    """
    config, tensors, fingerprint = read_adapter(directory)
    result = plan(model, config, adapter_name)
    problems = []
    if fingerprint:
        mine = {e.target: list(e.shape) for e in result.entries if e.kind != "modules_to_save"}
        for target in sorted(set(fingerprint) | set(mine)):
            if fingerprint.get(target) != mine.get(target):
                problems.append(
                    f"base model differs at {target}: adapter was made for shape "
                    f"{fingerprint.get(target)}, this model has {mine.get(target)}"
                )
    expected = _expected(model, result.entries, config)
    for key, (_, _, shape) in expected.items():
        if key not in tensors:
            problems.append(f"missing tensor {key}")
        elif tuple(tensors[key].shape) != shape:
            problems.append(
                f"{key}: file has shape {tuple(tensors[key].shape)}, model expects {shape}"
            )
    embeddings = _embedding_weights(model, result.entries)
    for key in sorted(set(tensors) - set(expected)):
        if key in embeddings and tuple(tensors[key].shape) == tuple(embeddings[key].shape):
            expected[key] = (None, "embedding", tuple(embeddings[key].shape))
        elif not _peft_duplicate(key, result.entries):
            problems.append(f"unexpected tensor {key}")
    if problems:
        shown = problems[:50] + (["..."] if len(problems) > 50 else [])
        raise LoraError(
            f"Cannot load adapter from {directory}:\n  - "
            + "\n  - ".join(shown)
            + "\nCheck that the adapter was made for this base model."
        )
    add_lora(model, config, adapter_name)
    _copy_in(model, tensors, expected, adapter_name)
    return model


def _embedding_weights(model: nn.Module, entries: list[PlanEntry]) -> dict[str, nn.Parameter]:
    """PEFT key -> weight for the input/output embeddings, which PEFT saves in full when an
    embedding is adapted (to carry a resized vocabulary); loading them does what PEFT does."""
    wrapped = {e.path for e in entries if e.kind != "modules_to_save"}
    weights = {}
    for path, module in walk(model):
        if isinstance(unwrap(module), nn.Embedding) or path == "lm_head":
            name = f"{path}.base_layer.weight" if path in wrapped else f"{path}.weight"
            weights[PREFIX + name] = unwrap(module).weight
    return weights


def _peft_duplicate(key: str, entries: list[PlanEntry]) -> bool:
    # PEFT with bias="all" also saves the biases inside its modules_to_save wrapper.
    return any(
        key.startswith(f"{PREFIX}{e.path}.original_module.")
        or key.startswith(f"{PREFIX}{e.path}.modules_to_save.")
        for e in entries
        if e.kind == "modules_to_save"
    )


def _copy_in(model: nn.Module, tensors: dict, expected: dict, adapter_name: str) -> None:
    """Copy checked file tensors into the freshly added adapter (and biases)."""
    modules = dict(iter_adapter_modules(model))
    pairs: dict[str, dict[str, Tensor]] = {}
    with torch.no_grad():
        for key, (entry, role, _) in expected.items():
            if entry is None:  # a bias or a full embedding weight
                model.get_parameter(key.removeprefix(PREFIX)).copy_(tensors[key])
            elif entry.kind == "modules_to_save":
                copy = modules[entry.path].modules_to_save[adapter_name]
                copy.get_parameter(role).copy_(tensors[key])
            else:
                pairs.setdefault(entry.target, {"entry": entry})[role] = tensors[key]
        for pair in pairs.values():
            entry = pair["entry"]
            layer = modules[entry.path]
            while isinstance(layer, LoraParameter) and layer.parameter_name != entry.parameter:
                layer = layer.base_layer
            A, B = _from_peft(pair["A"], pair["B"], layer, entry.r)
            layer.lora_A[adapter_name].copy_(A)
            layer.lora_B[adapter_name].copy_(B)
