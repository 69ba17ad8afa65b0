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
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder to write into; on a clean exit it becomes ``target`` at once.

    Files already in ``target`` that the new version does not write are kept. On an
    exception (a full disk, say) ``target`` is untouched and the new folder removed. A file
    at ``target`` is refused (``LoraError``), never replaced.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        # The swap would exchange a folder with the user's file, hiding it under a temp name.
        raise LoraError(f"{target} is a file, not a folder; pass a folder path instead.")
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    new = target.parent / f".{target.name}.new-{uuid.uuid4().hex[:12]}"
    new.mkdir()  # permissions from the umask, like any folder the user makes
    try:
        yield new
        if target.is_dir():
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
