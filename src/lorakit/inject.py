"""Planning what to adapt (``plan``), adding adapters (``add_lora``), freezing the base.

``plan`` is a dry run: it takes the config's targets from one walk of the model
(``lorakit.targeting.find_targets``), asks each target's layer class (``lorakit.layers``, by
module type) whether it can adapt it, and either returns the list of changes or raises one
``LoraError`` listing every problem. ``apply_plan`` makes the changes through the wrapper
contract (``existing``, construction, ``add_adapter``); ``add_lora`` is the two in a row, so
a bad config never leaves a half-modified model.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import nn

from .config import WEIGHT_INITS, LoraConfig
from .errors import LoraError
from .hf.enclosing import guard
from .hf.integration import attach
from .layers import (
    LoraFused,
    LoraKind,
    LoraLinear,
    LoraParameter,
    ModulesToSave,
    TrainableTokens,
    Wrapper,
    layer_class_for,
    supported_types,
    unwrap,
)
from .layers.base import warn_large_rank
from .state import AdapterState, adapter_configs
from .tables import format_table
from .targeting import (
    MoeParts,
    Targets,
    expert_parameters,
    find_targets,
    inside,
    iter_adapter_modules,
    peft_moe_renames,
    peft_parameter_target,
)


@dataclass
class PlanEntry:
    """One change ``add_lora`` would make: wrap ``path`` with ``layer`` (built with ``options``)
    and add the adapter to it with ``settings``."""

    path: str
    layer: type[Wrapper]  # a LoraLayer kind, ModulesToSave or TrainableTokens
    module_type: str
    shape: tuple[int, ...]  # of the base weight (or parameter) being adapted
    r: int = 0
    alpha: float = 0.0
    params: int = 0  # trainable parameters this entry adds
    options: dict[str, Any] = field(default_factory=dict)  # the wrapper's: slices=, parameter=
    settings: dict[str, Any] = field(default_factory=dict)  # add_adapter's: r=, scale=, indices=

    @property
    def target(self) -> str:
        """The dotted name this entry adapts: the module, or module.parameter."""
        parameter = self.options.get("parameter")
        return f"{self.path}.{parameter}" if parameter else self.path

    @property
    def is_lora(self) -> bool:
        """Whether this entry adds a LoRA pair (not a full copy or trainable rows)."""
        return self.layer.is_lora

    def base_in(self, model: nn.Module) -> nn.Module:
        """The module the entry's class methods are asked about: the user's module, or for a
        nesting kind what stands at the path (its wrappers included)."""
        module = model.get_submodule(self.path) if self.path else model
        return module if self.layer.nests else unwrap(module)


@dataclass
class Plan:
    """What ``add_lora(model, config)`` would do, with parameter counts. ``str()`` is a table."""

    adapter_name: str
    entries: list[PlanEntry] = field(default_factory=list)
    base_params: int = 0
    config: LoraConfig | None = None  # what was planned (``apply_plan`` records it)
    parts: MoeParts = field(default_factory=MoeParts)  # a mixture of experts' parts

    @property
    def lora_params(self) -> int:
        """Trainable parameters the adapter adds (LoRA pairs, copies, trainable rows)."""
        return sum(e.params for e in self.entries)

    def __str__(self) -> str:
        rows = [("module", "type", "weight shape", "r", "alpha", "params")]
        for e in self.entries:
            shown = {k: v for k, v in e.options.items() if k in ("slices",)}
            kind = e.module_type + "".join(f" {k}={v}" for k, v in shown.items())
            alpha = f"{e.alpha:g}" if e.is_lora else "-"
            size = e.layer.plan_label(e.settings)
            rows.append((e.target, kind, "x".join(map(str, e.shape)), size, alpha, f"{e.params:,}"))
        lines = format_table(rows)
        share = 100.0 * self.lora_params / max(self.base_params, 1)
        lines.append(
            f"adapter '{self.adapter_name}': {len(self.entries)} modules, "
            f"{self.lora_params:,} trainable params ({share:.3f}% of {self.base_params:,})"
        )
        return "\n".join(lines + self.moe_lines())

    def moe_lines(self) -> list[str]:
        """A mixture-of-experts model's routed experts, routers and shared experts, each
        group with what this adapter adapts in it (or "frozen"); empty for a dense model."""
        parts = self.parts
        if not parts.experts:
            return []
        adapted: dict[str, set[str]] = {}  # part path -> adapted names under it
        for e in (e for e in self.entries if e.is_lora):
            part = next((p for p in parts.all() if inside(e.path, p)), None)
            if part is not None:
                name = e.options.get("parameter") or e.path[len(part) + 1 :] or "weight"
                adapted.setdefault(part, set()).add(name)
        rows = [("part", "modules", f"adapter '{self.adapter_name}'")]
        for role, paths in (
            ("routed experts", list(parts.experts)),
            ("routers", parts.routers),
            ("shared experts", parts.shared),
        ):
            groups: dict[str, list[str]] = {}  # ``model.layers.*.mlp.experts`` -> its paths
            for path in paths:
                groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", path), []).append(path)
            for pattern, group in groups.items():
                names = sorted(set().union(*(adapted.get(p, set()) for p in group)))
                held = sum(p in adapted for p in group)
                state = f"LoRA on {', '.join(names)}" if names else "frozen"
                if names and held < len(group):
                    state += f" (in {held} of {len(group)})"
                rows.append((role, pattern, state))
        count = f"{len(parts.experts)} layer{'s' * (len(parts.experts) != 1)}"
        return [f"mixture of experts in {count}:", *format_table(rows)]


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
    targets = find_targets(model, config)
    problems += targets.unmatched
    result = Plan(
        adapter_name, base_params=sum(p.numel() for p in model.parameters()), config=config
    )
    result.parts = targets.parts
    result.entries += _lora_entries(config, targets, problems)
    problems += peft_problems(model, config, result.entries)
    result.entries += _token_entries(model, targets, result.entries, problems)
    result.entries += [_entry(ModulesToSave, path, module) for path, module in targets.copies]
    _check_weight_init(model, config, result, problems)
    if problems:
        raise LoraError(f"Cannot add adapter '{adapter_name}':\n  - " + "\n  - ".join(problems))
    for entry in result.entries:
        if entry.is_lora:
            limit = entry.layer.rank_limit(entry.base_in(model), **entry.options)
            if entry.r > limit:
                warn_large_rank(entry.target, entry.r, limit)
    return result


def _entry(
    layer: type[Wrapper],
    path: str,
    module: nn.Module,
    options: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    alpha: float = 0.0,
) -> PlanEntry:
    """A plan entry for ``layer`` at ``path``, its shape and size asked of the layer class."""
    options, settings = options or {}, settings or {}
    base = module if layer.nests else unwrap(module)
    return PlanEntry(
        path,
        layer,
        type(unwrap(module)).__name__,
        layer.weight_shape(base, **options),
        settings.get("r", 0),
        alpha,
        layer.trainable_count(base, settings, **options),
        options,
        settings,
    )


def _lora_entry(
    layer: type[LoraKind], path: str, module: nn.Module, options: dict, config: LoraConfig
) -> PlanEntry:
    """The entry of a LoRA target: ``LoraLayer.add_adapter``'s settings from the config's
    values for the target's name (``module.parameter`` for a raw parameter)."""
    key = f"{path}.{options['parameter']}" if "parameter" in options else path
    settings = {
        "r": config.rank_for(key),
        "scale": config.scale_for(key),
        "dropout": config.dropout,
        "init": config.init,
        "use_dora": config.use_dora,
        "lora_bias": config.lora_bias,
    }
    return _entry(layer, path, module, options, settings, config.alpha_for(key))


