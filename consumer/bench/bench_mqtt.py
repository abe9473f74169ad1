"""MQTT ingest beside CoAP: how many readings per second one consumer stores, fed either way, same run.

Starts a real Mosquitto (``smartgas_common.mosquitto``, anonymous, loopback ephemeral port) and a real
consumer process (``--device-auth none``, a fresh SQLite store, CoAP on and ``--mqtt-broker`` set), then
for each transport one ``smartgas-publisher`` process with ``--meters M --count K`` and a period so short
that every meter sends its K readings back to back, each waiting for its acknowledgement (CoAP: the
consumer's 2.04, after commit; MQTT: the broker's PUBACK, while the consumer acknowledges to the broker
only after commit). The consumer's stored count (``/metrics``) is sampled until it has every reading:
throughput is readings stored per second from the first stored to the last. After the consumer stopped,
the store must hold exactly every reading both publishers had acknowledged, or the run fails. Bounded: M×K
readings per transport, and each within ``--timeout``. Run: ``make bench-mqtt`` or
``python consumer/bench/bench_mqtt.py --meters 200 --readings 25``.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import serving  # a sibling module: the script runs as consumer/bench/bench_mqtt.py

from smartgas_common.mosquitto import Mosquitto

FINISHED = re.compile(r"fleet finished: meters=\d+ produced=(\d+) sent=\d+ acked=(\d+)")
#: Readings stored since start (Prometheus text format).
STORED = re.compile(r"^smartgas_readings_stored_total (\S+)$", re.MULTILINE)


def stored(http_port: int) -> int:
    match = STORED.search(serving.metrics_text(http_port))
    return int(float(match.group(1))) if match else 0


def start_consumer(
    scratch: Path, broker: Mosquitto, meters: int, receive_maximum: int | None
) -> tuple[subprocess.Popen[str], int, int]:
    extra = [] if receive_maximum is None else ["--mqtt-receive-maximum", str(receive_maximum)]
    command = serving.serve_command(
        scratch / "bench.db", "--device-auth", "none", "--mqtt-broker", broker.url,
        "--max-unknown-meters", str(2 * meters), "--unknown-meters-per-minute", str(120 * meters), *extra,
    )  # fmt: skip
    running = serving.start(command)
    return running.process, running.coap_port, running.http_port


def drive(
    transport: str, meters: int, readings: int, coap_port: int, broker: Mosquitto, http_port: int, timeout_s: float
) -> dict[str, object]:
    """One publisher run over ``transport``; the consumer's stored count followed until it has them all."""
    before = stored(http_port)
    expected = before + meters * readings
    publisher = subprocess.Popen(
        [
            sys.executable, "-m", "smartgas_publisher",
            "--transport", transport, "--consumer", f"coap://127.0.0.1:{coap_port}", "--broker", broker.url,
            # Each transport its own meter ids, so the consumer stores the second run's readings as new.
            "--id-prefix", f"bench-{transport}", "--meters", str(meters), "--count", str(readings),
            "--period", "0.001", "--buffer", str(readings), "--drain-timeout", str(timeout_s),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    started = time.monotonic()
    # From the last sample that saw nothing stored yet (the publisher's start-up is not ingest time), so
    # the readings the first non-empty sample found are timed too: a short run cannot look faster than it
    # was (timing from that first sample itself, 500 readings all stored within one 50 ms interval once
    # gave 0.0 s and 188 million readings/s).
    nothing_stored_at = started
    count = before
    while count < expected and time.monotonic() - started < timeout_s:
        time.sleep(0.05)
        asked_at = time.monotonic()
        count = stored(http_port)
        if count == before:
            nothing_stored_at = asked_at
    finished_at = time.monotonic()
    _, err = publisher.communicate(timeout=timeout_s)
    summary = FINISHED.search(err)
    if summary is None:
        raise SystemExit(f"{transport}: the publisher printed no summary:\n{err[-3000:]}")
    seconds = finished_at - nothing_stored_at
    return {
        "transport": transport,
        "readings": meters * readings,
        "acknowledged": int(summary.group(2)),
        "stored_by_consumer": count - before,
        "seconds": round(seconds, 2),
        "readings_per_second": round((count - before) / max(seconds, 1e-9), 1),
    }


def run(
    meters: int, readings: int, transports: list[str], timeout_s: float, receive_maximum: int | None
) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        broker = Mosquitto(scratch / "broker").start()
        try:
            consumer, coap_port, http_port = start_consumer(scratch, broker, meters, receive_maximum)
            try:
                results = [
                    drive(transport, meters, readings, coap_port, broker, http_port, timeout_s)
                    for transport in transports
                ]
            finally:
                consumer.terminate()
                consumer.wait(120)
        finally:
            broker.stop()
        with sqlite3.connect(scratch / "bench.db") as connection:
            for result in results:
                result["in_store"] = connection.execute(
                    "SELECT count(*) FROM readings WHERE meter_id LIKE ?", (f"bench-{result['transport']}-%",)
                ).fetchone()[0]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=200)
    parser.add_argument("--readings", type=int, default=25, help="readings per meter")
    parser.add_argument("--transport", choices=["coap", "mqtt", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up on a transport after this long")
    parser.add_argument(
        "--receive-maximum", type=int, help="the consumer's --mqtt-receive-maximum (default: the consumer's default)"
    )
    arguments = parser.parse_args()
    transports = ["coap", "mqtt"] if arguments.transport == "both" else [arguments.transport]
    results = run(arguments.meters, arguments.readings, transports, arguments.timeout, arguments.receive_maximum)
    if len(results) == 1:
        print(json.dumps(results[0], indent=2))
    else:
        print(f"{'':22}" + "".join(f"{result['transport']!s:>12}" for result in results))
        for name in results[0]:
            if name != "transport":
                print(f"{name:22}" + "".join(f"{result[name]!s:>12}" for result in results))
    # Every reading acknowledged is in the store, and every reading sent was acknowledged.
    expected = arguments.meters * arguments.readings
    return 0 if all(r["in_store"] == r["acknowledged"] == expected for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
