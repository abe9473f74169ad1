"""Scale benchmark: one publisher process driving thousands of meters at a real consumer, on schedule.

Starts a real consumer process (``smartgas-consumer serve``, ``--device-auth none`` or ``oscore``,
``--workers`` from ``--consumer-workers``) on loopback ephemeral ports with a fresh SQLite store, then one
``smartgas-publisher`` process with ``--meters M --period P --count K``, and reads the publisher's
summary line: how many readings it produced and had acknowledged, and how late they left against their
schedule (``send_delay_ms`` percentiles and the share more than 1 s late, readings never sent counted
late too; issue 12 asks under 1 % at 10,000 meters every 10 s). Also reports each process's CPU time per
reading (``/proc/PID/stat``; the consumer's main process only, not its workers) and the publisher's peak
RSS. After the consumer stopped, the store must hold every acknowledged reading, or the run fails.
Bounded: K readings per meter, and the whole run within ``--timeout``. ``--device-auth oscore`` provisions
every meter an OSCORE context first (not measured). Run: ``make bench-scale`` or
``python publisher/bench/bench_scale.py --meters 10000 --period 10 --readings 6``.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# The consumer's bench helpers (start a server, CPU time of a process): consumer/bench/serving.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "consumer" / "bench"))
import serving

SUMMARY = re.compile(
    r"fleet finished: meters=(?P<meters>\d+) produced=(?P<produced>\d+) sent=(?P<sent>\d+) acked=(?P<acked>\d+)"
    r" retried=(?P<retried>\d+) failed=(?P<failed>\d+) dropped=(?P<dropped>\d+) unsent=(?P<unsent>\d+)"
    r".* send_delay_ms p50=(?P<p50>\d+) p99=(?P<p99>\d+) max=(?P<max>\d+)"
    r" late_over_1s=(?P<late>\d+)/(?P<first_sent>\d+)"
)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_consumer(scratch: Path, meters: int, device_auth: str, workers: int) -> serving.Started:
    """A consumer on ephemeral ports, its log kept read (``consumer/bench/serving.py``)."""
    options = ["--device-auth", device_auth, "--workers", str(workers)]
    if device_auth == "oscore":
        options += ["--device-credentials", str(scratch / "device")]
    command = serving.serve_command(
        scratch / "bench.db",
        # The simulated meters are in no fleet file, and all of them start within one period.
        "--max-unknown-meters", str(meters), "--unknown-meters-per-minute", str(meters * 60),
        *options,
    )  # fmt: skip
    try:
        return serving.start(command)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None


def run(
    meters: int, period_s: float, readings: int, device_auth: str, timeout_s: float, workers: int
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        publisher_options: list[str] = []
        if device_auth == "oscore":
            from smartgas_consumer import device_auth as provisioning

            ids = [f"sim-{number:04d}" for number in range(1, meters + 1)]
            provisioning.provision_meters(scratch / "device", scratch / "meters", ids)
            publisher_options = ["--credentials", str(scratch / "meters")]
        started_consumer = start_consumer(scratch, meters, device_auth, workers)
        consumer, port, consumer_log = started_consumer.process, started_consumer.coap_port, started_consumer.log
        try:
            consumer_cpu_before = serving.cpu_seconds(consumer.pid)
            started = time.monotonic()
            publisher = subprocess.Popen(
                [
                    sys.executable, "-m", "smartgas_publisher",
                    "--consumer", f"coap://127.0.0.1:{port}",
                    "--meters", str(meters), "--period", str(period_s), "--count", str(readings),
                    "--status-interval", str(period_s), *publisher_options,
                ],
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            assert publisher.stderr is not None
            publisher_log: list[str] = []
            reader = threading.Thread(target=lambda: publisher_log.extend(publisher.stderr), daemon=True)  # type: ignore[arg-type]
            reader.start()
            publisher_cpu_s = peak_mb = 0.0
            while publisher.poll() is None:
                if time.monotonic() - started > timeout_s:
                    publisher.kill()
                    raise SystemExit(f"publisher still running after {timeout_s:g} s")
                try:  # measured while it runs: after it exits /proc no longer has it
                    publisher_cpu_s, peak_mb = serving.cpu_seconds(publisher.pid), peak_rss_mb(publisher.pid)
                except (FileNotFoundError, ProcessLookupError, IndexError):
                    break
                time.sleep(0.5)
            publisher.wait()
            reader.join(10)
            elapsed_s = time.monotonic() - started
            consumer_cpu_s = serving.cpu_seconds(consumer.pid) - consumer_cpu_before
        finally:
            consumer.terminate()
            try:
                consumer.wait(120)
            except subprocess.TimeoutExpired:
                consumer.kill()
                consumer.wait()
        summary = next((m for line in reversed(publisher_log) if (m := SUMMARY.search(line))), None)
        if summary is None:
            raise SystemExit(
                "publisher printed no summary:\n"
                + "".join(publisher_log[-20:])
                + "consumer:\n"
                + "".join(consumer_log[-20:])
            )
        with sqlite3.connect(scratch / "bench.db") as connection:
            stored = connection.execute("SELECT count(*) FROM readings").fetchone()[0]
    counts = {name: int(value) for name, value in summary.groupdict().items()}
    produced = max(counts["produced"], 1)
    never_sent = counts["produced"] - counts["first_sent"]
    return {
        "device_auth": device_auth,
        "consumer_workers": workers,
        "meters": counts["meters"],
        "period_s": period_s,
        "readings_per_meter": readings,
        "produced": counts["produced"],
        "acknowledged": counts["acked"],
        "stored": stored,
        "retried": counts["retried"],
        "seconds": round(elapsed_s, 1),
        "send_delay_ms_p50": counts["p50"],
        "send_delay_ms_p99": counts["p99"],
        "send_delay_ms_max": counts["max"],
        "late_over_1s": counts["late"],
        # A reading never sent by the end of the run is later still: counted late too.
        "never_sent": never_sent,
        "late_or_never_sent_percent": round(100 * (counts["late"] + never_sent) / produced, 3),
        "publisher_cpu_ms_per_reading": round(publisher_cpu_s * 1000 / produced, 3),
        "publisher_peak_rss_mb": round(peak_mb, 1),
        "consumer_cpu_ms_per_reading": round(consumer_cpu_s * 1000 / produced, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=10_000)
    parser.add_argument("--period", type=float, default=10.0, help="seconds between two readings of a meter")
    parser.add_argument("--readings", type=int, default=6, help="readings per meter")
    parser.add_argument("--device-auth", choices=["none", "oscore", "both"], default="none")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds a run")
    parser.add_argument(
        "--consumer-workers", type=int, default=1, help="the consumer's --workers (plain CoAP only above 1)"
    )
    arguments = parser.parse_args()
    modes = ["none", "oscore"] if arguments.device_auth == "both" else [arguments.device_auth]
    results = [
        run(arguments.meters, arguments.period, arguments.readings, mode, arguments.timeout, arguments.consumer_workers)
        for mode in modes
    ]
    if len(results) == 1:
        print(json.dumps(results[0], indent=2))
    else:
        print(f"{'':30}" + "".join(f"{result['device_auth']!s:>12}" for result in results))
        for name in results[0]:
            if name != "device_auth":
                print(f"{name:30}" + "".join(f"{result[name]!s:>12}" for result in results))
    # Every acknowledged reading must be in the store, and every reading produced acknowledged.
    return 0 if all(r["stored"] == r["acknowledged"] == r["produced"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
