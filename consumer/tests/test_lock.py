"""The full lock of the Python dependency tree (constraints.lock, made by `make lock`) is whole and current.

constraints.txt pins the direct dependencies; constraints.lock pins every package of the tree and is what
the Makefile, the Dockerfiles and CI install with. These tests fail, saying to run `make lock`, when the
two disagree or when a package the installed tree needs is missing from the lock.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
FIX = "run `make lock` and commit constraints.lock"
#: This repository's own packages: installed from their folders (editable, or in the images from the
#: copied source), so never pinned in the lock; their dependencies are.
OWN_PACKAGES = {"smartgas-common", "smartgas-consumer", "smartgas-publisher"}

pytestmark = pytest.mark.skipif(
    not (REPO / "constraints.txt").is_file(),
    reason="constraints.txt is not in this tree (the image build has the lock only)",
)


def pins(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, separator, version = line.partition("==")
            assert separator, f"{path.name}: {line!r} is not an exact pin"
            found[canonical(name)] = version.strip()
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_direct_pin_is_in_the_lock_at_the_same_version() -> None:
    direct, locked = pins(REPO / "constraints.txt"), pins(REPO / "constraints.lock")
    differ = {name: (version, locked.get(name)) for name, version in direct.items() if locked.get(name) != version}
    assert not differ, f"constraints.txt and constraints.lock disagree (pin, lock): {differ}; {FIX}"


def test_the_lock_covers_the_whole_installed_tree() -> None:
    """Every distribution the two packages need, with their test extras, transitively, is pinned."""
    locked = pins(REPO / "constraints.lock")
    wanted: list[tuple[str, set[str]]] = []
    for package in ("smartgas-consumer", "smartgas-publisher"):
        try:
            metadata.distribution(package)
        except metadata.PackageNotFoundError:
            continue  # an image holds one of the two
        wanted.append((package, {"test"}))
    assert wanted
    seen: set[str] = set()
    missing: set[str] = set()
    while wanted:
        name, extras = wanted.pop()
        if canonical(name) in seen:
            continue
        seen.add(canonical(name))
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            environment = [{"extra": extra} for extra in extras or {""}]
            if requirement.marker is not None and not any(requirement.marker.evaluate(env) for env in environment):
                continue
            dependency = canonical(requirement.name)
            if dependency not in locked and dependency not in OWN_PACKAGES:
                missing.add(dependency)
            wanted.append((requirement.name, set(requirement.extras)))
    assert len(seen) > 20  # the walk really went through the tree
    assert not missing, f"not in constraints.lock: {sorted(missing)}; {FIX}"
