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

Mixture-of-experts models (``MoeParts``, found in the same walk): a module holding routed
experts as 3D parameters (E, out, in) is an experts module; the modules beside it are its
routers (a weight with one row per expert, or the one-row gate of a shared expert) and its
shared experts (MLPs every token goes through). ``"all-linear"`` on such a model adapts every
Linear but the output head and the routers, plus every expert parameter (as
``target_parameters``); routers stay frozen unless named (``target_parameters=["gate.weight"]``).
``file_targets`` says how an adapter of an MoE model is written so that PEFT reads it the same.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .layers import LoraLayer, Wrapper, iter_adapter_modules, layer_class_for, unwrap


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
class MoeParts:
    """A mixture-of-experts model's parts by module path (all empty for a dense model)."""

    experts: dict[str, list[str]] = field(default_factory=dict)
    """Experts module -> its expert parameters (3D, one matrix per expert)."""
    routers: list[str] = field(default_factory=list)
    """Gates beside an experts module: pick the experts (or weigh a shared expert)."""
    shared: list[str] = field(default_factory=list)
    """MLPs beside an experts module that every token goes through (shared experts)."""

    def all(self) -> list[str]:
        """Every part's path: experts modules, routers, shared experts."""
        return [*self.experts, *self.routers, *self.shared]

    def role(self, path: str) -> str | None:
        """``"routed experts"``, ``"router"`` or ``"shared expert"`` for a module at or
        below ``path``'s part; None outside every part."""
        if path in self.experts:
            return "routed experts"
        if any(inside(path, r) for r in self.routers):
            return "router"
        return "shared expert" if any(inside(path, s) for s in self.shared) else None


def expert_parameters(module: nn.Module) -> list[str]:
    """Names of ``module``'s own 3D parameters (E, out, in) when it holds routed experts: no
    layer kind handles it (a Conv1d's kernel is 3D too), they share the expert count E > 1,
    and the module says it holds E experts (``num_experts``, or "Expert" in its class name)."""
    if layer_class_for(module) is not None:
        return []
    found = [(n, p.shape[0]) for n, p in module.named_parameters(recurse=False) if p.dim() == 3]
    counts = {e for _, e in found}
    if len(counts) != 1 or (count := counts.pop()) < 2:
        return []
    named = (
        getattr(module, "num_experts", None) == count or "expert" in type(module).__name__.lower()
    )
    return [n for n, _ in found] if named else []


def _moe_parts(model: nn.Module, experts: dict[str, list[str]]) -> MoeParts:
    """The routers and shared experts beside each experts module (its siblings)."""
    parts = MoeParts(experts)
    for path, names in experts.items():
        parent, _, own = path.rpartition(".")
        count = getattr(unwrap(model.get_submodule(path)), names[0]).shape[0]
        for name, child in (model.get_submodule(parent) if parent else model).named_children():
            child_path, base = f"{parent}.{name}" if parent else name, unwrap(child)
            weight = base._parameters.get("weight")
            if name == own:
                continue
            if weight is not None and weight.dim() == 2 and weight.shape[0] in (count, 1):
                parts.routers.append(child_path)  # one row per expert, or a shared expert's gate
            elif any(_is_linear(unwrap(m)) for m in base.modules()):
                parts.shared.append(child_path)
    return parts


def _is_linear(module: nn.Module) -> bool:
    kind = layer_class_for(module)
    return kind is not None and kind.is_linear


def moe_parts(model: nn.Module) -> MoeParts:
    """The mixture-of-experts parts of ``model`` (see ``MoeParts``), from one walk."""
    experts = {p: n for p, m in walk(model) if p and (n := expert_parameters(unwrap(m)))}
    return _moe_parts(model, experts)


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
    parts: MoeParts = field(default_factory=lambda: MoeParts())
    """The model's mixture-of-experts parts (empty for a dense model)."""


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
    paths, parameter_keys, experts = [], [], {}
    for path, module in walk(model):
        base = unwrap(module)
        paths.append(path)
        parameter_keys += [f"{path}.{n}" for n, _ in base.named_parameters(recurse=False)]
        if path and (names := expert_parameters(base)):
            experts[path] = names
        if path and matches(config.modules_to_save, path):
            copies.append(path)
            found.copies.append((path, module))
        entry = select(path, base)
        if entry is not None:
            fused = [k for k in config.fused_slices if ends_with(path, k)]
            hits.update([entry, *(f"fused_slices[{k!r}]" for k in fused)])
            found.modules.append((path, module, config.fused_slices[fused[0]] if fused else None))
        for spec, name in _selected_parameters(config, path, module, copies):
            parameter_hits[spec] += 1
            found.parameters.append((path, module, name))
        for name in token_names(path, base):
            token_hits.setdefault(name, []).append((path, module))
    found.parts = _moe_parts(model, experts)
    if config.target_modules == ALL_LINEAR:  # routers stay frozen unless named
        found.modules = [t for t in found.modules if found.parts.role(t[0]) != "router"]
    found.unmatched += _unmatched_modules(config, hits, paths, parameter_keys)
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


