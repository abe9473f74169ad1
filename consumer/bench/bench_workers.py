"""Where a ``--workers`` consumer spends its CPU: each of its processes' CPU per acknowledged reading.

Starts the consumer (``--device-auth none``, the bench fleet) with ``--workers N`` (1: one process), warms
it up, then drives ``coapload``'s closed loop (``--outstanding`` in flight), or an open loop at ``--rate``,
``--rounds`` times, and prints for each round the readings/s and the CPU ms per acknowledged reading of
the consumer process, of each worker and of all of them (``/proc/PID/stat``), and of the consumer
process's main thread alone (its event loop: the one thread every reading passes; the store's thread is
the rest of that process).
``--py-spy DIR`` also records a speedscope profile of every process during the last round (``py-spy
record --nonblocking``, into DIR).

Run: ``python consumer/bench/bench_workers.py --workers 2`` (after ``make .venv/bin/coapload``). What it
measured is in docs/benchmarks.md ("``--workers 2``: the hand-off").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bench_compare  # noqa: E402  (the generator, the server under test, the store check)
import bench_ingest  # noqa: E402  (the bench fleet file)
import serving  # noqa: E402  (CPU time from /proc)


def process_cpu(pids: list[int], consumer_pid: int) -> dict[str, float]:
    """CPU seconds so far of each process, and of the consumer process's main thread (its event loop)."""
    cpu: dict[str, float] = {}
    for pid in pids:
        role = "consumer" if pid == consumer_pid else f"worker {pid}"
        try:
            cpu[role] = serving.cpu_seconds(pid)
            if pid == consumer_pid:
                cpu["consumer event loop"] = serving.stat_cpu_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))
        except OSError:
            continue
    return cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--sockets", type=int, default=64)
    parser.add_argument("--outstanding", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0, help="an open loop at this rate instead (0: closed loop)")
    parser.add_argument("--count", type=int, default=40000, help="requests of a round")
    parser.add_argument("--duration-s", type=float, default=15.0, help="longest a round lasts")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warm-up", type=int, default=3000, help="requests before the first round")
    parser.add_argument("--py-spy", type=Path, help="record every process during the last round into this folder")
    parser.add_argument("--consumer-arg", action="append", default=[], help="one more flag for the consumer")
    parser.add_argument("--generator", type=Path, default=BENCH_DIR.parents[1] / ".venv" / "bin" / "coapload")
    arguments = parser.parse_args()
    binary = bench_compare.build_generator(arguments.generator)
    rounds: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        fleet, db = scratch / "fleet.yaml", scratch / "bench.db"
        bench_ingest.write_fleet(fleet, arguments.meters)
        extra = [*arguments.consumer_arg, "--workers", str(arguments.workers)]
        command = bench_compare.consumer_command(db, fleet, extra)
        with bench_compare.started("consumer", command, db) as server:
            generator = bench_compare.Generator(binary, scratch, arguments.meters, arguments.sockets)
            generator.run(server, count=arguments.warm_up, duration_s=10, outstanding=arguments.outstanding)
            consumer_pid = server.process.pid
            worker_pids = [pid for pid in bench_compare.tree_pids(consumer_pid) if pid != consumer_pid]
            for number in range(arguments.rounds):
                pids = bench_compare.tree_pids(consumer_pid)
                spies: list[subprocess.Popen[bytes]] = []
                if arguments.py_spy is not None and number == arguments.rounds - 1:
                    arguments.py_spy.mkdir(parents=True, exist_ok=True)
                    py_spy = Path(sys.executable).parent / "py-spy"
                    for pid in pids:
                        role = "consumer" if pid == consumer_pid else f"worker-{pid}"
                        output = arguments.py_spy / f"{role}.speedscope.json"
                        spies.append(
                            subprocess.Popen(
                                [str(py_spy), "record", "-p", str(pid), "-d", str(int(arguments.duration_s)),
                                 "-r", "100", "--nonblocking", "--format", "speedscope", "-o", str(output)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            )
                        )  # fmt: skip
                before = process_cpu(pids, consumer_pid)
                load = generator.run(
                    server,
                    count=arguments.count,
                    duration_s=arguments.duration_s,
                    rate=arguments.rate,
                    outstanding=arguments.outstanding if not arguments.rate else 8192,
                )
                after = process_cpu(pids, consumer_pid)
                for spy in spies:
                    spy.wait()
                acked = max(int(load.report["acknowledged"]), 1)
                per_process = {
                    role: round((after[role] - before[role]) * 1000 / acked, 3) for role in before if role in after
                }
                loop_share = per_process.pop("consumer event loop", 0.0)
                rounds.append(
                    {
                        "readings_per_s": round(load.rate),
                        "acknowledged": load.report["acknowledged"],
                        "other_code": load.report["other_code"],
                        "timed_out": load.report["timed_out"],
                        "ack_p50_p99_ms": [load.report.get("latency_ms_p50"), load.report.get("latency_ms_p99")],
                        "cpu_ms_per_reading": per_process,
                        "cpu_ms_per_reading_all": round(sum(per_process.values()), 3),
                        "consumer_event_loop_cpu_ms_per_reading": loop_share,
                        "load_average_1": round(os.getloadavg()[0], 2),
                    }
                )
        missing = bench_compare.missing_from_store(db, generator.acknowledged())
    report = {"workers": arguments.workers, "worker_pids": worker_pids, "rounds": rounds}
    report["acknowledged_missing"] = missing
    print(json.dumps(report, indent=2))
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
