"""Which modules a config selects: PEFT's matching rules over a model's logical modules.

A logical module is what the user's model names: lorakit's wrappers stand for the module they
wrap (``walk`` does not enter them, ``unwrap`` sees through them), and a module whose layer
kind owns its children (``nn.MultiheadAttention``, which never calls its ``out_proj``) is not
entered either, so its children can't be targeted by mistake.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator

from torch import nn

from .config import ALL_LINEAR, LoraConfig
from .layers import LoraLayer, LoraLinear, Wrapper, layer_class_for


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside any lorakit wrappers."""
    while isinstance(module, Wrapper):
        module = module.base_layer
    return module


def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of logical modules: a wrapper stands for the module it wraps."""
    yield prefix, module
    if isinstance(module, Wrapper) or _owns_children(module):
        return
    for name, child in module.named_children():
        yield from walk(child, f"{prefix}.{name}" if prefix else name)


def _owns_children(module: nn.Module) -> bool:
    kind = layer_class_for(module)
    return kind is not None and kind.owns_children


def iter_adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, wrapper) for every lorakit wrapper in ``model``, outermost first."""
    for path, module in model.named_modules():
        if isinstance(module, Wrapper):
            yield path, module


def lora_layers(model: nn.Module, name: str | None = None) -> list[tuple[str, LoraLayer]]:
    """Every LoRA layer (nested ones included), or those holding adapter ``name``."""
    return [
        (path, m)
        for path, m in iter_adapter_modules(model)
        if isinstance(m, LoraLayer) and (name is None or name in m.lora_A)
    ]


def logical_path(path: str) -> str:
    """A module path without lorakit's ``base_layer`` segments (as the user's model names it)."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


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


def excluded(cfg: LoraConfig, path: str) -> bool:
    # An excluded module excludes everything inside it: test the path and each of its parents.
    parts = path.split(".")
    return any(matches(cfg.exclude_modules, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    return unwrap(head) if head is not None else None


def closest(name: str, paths: list[str]) -> list[str]:
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths if p})
    close = difflib.get_close_matches(name, leaves, n=5, cutoff=0.5)
    return close or difflib.get_close_matches(name, paths, n=5, cutoff=0.4)


def no_match(field: str, name: str, paths: list[str]) -> str:
    close = closest(name, paths)
    hint = f"; closest module names: {close}" if close else ""
    return f"{field} entry {name!r} matched no module{hint}"


def selector(
    config: LoraConfig, head: nn.Module | None, save_paths: list[str]
) -> Callable[[str, nn.Module], str | None]:
    """A function (path, base module) -> the target_modules entry selecting it, or None."""

    def select(path: str, base: nn.Module) -> str | None:
        if not path or excluded(config, path) or not _in_layers(config, path):
            return None
        if any(path == s or path.startswith(s + ".") for s in save_paths):
            return None  # PEFT never adapts inside a modules_to_save module
        spec = config.target_modules
        if spec == ALL_LINEAR:
            kind = layer_class_for(base)  # LoraLinear or a subclass (quantized Linear4bit/8bit)
            linear = kind is not None and issubclass(kind, LoraLinear)
            return ALL_LINEAR if linear and base is not head else None
        if isinstance(spec, str):
            return spec if re.fullmatch(spec, path) else None
        return next((n for n in spec or [] if path == n or path.endswith("." + n)), None)

    return select
