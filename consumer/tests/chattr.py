"""Real storage faults for tests: ``chattr +i`` makes a file or directory immutable, even for root.

Root ignores file modes, so a chmod cannot make a store read-only for a test run as root; the immutable
flag can. Tests that need it use the ``chattr`` fixture and skip by name where it is unavailable (not root,
or a filesystem without the flag).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def chattr_works(directory: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        return False
    probe = directory / "chattr-probe"
    probe.touch()
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            return False
        subprocess.run(["chattr", "-i", str(probe)], check=True)
        return True
    finally:
        probe.unlink()


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """Make files or directories immutable for the duration of the block."""
    done: list[Path] = []
    try:
        for path in paths:
            subprocess.run(["chattr", "+i", str(path)], check=True)
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.fixture
def chattr(tmp_path: Path) -> None:
    if not chattr_works(tmp_path):
        pytest.skip("chattr +i needs root and a filesystem with the immutable flag")
