"""The run folder ``lorakit train`` writes, and the one reader of the settings saved in it.

::

    OUTPUT/
      train_config.yaml        the run's resolved settings: write_run_config, read_run_config
      adapter_model.safetensors, adapter_config.json, ...   the adapter (OUTPUT/NAME per task)
      metrics.jsonl, loss.png
      checkpoints/step-N/      adapter, train_config.yaml, state (lorakit.training.checkpoint)
      checkpoints/.step-N.*    what a killed write left: clean_checkpoints

Every reader of a run's saved settings (``--resume``, the check before a resume, ``lorakit
merge`` looking up ``quantize``) calls :func:`read_run_config`, so a damaged file gives the
same error everywhere. This module knows the folder's layout, not :class:`TrainConfig`: it
reads and writes plain mappings, and ``lorakit.training.config`` (which imports this module,
never the other way) builds the config from them.

One run writes to an output at a time: :func:`claim_output` holds ``.OUTPUT.lock`` beside
the folder (an ``flock``, so a killed run's lock is free again; the file names the holder's
pid), and refuses a folder that holds another run (unless resumed or ``--overwrite``) or
files of another kind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..atomic import atomic_folder, clean_leftovers, resolve_link, write_errors
from ..errors import LoraError, brief
from ..generate import GENERATION_FILE, GenerationSettings, save_generation_settings
from ..io import CONFIG_NAME, WEIGHTS_NAME, write_adapter_files
from .metrics import METRICS_FILE, PLOT_FILE

CONFIG_FILE = "train_config.yaml"  # the resolved config, in the output and each checkpoint
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.safetensors"
# lorakit 0.1 wrote checkpoint states with torch.save (a pickle) to this name; they are still
# found, and read without unpickling code (lorakit.training.checkpoint._read_0_1_state).
STATE_FILE_0_1 = "state.pt"
# What killed writes leave in OUTPUT/checkpoints: atomic_folder's .step-N.new-*/.old-* and a
# pruned .step-N.pruned-*.
_LEFTOVER = re.compile(r"\.step-(\d+)(\.new-|\.old-|\.pruned-).*")
# lorakit 0.1 wrote each checkpoint to a temporary .step-N-* and renamed it; a killed 0.1 run
# can leave one behind, so the folders of runs started with 0.1 may still hold them.
_LEFTOVER_0_1 = re.compile(r"\.step-(\d+)-.*")

# The fix for a damaged settings file: every copy in a run holds the same settings.
_RESTORE = (
    f"It records the settings of a lorakit train run: restore it from another copy (the run's "
    f"OUTPUT/{CONFIG_FILE} and every checkpoint hold one)."
)


# A run's settings are some fifty values; these bounds are far above any real file and far
# below what hurts. PyYAML expands aliases as it builds objects, so 500 bytes of nested
# aliases ("billion laughs") stand for gigabytes, and its composer recurses once per level.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64


class _Unbounded(yaml.YAMLError):
    """A YAML document past :data:`MAX_YAML_VALUES` or :data:`MAX_YAML_DEPTH`."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python objects) that counts values with aliases expanded
    and refuses a document past the bounds before anything is built from it."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values: dict[int, int] = {}  # id(node) -> values it stands for, aliases expanded
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Unbounded(f"its values nest more than {MAX_YAML_DEPTH} levels deep")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._values:  # an alias gives back a node already counted
            children = node.value if isinstance(node.value, list) else []
            flat = [n for c in children for n in (c if isinstance(c, tuple) else (c,))]
            self._values[id(node)] = 1 + sum(self._values.get(id(c), 1) for c in flat)
        if self._values[id(node)] > MAX_YAML_VALUES:
            raise _Unbounded(
                f"with its aliases (*name) expanded it holds more than {MAX_YAML_VALUES:,} "
                "values, which no settings file needs (an alias bomb?)"
            )
        return node


