"""``make bench``: the consumer side by side with a bare aiocoap server, driven by a C load generator.

One run measures, against the same generator (``coapload.c``: raw UDP, CON PUTs of a ~100-byte JSON
reading, ``--meters`` meter ids spread over ``--sockets`` client sockets, each meter always on one):

(a) ``bare``: ``bare_server.py``, aiocoap answering 2.04 with no work at all (the reference);
(b) ``consumer``: ``smartgas-consumer serve`` on its defaults with ``--device-auth none`` and a fleet file
    listing the meters (so every reading pays for validation, real-gas physics, the durable group commit,
    the sequence rule and the alerts);
(c) ``oscore``: the consumer with ``--device-auth oscore``. The C generator does not speak OSCORE, so this
    row is driven by ``bench_ingest.py``'s Python aiocoap clients (each meter its own context), and is
    given as a ratio to (b) driven by the same Python clients in the same run;
(d) ``workers-N``: the consumer with ``--workers N`` (``--workers`` here; skipped at 1).

For (a), (b) and (d): the saturation throughput (closed loop, ``--outstanding`` requests in flight) and
its ratio to (a); the acknowledgement latency p50/p99 in an open loop at half of (a)'s saturation rate;
the kernel's UDP receive-buffer drops (``/proc/net/snmp`` Udp RcvbufErrors, machine-wide, over the
server's runs); the server's CPU per answer (``/proc/PID/stat``: what it spent, whatever else runs).
For the consumer rows, a sustained open loop at ``--sustain-rate`` (2,000/s) for ``BENCH_SUSTAIN_S``
seconds (300 by default), the consumer's RSS sampled through it (the last sample, and the growth over the
last two minutes), and the requests of it answered with another code than 2.04 or not within 5 s.
Before the runs, the disk under the stores: 1,000 fsyncs of a 4 KiB append, as each group commit makes
(every acknowledgement waits for one, so that disk's tail is a floor under the latency tail), then 1,000
more beside checkpoint-shaped writes into another file (``disk_fsync_ms``). For the consumer rows, the
half-rate p99 split by the consumer's own histograms (``/metrics``: its answer inside, one group commit),
read before and after that run. After each consumer run the consumer is stopped and every reading the
generator saw acknowledged is looked up in its store: the bench fails (exit 1) if one is missing.

Run: ``make bench``, or ``python consumer/bench/bench_compare.py --workers 2``; a smoke run with tiny
counts: ``python consumer/bench/bench_compare.py --smoke``. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bench_ingest  # noqa: E402  (the Python clients of the OSCORE row, and the bench fleet file)
import serving  # noqa: E402  (start a server, learn its ports)

GENERATOR_SOURCE = BENCH_DIR / "coapload.c"
#: How long a server may take to say it listens (the consumer builds its gas models first).
START_TIMEOUT_S = 120.0
#: The consumer's own histograms (docs/metrics.md) that split the half-rate run's p99: the answer inside it
#: (from its CoAP resource taking the PUT to the 2.04; not kept by ``--workers`` workers) and one group commit.
INSIDE_HISTOGRAMS = {"inside_ack": "smartgas_ack_latency_seconds", "commit": "smartgas_store_commit_duration_seconds"}
#: How long a consumer may take to commit and exit once asked.
STOP_TIMEOUT_S = 120.0


def build_generator(binary: Path) -> Path:
    """Compile ``coapload.c`` into ``binary`` unless it is already newer than the source."""
    if binary.exists() and binary.stat().st_mtime >= GENERATOR_SOURCE.stat().st_mtime:
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(GENERATOR_SOURCE)], check=True)
    return binary


def udp_receive_buffer_errors() -> int:
    """The kernel's count of UDP datagrams dropped for a full socket receive buffer (all sockets)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Udp:")]
    header, values = lines[0], lines[1]
    return int(values[header.index("RcvbufErrors")])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (a multi-worker consumer is several processes)."""
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
                pids.append(int(child))
                frontier.append(int(child))
    return pids


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for each in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += serving.cpu_seconds(each)
    return total


def tree_rss_mb(pid: int) -> float:
    total = 0.0
    for each in tree_pids(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_mb(each)
    return total


@dataclass
class Server:
    """A server process under test, started and bound to an ephemeral loopback port."""

    name: str
    process: subprocess.Popen[str]
    port: int
    db: Path | None = None
    log: list[str] = field(default_factory=list)
    http_port: int = 0  # a consumer's API, where its /metrics are; 0 for the bare server

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"{self.name} did not stop within {STOP_TIMEOUT_S:.0f} s") from None


@contextlib.contextmanager
def started(name: str, command: list[str], db: Path | None = None) -> Iterator[Server]:
    running = serving.start(command, name=name, http=db is not None)
    server = Server(name, running.process, running.coap_port, db, running.log, running.http_port)
    try:
        yield server
    finally:
        server.stop()


def consumer_command(db: Path, fleet: Path, extra: list[str]) -> list[str]:
    return serving.serve_command(db, "--fleet", str(fleet), "--device-auth", "none", *extra)


@dataclass
class Load:
    """What one generator run reported (coapload's JSON) plus what the server spent meanwhile."""

    report: dict[str, Any]
    cpu_s: float
    drops: int

    @property
    def rate(self) -> float:
        return float(self.report["acknowledged_per_second"])


class Generator:
    """Runs coapload against one server, continuing each meter's seq across runs (one acked file each)."""

    def __init__(self, binary: Path, scratch: Path, meters: int, sockets: int) -> None:
        self.binary, self.scratch, self.meters, self.sockets = binary, scratch, meters, sockets
        self.next_seq = 0
        self.acked_files: list[Path] = []

    def run(self, server: Server, *, count: int, duration_s: float, rate: float = 0, outstanding: int = 64) -> Load:
        acked = self.scratch / f"acked-{server.name}-{len(self.acked_files)}.txt"
        self.acked_files.append(acked)
        cpu_before, drops_before = tree_cpu_seconds(server.process.pid), udp_receive_buffer_errors()
        command = [
            str(self.binary),
            "--port",
            str(server.port),
            "--meters",
            str(self.meters),
            "--sockets",
            str(self.sockets),
            "--rate",
            str(rate),
            "--outstanding",
            str(outstanding),
            "--count",
            str(count),
            "--duration-s",
            str(duration_s),
            "--first-seq",
            str(self.next_seq),
            "--acked",
            str(acked),
        ]
        output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration_s + 60)
        report = json.loads(output.stdout)
        # Each meter sent at most ceil(sent / meters) readings; the next run starts above them (a gap of
        # at most one, well inside the sequence rule's slack).
        self.next_seq += math.ceil(report["sent"] / self.meters) + 1
        cpu_s = tree_cpu_seconds(server.process.pid) - cpu_before
        return Load(report, cpu_s, udp_receive_buffer_errors() - drops_before)

    def acknowledged(self) -> set[tuple[str, int]]:
        pairs: set[tuple[str, int]] = set()
        for path in self.acked_files:
            for line in path.read_text().splitlines():
                meter_id, seq = line.split()
                pairs.add((meter_id, int(seq)))
        return pairs


