"""Which adapter folders a client may name in ``POST /v1/load_lora_adapter``.

The path comes from the network, so before any file in it is read:

- with ``--adapter-root`` roots, the folder (its real path, links followed) must lie under
  one of them;
- each file the loader reads (``adapter_config.json``, the weights, ``generation_settings.json``)
  must be a regular file (a FIFO would block the engine, a device file never end) that
  resolves inside the folder or under a root: a symlink out (to ``/etc/...``) is refused.

Messages repeat only what the client sent and the names of the files, never what a link
points to or what a file holds. The adapters named on the command line are the operator's
own and are not checked here (a Hugging Face cache snapshot is made of links to its blobs).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ..errors import LoraError, brief
from ..generate import GENERATION_FILE
from ..io import CONFIG_NAME, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME

READ_FILES = (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME, GENERATION_FILE)


def check_roots(roots: Sequence[str | os.PathLike]) -> tuple[Path, ...]:
    """The ``--adapter-root`` folders, resolved once (at start-up, before the model loads).

    Raises:
        LoraError: a root that is not an existing folder.
    """
    resolved = []
    for root in roots:
        path = Path(root).resolve()
        if not path.is_dir():
            raise LoraError(f"--adapter-root {root}: not a folder; pass an existing folder.")
        resolved.append(path)
    return tuple(resolved)


def check_request_folder(path: str, roots: Sequence[Path] = ()) -> Path:
    """The adapter folder a load request names, resolved (links followed, so that what is
    loaded is what was checked), once its files are safe to read.

    Args:
        path: ``lora_path`` as the client sent it.
        roots: the resolved ``--adapter-root`` folders; empty: any folder.

    Raises:
        LoraError: a path that cannot name a file, a folder outside the roots or missing, or
            a file of the adapter that is a link out of the folder or not a regular file.
    """
    shown = brief(path)
    try:
        real = Path(path).resolve()
        inside = not roots or any(real.is_relative_to(root) for root in roots)
        if not inside:
            raise LoraError(
                f"{shown}: outside the folders this server loads adapters from (its "
                "--adapter-root folders); copy the adapter under one of them."
            )
        if not real.is_dir():
            raise LoraError(f"{shown}: not an adapter folder (no such folder).")
        for name in READ_FILES:
            _check_file(real / name, real, roots, shown)
    except LoraError:
        raise
    except (OSError, RuntimeError, ValueError) as error:  # too long, a loop, a NUL, bad UTF-8
        reason = getattr(error, "strerror", None) or "not a valid path"
        raise LoraError(f"{shown}: cannot be read ({reason}).") from None
    if not (real / CONFIG_NAME).is_file():
        raise LoraError(
            f"{shown}: not an adapter folder (no {CONFIG_NAME}). Pass the --output folder of "
            "lorakit train, a checkpoint folder, or a PEFT adapter folder."
        )
    return real


def _check_file(file: Path, real: Path, roots: Sequence[Path], shown: str) -> None:
    """Refuse ``file`` (when present) unless it is a regular file inside the folder or a root."""
    try:
        mode = file.lstat().st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        target = file.resolve()
        if not any(target.is_relative_to(place) for place in (real, *roots)):
            raise LoraError(
                f"{shown}: {file.name} is a symbolic link out of the folder; this server reads "
                "only files inside the adapter folder (or under an --adapter-root). Copy the "
                "file into the folder."
            )
        mode = target.stat().st_mode
    if not stat.S_ISREG(mode):
        raise LoraError(f"{shown}: {file.name} is not a regular file.")
