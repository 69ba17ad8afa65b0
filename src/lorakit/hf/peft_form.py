"""A model's adapter in PEFT's form: its tensors under PEFT's names and the facts of the model
its ``adapter_config.json`` records (``file_facts``: the base, the task type, ...).

Each layer class owns its tensor names and layout (``peft_tensors``); this module puts them
under the module paths. It sits below ``inject`` (it asks the layers and the adapter state
only), so both the adapter files (``lorakit.io``) and transformers' own ``save_pretrained``
(``lorakit.hf.integration``, which ``add_lora`` attaches) write the same tensors and JSON.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import FileFacts, LoraConfig
from ..layers import Wrapper
from ..state import AdapterState, adapter_configs
from ..targeting import file_targets, inside, iter_adapter_modules, unwrap, walk

PREFIX = "base_model.model."

# PEFT's task_type -> transformers' auto-model mappings whose classes it loads with
# (``AutoPeftModelForCausalLM`` loads ``AutoModelForCausalLM``'s class), first match wins.
_TASK_MAPPINGS = (
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"),
)


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (asked without importing
    transformers, which a plain torch model never needs)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from transformers' own auto-model
    mappings (``LlamaForCausalLM`` and ``GPT2LMHeadModel`` -> ``CAUSAL_LM``, ``LlamaModel`` ->
    ``FEATURE_EXTRACTION``); a subclass counts as its transformers class. None for any other
    module, and for classes no PEFT task loads (a vision-language model's image-text class).
    """
    if not is_transformers_model(model):
        return None
    from transformers.models.auto import modeling_auto

    classes = [cls.__name__ for cls in type(model).__mro__]
    for task, mapping in _TASK_MAPPINGS:
        names = set()
        for value in getattr(modeling_auto, mapping).values():
            names.update((value,) if isinstance(value, str) else value)
        if any(name in names for name in classes):
            return task
    return None


def own_name(model: nn.Module) -> str | None:
    """The model's own name or path as transformers loaded it (``from_pretrained(folder)``
    gives the folder), as transformers' ``from_pretrained`` loads it offline; None for a
    model built from a config."""
    from ..models.gguf import transformers_path

    config = getattr(model, "config", None)
    name = getattr(model, "name_or_path", None) or getattr(config, "name_or_path", None)
    return transformers_path(str(name)) if name else None


def file_facts(
    model: nn.Module, adapter_name: str = "default", base_model: str | None = None
) -> FileFacts:
    """What adapter ``adapter_name``'s JSON says about ``model`` (``LoraConfig.to_peft_file``).

    Args:
        base_model: the base as transformers and PEFT load it (a GGUF's converted folder, say),
            resolved by the caller; None keeps the config's ``base_model_name_or_path`` or,
            when it records none, the model's own name or path (``own_name``), as PEFT does.

    Layers whose pair is wider in PEFT's file than the saved config's rank (a fused-slice
    adapter is one pair of rank n_on · r, ``LoraFused.to_peft``) get that rank and their scale.
    """
    saved = adapter_configs(model)[adapter_name].on_original_weight()
    ranks, scales = {}, {}
    for path, layer in top_level(model, adapter_name):
        if layer.is_lora and layer.peft_rank(adapter_name) != saved.rank_for(path):
            ranks[path] = layer.peft_rank(adapter_name)
            scales[path] = layer.scale[adapter_name]
    # A mixture-of-experts model's targets by full path (``targeting.file_targets``).
    lora = [(p, m) for p, m in top_level(model, adapter_name) if m.is_lora]
    listed = file_targets(model, lora, saved, adapter_name)
    if listed is not None:
        ranks, scales = {**ranks, **listed.ranks}, {**scales, **listed.scales}
    if base_model is None and not saved.base_model_name_or_path:
        base_model = own_name(model)
    return FileFacts(
        base_model=base_model,
        task_type=task_type(model),
        fan_in_fan_out=any(
            getattr(m, "fan_in_fan_out", False) for _, m in iter_adapter_modules(model)
        ),
        ranks=ranks,
        scales=scales,
        targets=None if listed is None else (listed.modules, listed.parameters),
    )


def bias_keys(
    model: nn.Module, config: LoraConfig, adapted: set[str], saved: set[str]
) -> dict[str, nn.Parameter]:
    """PEFT key -> bias parameter that ``config.bias`` puts in the file.

    ``adapted``: paths of the adapter's wrappers that are not whole copies; ``saved``: its
    ``modules_to_save`` paths. The biases inside any whole copy travel with the copy. Works
    before or after wrapping: a wrapped module's bias is named ``<path>.base_layer.bias`` in
    the file, as in PEFT.
    """
    if config.bias == "none":
        return {}
    wrappers = list(iter_adapter_modules(model))
    wrapped = adapted | {p for p, _ in wrappers}
    saved = saved | {p for p, m in wrappers if m.whole_copy}
    keys = {}
    for path, module in walk(model):
        bias = getattr(unwrap(module), "bias", None)
        if not isinstance(bias, nn.Parameter) or any(inside(path, s) for s in saved):
            continue
        if config.bias == "lora_only" and path not in adapted:
            continue
        keys[f"{PREFIX}{path}{'.base_layer' if path in wrapped else ''}.bias"] = bias
    return keys


def top_level(model: nn.Module, name: str | None = None) -> list[tuple[str, Wrapper]]:
    """Wrappers that own their PEFT tensors (holding adapter ``name``): all but nested ones.

    A layer's ``nested_layers`` (MultiheadAttention's ``out_proj``) are saved by that layer.
    """
    wrappers = list(iter_adapter_modules(model))
    nested = {id(n) for _, m in wrappers for n in m.nested_layers()}
    return [
        (path, m)
        for path, m in wrappers
        if id(m) not in nested and (name is None or name in m.adapter_names())
    ]


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter_name``'s tensors under PEFT's names (what ``save_adapter`` writes)."""
    AdapterState.of(model).check([adapter_name])
    config = adapter_configs(model)[adapter_name]
    tensors: dict[str, Tensor] = {}
    adapted, saved = set(), set()
    for path, module in top_level(model, adapter_name):
        for key, value in module.peft_tensors(adapter_name).items():
            tensors[f"{PREFIX}{path}.{key}"] = value
        (saved if module.whole_copy else adapted).add(path)
    tensors.update(bias_keys(model, config, adapted, saved))
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
