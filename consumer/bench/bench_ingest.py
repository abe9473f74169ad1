"""Ingest benchmark: how many readings per second the consumer acknowledges, and how fast.

Starts a real consumer process (``smartgas-consumer serve``) on a loopback ephemeral port with a fresh
SQLite store, then drives it with M simulated meters, each its own aiocoap client endpoint, each sending
K readings back to back (CON PUT, waiting for every answer). Reports acknowledged readings per second,
the consumer's CPU time per reading (``/proc/PID/stat``), acknowledgement latency percentiles, and checks
that the store holds exactly what was acknowledged. Bounded in count (M x K) and in time (--timeout).
Run: ``make bench`` or ``python consumer/bench/bench_ingest.py --meters 200 --readings 25``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiocoap
from aiocoap.numbers.codes import Code

LISTENING = re.compile(rb"listening on coap://\[127\.0\.0\.1\]:(\d+)")
#: Clock ticks per second of /proc/PID/stat's CPU times.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far: what the consumer spent, whatever else runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def meter(port: int, meter_id: str, readings: int, latencies: list[float]) -> int:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    acknowledged = 0
    try:
        for seq in range(readings):
            body = {
                "seq": seq,
                "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "pressure_bar": 200.0 - seq * 0.01,
                "temperature_c": 15.0,
                "volume_l": 50.0,
            }
            message = aiocoap.Message(
                code=Code.PUT,
                uri=f"coap://127.0.0.1:{port}/meters/{meter_id}/reading",
                payload=json.dumps(body).encode(),
                content_format=50,
            )
            started = time.perf_counter()
            response = await context.request(message).response
            latencies.append(time.perf_counter() - started)
            acknowledged += response.code == Code.CHANGED
    finally:
        await context.shutdown()
    return acknowledged


async def run(meters: int, readings: int, timeout_s: float, group_window_ms: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        db = Path(scratch) / "bench.db"
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
            "--group-window-ms",
            str(group_window_ms),
            # No fleet file: every simulated meter is unknown, and all of them start at once.
            "--max-unknown-meters",
            str(max(meters, 1)),
            "--unknown-meters-per-minute",
            str(max(meters, 1)),
            stderr=asyncio.subprocess.PIPE,
        )
        drain: asyncio.Task[bytes] | None = None
        try:
            assert process.stderr is not None
            match = None
            deadline = time.monotonic() + 20
            while match is None and time.monotonic() < deadline:
                line = await asyncio.wait_for(process.stderr.readline(), 20)
                assert line, "consumer did not start"
                match = LISTENING.search(line)
            assert match, "consumer did not start"
            drain = asyncio.create_task(process.stderr.read())  # keeps the log pipe from filling up
            port = int(match.group(1))
            latencies: list[float] = []
            cpu_before = cpu_seconds(process.pid)
            started = time.perf_counter()
            acknowledged = await asyncio.wait_for(
                asyncio.gather(*(meter(port, f"bench-{i:05d}", readings, latencies) for i in range(meters))),
                timeout_s,
            )
            elapsed = time.perf_counter() - started
            consumer_cpu_s = cpu_seconds(process.pid) - cpu_before
        finally:
            process.terminate()
            await process.wait()
            if drain is not None:
                drain.cancel()
        with sqlite3.connect(db) as connection:
            stored = connection.execute("SELECT count(*) FROM readings").fetchone()[0]
    total = sum(acknowledged)
    cuts = statistics.quantiles(latencies, n=100)
    return {
        "meters": meters,
        "readings_per_meter": readings,
        "group_window_ms": group_window_ms,
        "acknowledged": total,
        "stored": stored,
        "seconds": round(elapsed, 2),
        "readings_per_second": round(total / elapsed, 1),
        # The consumer's own CPU per reading: steadier than readings/s when other work shares the cores.
        "consumer_cpu_ms_per_reading": round(consumer_cpu_s * 1000 / max(total, 1), 3),
        "latency_ms_p50": round(cuts[49] * 1000, 2),
        "latency_ms_p95": round(cuts[94] * 1000, 2),
        "latency_ms_p99": round(cuts[98] * 1000, 2),
        "latency_ms_max": round(max(latencies) * 1000, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=200)
    parser.add_argument("--readings", type=int, default=25, help="readings per meter")
    parser.add_argument("--group-window-ms", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    arguments = parser.parse_args()
    result = asyncio.run(run(arguments.meters, arguments.readings, arguments.timeout, arguments.group_window_ms))
    print(json.dumps(result, indent=2))
    # Every acknowledged reading must be in the store, or the numbers mean nothing.
    return 0 if result["stored"] == result["acknowledged"] == arguments.meters * arguments.readings else 1


if __name__ == "__main__":
    raise SystemExit(main())
