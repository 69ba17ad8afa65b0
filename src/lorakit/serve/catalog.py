"""The names a client may put in ``model``: the base model and each loaded adapter.

A served adapter keeps the name clients use apart from its name inside the model
(``lora1``, ``lora2``...): client names may hold any character, and a name unloaded and loaded
again gets a fresh adapter, never the one still finishing its last requests.

Each entry carries the generation settings saved with it (``generation_settings.json``: the
system prompt and chat template it was trained with), applied to its chat requests as
``lorakit generate --use NAME`` applies them.

A refused load is a :class:`LoadRefused`: its text, for the operator's terminal and the
server's log, says everything the loader found; its ``public`` sentence, all a client gets,
says which kind of problem it is without a value read from the files (a folder named over
HTTP may hold anything).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import LoraError, brief
from ..generate import GENERATION_FILE, GenerationSettings, read_generation_settings
from ..io import CONFIG_NAME

LOGGED = "The server's log has the details."


class UnknownModel(LoraError):
    """No served model has this name (HTTP 404)."""


class LoadRefused(LoraError):
    """An adapter that could not be loaded; nothing of it is left in the model.

    Attributes:
        public: why, for a client: the kind of problem, never a value from the files.
    """

    def __init__(self, detail: str, public: str) -> None:
        super().__init__(detail)
        self.public = public


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
            names = ", ".join(brief(n) for n in list(self._served)[:10])
            names += f" and {len(self._served) - 10} more" if len(self._served) > 10 else ""
            raise UnknownModel(
                f"The model {brief(requested)} does not exist; this server has {names}."
            )
        return served

    def check_new(self, name: str) -> None:
        """Raise ``LoraError`` unless ``name`` can be given to a new adapter."""
        if not name or not name.strip():
            raise LoraError("An adapter needs a non-empty name.")
        if name in self._served:
            what = "the base model" if name == self.base.name else "an adapter already loaded"
            raise LoraError(f"The name {brief(name)} is taken by {what}; choose another.")

    def load(self, model: nn.Module, name: str, folder: str | Path) -> Served:
        """Load the adapter in ``folder`` onto ``model`` and serve it as ``name``.

        Raises:
            LoraError: a taken name or no adapter in ``folder``.
            LoadRefused: anything else, every error of reading and loading included (an
                unreadable file, an adapter made for another base model, one that per-row
                routing cannot batch: ``modules_to_save`` copies, raw parameters); nothing
                is left loaded then.
        """
        from ..adapters import delete_adapter, route
        from ..io import load_adapter
        from ..state import adapter_configs

        self.check_new(name)
        if not (Path(folder) / CONFIG_NAME).is_file():
            raise LoraError(
                f"{folder}: not an adapter folder (no {CONFIG_NAME}). Pass the --output "
                "folder of lorakit train, a checkpoint folder, or a PEFT adapter folder."
            )
        key, stage = next(self._keys), "settings"
        try:
            settings = read_generation_settings(folder)
            stage = "adapter"
            load_adapter(model, folder, adapter_name=key)
            stage = "route"
            with route(model, [key]):
                pass  # route checks that every layer of the adapter can be routed per row
        except Exception as error:
            if key in adapter_configs(model):
                delete_adapter(model, key)
            raise _refusal(stage, error, name, folder) from None
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


def _refusal(stage: str, error: Exception, name: str, folder: str | Path) -> LoadRefused:
    """The error of a failed load at ``stage`` as a :class:`LoadRefused`."""
    detail = str(error) if isinstance(error, LoraError) else f"{type(error).__name__}: {error}"
    if isinstance(error, OSError):
        public = f"{folder}: cannot read the adapter's files ({error.strerror or 'I/O error'})."
        return LoadRefused(f"{folder}: {detail}", f"{public} {LOGGED}")
    if not isinstance(error, LoraError):
        public = f"{folder}: loading the adapter failed ({type(error).__name__})."
    elif stage == "settings":
        public = (
            f"{folder}: {GENERATION_FILE} is not the JSON object lorakit writes (system, "
            "chat_template as strings or null); fix or delete it."
        )
    elif stage == "route":
        refused = (
            f"Adapter {brief(name)} ({folder}) cannot be served: lorakit serve runs requests "
            "for different adapters in one batch (per-row routing)"
        )
        public = (
            f"{refused}, and this adapter has layers that cannot be routed per row "
            "(modules_to_save copies or raw-parameter targets)."
        )
        detail = f"{refused}. {detail}"
    elif _readable(folder):
        public = (
            f"Adapter {folder} was made for another base model: its target modules or tensor "
            "shapes do not match this server's base model."
        )
    else:
        public = (
            f"{folder}: not an adapter lorakit can read ({CONFIG_NAME} or the weights are "
            "corrupt, truncated, or set PEFT options lorakit does not implement)."
        )
    return LoadRefused(detail, f"{public} {LOGGED}")


def _readable(folder: str | Path) -> bool:
    """Whether the adapter's files read on their own (a load that failed after all: a misfit)."""
    from ..io import read_adapter

    try:
        read_adapter(folder)
    except Exception:  # any failure to read is the "cannot read" answer
        return False
    return True