def read_yaml_mapping(path: Path, fix: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path``, keys with ``-`` read as ``_`` (an empty file: {}).

    Args:
        path: the file.
        fix: the sentence that ends each error, saying what to do.

    Raises:
        LoraError: the file cannot be read (or is not text), is not YAML, expands past
            :data:`MAX_YAML_VALUES` values or nests deeper than :data:`MAX_YAML_DEPTH`, or
            does not hold a mapping.
    """
    try:
        loaded = yaml.load(path.read_text(), Loader=_BoundedLoader) or {}
    except (OSError, UnicodeDecodeError) as error:  # no permission; bytes that are not text
        reason = getattr(error, "strerror", None) or error
        raise LoraError(f"Cannot read {path} ({reason}). {fix}") from None
    except (_Unbounded, RecursionError) as error:
        raise LoraError(f"{path} is refused: {error}. {fix}") from None
    except yaml.YAMLError as error:
        raise LoraError(f"{path} is not valid YAML: {error}\n{fix}") from None
    if not isinstance(loaded, dict):
        raise LoraError(f"{path} must hold a mapping of keys to values. {fix}")
    return {str(key).replace("-", "_"): value for key, value in loaded.items()}


def read_run_config(folder: str | Path, required: bool = True) -> dict[str, Any] | None:
    """The settings a run saved in ``folder/train_config.yaml``, as written (not validated).

    Args:
        folder: a run's output folder or one of its checkpoints.
        required: whether a missing file is an error; otherwise it gives ``None`` (a folder
            lorakit train did not write, such as a PEFT adapter's).

    Raises:
        LoraError: the file is damaged (unreadable, not YAML, not a mapping), or missing
            when ``required``.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        if not required:
            return None
        raise LoraError(
            f"{path} not found: {folder} holds no settings of a lorakit train run. Pass a "
            f"folder OUTPUT/{CHECKPOINTS}/step-N it wrote, or its OUTPUT folder."
        )
    return read_yaml_mapping(path, _RESTORE)


def write_run_config(settings: Mapping[str, Any], folder: Path) -> None:
    """``folder/train_config.yaml`` holding ``settings``, written to a temporary name and renamed.

    ``settings`` is a resolved config as a mapping (``TrainConfig.to_dict()``); keys keep
    their order, so the file reads like ``lorakit train --help``.

    Raises:
        OSError: the file cannot be written (the caller says what was being written).
    """
    path = folder / CONFIG_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(dict(settings), sort_keys=False))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk must leave no half file behind


def has_state(folder: Path) -> bool:
    """Whether ``folder`` holds a checkpoint's training state (this format or lorakit 0.1's)."""
    return (folder / STATE_FILE).is_file() or (folder / STATE_FILE_0_1).is_file()


def checkpoint_steps(folder: Path) -> list[tuple[int, Path]]:
    """``(N, folder/step-N)`` for each complete checkpoint in ``folder``, oldest first."""
    found = []
    for path in folder.glob("step-*"):
        suffix = path.name.removeprefix("step-")
        if path.is_dir() and suffix.isdigit() and has_state(path):
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: ``path`` itself, or the newest one inside an output folder.

    Raises:
        LoraError: if ``path`` holds no checkpoint.
    """
    path = Path(path)
    if has_state(path):
        return path
    for folder in (path / CHECKPOINTS, path):
        steps = checkpoint_steps(folder) if folder.is_dir() else []
        if steps:
            return steps[-1][1]
    raise LoraError(
        f"No checkpoint found in {path}: pass a folder OUTPUT/{CHECKPOINTS}/step-N written by "
        "lorakit train with --save-every, or its OUTPUT folder."
    )


def clean_checkpoints(output: str | Path) -> list[Path]:
    """Remove what killed runs left in ``output/checkpoints``; return what was removed.

    A checkpoint cut between the two renames of a non-atomic swap is put back first
    (``atomic.clean_leftovers``); every other hidden leftover, lorakit 0.1's included, is
    deleted.
    """
    root = Path(output) / CHECKPOINTS
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for step in sorted({m.group(1) for p in root.iterdir() if (m := _LEFTOVER.fullmatch(p.name))}):
        removed += clean_leftovers(root / f"step-{step}")
    for path in root.iterdir():
        if _LEFTOVER.fullmatch(path.name) or _LEFTOVER_0_1.fullmatch(path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def save_adapter_folder(
    model: nn.Module, folder: Path, name: str, settings: GenerationSettings
) -> None:
    """Adapter ``name`` of ``model`` and its generation settings, swapped into ``folder`` as
    one unit (a kill leaves the old folder or the new one).

    Raises:
        LoraError: the folder cannot be written (a full disk, no permission); what was there
            before is unchanged.
    """
    then = (
        "; what was there before is unchanged. Free space, then run again (with --resume "
        "OUTPUT if the run saved checkpoints)."
    )
    with write_errors(f"the adapter to {folder}", then), atomic_folder(folder) as new:
        write_adapter_files(model, new, name)
        save_generation_settings(settings, new)


# --- the output, held by one run ----------------------------------------------------------------
# What a run of lorakit train writes in OUTPUT besides train_config.yaml and its adapters:
# a folder holding only these (and hidden files) is what a killed run left, not another kind.
# (tensorboard, wandb, mlruns: the trackers' folders, lorakit.training.trackers).
_RUN_LOGS = {CHECKPOINTS, METRICS_FILE, PLOT_FILE, "tensorboard", "wandb", "mlruns"}
_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, GENERATION_FILE}


def check_output(output: Path) -> None:
    """``--output`` must be a folder we can create or write, found before any model loads.

    Raises:
        LoraError: a file, or a folder (or the nearest existing parent) we cannot write.
    """
    if output.exists() and not output.is_dir():
        raise LoraError(f"--output {output} is a file; pass a folder (it is created if missing).")
    existing = next(p for p in (output, *output.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LoraError(
            f"--output {output}: cannot write in {existing} (no permission, or not a folder); "
            "choose a folder you can write to."
        )


@contextmanager
def claim_output(
    output: str | Path, *, resume: str | None = None, overwrite: bool = False
) -> Iterator[Path]:
    """Hold ``output`` for one run of ``lorakit train``; yields the folder, links resolved.

    The lock is ``.OUTPUT.lock`` beside the folder (so swapping the folder in whole never
    moves it), held with ``flock`` for as long as the ``with`` lasts: a second run on the same
    folder is refused naming the holder's pid, and the lock of a killed run is free at once
    (the kernel drops it with the process) and taken over.

    Args:
        output: the run's ``--output``.
        resume: the run's ``--resume``: a folder holding an earlier run may be written when
            the run resumed is that one.
        overwrite: an earlier run in ``output`` will be replaced (:func:`start_run_folder`).

    Raises:
        LoraError: see :func:`check_output`; ``output`` holds another run (and neither
            ``resume`` of it nor ``overwrite``) or files lorakit train does not write; another
            process holds the lock.
    """
    check_output(Path(output))
    try:
        folder = Path(output).resolve()  # every spelling of one folder takes the same lock
    except (OSError, RuntimeError) as err:  # a loop of symbolic links
        raise LoraError(f"--output {output} cannot be followed ({err}); fix the link.") from None
    _check_previous(folder, output, resume, overwrite)
    lock = folder.parent / f".{folder.name}.lock"
    # The folders made for the lock go with it when the run wrote nothing (a refused run
    # leaves no trace).
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    fd = None
    try:
        with write_errors(
            f"the lock file {lock}", ". Choose an --output in a folder you can write."
        ):
            fd = _lock(lock, output)
        yield folder
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)  # while still held: see _lock
            os.close(fd)
        for path in made:
            with contextlib.suppress(OSError):  # not empty: the run's files are there
                path.rmdir()


def _lock(path: Path, output: str | Path) -> int | None:
    """An open, ``flock``-ed ``path`` holding this process's pid (``None`` where the system
    has no ``flock``: Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 20).decode(errors="replace").strip()
            os.close(fd)
            holder = f"pid {pid}" if pid.isdigit() else "a process just starting"
            raise LoraError(
                f"--output {output} is in use: another lorakit train ({holder}) is writing to "
                "it. Wait for it to end (or stop it), or choose another --output."
            ) from None
        # A run that ended between our open and our flock removed the file it held: ours is
        # then a file no other run can see, so open the path again.
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:  # a full disk: not even a pid fits
        path.unlink(missing_ok=True)
        os.close(fd)
        raise
    return fd


