"""Planning what to adapt (``plan``), adding adapters (``add_lora``), freezing the base.

``plan`` is a dry run: it matches the config against the model (``lorakit.targeting``), asks
each target's layer class (``lorakit.layers``, by module type) whether it can adapt it, and
either returns the list of changes or raises one ``LoraError`` listing every problem.
``add_lora`` applies a plan, so a bad config never leaves a half-modified model.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from .config import ALL_LINEAR, WEIGHT_INITS, LoraConfig
from .errors import LoraError
from .layers import (
    LoraFused,
    LoraLayer,
    LoraParameter,
    ModulesToSave,
    TrainableTokens,
    Wrapper,
    layer_class_for,
    supported_types,
)
from .layers.base import warn_large_rank
from .state import AdapterState, adapter_configs
from .tables import format_table
from .targeting import (
    closest,
    excluded,
    iter_adapter_modules,
    matches,
    no_match,
    output_head,
    selector,
    unwrap,
    walk,
)


@dataclass
class PlanEntry:
    """One change ``add_lora`` would make: wrap ``path`` with ``layer`` (built with ``options``)."""

    path: str
    layer: type  # a LoraLayer subclass, ModulesToSave or TrainableTokens
    module_type: str
    shape: tuple[int, ...]  # of the base weight (or parameter) being adapted
    r: int = 0
    alpha: float = 0.0
    params: int = 0  # trainable parameters this entry adds
    options: dict[str, Any] = field(default_factory=dict)  # slices=..., parameter=..., indices=...

    @property
    def target(self) -> str:
        """The dotted name this entry adapts: the module, or module.parameter."""
        parameter = self.options.get("parameter")
        return f"{self.path}.{parameter}" if parameter else self.path

    @property
    def is_lora(self) -> bool:
        """Whether this entry adds a LoRA pair (not a full copy or trainable rows)."""
        return issubclass(self.layer, LoraLayer)


@dataclass
class Plan:
    """What ``add_lora(model, config)`` would do, with parameter counts. ``str()`` is a table."""

    adapter_name: str
    entries: list[PlanEntry] = field(default_factory=list)
    base_params: int = 0

    @property
    def lora_params(self) -> int:
        """Trainable parameters the adapter adds (LoRA pairs, copies, trainable rows)."""
        return sum(e.params for e in self.entries)

    def __str__(self) -> str:
        rows = [("module", "type", "weight shape", "r", "alpha", "params")]
        for e in self.entries:
            shown = {k: v for k, v in e.options.items() if k in ("slices",)}
            kind = e.module_type + "".join(f" {k}={v}" for k, v in shown.items())
            r, alpha = (str(e.r), f"{e.alpha:g}") if e.is_lora else (_what(e), "-")
            rows.append((e.target, kind, "x".join(map(str, e.shape)), r, alpha, f"{e.params:,}"))
        lines = format_table(rows)
        share = 100.0 * self.lora_params / max(self.base_params, 1)
        lines.append(
            f"adapter '{self.adapter_name}': {len(self.entries)} modules, "
            f"{self.lora_params:,} trainable params ({share:.3f}% of {self.base_params:,})"
        )
        return "\n".join(lines)


def _what(entry: PlanEntry) -> str:
    if entry.layer is TrainableTokens:
        return f"{len(entry.options['indices'])} rows"
    return "full copy"


class TrainableParameters(NamedTuple):
    """Parameter counts; ``total`` includes adapter parameters, as PEFT counts them."""

    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {share:.4f}"
        )


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Count trainable and total parameters (tied weights counted once)."""
    params = list(model.parameters())
    return TrainableParameters(
        sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
    )


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` inside ``model`` (its parent's attribute)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


# --- planning ------------------------------------------------------------------------------
def plan(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> Plan:
    """Dry run of ``add_lora``: what would be adapted, with shapes and parameter counts.

    Changes nothing. Raises ``LoraError`` listing every problem: targets that match nothing
    (with the closest module names), unsupported module types or options, fused slices that
    don't divide the output, an adapter name already in use. A rank above a weight's
    min(in, out) is allowed with a warning, as in PEFT.
    """
    problems: list[str] = []
    if adapter_name in adapter_configs(model):
        problems.append(
            f"adapter '{adapter_name}' already exists (have: {sorted(adapter_configs(model))}); "
            "pick another adapter_name or delete_adapter it first"
        )
    modules = list(walk(model))
    result = Plan(adapter_name, base_params=sum(p.numel() for p in model.parameters()))
    save_paths = [p for p, _ in modules if p and matches(config.modules_to_save, p)]
    _plan_modules(config, modules, save_paths, output_head(model), result, problems)
    _plan_parameters(config, modules, result, problems)
    _plan_tokens(model, config, modules, result, problems)
    _plan_copies(model, config, modules, save_paths, result, problems)
    _check_weight_init(model, config, result, problems)
    if problems:
        raise LoraError(f"Cannot add adapter '{adapter_name}':\n  - " + "\n  - ".join(problems))
    for entry in result.entries:
        if entry.is_lora:
            module = model.get_submodule(entry.path) if entry.path else model
            base = module if entry.layer.nests else unwrap(module)
            shape_a, shape_b = entry.layer.adapter_shapes(base, entry.r, **entry.options)
            entry.params = math.prod(shape_a) + math.prod(shape_b)
            limit = entry.layer.rank_limit(base, **entry.options)
            if entry.r > limit:
                warn_large_rank(entry.target, entry.r, limit)
    return result


def _plan_modules(
    config: LoraConfig,
    modules: list[tuple[str, nn.Module]],
    save_paths: list[str],
    head: nn.Module | None,
    result: Plan,
    problems: list[str],
) -> None:
    """Plan entries for ``target_modules`` (and ``fused_slices``), appended to ``result``."""
    select = selector(config, head, save_paths)
    hit: set[str] = set()
    fused_used: set[str] = set()
    for path, module in modules:
        entry_name = select(path, unwrap(module))
        if entry_name is None:
            continue
        hit.add(entry_name)
        entry = _module_entry(config, path, module, problems)
        if entry is not None:
            result.entries.append(entry)
            fused_used.update(k for k in config.fused_slices if matches([k], path))
    problems += [
        f"fused_slices[{k!r}] names no targeted module"
        for k in config.fused_slices
        if k not in fused_used
    ]
    spec = config.target_modules
    paths = [p for p, _ in modules]
    if spec == ALL_LINEAR and not hit:
        problems.append("'all-linear' found no Linear or Conv1D layer besides the output head")
    elif spec and spec != ALL_LINEAR:
        for name in [spec] if isinstance(spec, str) else spec:
            if name not in hit:
                problems.append(no_match("target_modules", name, paths))


def _module_entry(
    config: LoraConfig, path: str, module: nn.Module, problems: list[str]
) -> PlanEntry | None:
    """The plan entry for a selected module, or None with the reasons added to ``problems``."""
    base = unwrap(module)
    slices = next((f for k, f in config.fused_slices.items() if matches([k], path)), None)
    layer = LoraFused if slices is not None else layer_class_for(base)
    options = {"slices": slices} if slices is not None else {}
    if layer is None or isinstance(module, (LoraParameter, ModulesToSave, TrainableTokens)):
        problems.append(
            f"{path}: {type(base).__name__} is not a supported module type "
            f"({', '.join(supported_types())}); target its parameters with target_parameters "
            "or narrow target_modules"
        )
        return None
    if isinstance(module, LoraLayer) and type(module) is not layer:
        problems.append(
            f"{path}: already holds adapters of another layout ({type(module).__name__}); "
            "all adapters on a module must agree on fused_slices"
        )
        return None
    r = config.rank_for(path)
    found = layer.problems(path, base, r, **options) + _option_problems(layer, config, path)
    if found:
        problems += found
        return None
    shape = layer.weight_shape(base, **options)
    return PlanEntry(path, layer, type(base).__name__, shape, r, config.alpha_for(path), 0, options)


def _option_problems(layer: type[LoraLayer], config: LoraConfig, target: str) -> list[str]:
    """Config options this layer kind cannot honour, each named (never silently dropped)."""
    name = layer.__name__
    found = []
    if config.use_dora and not layer.supports_dora:
        found.append(f"{target}: use_dora is not supported by {name} (nor by PEFT)")
    if config.lora_bias and not layer.supports_lora_bias:
        found.append(f"{target}: lora_bias is not supported by {name} (nor by PEFT)")
    if config.dropout and layer.dropout_mode == "refused":
        found.append(
            f"{target}: dropout={config.dropout} is not defined for {name} (the delta is added "
            "to the weight, there is no input to drop); use dropout=0"
        )
    return found


def _plan_parameters(
    config: LoraConfig, modules: list[tuple[str, nn.Module]], result: Plan, problems: list[str]
) -> None:
    """Plan entries for ``target_parameters``, appended to ``result``."""
    if not config.target_parameters:
        return
    hit: dict[str, int] = {}
    for path, module in modules:
        wrapped = isinstance(module, Wrapper) and not isinstance(module, LoraParameter)
        if not path or excluded(config, path) or wrapped:
            continue
        for name, param in unwrap(module).named_parameters(recurse=False):
            key = f"{path}.{name}"
            spec = next(
                (t for t in config.target_parameters if key == t or key.endswith("." + t)), None
            )
            if spec is None:
                continue
            hit[spec] = hit.get(spec, 0) + 1
            options = {"parameter": name}
            found = LoraParameter.problems(path, module, config.rank_for(key), **options)
            found += _option_problems(LoraParameter, config, key)
            if found:
                problems += found
                continue
            result.entries.append(
                PlanEntry(
                    path,
                    LoraParameter,
                    type(unwrap(module)).__name__,
                    tuple(param.shape),
                    config.rank_for(key),
                    config.alpha_for(key),
                    0,
                    options,
                )
            )
    all_params = [
        f"{p}.{n}" for p, m in modules for n, _ in unwrap(m).named_parameters(recurse=False)
    ]
    for spec in config.target_parameters:
        if not hit.get(spec):
            close = closest(spec, all_params)
            problems.append(
                f"target_parameters entry {spec!r} matched no parameter"
                + (f"; closest parameter names: {close}" if close else "")
            )


def _plan_tokens(
    model: nn.Module,
    config: LoraConfig,
    modules: list[tuple[str, nn.Module]],
    result: Plan,
    problems: list[str],
) -> None:
    """Plan entries for ``trainable_token_indices``, appended to ``result``."""
    wanted = config.trainable_token_indices
    if not wanted:
        return
    if not isinstance(wanted, dict):
        get = getattr(model, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        path = next(
            (p for p, m in modules if embedding is not None and unwrap(m) is embedding), None
        )
        if path is None:
            problems.append(
                "trainable_token_indices is a list but this model has no get_input_embeddings(); "
                "give a dict {embedding module name: [token ids]}"
            )
            return
        wanted = {path: wanted}
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    targeted = {e.path for e in result.entries}
    for name, ids in wanted.items():
        found = [(p, m) for p, m in modules if p and matches([name], p)]
        if len(found) != 1:
            problems.append(
                no_match("trainable_token_indices", name, [p for p, _ in modules])
                if not found
                else f"trainable_token_indices[{name!r}] matches {len(found)} modules; give the full path"
            )
            continue
        path, module = found[0]
        base = unwrap(module)
        errors = TrainableTokens.problems(path, base, ids)
        if path in targeted:
            errors.append(f"{path}: both LoRA and trainable_token_indices target it; choose one")
        elif not errors and owners[id(base.weight)] > 1:
            errors.append(
                f"{path}: its weight is tied to another module (an output head?), which would "
                "keep the old rows; untie it (tie_word_embeddings=False) or use modules_to_save"
            )
        if errors:
            problems += errors
            continue
        result.entries.append(
            PlanEntry(
                path,
                TrainableTokens,
                type(base).__name__,
                tuple(base.weight.shape),
                params=len(ids) * base.weight.shape[1],
                options={"indices": list(ids)},
            )
        )


def _plan_copies(
    model: nn.Module,
    config: LoraConfig,
    modules: list[tuple[str, nn.Module]],
    save_paths: list[str],
    result: Plan,
    problems: list[str],
) -> None:
    """Plan entries for ``modules_to_save``, appended to ``result``."""
    paths = [p for p, _ in modules]
    for name in config.modules_to_save or []:
        if not any(matches([name], p) for p in save_paths):
            problems.append(no_match("modules_to_save", name, paths))
    for path in save_paths:
        base = unwrap(model.get_submodule(path))
        shape = tuple(base.weight.shape) if hasattr(base, "weight") else ()
        params = sum(p.numel() for p in base.parameters())
        result.entries.append(
            PlanEntry(path, ModulesToSave, type(base).__name__, shape, params=params)
        )


def _check_weight_init(
    model: nn.Module, config: LoraConfig, result: Plan, problems: list[str]
) -> None:
    """PiSSA / OLoRA rewrite the base weight: only plain, unshared, adapter-free layers."""
    if config.init not in WEIGHT_INITS:
        return
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for entry in result.entries:
        if not entry.is_lora:
            continue
        if not entry.layer.supports_weight_init:
            problems.append(
                f"{entry.target}: init={config.init!r} needs a Linear or Conv1D layer, not "
                f"{entry.module_type}; leave it out of the targets or use init='kaiming'"
            )
            continue
        module = model.get_submodule(entry.path)
        if isinstance(module, LoraLayer) and module.adapter_names():
            problems.append(
                f"{entry.path}: init={config.init!r} would rewrite a weight that adapters "
                f"{module.adapter_names()} were made for; add it to a model without them"
            )
        elif owners[id(unwrap(module).weight)] > 1:
            problems.append(
                f"{entry.path}: its weight is tied to another module, which init="
                f"{config.init!r} would change too; untie it or leave it out of the targets"
            )


# --- applying ------------------------------------------------------------------------------
def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` per ``config`` to ``model`` in place and return the model.

    Validates everything first (see ``plan``); afterwards the base is frozen, only adapter
    parameters (LoRA pairs, DoRA magnitudes, copies, trainable rows) and biases per
    ``config.bias`` train, and the new adapter is the active one.
    """
    result = plan(model, config, adapter_name)
    for entry in result.entries:
        _apply(model, entry, config, adapter_name)
    AdapterState.of(model).add(adapter_name, config)
    _freeze_base(model, config, result)
    for _, module in iter_adapter_modules(model):
        # Merged adapters stay active: their deltas are in the weights (unmerge to drop them).
        merged = [n for n in module.active if n in getattr(module, "merged", [])]
        module.set_active([*merged, adapter_name])
    return model


def _apply(model: nn.Module, entry: PlanEntry, config: LoraConfig, adapter_name: str) -> None:
    """Wrap ``entry.path`` if it is not wrapped yet, and add the adapter to its wrapper."""
    module = model.get_submodule(entry.path)
    if entry.is_lora:
        existing = entry.layer.existing(module, **entry.options)
    else:
        existing = module if isinstance(module, entry.layer) else None
    if existing is None:  # a new wrapper, around any of another target (nesting kinds)
        existing = entry.layer(module, **entry.options) if entry.is_lora else entry.layer(module)
        replace_module(model, entry.path, existing)
    module = existing
    if entry.layer is ModulesToSave:
        module.add_adapter(adapter_name)
    elif entry.layer is TrainableTokens:
        module.add_adapter(adapter_name, entry.options["indices"])
    else:
        scale = entry.alpha / (entry.r**0.5 if config.use_rslora else entry.r)
        module.add_adapter(
            adapter_name,
            entry.r,
            scale,
            config.dropout,
            config.init,
            use_dora=config.use_dora,
            lora_bias=config.lora_bias,
        )


def _freeze_base(model: nn.Module, config: LoraConfig, result: Plan) -> None:
    """Only adapter parameters (and biases per ``config.bias``) keep requires_grad."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in iter_adapter_modules(model):
        for name in module.adapter_names():
            for p in module.adapter_parameters(name):
                p.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)
    elif config.bias == "lora_only":
        for entry in result.entries:
            bias = getattr(unwrap(model.get_submodule(entry.path)), "bias", None)
            if entry.is_lora and isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