def missing_from_store(db: Path, acknowledged: set[tuple[str, int]]) -> int:
    """How many acknowledged (meter, seq) pairs the stopped consumer's store does not hold."""
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as connection:
        stored = set(connection.execute("SELECT meter_id, seq FROM readings").fetchall())
    return len(acknowledged - stored)


def sustain(server: Server, generator: Generator, rate: float, seconds: float) -> dict[str, Any]:
    """An open loop at ``rate`` for ``seconds``, the server's RSS sampled every tenth of it."""
    samples: list[tuple[float, float]] = []
    chunk_s = max(seconds / 10, 1.0)
    started = time.monotonic()
    loads: list[Load] = []
    while time.monotonic() - started < seconds - 0.5:
        loads.append(
            generator.run(server, count=int(rate * chunk_s) + 1, duration_s=chunk_s, rate=rate, outstanding=8192)
        )
        samples.append((round(time.monotonic() - started), round(tree_rss_mb(server.process.pid), 1)))
    last_two_minutes = [rss for at, rss in samples if at >= samples[-1][0] - 120]
    acked = sum(load.report["acknowledged"] for load in loads)
    return {
        "sustain_seconds": round(time.monotonic() - started),
        "sustain_rate": rate,
        "sustain_acknowledged": acked,
        "sustain_other_code": sum(load.report["other_code"] for load in loads),
        "sustain_timed_out": sum(load.report["timed_out"] for load in loads),
        "sustain_udp_drops": sum(load.drops for load in loads),
        "rss_mb_end": samples[-1][1],
        "rss_mb_growth_last_2_min": round(last_two_minutes[-1] - last_two_minutes[0], 1),
        "rss_mb_samples": samples,
    }


