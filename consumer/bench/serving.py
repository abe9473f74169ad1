"""A server process for a benchmark: started on loopback ephemeral ports, its ports read from its log.

Shared by the benchmark scripts (``bench_compare.py``, ``bench_ingest.py``, ``bench_mqtt.py``,
``bench_workers.py``, ``bench_flood.py``, and the publisher's ``bench_scale.py``), which import it as a
sibling module (the publisher's puts this folder on its path); the tests have their own helper
(``consumer/tests/running.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

COAP_LISTENING = re.compile(r"listening on coap://\[127\.0\.0\.1\]:(\d+)")
HTTP_LISTENING = re.compile(r"HTTP API on http://127\.0\.0\.1:(\d+)/api")
#: A consumer builds its gas models at start (CoolProp): seconds, more on a loaded machine.
START_TIMEOUT_S = 120.0
#: Clock ticks per second of /proc/PID/stat's CPU times.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far: what it spent, whatever else shares the cores."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def stat_cpu_seconds(stat_path: Path) -> float:
    """User and system CPU time in a process's or a thread's ``/proc/.../stat`` (``.../task/TID/stat``)."""
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def metrics_text(http_port: int) -> str:
    """A consumer's ``/metrics`` (Prometheus text format) on its loopback HTTP port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def serve_command(db: Path, *options: str) -> list[str]:
    """``smartgas-consumer serve`` on loopback, both ports chosen by the kernel, on the store ``db``."""
    return [
        sys.executable, "-m", "smartgas_consumer", "serve",
        "--coap-host", "127.0.0.1", "--coap-port", "0", "--http-port", "0",
        "--db", str(db), *options,
    ]  # fmt: skip


@dataclass
class Started:
    """A started process, its CoAP port, its HTTP port (0 for a server without one) and its log so far."""

    process: subprocess.Popen[str]
    coap_port: int
    http_port: int
    log: list[str] = field(default_factory=list)


def start(command: list[str], *, name: str = "consumer", http: bool = True) -> Started:
    """Start ``command`` and wait until it logged its CoAP port (and its HTTP port if ``http``); its output is
    then read on a thread into ``log``, so the pipe never fills. Raises RuntimeError if it does not start."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    assert process.stdout is not None
    log: list[str] = []
    coap_port = http_port = 0
    deadline = time.monotonic() + START_TIMEOUT_S
    while not coap_port or (http and not http_port):
        line = process.stdout.readline()
        if not line or time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"{name} did not start: {''.join(log[-20:])}")
        log.append(line)
        if match := COAP_LISTENING.search(line):
            coap_port = int(match.group(1))
        if match := HTTP_LISTENING.search(line):
            http_port = int(match.group(1))
    stdout = process.stdout
    threading.Thread(target=lambda: log.extend(stdout), daemon=True).start()
    return Started(process, coap_port, http_port, log)
