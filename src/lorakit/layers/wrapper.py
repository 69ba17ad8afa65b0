"""The contract of every module lorakit puts into a model in place of the user's module.

Three kinds of wrapper stand in a model: LoRA layers (``base.LoraLayer`` and its kinds), full
trainable copies (``modules_to_save.ModulesToSave``) and trainable embedding rows
(``tokens.TrainableTokens``). ``Wrapper`` is what they share and all that ``inject``, ``io``,
``merge``, ``adapters`` and ``export`` ask of them, so none of those modules asks which class
a wrapper is:

====================  ===========================================================
planning (class)      ``existing``, ``weight_shape``, ``peft_shapes``,
                      ``trainable_count``, ``plan_label``, and the flags below
adapters              ``adapter_names``, ``adapter_parameters``, ``add_adapter``,
                      ``delete_adapter``, ``active`` / ``set_active``
files                 ``peft_tensors`` / ``load_peft_tensors`` (PEFT's names under the
                      module's path), ``base_shape`` (the fingerprint), ``target_name``,
                      ``nested_layers``, ``extras`` (what a runtime of plain pairs lacks)
merging, unloading    ``merged``, ``merge_problem``, ``merged_weight``, ``merge``,
                      ``unmerge`` (kinds that fold into a weight), ``restore_base``,
                      ``unloaded``
====================  ===========================================================

``unwrap`` and ``iter_adapter_modules`` find the wrappers of a model by this base class.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

Shape = tuple[int, ...]


class Wrapper(nn.Module):
    """Stands in for the wrapped module; attributes it lacks are read from that module, so
    model code that reads ``.weight``, ``.in_features``, ... keeps working.

    Every kind reads the user's module as ``base_layer`` (kept under ``wrapped_attribute``),
    holds named adapters and implements the methods below that raise
    ``NotImplementedError``; the others have the defaults most kinds want.
    """

    wrapped_attribute: ClassVar[str] = "base_layer"  # where the user's module is kept
    # A low-rank pair per adapter, with a rank, alpha and scale (init and bias="lora_only"
    # apply to it); the other kinds train whole tensors.
    is_lora: ClassVar[bool] = False
    # A whole trained copy of the module per adapter: nothing inside it is a target, its
    # parameters (biases too) travel with the copy, and it folds in by replacing the module
    # on ``unload``, never by adding a delta to a weight.
    whole_copy: ClassVar[bool] = False
    # Batch rows can take different adapters in one forward (``lorakit.route``).
    supports_routing: ClassVar[bool] = False
    # Wrappers of this kind nest, one per target in one module (raw parameters, as in PEFT):
    # class methods then get the module as it stands, wrappers included.
    nests: ClassVar[bool] = False
    # Prefixes (under the module's path) of tensors PEFT also saves for this kind, which
    # duplicate what the file holds under ``peft_tensors``' names; loading ignores them.
    peft_duplicates: ClassVar[tuple[str, ...]] = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.wrapped_attribute:
                raise
            return getattr(super().__getattr__(self.wrapped_attribute), name)

    # --- planning: what an adapter of this kind would be (no wrapper is built to ask) --------
    @classmethod
    def existing(cls, module: nn.Module, **options: Any) -> Wrapper | None:
        """The wrapper of this kind (and options) already standing at a module's place."""
        return module if isinstance(module, cls) else None

    @classmethod
    def weight_shape(cls, module: nn.Module, **options: Any) -> Shape:
        """Shape of the base weight the adapter changes, as the plan shows it."""
        return tuple(module.weight.shape)

    @classmethod
    def peft_shapes(
        cls, module: nn.Module, settings: Mapping[str, Any], **options: Any
    ) -> dict[str, Shape]:
        """PEFT tensor name (under the module's path) -> shape, for one adapter added with
        ``add_adapter(name, **settings)``: what a file must hold for it."""
        raise NotImplementedError

    @classmethod
    def trainable_count(cls, module: nn.Module, settings: Mapping[str, Any], **options: Any) -> int:
        """Trainable parameters one adapter added with ``settings`` holds on ``module``."""
        raise NotImplementedError

    @classmethod
    def plan_label(cls, settings: Mapping[str, Any]) -> str:
        """What the plan's table shows in its rank column for one adapter of this kind."""
        raise NotImplementedError

    # --- adapters ------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        """Names of the adapters this wrapper holds."""
        raise NotImplementedError

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name``."""
        raise NotImplementedError

    def add_adapter(self, name: str, **settings: Any) -> None:
        """Create adapter ``name`` from a plan entry's ``settings`` and make it active."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (the caller unmerged it first)."""
        raise NotImplementedError

    @property
    def active(self) -> list[str]:
        """Adapters that serve the forward (or are merged into the weight)."""
        return list(self._active)

    def set_active(self, names: Sequence[str]) -> None:
        """Make exactly ``names`` (those this wrapper holds) active, in that order."""
        held = self.adapter_names()
        self._active = [n for n in names if n in held]

    # --- files -----------------------------------------------------------------------------------
    def peft_tensors(self, name: str) -> dict[str, Tensor]:
        """Adapter ``name``'s tensors under PEFT's names (relative to this module's path)."""
        raise NotImplementedError

    def load_peft_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        """Copy checked tensors (``peft_tensors``' names and shapes) into adapter ``name``."""
        raise NotImplementedError

    @classmethod
    def as_current_peft(cls, tensors: dict[str, Tensor], peft_version: str | None) -> dict:
        """This kind's file ``tensors`` (``peft_tensors``' names) from a file that PEFT release
        ``peft_version`` wrote (None: not recorded), as the current PEFT reads them: where a
        PEFT release changed what a tensor means, the file's meaning is kept."""
        return tensors

    def base_shape(self) -> Shape | None:
        """The base weight's logical shape, as an adapter's fingerprint records it (None: this
        kind is not part of the fingerprint)."""
        return tuple(self.base_layer.weight.shape)

    def target_name(self, path: str) -> str:
        """What the user's config calls this wrapper's target, given the wrapper's path."""
        return path

    def nested_layers(self) -> list[Wrapper]:
        """Wrappers inside this one whose adapters it adds and saves (none by default)."""
        return []

    def extras(self, name: str) -> list[str]:
        """Config options adapter ``name`` uses here beyond a plain pair ``scale · B A``
        (``use_dora``, ``lora_bias``, ``modules_to_save``, ``trainable_token_indices``):
        what a runtime that applies only plain pairs cannot take."""
        return []

    # --- merging and unloading ---------------------------------------------------------------
    @property
    def merged(self) -> list[str]:
        """Adapters folded into the base weight, in merge order."""
        return []

    def merge_problem(self, names: Sequence[str]) -> str | None:
        """Why merging ``names`` (on top of those merged) would not be exact, if it would not."""
        return None

    def merged_weight(self, name: str) -> tuple[Tensor, Tensor | None]:
        """(W, bias) after merging ``name``, in fp32; nothing is written."""
        raise NotImplementedError

    def merge(self, name: str, weight: Tensor, bias: Tensor | None) -> None:
        """Write ``merged_weight(name)``'s result and record ``name`` as merged."""
        raise NotImplementedError

    def unmerge(self, name: str) -> None:
        """Take adapter ``name`` back out of the weight."""
        raise NotImplementedError

    def restore_base(self, name: str) -> None:
        """Give back to the base weight what adding adapter ``name`` took out (none here)."""

    def unloaded(self, merge: bool) -> nn.Module:
        """The plain module that replaces this wrapper on ``unload`` (the caller merged or
        unmerged first): the wrapped module."""
        return self.base_layer


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside any lorakit wrappers."""
    while isinstance(module, Wrapper):
        module = module.base_layer
    return module


def iter_adapter_modules(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """(path, wrapper) for every lorakit wrapper in ``model``, outermost first."""
    for path, module in model.named_modules():
        if isinstance(module, Wrapper):
            yield path, module
