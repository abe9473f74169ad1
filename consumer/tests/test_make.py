"""The repository's Makefile as a user runs it: what ``make deps`` installs, what ``make test`` resolves to."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")

pytestmark = pytest.mark.skipif(MAKE is None, reason="make is not installed")


def test_deps_installs_missing_debian_packages_without_recommends(tmp_path: Path) -> None:
    # Stand-ins for sudo and apt-get that record what they were asked: a test must not install system
    # packages. PATH holds nothing else, so every tool counts as missing.
    calls = tmp_path / "calls"
    for name, body in (("apt-get", f'echo "apt-get $*" >> {calls}'), ("sudo", 'exec "$@"')):
        script = tmp_path / name
        script.write_text(f"#!/bin/bash\n{body}\n")
        script.chmod(0o755)
    assert MAKE is not None
    result = subprocess.run(
        [MAKE, "--no-print-directory", "deps"],
        cwd=REPO,
        env={"PATH": str(tmp_path), "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    install = [line for line in calls.read_text().splitlines() if " install " in line]
    assert len(install) == 1
    words = install[0].split()
    assert "--no-install-recommends" in words
    packages = {word for word in words[words.index("install") + 1 :] if not word.startswith("-")}
    assert {"libcoap3-bin", "docker-compose", "chromium", "fonts-liberation"} <= packages
    # The README names every package make test installs, and no other.
    readme = (REPO / "README.md").read_text()
    sentence = " ".join(readme.split("`make test` installs Debian's", 1)[1].split(" with `apt-get`", 1)[0].split())
    named = set(re.findall(r"`([a-z0-9.+-]+)`", sentence))
    assert named == packages, (named, packages)
