"""The ``smartgas-consumer`` console script as a user meets it: ``--help`` everywhere, the README's command list."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from smartgas_consumer.cli import build_parser
from smartgas_consumer.reading import parse_reading
from smartgas_consumer.status import NOT_SHIPPING
from smartgas_consumer.store import ReadingStore

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
    assert subcommands() == [
        "hash-key",
        "healthcheck",
        "provision-meter",
        "provision-meters",
        "revoke-meter",
        "serve",
        "setup",
        "status",
    ]


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


def test_help_names_each_value_after_its_setting_not_its_first_word() -> None:
    """``--mqtt-broker MQTT`` and ``--device-credentials DEVICE`` told a newcomer nothing (the value was named
    by the setting's first word, shared by a whole family of settings)."""
    serve = next(
        action.choices["serve"] for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)
    )
    metavars = {action.option_strings[0]: action.metavar for action in serve._actions if action.option_strings}
    assert metavars["--mqtt-broker"] == "BROKER"
    assert metavars["--device-credentials"] == "CREDENTIALS"
    assert metavars["--group-window-ms"] == "MS"
    assert metavars["--workers"] == "WORKERS"


def test_readme_lists_every_subcommand() -> None:
    block = README.read_text().split("## Commands", 1)[1].split("```")[1]
    listed = sorted(set(re.findall(r"^smartgas-consumer ([a-z-]+)", block, flags=re.MULTILINE)))
    assert listed == subcommands()


# ---- status


async def make_store(path: Path, readings: int) -> None:
    """A real store with ``readings`` readings of one meter, none shipped."""
    store = ReadingStore(path)
    await store.open()
    try:
        for seq in range(readings):
            body = {"seq": seq, "ts": "2026-11-23T08:00:00Z", "pressure_bar": 200, "temperature_c": 15, "volume_l": 50}
            await store.add(parse_reading("m1", body), 400.0, datetime.now(UTC))
    finally:
        await store.close()


def run_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMARTGAS_CONSUMER_")}
    return subprocess.run(
        [console_script(), "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**environ, **(env or {})},
    )


async def test_status_without_elasticsearch_reports_no_shipping_lag(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    await make_store(db, 3)
    result = run_status("--db", str(db))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["readings"], report["meters"]) == (3, 1)
    assert "pending" not in report and "oldest_pending_received_at" not in report
    assert report["shipping_lag"] == NOT_SHIPPING


async def test_status_with_elasticsearch_reports_what_waits_to_be_shipped(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    await make_store(db, 3)
    # Only the setting matters: status reads the store and never contacts Elasticsearch.
    result = run_status("--db", str(db), env={"SMARTGAS_CONSUMER_ELASTICSEARCH_URL": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["pending"] == 3
    assert report["shipping_lag"].startswith("pending=3 oldest_pending_age=")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "no SmartGas store there (no such file)"),
        (b"", "not a SmartGas store"),
        (b"hello, not a database at all" * 100, "not a SmartGas store (file is not a database)"),
        ("other-sqlite", "not a SmartGas store (no SmartGas tables in it)"),
    ],
    ids=["missing", "empty", "text", "other-sqlite"],
)
def test_status_on_a_path_that_is_not_a_store_exits_2_naming_it_and_creates_nothing(
    tmp_path: Path, content: bytes | str | None, words: str
) -> None:
    db = tmp_path / "typo.db"
    if content == "other-sqlite":
        with contextlib.closing(sqlite3.connect(db)) as connection:
            connection.execute("CREATE TABLE notes (text TEXT)")
    elif isinstance(content, bytes):
        db.write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    original = db.read_bytes() if db.exists() else None
    result = run_status("--db", str(db))
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"--db {db}" in result.stderr and words in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created (no store, no -wal)
    assert (db.read_bytes() if db.exists() else None) == original