def inside_histograms(server: Server) -> dict[str, dict[float, float]]:
    """A consumer's own histograms of the latency tail, from its ``/metrics``: {family: {le: count}}.
    Empty for a server without an API (the bare one)."""
    if not server.http_port:
        return {}
    return {
        family.name: {float(sample.labels["le"]): sample.value for sample in family.samples if "le" in sample.labels}
        for family in text_string_to_metric_families(serving.metrics_text(server.http_port))
        if family.name in INSIDE_HISTOGRAMS.values()
    }


def quantile_at_most_ms(before: dict[float, float], after: dict[float, float], quantile: float) -> float | None:
    """The upper edge (ms) of the bucket that holds ``quantile`` of what a histogram observed between two
    scrapes; None if it observed nothing, or if that bucket is the one beyond the last edge."""
    total = after.get(math.inf, 0) - before.get(math.inf, 0)
    if total <= 0:
        return None
    edge = next(le for le in sorted(after) if after[le] - before.get(le, 0) >= quantile * total)
    return None if math.isinf(edge) else round(edge * 1000, 1)


def measure(
    server: Server, generator: Generator, arguments: argparse.Namespace, half_rate: float | None
) -> dict[str, Any]:
    """Saturation, then latency at ``half_rate`` (None: half of this server's own saturation)."""
    saturation = generator.run(
        server, count=arguments.saturation_count, duration_s=arguments.phase_s, outstanding=arguments.outstanding
    )
    rate = half_rate if half_rate is not None else saturation.rate / 2
    inside_before = inside_histograms(server)
    half = generator.run(
        server, count=max(int(rate * arguments.phase_s), 1), duration_s=arguments.phase_s, rate=rate, outstanding=8192
    )
    inside_after = inside_histograms(server)
    answered = max(saturation.report["acknowledged"] + saturation.report["other_code"], 1)
    return {
        "saturation_per_s": round(saturation.rate),
        "saturation_timed_out": saturation.report["timed_out"],
        "cpu_ms_per_answer": round(saturation.cpu_s * 1000 / answered, 3),
        "half_rate": round(rate),
        "half_p50_ms": half.report.get("latency_ms_p50"),
        "half_p99_ms": half.report.get("latency_ms_p99"),
        "half_timed_out": half.report["timed_out"],
        "udp_drops": saturation.drops + half.drops,
        "codes": saturation.report["codes"],
    } | {
        # Where the tail is: inside the consumer (its resource's answer, its group commits), or before it.
        f"half_{key}_p99_ms_at_most": quantile_at_most_ms(inside_before[family], inside_after[family], 0.99)
        for key, family in INSIDE_HISTOGRAMS.items()
        if family in inside_after
    }