def _lora_entries(config: LoraConfig, targets: Targets, problems: list[str]) -> list[PlanEntry]:
    """Entries for ``target_modules`` (with ``fused_slices``) and ``target_parameters``; the
    reasons a target cannot be adapted go to ``problems``."""
    entries = []
    for path, module, slices in targets.modules:
        base = unwrap(module)
        layer = LoraFused if slices is not None else layer_class_for(base)
        options = {"slices": slices} if slices is not None else {}
        found = _wrapper_problems(layer, path, module, options)
        if not found:
            r = config.rank_for(path)
            found = layer.problems(path, base, r, **options) + _option_problems(layer, config, path)
        why = layer.router_problem(base) if layer and targets.parts.role(path) == "router" else None
        if why:  # routers are frozen by default; one that is named must take LoRA exactly
            found.append(
                f"{path}: {why}; adapt its weight instead: target_parameters ['{path}.weight']"
            )
        if found:
            problems += found
            continue
        entries.append(_lora_entry(layer, path, module, options, config))
    for path, module, name in targets.parameters:
        key, options = f"{path}.{name}", {"parameter": name}
        r = config.rank_for(key)
        found = LoraParameter.problems(path, module, r, **options)  # options: peft_problems
        if found:
            problems += found
            continue
        entries.append(_lora_entry(LoraParameter, path, module, options, config))
    return entries


