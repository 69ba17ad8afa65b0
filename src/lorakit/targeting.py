"""What a config selects in a model, from one walk: PEFT's matching rules, each written once.

A logical module is what the user's model names: lorakit's wrappers stand for the module they
wrap (``walk`` does not enter them, ``unwrap`` sees through them), and a module whose layer
kind owns its children (``nn.MultiheadAttention``, which never calls its ``out_proj``) is not
entered either, so its children can't be targeted by mistake.

``find_targets`` walks the model once and returns every target of a config (modules,
parameters, embedding rows, whole copies) with the entries that matched nothing; planning
(``lorakit.inject.plan``) then asks the layer classes about each. The rules:

- a list entry matches a path equal to it or ending with ``.entry`` (``ends_with``); a string
  is a regex that must match the whole path (``matches``);
- an excluded module, and a ``modules_to_save`` copy, hold everything below them (``inside``).
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .layers import LoraLayer, iter_adapter_modules, layer_class_for, unwrap


def ends_with(path: str, name: str) -> bool:
    """PEFT's suffix rule: ``path`` is ``name`` or ends with ``.name`` (whole dotted parts)."""
    return path == name or path.endswith("." + name)


def inside(path: str, root: str) -> bool:
    """The subtree rule: ``path`` is ``root`` or a module below it."""
    return path == root or path.startswith(root + ".")


def matches(spec: list[str] | str | None, path: str) -> bool:
    """PEFT's matching: a list entry by ``ends_with``; a string is a regex matching all of it."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(ends_with(path, name) for name in spec)


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of logical modules, parents first: a wrapper stands for what it wraps."""
    yield prefix, module
    if unwrap(module) is not module or _owns_children(module):
        return
    for name, child in module.named_children():
        yield from walk(child, f"{prefix}.{name}" if prefix else name)


def _owns_children(module: nn.Module) -> bool:
    kind = layer_class_for(module)
    return kind is not None and kind.owns_children


def lora_layers(model: nn.Module, name: str | None = None) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer (nested ones included), or those holding adapter ``name``."""
    return [
        (path, m)
        for path, m in iter_adapter_modules(model)
        if m.is_lora and (name is None or name in m.adapter_names())
    ]


def _layer_index(cfg: LoraConfig, path: str) -> int | None:
    # PEFT's rule: the first number after a ``layers_pattern`` segment (or any segment).
    patterns = cfg.layers_pattern
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if found:
                break
    return int(found["idx"]) if found else None


def _in_layers(cfg: LoraConfig, path: str) -> bool:
    if cfg.layers_to_transform is None:
        return True
    wanted = cfg.layers_to_transform
    wanted = [wanted] if isinstance(wanted, int) else wanted
    return _layer_index(cfg, path) in wanted


def excluded(cfg: LoraConfig, path: str) -> bool:
    """Whether ``path`` is inside a module ``exclude_modules`` names (the path or a parent)."""
    parts = path.split(".")
    return any(matches(cfg.exclude_modules, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (``get_output_embeddings`` or ``lm_head``), unwrapped."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    return unwrap(head) if head is not None else None


def closest(name: str, paths: list[str]) -> list[str]:
    """Names among ``paths`` (their last parts first) close to ``name``, for hints."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths if p})
    close = difflib.get_close_matches(name, leaves, n=5, cutoff=0.5)
    return close or difflib.get_close_matches(name, paths, n=5, cutoff=0.4)


def no_match(field_name: str, name: str, paths: list[str]) -> str:
    """The problem line for a config entry that matched no module, with the closest names."""
    close = closest(name, paths)
    hint = f"; closest module names: {close}" if close else ""
    return f"{field_name} entry {name!r} matched no module{hint}"


@dataclass
class Targets:
    """Every target of a config in a model, in walk order, and what matched nothing.

    Each target names its path and the module there as it stands (a wrapper stands for the
    module it wraps).
    """

    modules: list[tuple[str, nn.Module, list[bool] | None]] = field(default_factory=list)
    """``target_modules``: (path, module, its ``fused_slices`` or None)."""
    parameters: list[tuple[str, nn.Module, str]] = field(default_factory=list)
    """``target_parameters``: (path of the owning module, module, parameter name)."""
    tokens: list[tuple[str, nn.Module, list[int]]] = field(default_factory=list)
    """``trainable_token_indices``: (path, embedding, token ids), in the config's order."""
    copies: list[tuple[str, nn.Module]] = field(default_factory=list)
    """``modules_to_save``: (path, module)."""
    unmatched: list[str] = field(default_factory=list)
    """One problem line per config entry that selects nothing (or too much)."""