def run_consumer(
    name: str, extra: list[str], binary: Path, scratch: Path, fleet: Path, arguments: argparse.Namespace, half: float
) -> dict[str, Any]:
    db = scratch / f"{name}.db"
    generator = Generator(binary, scratch, arguments.meters, arguments.sockets)
    command = consumer_command(db, fleet, extra)
    with started(name, command, db) as server:
        result = measure(server, generator, arguments, half)
        if arguments.sustain_s > 0:
            result |= sustain(server, generator, arguments.sustain_rate, arguments.sustain_s)
    acknowledged = generator.acknowledged()
    result["acknowledged_total"] = len(acknowledged)
    result["acknowledged_missing_from_store"] = missing_from_store(db, acknowledged)
    return result


def run_oscore(arguments: argparse.Namespace) -> dict[str, Any]:
    """(c): Python aiocoap clients, plain then OSCORE, against the consumer (the same clients both times)."""
    meters, readings = arguments.oscore_meters, arguments.oscore_readings
    plain, protected = (
        asyncio.run(bench_ingest.run(meters, readings, 300.0, 2.0, mode, known=True)) for mode in ("none", "oscore")
    )
    return {
        "python_client_none_per_s": plain["readings_per_second"],
        "python_client_oscore_per_s": protected["readings_per_second"],
        "oscore_to_none": round(float(protected["readings_per_second"]) / float(plain["readings_per_second"]), 2),
        "oscore_cpu_ms_per_reading": protected["consumer_cpu_ms_per_reading"],
        "none_cpu_ms_per_reading": plain["consumer_cpu_ms_per_reading"],
        "oscore_p99_ms": protected["latency_ms_p99"],
        "acknowledged_missing_from_store": sum(
            int(result["acknowledged"]) - int(result["stored"]) for result in (plain, protected)
        ),
    }


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "load_average_1_5_15": [round(value, 2) for value in load],
        "python": sys.version.split()[0],
    }


