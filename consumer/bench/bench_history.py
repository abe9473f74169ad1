"""What a long history costs the consumer: readings/s, CPU and disk writes per reading on a store whose
meters already hold ``--history`` readings each, beside the same run on a new store.

Real meters report every 10 s, 8,640 readings a day each, so a consumer spends its life on a store far
larger than the new one the side-by-side bench (``bench_compare.py``) starts with. This bench fills a
store before the consumer starts: ``--history`` readings per meter, 10 s apart and ending a minute ago,
marked shipped (as with a working sink), written by SQL straight into the schema the consumer itself
created, with each meter's registry row. The consumer then takes ``coapload``'s closed loop
(``--outstanding`` in flight, ``--rounds`` runs of ``--count`` readings), each meter's seq going on from
its history. Per round it prints readings/s, the consumer's CPU ms and disk bytes written (``write_bytes``
of ``/proc/PID/io``: the WAL, the checkpoints) per acknowledged reading. Every acknowledged reading is
checked to be in the store afterwards.

Run: ``python consumer/bench/bench_history.py`` (after ``make .venv/bin/coapload``). What it measured is in
docs/benchmarks.md ("A long history").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bench_compare  # noqa: E402  (the generator, the server under test, the store check)
import bench_ingest  # noqa: E402  (the bench fleet file and its meter ids)

from smartgas_consumer.schema import format_timestamp  # noqa: E402
from smartgas_consumer.store import ReadingStore  # noqa: E402

#: The bench meters' period: their history is this far apart.
PERIOD_S = 10


def fill(db: Path, meters: int, history: int) -> float:
    """Create the store (the consumer's own schema), then write ``history`` readings for each of ``meters``
    meters and their registry rows; return the seconds it took."""
    started = time.monotonic()

    async def create() -> None:
        store = ReadingStore(db)
        await store.open()
        await store.close()

    asyncio.run(create())
    end = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=0)
    first = end - timedelta(seconds=PERIOD_S * (history - 1))
    last = format_timestamp(end)
    with contextlib.closing(sqlite3.connect(db)) as connection, connection:
        for index in range(meters):
            meter_id = bench_ingest.meter_id(index)
            connection.execute(
                "WITH RECURSIVE n(seq) AS (SELECT 0 UNION ALL SELECT seq + 1 FROM n WHERE seq + 1 < :history)"
                " INSERT INTO readings (meter_id, epoch, seq, ts, received_at, pressure_bar, temperature_c,"
                " volume_l, moles, fill_pct, client_id, site_id, meter_known, ship_state, shipped_at)"
                " SELECT :meter, 0, seq, t, t, 180.25, 15.0, 50.0, 380.0, 90.0, 'bench', 'lab', 1, 1, t FROM"
                " (SELECT seq, strftime('%Y-%m-%dT%H:%M:%S', :first + seq * :period, 'unixepoch') || '.000000Z' AS t"
                " FROM n)",
                {"history": history, "meter": meter_id, "first": int(first.timestamp()), "period": PERIOD_S},
            )
            connection.execute(
                "INSERT INTO meters (meter_id, known, client_id, site_id, first_seen, last_seen, epoch, last_seq,"
                " last_ts, readings, last_reading_id) VALUES (?, 1, 'bench', 'lab', ?, ?, 0, ?, ?, ?,"
                " (SELECT max(id) FROM readings))",
                (meter_id, format_timestamp(first), last, history - 1, last, history),
            )
    return time.monotonic() - started


def written_bytes(pid: int) -> int:
    """Bytes process ``pid`` (all its threads) caused to be written to storage so far."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/io has no write_bytes")


def run(name: str, history: int, arguments: argparse.Namespace, scratch: Path, fleet: Path) -> dict[str, Any]:
    db = scratch / f"{name}.db"
    result: dict[str, Any] = {"history_per_meter": history}
    if history:
        result["fill_s"] = round(fill(db, arguments.meters, history), 1)
        result["store_mb_before"] = round(db.stat().st_size / 1e6)
    generator = bench_compare.Generator(arguments.generator, scratch, arguments.meters, arguments.sockets)
    generator.next_seq = history
    rounds = []
    command = bench_compare.consumer_command(db, fleet, arguments.consumer_arg)
    with bench_compare.started(name, command, db) as server:
        generator.run(server, count=arguments.warm_up, duration_s=60)
        for _ in range(arguments.rounds):
            before = written_bytes(server.process.pid)
            load = generator.run(server, count=arguments.count, duration_s=60, outstanding=arguments.outstanding)
            acknowledged = max(load.report["acknowledged"], 1)
            rounds.append(
                {
                    "readings_per_s": round(load.rate),
                    "cpu_ms_per_reading": round(load.cpu_s * 1000 / acknowledged, 3),
                    "disk_kb_written_per_reading": round(
                        (written_bytes(server.process.pid) - before) / 1024 / acknowledged, 1
                    ),
                    "timed_out": load.report["timed_out"],
                }
            )
    result["rounds"] = rounds
    result["acknowledged_missing_from_store"] = bench_compare.missing_from_store(db, generator.acknowledged())
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--history", type=int, default=2000, help="readings per meter already in the store")
    parser.add_argument("--sockets", type=int, default=64)
    parser.add_argument("--outstanding", type=int, default=64)
    parser.add_argument("--count", type=int, default=30000, help="readings of a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-up", type=int, default=3000, help="readings before the first round")
    parser.add_argument("--consumer-arg", action="append", default=[], help="one more flag for the consumer")
    parser.add_argument("--generator", type=Path, default=BENCH_DIR.parents[1] / ".venv" / "bin" / "coapload")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks the bench runs, measures nothing")
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.meters, arguments.history, arguments.sockets = 20, 30, 4
        arguments.count, arguments.rounds, arguments.warm_up = 200, 1, 20
    bench_compare.build_generator(arguments.generator)
    results: dict[str, Any] = {"machine": bench_compare.machine(), "meters": arguments.meters}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        fleet = scratch / "fleet.yaml"
        bench_ingest.write_fleet(fleet, arguments.meters)
        results["new_store"] = run("new", 0, arguments, scratch, fleet)
        results["long_history"] = run("history", arguments.history, arguments, scratch, fleet)
    print(json.dumps(results, indent=2))
    missing = (
        results["new_store"]["acknowledged_missing_from_store"]
        + results["long_history"]["acknowledged_missing_from_store"]
    )
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