def _check_previous(folder: Path, output: str | Path, resume: str | None, overwrite: bool) -> None:
    """Refuse ``folder`` (``output`` resolved) when it holds another run (unless it is resumed
    or overwritten) or files lorakit train does not write."""
    listed = folder.iterdir() if folder.is_dir() else ()
    names = {path.name for path in listed if not path.name.startswith(".")}
    steps = checkpoint_steps(folder / CHECKPOINTS) if CHECKPOINTS in names else []
    if CONFIG_FILE not in names and not steps:
        _refuse_others(output, names - _RUN_LOGS, "holds no run of lorakit train")
        return
    resumed = Path(resume).resolve() if resume is not None else None
    if resumed is not None and folder in (resumed, *resumed.parents):
        return
    if overwrite:
        _refuse_others(output, names - _run_names(folder), "holds files no run writes")
        return
    if any(folder.glob(CONFIG_NAME)) or any(folder.glob(f"*/{CONFIG_NAME}")):
        state, go_on = "finished: its adapter is written", ""
    elif steps:
        state = f"interrupted: its last checkpoint is step {steps[-1][0]}"
        go_on = f"continue it with --resume {output}, "
    else:
        state, go_on = "stopped before its first checkpoint", ""
    raise LoraError(
        f"--output {output} holds an earlier run of lorakit train ({state}), which a new run "
        f"would mix with its own. To go on, {go_on}replace it with --overwrite, or choose a "
        "new --output."
    )


