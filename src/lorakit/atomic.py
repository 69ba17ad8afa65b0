"""Folders that change all at once: a new version is built beside the target, then swapped in.

A kill -9 or a full disk at any moment leaves the target folder holding the complete old or
the complete new version, never a mixture (an adapter's config from one save next to its
weights from another), and never a temporary file inside it::

    parent/.NAME.new-XXXX/   written and fsynced; files of the old NAME/ it does not
                             replace are hard-linked in, so nothing else in NAME/ is lost
    parent/NAME/  <->  parent/.NAME.new-XXXX/     one atomic exchange (Linux renameat2)
    parent/.NAME.new-XXXX/   now the old version: removed

Where the kernel or file system cannot exchange two paths, the swap is two renames
(NAME -> .NAME.old-XXXX, new -> NAME); a kill between them leaves NAME missing for a moment,
and the next write to NAME puts the old version back. Either way, leftovers of a killed write
are removed by the next write to the same folder (``clean_leftovers``).

A target that is a symbolic link is resolved once, first: the new version is swapped in where
the link points and the link itself is left as it was. The files a write makes get the modes
the process's umask gives any file (``follow_umask``; safetensors alone would make them
owner-only), and every writer reports a full disk in one line (``write_errors``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from .errors import LoraError

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the system cannot (then nothing changed)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder, name))
        _fsync(Path(folder))


def clean_leftovers(target: str | os.PathLike) -> list[Path]:
    """Remove what killed writes to ``target`` left beside it; put back a swapped-out old
    version if a kill came between the two renames of the fallback. Returns what was removed."""
    target = Path(target)
    old = sorted(target.parent.glob(f".{target.name}.old-*"))
    if old and not target.exists():
        old[-1].rename(target)  # the fallback swap was cut after its first rename
        old = old[:-1]
    removed = [*target.parent.glob(f".{target.name}.new-*"), *old]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _link_rest(old: Path, new: Path) -> None:
    """Hard-link everything of ``old`` that ``new`` does not hold (no data is copied)."""
    for entry in old.iterdir():
        if (new / entry.name).exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=os.link)
        else:
            os.link(entry, new / entry.name, follow_symlinks=False)


def resolve_link(target: Path) -> Path:
    """``target`` with a symbolic link at its end followed (once), so a swap happens where
    the link points instead of exchanging the link itself.

    Raises:
        LoraError: a link that leads in a loop.
    """
    if not target.is_symlink():
        return target
    try:
        return target.resolve()
    except (OSError, RuntimeError) as err:  # a loop of links
        raise LoraError(
            f"{target} is a symbolic link that leads nowhere ({err}); fix or remove it."
        ) from None


@contextmanager
def atomic_folder(target: str | os.PathLike, keep_rest: bool = True) -> Iterator[Path]:
    """Yield an empty folder to write into; on a clean exit it becomes ``target`` at once.

    Files already in ``target`` that the new version does not write are kept (unless
    ``keep_rest`` is false: then the new version replaces the folder whole). On an exception
    (a full disk, say) ``target`` is untouched and the new folder removed. A file at
    ``target`` is refused (``LoraError``), never replaced; a symbolic link is written through.
    """
    target = resolve_link(Path(target))
    if target.exists() and not target.is_dir():
        # The swap would exchange a folder with the user's file, hiding it under a temp name.
        raise LoraError(f"{target} is a file, not a folder; pass a folder path instead.")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    new = target.parent / f".{target.name}.new-{uuid.uuid4().hex[:12]}"
    new.mkdir()  # permissions from the umask, like any folder the user makes
    try:
        yield new
        follow_umask(new)  # before the old files are linked in: those keep their modes
        if target.is_dir():
            os.chmod(new, target.stat().st_mode & 0o7777)  # the folder keeps its own mode
            if keep_rest:
                _link_rest(target, new)
        _fsync_tree(new)
        if not target.exists():
            new.rename(target)
        elif _exchange(new, target):
            shutil.rmtree(new)  # the old version, now at the temporary name
        else:
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            target.rename(old)
            new.rename(target)
            shutil.rmtree(old)
        _fsync(target.parent)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


# --- file modes ----------------------------------------------------------------------------------
def process_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only set it, and
    setting it even for a moment would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (not Linux): the only other way to read it
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike) -> None:
    """Give ``root`` (a file, or a folder and everything in it) the modes a plain ``open`` or
    ``mkdir`` would: 0o666 (0o777 for folders and executables) less the umask.

    safetensors writes through an owner-only temporary file (mode 0o600) and ``tempfile``
    makes owner-only folders, so without this another user or a serving container could read
    everything lorakit writes but its weights. Symbolic links are left alone.
    """
    mask = process_umask()
    paths = [Path(root)]
    for folder, dirs, files in os.walk(root):  # nothing for a file; links are not followed
        paths += [Path(folder, name) for name in (*dirs, *files)]
    for path in paths:
        if not path.is_symlink():
            executable = path.is_dir() or os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


# --- errors of writing -------------------------------------------------------------------------
# What safetensors (0.4+) says of an I/O error: "... I/O error: No space left on device (os error 28)"
_SAFETENSORS_IO = re.compile(r"I/O error: (.*?) \(os error \d+\)")


def _write_problem(error: BaseException) -> str | None:
    """The system's words for why a write failed (``No space left on device``, ``Disk quota
    exceeded``, ``Permission denied``); ``None`` for an error that is no failed write (a bug)."""
    if isinstance(error, SafetensorError):
        found = _SAFETENSORS_IO.search(str(error))
        return found.group(1) if found else None
    return error.strerror or str(error)


@contextmanager
def write_errors(what: str, then: str) -> Iterator[None]:
    """Errors of writing ``what`` as one ``LoraError`` line: ``Could not write {what}
    ({problem}){then}``.

    Every writer of lorakit's files goes through this, so a full disk (``ENOSPC``,
    ``EDQUOT``, and safetensors' own ``SafetensorError``, which is no ``OSError``), a
    read-only mount or a missing permission reads the same everywhere and never as a
    traceback. Put it outside :func:`atomic_folder`, so the half-written folder is gone first.

    Args:
        what: what was being written, and where (``"the checkpoint runs/a/checkpoints/step-4"``).
        then: the rest of the sentence: what is kept and how to go on, starting with its own
            punctuation (``"; what was there is unchanged. Free space, then run again."``).
    """
    try:
        yield
    except (OSError, SafetensorError) as error:
        problem = _write_problem(error)
        if problem is None:
            raise
        raise LoraError(f"Could not write {what} ({problem}){then}") from error