def _wrapper_problems(
    layer: type[LoraKind] | None, path: str, module: nn.Module, options: dict[str, Any]
) -> list[str]:
    """Why ``layer`` cannot adapt the module at ``path``: no kind for its type, or a wrapper
    of another kind standing there."""
    base = unwrap(module)
    wrapped = base is not module and (layer is None or layer.existing(module, **options) is None)
    # Another LoRA layout of the module itself can be named; a copy, trainable rows or a raw
    # parameter's LoRA standing there leave the module no target_modules kind.
    if layer is None or (wrapped and not (module.is_lora and not module.nests)):
        experts = expert_parameters(base)
        hint = (
            f"its routed experts are parameters: target_parameters {experts} "
            f"(--target-parameters {','.join(experts)}), or 'all-linear', which adapts them"
            if experts
            else "target its parameters with target_parameters or narrow target_modules"
        )
        return [
            f"{path}: {type(base).__name__} is not a supported module type "
            f"({', '.join(supported_types())}); {hint}"
        ]
    if wrapped:
        return [
            f"{path}: already holds adapters of another layout ({type(module).__name__}); "
            "all adapters on a module must agree on fused_slices"
        ]
    return []


def _option_problems(layer: type[LoraKind], config: LoraConfig, target: str) -> list[str]:
    """Config options this layer kind cannot honour, each named (never silently dropped)."""
    name = layer.__name__
    found = []
    if config.use_dora and not layer.supports_dora:
        found.append(f"{target}: use_dora is not supported by {name} (nor by PEFT)")
    if config.lora_bias and not layer.supports_lora_bias:
        found.append(f"{target}: lora_bias is not supported by {name} (nor by PEFT)")
    if config.init == "nora" and not layer.supports_nora:  # PEFT: its default init, silently
        found.append(f"{target}: init='nora' needs a Linear or a parameter target, not {name}")
    if config.dropout and layer.dropout_mode == "refused":
        found.append(
            f"{target}: dropout={config.dropout} is not defined for {name} (the delta is added "
            "to the weight, there is no input to drop); use dropout=0"
        )
    return found


def parameter_targets(model: nn.Module, entries: list[PlanEntry]) -> tuple[list[str], list[str]]:
    """The LoRA entries an adapter file lists as ``target_parameters``: (raw parameters,
    modules written as ``<path>.weight`` because PEFT's MoE conversion would misread them)."""
    renamed = peft_moe_renames(model)
    lora = [e for e in entries if e.is_lora]
    raw = [e.target for e in lora if "parameter" in e.options]
    moved = [e.path for e in lora if "parameter" not in e.options]
    return raw, [p for p in moved if peft_parameter_target(p, renamed)]


def peft_problems(model: nn.Module, config: LoraConfig, entries: list[PlanEntry]) -> list[str]:
    """What an adapter with parameter targets cannot have, once per option: dropout (there
    is no input of ours to drop), and DoRA and lora_bias, which PEFT's ``ParamWrapper`` refuses
    for the whole adapter."""
    raw, moved = parameter_targets(model, entries)
    if not raw and not moved:
        return []
    where = f"{len(raw) + len(moved)} parameter targets here, e.g. {[*raw, *moved][0]}"
    if moved:
        where += (
            f"; PEFT reads {model.config.model_type}'s target_modules named "
            f"{'/'.join(peft_moe_renames(model))} as experts, so {moved[0]} and such are listed "
            "as target_parameters"
        )
    undefined = "is not defined for LoraParameter (no input of ours to drop) and " if raw else ""
    found = [
        f"dropout={config.dropout} {undefined}PEFT refuses lora_dropout != 0 in an adapter with "
        f"target_parameters ({where}); use dropout=0"
    ] * bool(config.dropout)
    return found + [
        f"{option} is not supported on parameter targets, by LoraParameter nor by PEFT, which "
        f"refuses it for the whole adapter ({where}); leave {option} off"
        for option in ("use_dora", "lora_bias")
        if getattr(config, option)
    ]


