"""Helpers for tests that run the consumer as a separate process (make run, the README's commands).

A running consumer holds its store alone (store.py: the WAL index lives in its memory), so such a test
learns how many readings it stored from its ``/metrics``, and opens the store file only once it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path


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


class ConsumerProcess:
    """``smartgas-consumer serve`` as a child process on loopback ephemeral ports, its log kept line by line.

    ``async with ConsumerProcess.start(db, *options) as consumer``: started and listening (its CoAP port in
    ``port``); on leaving, killed if it still runs. ``await consumer.logged(pattern)`` waits for a log line.
    """

    LISTENING = re.compile(r"listening on coap://\[127\.0\.0\.1\]:(\d+)")

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.port = 0
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace"))
            self._new_line.set()
        self._new_line.set()

    async def logged(self, pattern: str, timeout_s: float = 60.0, *, after: int = 0) -> re.Match[str]:
        """The first log line from index ``after`` on that matches ``pattern``, waiting at most ``timeout_s``."""
        compiled = re.compile(pattern)
        deadline = asyncio.get_running_loop().time() + timeout_s
        seen = after
        while True:
            for line in self.lines[seen:]:
                if match := compiled.search(line):
                    return match
            seen = len(self.lines)
            if self._reader.done():
                raise AssertionError(f"the consumer exited without logging {pattern!r}: {''.join(self.lines[-20:])}")
            self._new_line.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"no log line {pattern!r} within {timeout_s} s: {''.join(self.lines[-20:])}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_line.wait(), left)

    async def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then its exit code (its log read to the end)."""
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), timeout_s)
        await asyncio.wait_for(self._reader, timeout_s)
        return code

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, db: Path, *options: str, start_timeout_s: float = 120.0) -> AsyncIterator[ConsumerProcess]:
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
        consumer = cls(process)
        try:
            consumer.port = int((await consumer.logged(cls.LISTENING.pattern, start_timeout_s)).group(1))
            yield consumer
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            consumer._reader.cancel()
            await asyncio.gather(consumer._reader, return_exceptions=True)