def disk_fsync_ms(directory: Path, count: int = 1000, *, beside_checkpoints: bool = False) -> dict[str, float]:
    """The disk under the stores: ``count`` appends of 4 KiB to a file in ``directory``, each followed by
    ``fsync``, as a group commit's WAL append is. Every acknowledgement waits for one, so this disk's tail
    is a floor under the consumer's latency tail.

    With ``beside_checkpoints``, the appends are paced as group commits are (one per 2 ms window) while a
    thread does what SQLite's automatic checkpoint does several times a second at the bench's rates (a WAL
    of 1,000 pages, ~3 pages a reading): it writes 1,000 pages of 4 KiB at random places in a second file of
    16 MiB, fsyncs it, and waits 0.2 s. The checkpoint runs inside a commit or on a thread of its own; either
    way its writes share the disk with the next commit's fsync, and this measures what that costs."""
    block = os.urandom(4096)
    took: list[float] = []
    path = directory / "fsync-probe"
    database = directory / "fsync-probe-database"
    finished = threading.Event()

    def checkpoint_shaped_writes() -> None:
        pages = 16 * 1024 * 1024 // len(block)
        descriptor = os.open(database, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while not finished.is_set():
                for _ in range(1000):
                    os.pwrite(descriptor, block, random.randrange(pages) * len(block))
                os.fsync(descriptor)
                finished.wait(0.2)
        finally:
            os.close(descriptor)

    writer: threading.Thread | None = None
    if beside_checkpoints:
        writer = threading.Thread(target=checkpoint_shaped_writes, name="fsync-probe-checkpoints")
        writer.start()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            started = time.perf_counter()
            os.write(descriptor, block)
            os.fsync(descriptor)
            took.append((time.perf_counter() - started) * 1000)
            if writer is not None:
                time.sleep(0.002)
    finally:
        os.close(descriptor)
        finished.set()
        if writer is not None:
            writer.join()
        path.unlink()
        database.unlink(missing_ok=True)
    cuts = statistics.quantiles(took, n=1000, method="inclusive")  # as bench_ingest's: never beyond the largest
    return {
        "fsyncs": count,
        "p50": round(cuts[499], 2),
        "p99": round(cuts[989], 2),
        "p99_9": round(cuts[998], 2),
        "max": round(max(took), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meters", type=int, default=1000)
    parser.add_argument("--sockets", type=int, default=64, help="client sockets (source ports) the meters send from")
    parser.add_argument("--outstanding", type=int, default=64, help="requests in flight at saturation")
    parser.add_argument("--saturation-count", type=int, default=30000, help="requests of a saturation run")
    parser.add_argument("--phase-s", type=float, default=20.0, help="longest a saturation or half-rate run lasts")
    parser.add_argument("--sustain-rate", type=float, default=2000.0)
    parser.add_argument(
        "--sustain-s", type=float, default=float(os.environ.get("BENCH_SUSTAIN_S", "300")), help="0: no sustained run"
    )
    parser.add_argument("--half-rate", type=float, help="the open loop's rate (default: half of (a)'s saturation)")
    parser.add_argument("--workers", type=int, default=1, help="also run the consumer with --workers N (N > 1)")
    parser.add_argument("--oscore-meters", type=int, default=200)
    parser.add_argument("--oscore-readings", type=int, default=25)
    parser.add_argument("--skip", action="append", default=[], choices=["bare", "consumer", "oscore", "workers"])
    parser.add_argument("--consumer-arg", action="append", default=[], help="one more flag for every consumer")
    parser.add_argument("--generator", type=Path, default=BENCH_DIR.parents[1] / ".venv" / "bin" / "coapload")
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks the bench runs, measures nothing")
    arguments = parser.parse_args()
    if arguments.smoke:
        arguments.meters, arguments.sockets, arguments.saturation_count, arguments.phase_s = 20, 4, 200, 5.0
        arguments.half_rate = 50.0
        arguments.sustain_s, arguments.sustain_rate, arguments.oscore_meters, arguments.oscore_readings = 3, 50, 3, 3
    binary = build_generator(arguments.generator)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        fleet = scratch / "fleet.yaml"
        bench_ingest.write_fleet(fleet, arguments.meters)
        fsyncs = 50 if arguments.smoke else 1000
        disk = {
            "disk_fsync_4k_ms": disk_fsync_ms(scratch, fsyncs),
            "disk_fsync_4k_beside_checkpoints_ms": disk_fsync_ms(scratch, fsyncs, beside_checkpoints=True),
        }
        half: float | None = arguments.half_rate
        if "bare" not in arguments.skip:
            command = [sys.executable, str(BENCH_DIR / "bare_server.py"), "--port", "0"]
            with started("bare", command) as server:
                generator = Generator(binary, scratch, arguments.meters, arguments.sockets)
                results["bare"] = measure(server, generator, arguments, half)
            half = half or results["bare"]["half_rate"]
        if half is None:
            half = arguments.sustain_rate / 2
        consumers = [("consumer", list(arguments.consumer_arg))]
        if arguments.workers > 1 and "workers" not in arguments.skip:
            workers = [*arguments.consumer_arg, "--workers", str(arguments.workers)]
            consumers.append((f"workers-{arguments.workers}", workers))
        for name, extra in consumers:
            if name == "consumer" and "consumer" in arguments.skip:
                continue
            results[name] = run_consumer(name, extra, binary, scratch, fleet, arguments, half)
        if "oscore" not in arguments.skip:
            results["oscore"] = run_oscore(arguments)
    reference = results.get("bare", {}).get("saturation_per_s")
    for result in results.values():
        if reference and "saturation_per_s" in result:
            result["ratio_to_bare"] = round(result["saturation_per_s"] / reference, 2)
    print(json.dumps({"machine": machine() | disk, "results": results}, indent=2))
    missing = sum(result.get("acknowledged_missing_from_store", 0) for result in results.values())
    if missing:
        print(f"bench: {missing} acknowledged reading(s) missing from the store", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
