"""The ``smartgas-consumer`` console script as a user meets it: ``--help`` everywhere, the README's command list."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smartgas_consumer.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def console_script() -> str:
    """The installed ``smartgas-consumer`` entry point, next to this interpreter."""
    found = shutil.which("smartgas-consumer", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("smartgas-consumer is not installed as a console script (pip install -e .)")
    return found


def subcommands() -> list[str]:
    """Every subcommand the parser knows, so a new one is covered without editing this test."""
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(name for action in actions for name in action.choices)


def test_the_parser_has_the_documented_subcommands() -> None:
    assert subcommands() == ["hash-key", "healthcheck", "serve", "setup", "status"]


@pytest.mark.parametrize("command", [[], *[[name] for name in subcommands()]], ids=lambda c: " ".join(c) or "top")
def test_help_of_every_command_prints_usage_and_exits_0(command: list[str]) -> None:
    # Through the real console script, as a user types it (a % in a help text once crashed every --help).
    result = subprocess.run(
        [console_script(), *command, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"usage: smartgas-consumer {' '.join(command)}".rstrip())


def test_help_shows_a_percent_sign_literally() -> None:
    result = subprocess.run(
        [console_script(), "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert "this % of the bottle's nominal filling pressure" in " ".join(result.stdout.split())


def test_readme_lists_every_subcommand() -> None:
    block = README.read_text().split("## Commands", 1)[1].split("```")[1]
    listed = sorted(set(re.findall(r"^smartgas-consumer ([a-z-]+)", block, flags=re.MULTILINE)))
    assert listed == subcommands()
