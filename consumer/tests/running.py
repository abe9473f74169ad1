"""Helpers for tests that run the consumer as a separate process: start one on ephemeral ports and learn them.

A running consumer holds its store alone (store.py: the WAL index lives in its memory), so such a test
learns how many readings it stored from its ``/metrics``, and opens the store file only once it stopped.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


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


def stored_per_metrics(http_port: int) -> int:
    """Readings the consumer on ``http_port`` stored since it started (0 until it answers)."""
    return int(metric_value(http_port, "smartgas_readings_stored_total"))


def stored_in_file(db: Path) -> int:
    """Readings in the store file of a consumer that has stopped (0 if there is none yet)."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as connection:
        count: int = connection.execute("SELECT count(*) FROM readings").fetchone()[0]
    return count


# ---- the consumer as a process ----------------------------------------------------------------------

COAP_LISTENING = re.compile(r"listening on coap://\[127\.0\.0\.1\]:(\d+)")
HTTP_LISTENING = re.compile(r"HTTP API on http://127\.0\.0\.1:(\d+)/api")
#: How long a consumer may take to listen: CoolProp's import and the gas models take seconds on a loaded
#: 2-core machine, where everything runs 5–10 times slower than idle.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def serve_command(db: Path, *options: str) -> list[str]:
    """``smartgas-consumer serve`` on loopback, both ports chosen by the kernel, on the store ``db``."""
    return [
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
    ]


def run_serve(db: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``serve`` to its end (a refusal at start: the callers check the exit code and the line)."""
    return subprocess.run(
        serve_command(db, *options), capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False, env=env
    )


@dataclass
class ConsumerProcess:
    """A consumer started by ``consumer_process``: its process, the ports it listens on (``coap_port`` 0 with
    ``--coap-enabled false``), its log file."""

    process: subprocess.Popen[bytes]
    coap_port: int
    http_port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        return metric_value(self.http_port, name)

    @property
    def lines(self) -> list[str]:
        """Its log so far, line by line (an index into it is a mark for ``logged(after=)``)."""
        return self.log().splitlines()

    def logged(self, pattern: str, timeout_s: float = START_TIMEOUT_S, *, after: int = 0) -> re.Match[str]:
        """The first log line from index ``after`` on that matches ``pattern``, waiting at most ``timeout_s``
        (an async test runs this in a thread)."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            lines = self.lines
            for line in lines[after:]:
                if match := compiled.search(line):
                    return match
            tail = "\n".join(lines[-20:])
            assert self.running(), f"the consumer exited without logging {pattern!r}:\n{tail}"
            assert time.monotonic() < deadline, f"no log line {pattern!r} within {timeout_s} s:\n{tail}"
            time.sleep(0.05)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, signum: signal.Signals = signal.SIGTERM) -> int:
        """Ask it to stop (``signum``) and return its exit code; an async test runs this in a thread."""
        self.process.send_signal(signum)
        return self.process.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def consumer_process(db: Path, *options: str, env: dict[str, str] | None = None) -> Iterator[ConsumerProcess]:
    """A consumer process on ``db`` until the block ends (then stopped, killed if it does not stop).

    Its log goes to a file beside the store, not a pipe: nobody has to drain it, and a failing test can
    print it.
    """
    # consumer-<store>-<n>.log: one per start, and no name the store's own files (store.db*) could take.
    coap_enabled = "--coap-enabled false" not in " ".join(options)
    log_path = db.parent / f"consumer-{db.name}-{len(list(db.parent.glob(f'consumer-{db.name}-*.log')))}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(serve_command(db, *options), stderr=log_file, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            text = log_path.read_text(errors="replace")
            coap, http = COAP_LISTENING.search(text), HTTP_LISTENING.search(text)
            if http and (coap or not coap_enabled):
                break
            assert process.poll() is None, f"the consumer exited ({process.returncode}) before it listened:\n{text}"
            assert time.monotonic() < deadline, f"the consumer did not listen within {START_TIMEOUT_S} s:\n{text}"
            time.sleep(0.05)
        yield ConsumerProcess(process, int(coap.group(1)) if coap else 0, int(http.group(1)), log_path)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