def find_targets(model: nn.Module, config: LoraConfig) -> Targets:
    """Every target of ``config`` in ``model``, from one walk, and the entries that matched
    nothing (with the closest names) or, for a token entry, more than one module."""
    found = Targets()
    copies: list[str] = []  # the copies met so far: a module's parents come before it
    select = _module_selector(config, output_head(model), copies)
    token_names = _token_selector(model, config)
    hits: Counter[str] = Counter()  # target_modules entries (and fused_slices keys)
    parameter_hits: Counter[str] = Counter()
    token_hits: dict[str, list[tuple[str, nn.Module]]] = {}
    paths, parameter_keys = [], []
    for path, module in walk(model):
        base = unwrap(module)
        paths.append(path)
        parameter_keys += [f"{path}.{n}" for n, _ in base.named_parameters(recurse=False)]
        if path and matches(config.modules_to_save, path):
            copies.append(path)
            found.copies.append((path, module))
        entry = select(path, base)
        if entry is not None:
            fused = [k for k in config.fused_slices if ends_with(path, k)]
            hits.update([entry, *(f"fused_slices[{k!r}]" for k in fused)])
            found.modules.append((path, module, config.fused_slices[fused[0]] if fused else None))
        for spec, name in _selected_parameters(config, path, module):
            parameter_hits[spec] += 1
            found.parameters.append((path, module, name))
        for name in token_names(path, base):
            token_hits.setdefault(name, []).append((path, module))
    found.unmatched += _unmatched_modules(config, hits, paths)
    for spec in config.target_parameters or []:
        if not parameter_hits[spec]:
            close = closest(spec, parameter_keys)
            found.unmatched.append(
                f"target_parameters entry {spec!r} matched no parameter"
                + (f"; closest parameter names: {close}" if close else "")
            )
    _add_tokens(config, token_hits, paths, found)
    found.unmatched += [
        no_match("modules_to_save", name, paths)
        for name in config.modules_to_save or []
        if not any(matches([name], p) for p in copies)
    ]
    return found


def _module_selector(
    config: LoraConfig, head: nn.Module | None, copies: list[str]
) -> Callable[[str, nn.Module], str | None]:
    """A function (path, base module) -> the ``target_modules`` entry selecting it, or None.

    ``copies`` is read as the walk fills it: a copy's path comes before its children's.
    """

    def select(path: str, base: nn.Module) -> str | None:
        if not path or excluded(config, path) or not _in_layers(config, path):
            return None
        if any(inside(path, s) for s in copies):
            return None  # PEFT never adapts inside a modules_to_save module
        spec = config.target_modules
        if spec == ALL_LINEAR:
            kind = layer_class_for(base)
            linear = kind is not None and kind.is_linear
            return ALL_LINEAR if linear and base is not head else None
        if isinstance(spec, str):
            return spec if re.fullmatch(spec, path) else None
        return next((n for n in spec or [] if ends_with(path, n)), None)

    return select


def _unmatched_modules(config: LoraConfig, hits: Counter[str], paths: list[str]) -> list[str]:
    """Problems for ``fused_slices`` and ``target_modules`` entries that selected nothing."""
    found = [
        f"fused_slices[{k!r}] names no targeted module"
        for k in config.fused_slices
        if not hits[f"fused_slices[{k!r}]"]
    ]
    spec = config.target_modules
    if spec == ALL_LINEAR and not hits[ALL_LINEAR]:
        found.append("'all-linear' found no Linear or Conv1D layer besides the output head")
    elif spec and spec != ALL_LINEAR:
        names = [spec] if isinstance(spec, str) else spec
        found += [no_match("target_modules", name, paths) for name in names if not hits[name]]
    return found


def _selected_parameters(config: LoraConfig, path: str, module: nn.Module) -> list[tuple[str, str]]:
    """(``target_parameters`` entry, parameter name) for each parameter of ``module`` that an
    entry selects: ``path.name`` ends with the entry."""
    if not config.target_parameters or not path or excluded(config, path):
        return []
    if unwrap(module) is not module and not module.nests:
        return []  # wrapped by another kind: its parameters are that wrapper's
    selected = []
    for name, _ in unwrap(module).named_parameters(recurse=False):
        key = f"{path}.{name}"
        spec = next((t for t in config.target_parameters if ends_with(key, t)), None)
        if spec is not None:
            selected.append((spec, name))
    return selected


_INPUT_EMBEDDING = ""  # the token entry of a list-form trainable_token_indices


def _token_selector(model: nn.Module, config: LoraConfig) -> Callable[[str, nn.Module], list[str]]:
    """A function (path, base module) -> the ``trainable_token_indices`` entries naming it;
    for the list form, the input embedding (found by identity) answers ``_INPUT_EMBEDDING``."""
    wanted = config.trainable_token_indices
    if isinstance(wanted, dict):
        return lambda path, base: [name for name in wanted if path and matches([name], path)]
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if wanted and callable(get) else None
    return lambda path, base: (
        [_INPUT_EMBEDDING] if embedding is not None and base is embedding else []
    )


def _add_tokens(
    config: LoraConfig,
    token_hits: dict[str, list[tuple[str, nn.Module]]],
    paths: list[str],
    found: Targets,
) -> None:
    """The token targets in the config's order, or why an entry has no single module."""
    wanted = config.trainable_token_indices
    if not wanted:
        return
    if not isinstance(wanted, dict):
        hit = token_hits.get(_INPUT_EMBEDDING)
        if not hit:
            found.unmatched.append(
                "trainable_token_indices is a list but this model has no get_input_embeddings(); "
                "give a dict {embedding module name: [token ids]}"
            )
            return
        wanted = {hit[0][0]: wanted}
        token_hits = {hit[0][0]: hit[:1]}
    for name, ids in wanted.items():
        hit = token_hits.get(name, [])
        if len(hit) == 1:
            found.tokens.append((*hit[0], list(ids)))
        elif not hit:
            found.unmatched.append(no_match("trainable_token_indices", name, paths))
        else:
            found.unmatched.append(
                f"trainable_token_indices[{name!r}] matches {len(hit)} modules; give the full path"
            )
