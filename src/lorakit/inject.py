"""Finding what to adapt (``plan``), adding adapters (``add_lora``), freezing the base.

``plan`` is a dry run: it matches the config against the model, checks every target, and
either returns the list of changes or raises one ``LoraError`` listing every problem.
``add_lora`` applies a plan, so a bad config never leaves a half-modified model.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from .config import ALL_LINEAR, WEIGHT_INITS, LoraConfig
from .errors import LoraError
from .layers import (
    LoraConv,
    LoraEmbedding,
    LoraFused,
    LoraLayer,
    LoraLinear,
    LoraParameter,
    ModulesToSave,
    is_gpt2_conv1d,
)

CONFIGS_ATTR = "lorakit_configs"  # model attribute: adapter name -> LoraConfig


@dataclass
class PlanEntry:
    """One change ``add_lora`` would make."""

    path: str
    kind: str  # linear | embedding | conv | fused | parameter | modules_to_save
    module_type: str
    shape: tuple[int, ...]  # of the base weight (or parameter) being adapted
    r: int = 0
    alpha: float = 0.0
    params: int = 0  # trainable parameters this entry adds
    parameter: str | None = None  # for target_parameters: the parameter's name
    slices: list[bool] | None = None  # for fused projections

    @property
    def target(self) -> str:
        """The dotted name this entry adapts: the module, or module.parameter."""
        return f"{self.path}.{self.parameter}" if self.parameter else self.path


@dataclass
class Plan:
    """What ``add_lora(model, config)`` would do, with parameter counts. ``str()`` is a table."""

    adapter_name: str
    entries: list[PlanEntry] = field(default_factory=list)
    base_params: int = 0

    @property
    def lora_params(self) -> int:
        """Trainable parameters the adapter adds (LoRA pairs and modules_to_save copies)."""
        return sum(e.params for e in self.entries)

    def __str__(self) -> str:
        rows = [("module", "type", "weight shape", "r", "alpha", "params")]
        for e in self.entries:
            kind = e.module_type + (f" slices={e.slices}" if e.slices else "")
            r = str(e.r) if e.kind != "modules_to_save" else "full copy"
            alpha = f"{e.alpha:g}" if e.kind != "modules_to_save" else "-"
            rows.append((e.target, kind, "x".join(map(str, e.shape)), r, alpha, f"{e.params:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        share = 100.0 * self.lora_params / max(self.base_params, 1)
        lines.append(
            f"adapter '{self.adapter_name}': {len(self.entries)} modules, "
            f"{self.lora_params:,} trainable params ({share:.3f}% of {self.base_params:,})"
        )
        return "\n".join(lines)


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


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """Adapter name -> the config it was added with (empty for a model without adapters)."""
    return getattr(model, CONFIGS_ATTR, {})


def iter_adapter_modules(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
    """(path, module) for every lorakit wrapper in ``model``, outermost first."""
    for path, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield path, module


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` inside ``model`` (its parent's attribute)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def logical_path(path: str) -> str:
    """A module path without lorakit's ``base_layer`` segments (as the user's model names it)."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside any lorakit wrappers."""
    while isinstance(module, (LoraLayer, ModulesToSave)):
        module = module.base_layer if isinstance(module, LoraLayer) else module.original_module
    return module


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of logical modules: a wrapper stands for the module it wraps and is not entered."""
    yield prefix, module
    if isinstance(module, (LoraLayer, ModulesToSave)):
        return
    for name, child in module.named_children():
        yield from walk(child, f"{prefix}.{name}" if prefix else name)


def matches(spec: list[str] | str | None, path: str) -> bool:
    """PEFT's matching: a list entry equals the path or its dotted suffix; a string full-matches."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith("." + name) for name in spec)


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


def _excluded(cfg: LoraConfig, path: str) -> bool:
    # An excluded module excludes everything inside it: test the path and each of its parents.
    parts = path.split(".")
    return any(matches(cfg.exclude_modules, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    return unwrap(head) if head is not None else None


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) or is_gpt2_conv1d(module):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


def _closest(name: str, paths: list[str]) -> list[str]:
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths if p})
    close = difflib.get_close_matches(name, leaves, n=5, cutoff=0.5)
    return close or difflib.get_close_matches(name, paths, n=5, cutoff=0.4)


