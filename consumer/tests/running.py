"""Helpers for tests that run the consumer as a separate process (make run, the README's commands, MQTT).

A running consumer holds its store alone (store.py: the WAL index lives in its memory), so such a test
learns how many readings it stored from its ``/metrics``, and opens the store file only once it stopped.
``consumer_process`` starts one (any options) and finds its HTTP port in its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

HTTP_LISTENING = re.compile(rb"HTTP API on http://127\.0\.0\.1:(\d+)/api")
#: How long a consumer process may take to start on a loaded 2-core machine.
START_TIMEOUT_S = 60.0


@dataclass
class ConsumerProcess:
    process: asyncio.subprocess.Process
    http_port: int
    log: bytearray

    def metric(self, name: str) -> float:
        return metric_value(self.http_port, name)


def metric_value(http_port: int, name: str) -> float:
    """One sample of the consumer's ``/metrics`` (a full line start, labels included); 0 until it answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.asynccontextmanager
async def consumer_process(db: Path, *options: str) -> AsyncIterator[ConsumerProcess]:
    """``smartgas-consumer serve`` on loopback ephemeral ports with the store ``db``; killed (SIGKILL) on
    exit unless the test stopped it. Its log is kept in ``log`` (read all along, so no pipe fills up)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smartgas_consumer",
        "serve",
        "--coap-host",
        "127.0.0.1",
        "--coap-port",
        "0",
        "--http-port",
        "0",
        "--db",
        str(db),
        *options,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr = process.stderr
    log = bytearray()
    found: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def read_log() -> None:
        while line := await stderr.readline():
            log.extend(line)
            if not found.done() and (match := HTTP_LISTENING.search(line)):
                found.set_result(int(match.group(1)))
        if not found.done():
            found.set_exception(AssertionError(f"the consumer exited before it served: {log.decode()[-2000:]}"))

    reader = asyncio.create_task(read_log())
    try:
        http_port = await asyncio.wait_for(found, timeout=START_TIMEOUT_S)
        yield ConsumerProcess(process, http_port, log)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.wait_for(reader, timeout=START_TIMEOUT_S)


def stored_per_metrics(http_port: int) -> int:
    """Readings the consumer on ``http_port`` stored since it started (0 until it answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("smartgas_readings_stored_total "):
            return int(float(line.split()[1]))
    return 0


def stored_in_file(db: Path) -> int:
    """Readings in the store file of a consumer that has stopped (0 if there is none yet)."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as connection:
        count: int = connection.execute("SELECT count(*) FROM readings").fetchone()[0]
    return count
