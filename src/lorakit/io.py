"""Adapter files in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor names are PEFT's (``base_model.model.<path>.lora_A.weight``, ``lora_embedding_A``,
``<path>.<param>`` for ``modules_to_save`` copies), so ``peft.PeftModel.from_pretrained``
reads what ``save_adapter`` writes and ``load_adapter`` reads what PEFT writes.

Each layer class owns its tensor names and layout (``peft_tensors`` / ``peft_shapes``) and
``LoraConfig.to_peft_file`` the JSON; this module gathers what the model adds (``file_facts``)
and assembles the files. Layouts PEFT lacks are written as equivalent plain LoRA: a
fused-slice adapter becomes one rank ``n_on · r`` pair on the whole projection
(``rank_pattern`` and ``alpha_pattern`` keep the scale), a grouped convolution's block A is
written dense, and 3D expert adapters use PEFT's stacked layout. lorakit's
own config and a fingerprint of the base model (adapted names and shapes) travel in the
safetensors metadata, so a lorakit file loads back exactly and onto the right model only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .atomic import atomic_folder, write_errors
from .config import LoraConfig
from .errors import LoraError

# The tensors and the JSON's facts in PEFT's form (re-exported: io is where callers look).
from .hf.peft_form import PREFIX, adapter_state_dict, bias_keys, file_facts, top_level
from .inject import PlanEntry, apply_plan, plan
from .merge import check_adapter_names
from .state import adapter_configs
from .targeting import unwrap, walk

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_BASE = "base_model_name_or_path"


# --- saving --------------------------------------------------------------------------------
def _fingerprint(model: nn.Module, adapter_name: str) -> dict[str, list[int]]:
    """Adapted target -> base weight shape: what the adapter was made for."""
    prints = {}
    for path, module in top_level(model, adapter_name):
        shape = module.base_shape()
        if shape is not None:
            prints[module.target_name(path)] = list(shape)
    return prints


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    base_model: str | None = None,
) -> Path:
    """Write adapter ``adapter_name`` to ``directory`` in PEFT's format; return the folder.

    Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (with lorakit's config, a
    copy of the JSON, and the base model fingerprint in its metadata). The pair is replaced as
    one unit (``lorakit.atomic``): a kill or a full disk at any moment leaves the old adapter
    or the new one, and other files in the folder are kept. A PiSSA / OLoRA adapter is
    written as a plain rank-2r LoRA (see ``LoraLinear.original_weight_pair``): it loads, in
    PEFT or lorakit, onto the unchanged base model, not onto the residual this model now holds.

    Args:
        base_model: the base model as transformers and PEFT load it, to record in the JSON
            (default: the config's ``base_model_name_or_path``, else the model's own name or
            path); see ``file_facts``.
    """
    out = Path(directory)
    kept = "; what was there before is unchanged. Free space or choose another folder."
    with write_errors(f"the adapter to {out}", kept), atomic_folder(out) as new:
        write_adapter_files(model, new, adapter_name, base_model=base_model)
    return out


def write_adapter_files(
    model: nn.Module,
    folder: Path,
    adapter_name: str = "default",
    *,
    base_model: str | None = None,
) -> None:
    """The two files of :func:`save_adapter` written straight into ``folder``, for a writer
    that makes a whole folder atomic itself (a training checkpoint)."""
    tensors = adapter_state_dict(model, adapter_name)
    saved = adapter_configs(model)[adapter_name].on_original_weight()
    peft = saved.to_peft_file(file_facts(model, adapter_name, base_model))
    if saved.base_model_name_or_path is None:  # the base the JSON resolved, read back by lorakit
        saved = saved.replace(base_model_name_or_path=peft[_BASE])
    metadata = {
        "format": "pt",
        "lorakit.config": json.dumps(saved.to_dict()),
        "lorakit.peft_config": json.dumps(peft),  # what the JSON must still say when read
        "lorakit.fingerprint": json.dumps(_fingerprint(model, adapter_name)),
    }
    save_file(tensors, folder / WEIGHTS_NAME, metadata=metadata)
    (folder / CONFIG_NAME).write_text(json.dumps(peft, indent=2) + "\n")


# --- loading -------------------------------------------------------------------------------
def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, Tensor], dict]:
    """Read an adapter folder: (config, tensors under PEFT names, fingerprint or {}).

    Reads safetensors, or a legacy ``adapter_model.bin`` with ``weights_only=True`` (no
    arbitrary unpickling). One folder is one model: ``adapter_config.json`` is what PEFT reads,
    so a lorakit file whose JSON was changed after saving (it disagrees with the copy kept in
    the weights' metadata) is refused, naming the fields. Raises ``LoraError`` for a missing,
    corrupt or truncated file, a config that is not a valid LoRA config, and tensors that are
    not finite floating-point values.
    """
    folder = Path(directory)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        _refuse_wrapped_model(folder)
        raise LoraError(
            f"{config_file} not found: an adapter folder needs {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(as written by save_adapter, lorakit train or PEFT's save_pretrained)."
        )
    peft_json = _read_json(config_file)
    tensors, metadata = _read_tensors(folder)
    try:
        config = LoraConfig.from_peft_dict(peft_json)  # validates the JSON in every case
        if "lorakit.config" in metadata:
            _check_same_config(config_file, peft_json, _metadata(metadata, "lorakit.peft_config"))
            config = LoraConfig.from_dict(_metadata(metadata, "lorakit.config"))
            if config.base_model_name_or_path is None:  # saved before the metadata kept it
                config = config.replace(base_model_name_or_path=peft_json.get(_BASE))
    except LoraError as err:
        raise LoraError(f"{config_file}: {err}") from None
    _check_values(folder, tensors)
    return config, tensors, _metadata(metadata, "lorakit.fingerprint") or {}


# Parameter names only a model saved with lorakit's wrappers still in it has.
_WRAPPED_KEYS = (".base_layer.", ".lora_A.", ".lora_embedding_A.", ".modules_to_save.")


def _refuse_wrapped_model(folder: Path) -> None:
    """A model folder whose weights carry lorakit's wrapper names is no adapter: say what it
    is and how to get the adapter out of it."""
    weights = folder / "model.safetensors"
    if not weights.is_file():
        return
    try:
        with safe_open(weights, framework="pt") as f:
            wrapped = next((k for k in f.keys() if any(w in k for w in _WRAPPED_KEYS)), None)  # noqa: SIM118
    except Exception:  # not readable as safetensors: the generic message below says enough
        return
    if wrapped is None:
        return
    raise LoraError(
        f"{folder} holds a whole model saved with lorakit's layers still in it (e.g. "
        f"{wrapped}), not an adapter: Trainer.save_model wrote that before lorakit 0.3. "
        "transformers' from_pretrained would load it with every adapted weight missing, "
        "and PEFT refuses it. To get the adapter: load the base model, add_lora(model, the "
        "config you trained with), model.load_state_dict(safetensors.torch.load_file("
        f"'{weights}'), strict=False), then model.save_pretrained(folder) writes it."
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoraError(
            f"{path} is not valid JSON ({err}); restore it or save the adapter again."
        ) from None
    except RecursionError:
        raise LoraError(
            f"{path} nests its values too deeply to be an adapter config; restore it or save "
            "the adapter again."
        ) from None
    if not isinstance(data, dict):
        raise LoraError(f"{path} must hold a JSON object, not a {type(data).__name__}.")
    return data


def _read_tensors(folder: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of the weights file, every reading error as a ``LoraError``."""
    path = folder / WEIGHTS_NAME
    if path.is_file():
        try:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types for every corruption
            raise LoraError(
                f"{path} is not a readable safetensors file ({type(err).__name__}: {err}); it "
                "is truncated or corrupt. Save the adapter again."
            ) from None
    legacy = folder / LEGACY_WEIGHTS_NAME
    if not legacy.is_file():
        raise LoraError(
            f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME})."
        )
    try:
        tensors = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors vary by torch version
        raise LoraError(
            f"Refusing to load {legacy}: it holds more than plain tensors "
            f"({err.__class__.__name__}), and lorakit never unpickles code. Convert it to "
            "safetensors in a trusted environment."
        ) from None
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise LoraError(f"{legacy} does not hold a dict of tensors.")
    return tensors, {}


