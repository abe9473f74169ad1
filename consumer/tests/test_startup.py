"""Start-up refusals and running faults of the consumer as a real process: one line, exit 2, no traceback.

Every path that can be provoked here is: a damaged, foreign, read-only store or directory, a bad fleet
file, a store served by another consumer, a CoAP or HTTP port in use; and, while running, the store's files
made immutable (the fault that used to end in SIGBUS through SQLite's memory-mapped ``-shm``).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from chattr import chattr, chattr_works, immutable  # noqa: F401 (chattr is a fixture)
from running import consumer_process, run_serve

from conftest import EXAMPLES_MAX_AGE_S, wire_example

pytestmark = pytest.mark.integration

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"


def start_refused(*options: str, db: Path) -> str:
    """Run ``serve`` expecting a refusal; return its stderr after checking the exit code and form."""
    result = run_serve(db, *options)
    assert result.returncode == 2, result.stderr
    if "DEBUG" not in options:
        assert "Traceback" not in result.stderr and " ERROR " not in result.stderr, result.stderr
        # Exactly one line says why (INFO log lines of what started before may precede it).
        (line,) = [line for line in result.stderr.splitlines() if " INFO " not in line]
        assert line.startswith("smartgas-consumer: ")
        return line
    return result.stderr


def make_store(db: Path) -> None:
    with consumer_process(db) as consumer:
        assert consumer.stop() == 0


def test_damaged_store(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    make_store(db)
    with sqlite3.connect(db) as connection:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        (root_page,) = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'meters'").fetchone()
    with db.open("r+b") as file:
        file.seek((root_page - 1) * page_size)
        file.write(b"\x5a" * page_size)
    line = start_refused(db=db)
    assert f"--db {db}: " in line and "restore it from a backup" in line


def test_traceback_only_with_debug_logging(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    db.write_bytes(b"not a database, but long enough to look like one " * 100)
    line = start_refused(db=db)
    assert f"--db {db}" in line and "not a SQLite store" in line
    debug = start_refused("--log-level", "DEBUG", db=db)
    assert "Traceback" in debug and "not a SQLite store" in debug


def test_read_only_store(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    make_store(db)
    if os.geteuid() == 0:
        if not chattr_works(tmp_path):
            pytest.skip("root ignores file modes; chattr +i is unavailable here")
        with immutable(db):
            line = start_refused(db=db)
    else:
        db.chmod(0o444)
        line = start_refused(db=db)
    assert f"--db {db}" in line and "writable" in line


def test_read_only_directory(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() == 0:
        if not chattr_works(tmp_path):
            pytest.skip("root ignores directory modes; chattr +i is unavailable here")
        with immutable(directory):
            line = start_refused(db=directory / "store.db")
    else:
        directory.chmod(0o555)
        line = start_refused(db=directory / "store.db")
    assert str(directory) in line and "directory writable" in line


def test_bad_fleet_file(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("clients: [unclosed\n")
    line = start_refused("--fleet", str(fleet), db=tmp_path / "store.db")
    assert str(fleet) in line


def test_fleet_file_naming_an_unknown_gas(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    text = FLEET_FILE.read_text()
    entry = "bottle-0003, site: lyon-gerland, gas: argon,"
    assert entry in text
    fleet.write_text(text.replace(entry, entry.replace("argon", "argn")))
    line = start_refused("--fleet", str(fleet), db=tmp_path / "store.db")
    assert f"{fleet}: meters[2].gas: gas 'argn' is not known; known gases: argon, argon-co2," in line


def test_second_consumer_on_the_store_names_the_first(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    with consumer_process(db) as first:
        line = start_refused(db=db)
        assert f"--db {db}: in use by another consumer (PID {first.pid})" in line
        assert first.running()  # the first one is untouched


def test_second_consumer_on_the_port_is_refused(tmp_path: Path) -> None:
    with consumer_process(tmp_path / "first.db") as first:
        # The later --coap-port wins over serve_command's 0.
        line = start_refused("--coap-port", str(first.coap_port), db=tmp_path / "second.db")
        assert f"--coap-port {first.coap_port}" in line and "in use" in line
        assert first.running()


def test_http_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = start_refused("--http-port", str(port), db=tmp_path / "store.db")
    assert f"--http-port {port}" in line and "in use" in line


async def put(context: aiocoap.Context, port: int, seq: int) -> aiocoap.Message:
    message = aiocoap.Message(
        code=Code.PUT,
        uri=f"coap://127.0.0.1:{port}/meters/m1/reading",
        payload=json.dumps({**wire_example("reading-250bar.json"), "seq": seq}).encode(),
        content_format=50,
    )
    return await asyncio.wait_for(context.request(message).response, timeout=20)


def store_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.name.startswith("store.db"))


@pytest.mark.usefixtures("chattr")
async def test_store_made_immutable_while_running_answers_5_03_then_recovers(tmp_path: Path) -> None:
    # Each file of the store made immutable alone, then all at once, under the running consumer. Before the
    # WAL index moved to heap memory, an immutable -shm killed the consumer with SIGBUS.
    db = tmp_path / "store.db"
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        # The wire example is dated 2026-11-23: the time window is widened for it.
        with consumer_process(db, "--max-reading-age", str(EXAMPLES_MAX_AGE_S)) as consumer:
            port = consumer.coap_port
            assert (await put(context, port, 0)).code == Code.CHANGED
            files = await asyncio.to_thread(store_files, tmp_path)
            seq = 1
            for frozen in [[path] for path in files] + [files]:
                with immutable(*frozen):
                    answer = await put(context, port, seq)
                    assert answer.code in (Code.CHANGED, Code.SERVICE_UNAVAILABLE), (frozen, answer)
                    assert consumer.running(), f"died ({consumer.process.returncode}) with {frozen} immutable"
                seq += answer.code == Code.CHANGED
            with immutable(*files):
                refused = await put(context, port, seq)
                assert refused.code == Code.SERVICE_UNAVAILABLE and b"could not commit" in refused.payload
            assert (await put(context, port, seq)).code == Code.CHANGED  # the fault went away: commits again
            assert consumer.running()
            assert await asyncio.to_thread(consumer.stop) == 0
    finally:
        await context.shutdown()
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT seq FROM readings ORDER BY seq").fetchall() == [(n,) for n in range(seq + 1)]
