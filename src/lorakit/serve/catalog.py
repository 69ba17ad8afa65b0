"""The names a client may put in ``model``: the base model and each loaded adapter.

A served adapter keeps the name clients use apart from its name inside the model
(``lora1``, ``lora2``...): client names may hold any character, and a name unloaded and loaded
again gets a fresh adapter, never the one still finishing its last requests.

Each entry carries the generation settings saved with it (``generation_settings.json``: the
system prompt and chat template it was trained with), applied to its chat requests as
``lorakit generate --use NAME`` applies them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import LoraError
from ..generate import GenerationSettings, read_generation_settings


class UnknownModel(LoraError):
    """No served model has this name (HTTP 404)."""


@dataclass(frozen=True)
class Served:
    """One name clients can ask for.

    Attributes:
        name: what clients put in ``model``.
        adapter: the adapter's name inside the model; ``None`` for the base model.
        path: where it was loaded from.
        settings: system prompt and chat template to prompt it with.
    """

    name: str
    adapter: str | None
    path: str
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    created: int = field(default_factory=lambda: int(time.time()))


class Catalog:
    """Served names -> :class:`Served`, for a base model called ``base.name``."""

    def __init__(self, base: Served) -> None:
        self.base = base
        self._served: dict[str, Served] = {base.name: base}
        self._keys = (f"lora{i}" for i in itertools.count(1))

    def __iter__(self) -> Iterator[Served]:
        """The served models, the base first (a copy: safe while adapters change)."""
        return iter(list(self._served.values()))

    def resolve(self, requested: str) -> Served:
        """The served model a request names: a served name or SGLang's ``base:adapter``.

        Raises:
            UnknownModel: nothing of that name (listing what there is).
        """
        served = self._served.get(requested)
        prefix = f"{self.base.name}:"
        if served is None and requested.startswith(prefix):
            served = self._served.get(requested[len(prefix) :])
        if served is None:
            names = ", ".join(repr(n) for n in self._served)
            raise UnknownModel(f"The model {requested!r} does not exist; this server has {names}.")
        return served

    def check_new(self, name: str) -> None:
        """Raise ``LoraError`` unless ``name`` can be given to a new adapter."""
        if not name or not name.strip():
            raise LoraError("An adapter needs a non-empty name.")
        if name in self._served:
            what = "the base model" if name == self.base.name else "an adapter already loaded"
            raise LoraError(f"The name {name!r} is taken by {what}; choose another.")

    def load(self, model: nn.Module, name: str, folder: str) -> Served:
        """Load the adapter in ``folder`` onto ``model`` and serve it as ``name``.

        Raises:
            LoraError: a taken name, no adapter in ``folder``, an adapter made for another base
                model (from ``load_adapter``'s fingerprint check), or one that per-row routing
                cannot batch (``modules_to_save`` copies, raw parameters); nothing is left
                loaded then.
        """
        from ..adapters import delete_adapter, route
        from ..io import load_adapter

        self.check_new(name)
        if not (Path(folder) / "adapter_config.json").is_file():
            raise LoraError(
                f"{folder}: not an adapter folder (no adapter_config.json). Pass the --output "
                "folder of lorakit train, a checkpoint folder, or a PEFT adapter folder."
            )
        settings = read_generation_settings(folder)
        key = next(self._keys)
        load_adapter(model, folder, adapter_name=key)
        try:
            with route(model, [key]):
                pass  # route checks that every layer of the adapter can be routed per row
        except LoraError as error:
            delete_adapter(model, key)
            raise LoraError(
                f"Adapter {name!r} ({folder}) cannot be served: lorakit serve runs requests "
                f"for different adapters in one batch (per-row routing). {error}"
            ) from None
        served = Served(name, key, str(folder), settings)
        self._served[name] = served
        return served

    def withdraw(self, name: str) -> Served:
        """Stop serving adapter ``name`` (new requests get 404); its adapter stays loaded.

        Raises:
            UnknownModel: no adapter of that name.
        """
        served = self._served.get(name)
        if served is None or served.adapter is None:
            raise UnknownModel(f"The lora adapter {name!r} cannot be found.")
        del self._served[name]
        return served