def _metadata(metadata: dict[str, str], key: str) -> dict | None:
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise LoraError(f"the metadata entry {key!r} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise LoraError(f"the metadata entry {key!r} must be a JSON object")
    return value


def _check_same_config(config_file: Path, found: dict, saved: dict | None) -> None:
    """The JSON must still say what lorakit wrote next to the weights (else: two models)."""
    if saved is None:
        return  # written by a lorakit before the copy existed
    changed = sorted(k for k in set(found) | set(saved) if found.get(k) != saved.get(k))
    if changed:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {found.get(k)!r}" for k in changed)
        raise LoraError(
            f"it was changed after the adapter was saved ({shown}), so PEFT and lorakit would "
            "build different models from this folder. Undo the edit, or apply it to the model "
            "(e.g. a new scale) and save the adapter again."
        )


def _check_values(folder: Path, tensors: dict[str, Tensor]) -> None:
    """Every tensor a finite floating-point array (an int LoRA matrix is a broken file)."""
    wrong = [f"{k} ({v.dtype})" for k, v in tensors.items() if not v.is_floating_point()]
    if wrong:
        raise LoraError(
            f"{folder}: adapter tensors must be floating point; found {wrong[:5]}"
            + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        )
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise LoraError(
            f"{folder}: NaN or inf in {bad[:5]}"
            + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            + "; the adapter diverged or the file is corrupt."
        )


def _expected(model: nn.Module, entries: list[PlanEntry], config: LoraConfig) -> dict:
    """PEFT key -> (entry or None, name under the entry, shape) for every tensor in the file.

    Shapes come from the layer classes (nothing is wrapped yet), so every mismatch is found
    before the model changes.
    """
    expected: dict[str, tuple[PlanEntry | None, str, tuple[int, ...]]] = {}
    for i, entry in enumerate(entries):
        path = entry.path
        if entry.layer.nests:
            # PEFT nests one wrapper per parameter; the first one targeted is innermost.
            later = sum(1 for e in entries[i + 1 :] if e.layer is entry.layer and e.path == path)
            path += ".base_layer" * later
        shapes = entry.layer.peft_shapes(entry.base_in(model), entry.settings, **entry.options)
        for key, shape in shapes.items():
            expected[f"{PREFIX}{path}.{key}"] = (entry, key, tuple(shape))
    adapted = {e.path for e in entries if not e.layer.whole_copy}
    saved = {e.path for e in entries if e.layer.whole_copy}
    for key, bias in bias_keys(model, config, adapted, saved).items():
        expected[key] = (None, "bias", tuple(bias.shape))
    return expected


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Add the adapter saved in ``directory`` (by lorakit or PEFT) to ``model`` and load it.

    Strict: missing or unexpected tensors, shape mismatches and a base-model fingerprint that
    does not match raise one ``LoraError`` listing every problem, before the model changes.
    The loaded adapter becomes the active one. The model is planned once: the plan the file
    is checked against is the one applied.
    """
    config, tensors, fingerprint = read_adapter(directory)
    try:
        result = plan(model, config, adapter_name)
    except LoraError as err:
        if fingerprint and adapter_name not in adapter_configs(model):
            _check_base(model, config, fingerprint, {}, directory)
        raise LoraError(f"Cannot load adapter from {directory}: {err}") from None
    if fingerprint:
        mine = {e.target: list(e.shape) for e in result.entries if not e.layer.whole_copy}
        _check_base(model, config, fingerprint, mine, directory)
    expected = _expected(model, result.entries, config)
    problems = _tensor_problems(model, tensors, expected, result.entries)
    if problems:
        raise LoraError(
            f"Cannot load adapter from {directory}:{_listed(problems)}\n"
            "Check that the adapter was made for this base model."
        )
    entries = _entry_tensors(directory, tensors, expected)
    apply_plan(model, result)
    _copy_in(model, tensors, expected, entries, adapter_name)
    return model


def _listed(problems: list[str], limit: int = 10) -> str:
    """Problems as indented lines, the first ``limit`` of them and a count of the rest."""
    more = [f"... and {len(problems) - limit} more"] if len(problems) > limit else []
    return "\n  - " + "\n  - ".join(problems[:limit] + more)


# JSON fields that fix what an adapter's tensors mean: equal in a file reloaded in place.
_SCALE_FIELDS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora")


def reload_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Copy the adapter saved in ``directory`` into ``model``'s adapter ``adapter_name``, in
    place: the same parameters get the saved values, so an optimizer holding them goes on.

    What resuming a run from a checkpoint of this adapter and loading its best checkpoint
    need (``lorakit.hf.trainer.AdapterCheckpoints``); ``load_adapter`` adds a new adapter.
    The file must hold exactly this adapter's tensors (as ``save_adapter`` writes them, or
    PEFT for the same config) at the same rank and scale.

    Raises:
        LoraError: an unknown adapter, a PiSSA / OLoRA adapter (its file holds the pair on
            the original weight, not the trained one), or, listed at once before anything
            changes, missing, unexpected or misshapen tensors and differing rank or scale.
    """
    check_adapter_names(model, [adapter_name])
    saved = adapter_configs(model)[adapter_name]
    if saved.on_original_weight() is not saved:
        raise LoraError(
            f"Cannot reload {directory} into adapter '{adapter_name}' in place: its "
            f"init={saved.init!r} adapter is saved as an equivalent pair on the original "
            "weight. Load it onto the unchanged base model with load_adapter instead."
        )
    _, tensors, _ = read_adapter(directory)
    found = _read_json(Path(directory) / CONFIG_NAME)
    mine = saved.to_peft_file(file_facts(model, adapter_name))
    problems = [
        f"{field}: the file has {found.get(field)!r}, the adapter {mine[field]!r}"
        for field in _SCALE_FIELDS
        if found.get(field, mine[field]) != mine[field]
    ]
    expected = adapter_state_dict(model, adapter_name)
    problems += [f"missing tensor {k}" for k in expected if k not in tensors]
    problems += [f"unexpected tensor {k}" for k in tensors if k not in expected]
    problems += [
        f"{k}: file has shape {tuple(tensors[k].shape)}, the adapter {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        raise LoraError(
            f"Cannot reload {directory} into adapter '{adapter_name}':{_listed(problems)}\n"
            "It holds another adapter; load it as a new one with load_adapter."
        )
    version, modules = found.get("peft_version"), top_level(model, adapter_name)
    per_module = [  # read through the recorded PEFT release before anything changes
        module.as_current_peft(
            {k: tensors[f"{PREFIX}{path}.{k}"] for k in module.peft_tensors(adapter_name)},
            version,
        )
        for path, module in modules
    ]
    adapted, copies = set(), set()
    for (path, module), own in zip(modules, per_module, strict=True):
        module.load_peft_tensors(adapter_name, own)
        (copies if module.whole_copy else adapted).add(path)
    with torch.no_grad():
        for key, param in bias_keys(model, saved, adapted, copies).items():
            param.copy_(tensors[key])
    return model


def _tensor_problems(
    model: nn.Module, tensors: dict[str, Tensor], expected: dict, entries: list[PlanEntry]
) -> list[str]:
    """Missing, misshapen and unexpected tensors of the file; whole embedding weights PEFT
    saves alongside an adapted embedding are added to ``expected`` (loading copies them)."""
    problems = []
    for key, (_, _, shape) in expected.items():
        if key not in tensors:
            problems.append(f"missing tensor {key}")
        elif tuple(tensors[key].shape) != shape:
            problems.append(
                f"{key}: file has shape {tuple(tensors[key].shape)}, model expects {shape}"
            )
    embeddings = _embedding_weights(model, entries)
    for key in sorted(set(tensors) - set(expected)):
        if key in embeddings and tuple(tensors[key].shape) == tuple(embeddings[key].shape):
            expected[key] = (None, "embedding", tuple(embeddings[key].shape))
        elif not _peft_duplicate(key, entries):
            problems.append(f"unexpected tensor {key}")
    return problems


def _check_base(
    model: nn.Module, config: LoraConfig, recorded: dict, mine: dict, directory: object
) -> None:
    """A few lines naming the base the adapter records, this model, and the first differences."""
    differ = [t for t in sorted(set(recorded) | set(mine)) if recorded.get(t) != mine.get(t)]
    if not differ:
        return
    this = getattr(model, "name_or_path", None) or type(model).__name__
    shown = "; ".join(f"{t}: {recorded.get(t)} vs {mine.get(t)}" for t in differ[:3])
    raise LoraError(
        f"Adapter {directory} was made for another base model.\n"
        f"  made for: {config.base_model_name_or_path or '(not recorded)'}; this model: {this}\n"
        f"  {len(differ)} of {len(recorded)} adapted weights differ (adapter vs this model), "
        f"e.g. {shown}\n"
        "Load it onto the model it was made for."
    )


def _embedding_weights(model: nn.Module, entries: list[PlanEntry]) -> dict[str, nn.Parameter]:
    """PEFT key -> weight for the input/output embeddings, which PEFT saves in full when an
    embedding is adapted (to carry a resized vocabulary); loading them does what PEFT does."""
    wrapped = {e.path for e in entries if not e.layer.whole_copy}
    weights = {}
    for path, module in walk(model):
        if isinstance(unwrap(module), nn.Embedding) or path == "lm_head":
            name = f"{path}.base_layer.weight" if path in wrapped else f"{path}.weight"
            weights[PREFIX + name] = unwrap(module).weight
    return weights


def _peft_duplicate(key: str, entries: list[PlanEntry]) -> bool:
    """Whether PEFT saved ``key`` besides the tensors the file holds for an entry (its
    wrapper's own copies, e.g. the biases of a modules_to_save copy with bias="all")."""
    return any(
        key.startswith(f"{PREFIX}{e.path}.{prefix}")
        for e in entries
        for prefix in e.layer.peft_duplicates
    )


def _entry_tensors(directory: object, tensors: dict, expected: dict) -> list[tuple]:
    """(plan entry, its file tensors) per entry, read as the current PEFT reads a file that
    the PEFT release it records wrote (``Wrapper.as_current_peft``), before the model changes."""
    version = _read_json(Path(directory) / CONFIG_NAME).get("peft_version")
    per_entry: dict[int, tuple[PlanEntry, dict[str, Tensor]]] = {}
    for key, (entry, name, _) in expected.items():
        if entry is not None:  # None: a bias or a full embedding weight, copied as it is
            per_entry.setdefault(id(entry), (entry, {}))[1][name] = tensors[key]
    return [(e, e.layer.as_current_peft(found, version)) for e, found in per_entry.values()]


def _copy_in(
    model: nn.Module, tensors: dict, expected: dict, entries: list[tuple], adapter_name: str
) -> None:
    """Copy checked file tensors into the freshly added adapter (``entries``: from
    ``_entry_tensors``) and the biases and embeddings the file holds."""
    with torch.no_grad():
        for key, (entry, _, _) in expected.items():
            if entry is None:
                model.get_parameter(key.removeprefix(PREFIX)).copy_(tensors[key])
    for entry, found in entries:
        wrapper = entry.layer.existing(model.get_submodule(entry.path), **entry.options)
        wrapper.load_peft_tensors(adapter_name, found)