def _refuse_others(output: str | Path, others: set[str], what: str) -> None:
    if others:
        shown = ", ".join(brief(name) for name in sorted(others)[:5])
        more = f" and {len(others) - 5} more" if len(others) > 5 else ""
        raise LoraError(
            f"--output {output} {what}: it holds {shown}{more}, which lorakit train would mix "
            "with its own files. Pass a new or empty folder (or move those out)."
        )


def _run_names(folder: Path) -> set[str]:
    """Every name a run of lorakit train writes in its output (tasks' adapter folders too)."""
    try:
        saved = read_run_config(folder) or {}
    except LoraError:  # damaged: replaced whole anyway; its task folders are then unknown
        saved = {}
    tasks = saved.get("tasks") if isinstance(saved.get("tasks"), list) else []
    return {CONFIG_FILE, *_RUN_LOGS, *_ADAPTER_FILES, *(str(t).split("=")[0] for t in tasks)}


def start_run_folder(output: Path, settings: Mapping[str, Any], replace: bool = False) -> None:
    """Make ``output`` ready for a run and write its settings there (``train_config.yaml``).

    With ``replace`` (``--overwrite``), what an earlier run left is swapped out for an empty
    folder first, as one unit: a kill leaves the old run or the new, empty one. It is called
    once the model has loaded, so a run refused on its inputs loses nothing.

    Raises:
        LoraError: the folder cannot be written (a full disk, no permission).
    """
    folder = resolve_link(output)  # a link, dangling until now, is written through
    with write_errors(f"the run's settings to {output}", ". Free space, then run again."):
        if replace and folder.is_dir() and any(folder.iterdir()):
            with atomic_folder(folder, keep_rest=False):
                pass
        folder.mkdir(parents=True, exist_ok=True)
        write_run_config(settings, folder)
