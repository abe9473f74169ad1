"""Ingest benchmark: how many readings per second the consumer acknowledges, and how fast.

Starts a real consumer process (``smartgas-consumer serve``) on a loopback ephemeral port with a fresh
SQLite store, then drives it with M simulated meters, each its own aiocoap client endpoint, each sending
K readings back to back (CON PUT, waiting for every answer). Reports acknowledged readings per second,
the consumer's CPU time per reading (``/proc/PID/stat``), acknowledgement latency percentiles, and checks
that the store holds exactly what was acknowledged. Bounded in count (M x K) and in time (--timeout).
``--device-auth oscore`` provisions every meter an OSCORE context first and protects every request with it
(the consumer runs ``--device-auth oscore``); ``both`` (what ``make bench`` runs) measures plain CoAP and
OSCORE one after the other and prints them side by side. Run: ``make bench`` or
``python consumer/bench/bench_ingest.py --meters 200 --readings 25``.

By default the meters are listed in a fleet file written for the run, holding in turn each compressed
built-in gas (``BENCH_GASES``, mixtures included), so every reading pays for its real-gas physics as a
fleet meter's does; ``--unknown`` leaves them out of any fleet file (no client, no gas, no physics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiocoap
import serving  # a sibling module: the script runs as consumer/bench/bench_ingest.py (or is imported beside it)
from aiocoap import oscore
from aiocoap.numbers.codes import Code

from smartgas_consumer import device_auth

#: How long one reading may wait for its answer; one that waits longer counts as not acknowledged.
RESPONSE_DEADLINE_S = 60.0
#: The gases of the bench fleet, in turn: every compressed built-in gas, the two mixtures included.
BENCH_GASES = ("oxygen", "nitrogen", "argon", "argon-co2", "medical-air", "helium", "hydrogen", "methane")


def meter_id(index: int) -> str:
    return f"bench-{index:05d}"


def write_fleet(path: Path, meters: int) -> None:
    """A fleet file listing the bench meters on one always-working site, 50 L bottles at 200 bar."""
    lines = [
        "version: 1",
        "clients: [{id: bench, name: Bench}]",
        "sites: [{id: lab, client: bench, name: Lab, latitude: 45.7, longitude: 4.8, working_hours_utc: [0, 24]}]",
        "meters:",
    ]
    for index in range(meters):
        gas = BENCH_GASES[index % len(BENCH_GASES)]
        lines.append(
            f"  - {{id: {meter_id(index)}, site: lab, gas: {gas}, volume_l: 50, nominal_pressure_bar: 200, "
            "draw_mol_per_h: 1}"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def meter(
    port: int, meter_id: str, readings: int, latencies: list[float], credentials: Path | None, timed_out: list[str]
) -> int:
    security = None
    if credentials is None:
        context = await aiocoap.Context.create_client_context(transports=["udp6"])
    else:
        context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
        security = oscore.FilesystemSecurityContext(str(credentials / meter_id))
        context.client_credentials[f"coap://127.0.0.1:{port}/*"] = security
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
            try:
                # aiocoap waits without a limit for a response announced by an empty ACK: bound it here.
                response = await asyncio.wait_for(context.request(message).response, RESPONSE_DEADLINE_S)
            except TimeoutError:
                timed_out.append(meter_id)
                continue
            latencies.append(time.perf_counter() - started)
            acknowledged += response.code == Code.CHANGED
    finally:
        await context.shutdown()
        if security is not None:
            security._destroy()
    return acknowledged


async def run(
    meters: int, readings: int, timeout_s: float, group_window_ms: float, device_auth_mode: str, *, known: bool
) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as scratch:
        db = Path(scratch) / "bench.db"
        meter_ids = [meter_id(i) for i in range(meters)]
        fleet_options: list[str] = []
        if known:
            fleet = Path(scratch) / "fleet.yaml"
            write_fleet(fleet, meters)
            fleet_options = ["--fleet", str(fleet)]
        auth_options: list[str] = ["--device-auth", device_auth_mode]
        meter_credentials: Path | None = None
        if device_auth_mode == "oscore":
            consumer_credentials, meter_credentials = Path(scratch) / "device", Path(scratch) / "meters"
            device_auth.provision_meters(consumer_credentials, meter_credentials, meter_ids)  # not measured
            auth_options += ["--device-credentials", str(consumer_credentials)]
        command = serving.serve_command(
            db,
            "--group-window-ms",
            str(group_window_ms),
            *fleet_options,
            # Without a fleet file every simulated meter is unknown, and all of them start at once.
            "--max-unknown-meters",
            str(max(meters, 1)),
            "--unknown-meters-per-minute",
            str(max(meters, 1)),
            *auth_options,
        )
        consumer = await asyncio.to_thread(serving.start, command)
        process = consumer.process
        try:
            port = consumer.coap_port
            latencies: list[float] = []
            timed_out: list[str] = []
            cpu_before = serving.cpu_seconds(process.pid)
            started = time.perf_counter()
            acknowledged = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        meter(port, meter_id, readings, latencies, meter_credentials, timed_out)
                        for meter_id in meter_ids
                    )
                ),
                timeout_s,
            )
            elapsed = time.perf_counter() - started
            consumer_cpu_s = serving.cpu_seconds(process.pid) - cpu_before
        finally:
            process.terminate()
            await asyncio.to_thread(process.wait)
        with sqlite3.connect(db) as connection:
            stored = connection.execute("SELECT count(*) FROM readings").fetchone()[0]
    total = sum(acknowledged)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")  # never beyond the largest
    return {
        "device_auth": device_auth_mode,
        "meters": meters,
        "fleet": "known" if known else "unknown",
        "readings_per_meter": readings,
        "group_window_ms": group_window_ms,
        "acknowledged": total,
        "timed_out": len(timed_out),
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
    parser.add_argument(
        "--device-auth", choices=["none", "oscore", "both"], default="none", help="plain CoAP, OSCORE, or both"
    )
    parser.add_argument("--unknown", action="store_true", help="meters missing from any fleet file (no physics)")
    arguments = parser.parse_args()
    modes = ["none", "oscore"] if arguments.device_auth == "both" else [arguments.device_auth]
    results = [
        asyncio.run(
            run(
                arguments.meters,
                arguments.readings,
                arguments.timeout,
                arguments.group_window_ms,
                mode,
                known=not arguments.unknown,
            )
        )
        for mode in modes
    ]
    if len(results) == 1:
        print(json.dumps(results[0], indent=2))
    else:  # side by side: one row per measure, one column per mode
        print(f"{'':22}" + "".join(f"{result['device_auth']!s:>12}" for result in results))
        for name in results[0]:
            if name != "device_auth":
                print(f"{name:22}" + "".join(f"{result[name]!s:>12}" for result in results))
    # Every acknowledged reading must be in the store, or the numbers mean nothing.
    expected = arguments.meters * arguments.readings
    return 0 if all(result["stored"] == result["acknowledged"] == expected for result in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