def _unmatched_modules(
    config: LoraConfig, hits: Counter[str], paths: list[str], parameter_keys: list[str]
) -> list[str]:
    """Problems for ``fused_slices`` and ``target_modules`` entries that selected nothing; an
    entry naming a parameter (a fused MoE ``gate_up_proj``) is told to use target_parameters."""
    found = [
        f"fused_slices[{k!r}] names no targeted module"
        for k in config.fused_slices
        if not hits[f"fused_slices[{k!r}]"]
    ]
    spec = config.target_modules
    if spec == ALL_LINEAR and not hits[ALL_LINEAR]:
        found.append("'all-linear' found no Linear or Conv1D layer besides the output head")
    elif spec and spec != ALL_LINEAR:
        for name in [n for n in ([spec] if isinstance(spec, str) else spec) if not hits[n]]:
            named = [k for k in parameter_keys if isinstance(spec, list) and ends_with(k, name)]
            if named:
                found.append(
                    f"target_modules entry {name!r} names a parameter ({named[0]}), not a "
                    "module: give it in target_parameters (--target-parameters)"
                )
            else:
                found.append(no_match("target_modules", name, paths))
    return found


def _selected_parameters(
    config: LoraConfig, path: str, module: nn.Module, copies: list[str]
) -> list[tuple[str, str]]:
    """(config entry, parameter name) for each parameter of ``module`` that a
    ``target_parameters`` entry selects (``path.name`` ends with it) or, with
    ``"all-linear"``, each expert parameter (the entry is then ``"all-linear"``)."""
    if not path or excluded(config, path) or any(inside(path, s) for s in copies):
        return []
    if unwrap(module) is not module and not module.nests:
        return []  # wrapped by another kind: its parameters are that wrapper's
    experts = expert_parameters(unwrap(module)) if config.target_modules == ALL_LINEAR else []
    selected = []
    for name, _ in unwrap(module).named_parameters(recurse=False):
        key = f"{path}.{name}"
        spec = next((t for t in config.target_parameters or [] if ends_with(key, t)), None)
        if spec is not None or name in experts:
            selected.append((spec or ALL_LINEAR, name))
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


# --- how an MoE adapter is written for PEFT ----------------------------------------------------
# PEFT 0.22 rewrites the config of an adapter for these model types before it adapts anything
# (``_convert_peft_config_moe``, for transformers 5's fused experts): a target_modules entry
# named, or ending with, one of these names becomes a target_parameters entry for the routed
# experts (and "gate" the router's weight), whatever module it named, and a regex or
# "all-linear" is first resolved to leaf names. The table is PEFT's for the model types
# transformers 5.25 maps to its "qwen2_moe" and "mixtral" conversions
# (tests/test_moe_files.py checks it against the installed PEFT and transformers).
_QWEN2_MOE_NAMES = ("gate", "gate_proj", "up_proj", "down_proj")
_QWEN2_MOE_TYPES = """afmoe beam cohere2_moe deepseek_v2 deepseek_v3 deepseek_v32 dots1
ernie4_5_moe exaone_moe flex_olmo glm4_moe glm4_moe_lite glm4v_moe glm_moe_dsa hunyuan_v1_moe
longcat_flash mellum olmoe qwen3_moe qwen3_next qwen3_omni_moe qwen3_omni_moe_text
qwen2_moe qwen3_omni_moe_thinker sarvam_mla solar_open""".split()  # noqa: SIM905 (a table of words)
PEFT_MOE_RENAMES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("mixtral", "minimax", "minimax_m2"), ("gate", "w1", "w2", "w3")),
    **dict.fromkeys(_QWEN2_MOE_TYPES, _QWEN2_MOE_NAMES),
}


def peft_moe_renames(model: nn.Module) -> tuple[str, ...]:
    """The target_modules names PEFT's MoE conversion rewrites for ``model``'s type."""
    return PEFT_MOE_RENAMES.get(getattr(getattr(model, "config", None), "model_type", None), ())


def peft_parameter_target(path: str, renamed: tuple[str, ...]) -> str | None:
    """The ``target_parameters`` entry a LoRA module target at ``path`` is written as, when
    PEFT's MoE conversion would misread it as a module target (``<path>.weight``)."""
    return f"{path}.weight" if path.rsplit(".", 1)[-1] in renamed else None


@dataclass
class FileTargets:
    """An MoE adapter's targets as its ``adapter_config.json`` lists them, by full path."""

    modules: list[str]
    parameters: list[str]
    ranks: dict[str, int]  # parameter entry -> rank, where PEFT's patterns would give another
    scales: dict[str, float]  # ... -> scale, likewise


def file_targets(
    model: nn.Module, layers: list[tuple[str, Wrapper]], config: LoraConfig, name: str
) -> FileTargets | None:
    """How adapter ``name`` (``config``, its ``layers``: top-level LoRA wrappers) is written on
    a mixture-of-experts model so that PEFT reads the same adapter; None on a dense model.

    PEFT reads rules differently there: its MoE conversion rewrites names (``PEFT_MOE_RENAMES``),
    its "all-linear" takes routers, and a regex is cut to leaf names. So every target is listed
    by its full path, and a module PEFT would rewrite (a dense or shared-expert ``gate_proj``)
    becomes the parameter target ``<path>.weight``: PEFT's LoRA on that 2D weight is this one.
    """
    renamed = peft_moe_renames(model)
    if not renamed and not moe_parts(model).experts:
        return None
    found = FileTargets([], [], {}, {})
    for path, layer in layers:
        target = layer.target_name(path)
        moved = None if target != path else peft_parameter_target(path, renamed)
        if target != path or moved is None:
            (found.parameters if target != path else found.modules).append(target)
            continue
        found.parameters.append(moved)
        rank, scale = layer.peft_rank(name), layer.scale[name]
        if rank != config.rank_for(moved) or scale != config.scale_for(moved):
            found.ranks[moved], found.scales[moved] = rank, scale
    found.modules.sort()
    found.parameters.sort()
    return found
