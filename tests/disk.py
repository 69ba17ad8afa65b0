"""A small real disk for full-disk tests: a tmpfs mounted for one test.

Mounting needs root (``mount -t tmpfs``); elsewhere the tests that use it are skipped and the
injected-error tests beside them stand in. Import the fixture into a test module with
``from disk import small_disk  # noqa: F401``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SIZE = 64 * 1024  # bytes: room for configs and logs, not for a model's weights


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on its own 64 KiB tmpfs, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def files_on(root: Path) -> list[str]:
    """Every path under ``root`` (hidden ones too), relative, sorted: what a write left."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