def moe_plan(
    model: nn.Module, config: LoraConfig, default_dropout: float, adapter_name: str = "default"
) -> tuple[LoraConfig, list[str]]:
    """``lorakit train``'s adapter config and the MoE lines of its plan (``Plan.moe_lines``).

    The CLI's default dropout applies only where PEFT can apply it: an adapter with parameter
    targets (MoE experts) gets dropout 0, and a line saying so. Another dropout is kept (and
    ``plan`` refuses it there). Raises ``LoraError`` with every problem ``add_lora`` would.
    """
    probe = config.replace(dropout=0.0) if config.dropout == default_dropout else config
    result = plan(model, probe, adapter_name)
    if probe is config or not any(parameter_targets(model, result.entries)):
        return config, result.moe_lines()
    note = (
        f"dropout: 0, not the default {default_dropout:g}: PEFT refuses lora_dropout != 0 in an "
        "adapter with target_parameters (experts, or modules PEFT reads as experts)"
    )
    return probe, [*result.moe_lines(), note]


def _token_entries(
    model: nn.Module, targets: Targets, lora: list[PlanEntry], problems: list[str]
) -> list[PlanEntry]:
    """Entries for ``trainable_token_indices``; what stops one goes to ``problems``."""
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    targeted = {e.path for e in lora}
    entries = []
    for path, module, ids in targets.tokens:
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
        else:
            entries.append(_entry(TrainableTokens, path, module, settings={"indices": ids}))
    return entries


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
        held = module.adapter_names() if unwrap(module) is not module else []
        if held:
            problems.append(
                f"{entry.path}: init={config.init!r} would rewrite a weight that adapters "
                f"{held} were made for; add it to a model without them"
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
    return apply_plan(model, plan(model, config, adapter_name))


def apply_plan(model: nn.Module, result: Plan) -> nn.Module:
    """Make the changes ``result = plan(model, config, name)`` lists: ``add_lora`` without
    planning again, for a caller that checked the plan (``load_adapter``: the file's tensors).

    ``model`` must be as it was when planned. A transformers model is first given lorakit's
    answers to transformers' adapter integration (``lorakit.hf.integration``), so that its
    ``save_pretrained`` writes the adapter in PEFT's form; a transformers model enclosing
    ``model`` is refused its whole-model ``save_pretrained`` (``lorakit.hf.enclosing``).
    """
    attach(model)
    guard(model)
    for entry in result.entries:
        module = model.get_submodule(entry.path)
        wrapper = entry.layer.existing(module, **entry.options)
        if wrapper is None:  # a new wrapper, around any of another target (nesting kinds)
            wrapper = entry.layer(module, **entry.options)
            replace_module(model, entry.path, wrapper)
        wrapper.add_adapter(result.adapter_name, **entry.settings)
    AdapterState.of(model).add(result.adapter_name, result.config)
    _freeze_base(model, result)
    for _, module in iter_adapter_modules(model):
        # Merged adapters stay active: their deltas are in the weights (unmerge to drop them).
        merged = [n for n in module.active if n in module.merged]
        module.set_active([*merged, result.adapter_name])
    LoraLinear.link_shared_inputs(model)
    return model


def _freeze_base(model: nn.Module, result: Plan) -> None:
    """Only adapter parameters (and biases per the config's ``bias``) keep requires_grad."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in iter_adapter_modules(model):
        for name in module.adapter_names():
            for p in module.adapter_parameters(name):
                p.requires_grad_(True)
    if result.config.bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)
    elif result.config.bias == "lora_only":
        for entry in result.entries:
            bias = getattr(unwrap(model.get_submodule(entry.path)), "bias", None)
            if entry.is_lora and isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