def _check_shape(entry: PlanEntry, module: nn.Module, problems: list[str]) -> None:
    """Rank and layout limits of one target, appended to ``problems``."""
    if entry.kind == "parameter":
        if len(entry.shape) not in (2, 3):
            problems.append(
                f"{entry.target}: parameter of shape {entry.shape} is {len(entry.shape)}D; "
                "target_parameters supports 2D (out, in) and 3D (experts, out, in) tensors"
            )
            return
        limit = min(entry.shape[-2:])
    elif entry.kind == "conv":
        limit = min(module.out_channels, module.in_channels * math.prod(module.kernel_size))
        if entry.r % module.groups:
            problems.append(
                f"{entry.path}: rank {entry.r} must be a multiple of the convolution's "
                f"groups={module.groups}"
            )
        if module.padding_mode != "zeros":
            problems.append(
                f"{entry.path}: padding_mode={module.padding_mode!r} is not supported "
                "(the LoRA path pads with zeros); only 'zeros' convolutions can be adapted"
            )
    elif entry.kind == "fused":
        out_features = entry.shape[1] if is_gpt2_conv1d(module) else entry.shape[0]
        in_features = entry.shape[0] if is_gpt2_conv1d(module) else entry.shape[1]
        if out_features % len(entry.slices):
            problems.append(
                f"{entry.path}: {len(entry.slices)} fused slices do not divide its "
                f"{out_features} outputs; give one flag per equal slice"
            )
            return
        limit = min(in_features, out_features // len(entry.slices))
    else:
        limit = min(entry.shape)
    if entry.r > limit:
        problems.append(
            f"{entry.target}: rank {entry.r} exceeds min(in, out) = {limit} of its weight "
            f"{tuple(entry.shape)}; use r <= {limit} (rank_pattern can lower it per module)"
        )


def _adapter_params(entry: PlanEntry, module: nn.Module) -> int:
    wrapper = make_wrapper(entry, module)
    shape_a, shape_b = wrapper._shapes(entry.r)
    return math.prod(shape_a) + math.prod(shape_b)


def make_wrapper(entry: PlanEntry, module: nn.Module) -> LoraLayer:
    """The (empty) LoRA wrapper for a plan entry around ``module``."""
    if entry.kind == "linear":
        return LoraLinear(module)
    if entry.kind == "embedding":
        return LoraEmbedding(module)
    if entry.kind == "conv":
        return LoraConv(module)
    if entry.kind == "fused":
        return LoraFused(module, entry.slices)
    return LoraParameter(module, entry.parameter)


def _selector(config: LoraConfig, head: nn.Module | None, save_paths: list[str]):
    """A function (path, base module) -> the target_modules entry selecting it, or None."""

    def select(path: str, base: nn.Module) -> str | None:
        if not path or _excluded(config, path) or not _in_layers(config, path):
            return None
        if any(path == s or path.startswith(s + ".") for s in save_paths):
            return None  # PEFT never adapts inside a modules_to_save module
        spec = config.target_modules
        if spec == ALL_LINEAR:
            return ALL_LINEAR if _kind(base) == "linear" and base is not head else None
        if isinstance(spec, str):
            return spec if re.fullmatch(spec, path) else None
        return next((n for n in spec or [] if path == n or path.endswith("." + n)), None)

    return select


def plan(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> Plan:
    """Dry run of ``add_lora``: what would be adapted, with shapes and parameter counts.

    Changes nothing. Raises ``LoraError`` listing every problem: targets that match nothing
    (with the closest module names), unsupported module types, ranks above a weight's
    min(in, out), fused slices that don't divide the output, an adapter name already in use.
    """
    problems: list[str] = []
    if adapter_name in adapter_configs(model):
        problems.append(
            f"adapter '{adapter_name}' already exists (have: {sorted(adapter_configs(model))}); "
            "pick another adapter_name or delete_adapter it first"
        )
    modules = list(walk(model))
    paths = [p for p, _ in modules]
    result = Plan(adapter_name, base_params=sum(p.numel() for p in model.parameters()))
    save_paths = [p for p in paths if p and matches(config.modules_to_save, p)]
    select = _selector(config, _output_head(model), save_paths)

    hit: set[str] = set()
    fused_used: set[str] = set()
    for path, module in modules:
        base = unwrap(module)
        entry_name = select(path, base)
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
    if spec == ALL_LINEAR and not hit:
        problems.append("'all-linear' found no Linear or Conv1D layer besides the output head")
    elif spec and spec != ALL_LINEAR:
        for name in [spec] if isinstance(spec, str) else spec:
            if name not in hit:
                problems.append(_no_match("target_modules", name, paths))

    _plan_parameters(model, config, modules, result, problems)

    for name in config.modules_to_save or []:
        if not any(matches([name], p) for p in save_paths):
            problems.append(_no_match("modules_to_save", name, paths))
    for path in save_paths:
        base = unwrap(model.get_submodule(path))
        result.entries.append(
            PlanEntry(
                path=path,
                kind="modules_to_save",
                module_type=type(base).__name__,
                shape=tuple(base.weight.shape) if hasattr(base, "weight") else (),
                params=sum(p.numel() for p in base.parameters()),
            )
        )

    _check_weight_init(model, config, result, problems)

    if problems:
        raise LoraError(f"Cannot add adapter '{adapter_name}':\n  - " + "\n  - ".join(problems))
    for entry, (_, module) in zip(result.entries, _entry_modules(model, result), strict=True):
        if entry.kind != "modules_to_save":
            entry.params = _adapter_params(entry, module)
    return result


def _no_match(field: str, name: str, paths: list[str]) -> str:
    close = _closest(name, paths)
    hint = f"; closest module names: {close}" if close else ""
    return f"{field} entry {name!r} matched no module{hint}"


def _module_entry(
    config: LoraConfig, path: str, module: nn.Module, problems: list[str]
) -> PlanEntry | None:
    """The plan entry for a selected module, or None with the reason added to ``problems``."""
    base = unwrap(module)
    kind = _kind(base)
    if isinstance(module, LoraParameter) or kind is None:
        problems.append(
            f"{path}: {type(base).__name__} is not a supported module type (Linear, "
            "Embedding, Conv1d/2d/3d, GPT-2 Conv1D); target its parameters with "
            "target_parameters or narrow target_modules"
        )
        return None
    slices = next((f for k, f in config.fused_slices.items() if matches([k], path)), None)
    if slices is not None and kind != "linear":
        problems.append(f"{path}: fused_slices needs a Linear or Conv1D, not {kind}")
        return None
    entry = PlanEntry(
        path=path,
        kind="fused" if slices is not None else kind,
        module_type=type(base).__name__,
        shape=tuple(base.weight.shape),
        r=config.rank_for(path),
        alpha=config.alpha_for(path),
        slices=slices,
    )
    if isinstance(module, LoraLayer) and type(module) is not type(make_wrapper(entry, base)):
        problems.append(
            f"{path}: already holds adapters of another layout ({type(module).__name__}); "
            "all adapters on a module must agree on fused_slices"
        )
        return None
    _check_shape(entry, base, problems)
    return entry


def _check_weight_init(
    model: nn.Module, config: LoraConfig, result: Plan, problems: list[str]
) -> None:
    """PiSSA / OLoRA rewrite the base weight: only plain, unshared, adapter-free linear layers."""
    if config.init not in WEIGHT_INITS:
        return
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for entry in result.entries:
        if entry.kind == "modules_to_save":
            continue
        if entry.kind != "linear":
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


def _plan_parameters(
    model: nn.Module,
    config: LoraConfig,
    modules: list[tuple[str, nn.Module]],
    result: Plan,
    problems: list[str],
) -> None:
    """Plan entries for ``target_parameters``, appended to ``result``."""
    if not config.target_parameters:
        return
    if config.dropout:
        problems.append(
            "target_parameters needs dropout=0: the delta is added to the weight, "
            "there is no input to drop"
        )
    hit: dict[str, int] = {}
    for path, module in modules:
        if not path or _excluded(config, path) or isinstance(module, ModulesToSave):
            continue
        owner = unwrap(module)
        if isinstance(module, LoraLayer) and not isinstance(module, LoraParameter):
            continue
        for name, param in owner.named_parameters(recurse=False):
            key = f"{path}.{name}"
            spec = next(
                (t for t in config.target_parameters if key == t or key.endswith("." + t)), None
            )
            if spec is None:
                continue
            hit[spec] = hit.get(spec, 0) + 1
            entry = PlanEntry(
                path=path,
                kind="parameter",
                module_type=type(owner).__name__,
                shape=tuple(param.shape),
                r=config.rank_for(key),
                alpha=config.alpha_for(key),
                parameter=name,
            )
            _check_shape(entry, owner, problems)
            result.entries.append(entry)
    all_params = [
        f"{p}.{n}" for p, m in modules for n, _ in unwrap(m).named_parameters(recurse=False)
    ]
    for spec in config.target_parameters:
        if not hit.get(spec):
            close = difflib.get_close_matches(spec, all_params, n=5, cutoff=0.4)
            problems.append(
                f"target_parameters entry {spec!r} matched no parameter"
                + (f"; closest parameter names: {close}" if close else "")
            )


def _entry_modules(model: nn.Module, result: Plan) -> Iterator[tuple[str, nn.Module]]:
    for entry in result.entries:
        module = model.get_submodule(entry.path) if entry.path else model
        yield entry.path, unwrap(module) if entry.kind != "parameter" else module


def add_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` per ``config`` to ``model`` in place and return the model.

    Validates everything first (see ``plan``); afterwards the base is frozen, only LoRA
    parameters, ``modules_to_save`` copies and biases per ``config.bias`` train, and the new
    adapter is the active one.
    """
    result = plan(model, config, adapter_name)
    for entry in result.entries:
        module = model.get_submodule(entry.path)
        if entry.kind == "modules_to_save":
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                replace_module(model, entry.path, module)
            module.add_adapter(adapter_name)
            continue
        if entry.kind == "parameter":
            existing = module
            while (
                isinstance(existing, LoraParameter) and existing.parameter_name != entry.parameter
            ):
                existing = existing.base_layer
            if not isinstance(existing, LoraParameter):
                module = LoraParameter(module, entry.parameter)
                replace_module(model, entry.path, module)
                existing = module
            module = existing
        elif not isinstance(module, LoraLayer):
            module = make_wrapper(entry, module)
            replace_module(model, entry.path, module)
        scale = entry.alpha / (entry.r**0.5 if config.use_rslora else entry.r)
        module.add_adapter(adapter_name, entry.r, scale, config.dropout, config.init)
    configs = dict(adapter_configs(model))
    configs[adapter_name] = config
    setattr(model, CONFIGS_ATTR, configs)
    _freeze_base(model, config, result)
    for _, module in iter_adapter_modules(model):
        # Merged adapters stay active: their deltas are in the weights (unmerge to drop them).
        merged = getattr(module, "merged", [])
        mine = [adapter_name] if adapter_name in module.adapter_names() else []
        module.active = [n for n in module.active if n in merged] + mine
    return model


def _freeze_base(model: nn.Module, config: LoraConfig, result: Plan) -> None:
    """Only adapter parameters (and biases per ``config.bias``) keep requires_grad."""
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in iter_adapter_modules(model):
        if isinstance(module, LoraLayer):
            for p in [*module.lora_A.values(), *module.lora_B.values()]:
                p.requires_grad_(True)
        else:
            for p in module.modules_to_save.parameters():
                p.requires_grad_(True)
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                param.requires_grad_(True)
    elif config.bias == "lora_only":
        for entry in result.entries:
            bias = getattr(unwrap(model.get_submodule(entry.path)), "bias", None)
            if entry.kind != "modules_to_save" and isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
