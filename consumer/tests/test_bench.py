"""The CI smoke run of ``make bench`` (bench/bench_compare.py): it still builds, runs and checks the store.

Tiny counts, no timing assertions (timing goals belong to ``make bench``): the C generator is compiled
with gcc, a bare aiocoap server and a real consumer process are driven over loopback, and the bench's own
check (every reading the generator saw acknowledged is in the stopped consumer's store) must pass.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_compare.py"

pytestmark = pytest.mark.integration


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc (the bench's C load generator) is not installed")
def test_bench_smoke_run_stores_every_acknowledged_reading(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--generator", str(tmp_path / "coapload")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    results = report["results"]
    assert set(results) == {"bare", "consumer", "oscore"}
    for name in ("bare", "consumer"):
        # Every answer of the saturation run (200 requests; one may time out on a loaded machine) is 2.04.
        assert set(results[name]["codes"]) == {"2.04"}, name
    consumer = results["consumer"]
    assert consumer["acknowledged_total"] > 0
    assert consumer["acknowledged_missing_from_store"] == 0
    assert consumer["rss_mb_end"] > 0
    assert results["oscore"]["acknowledged_missing_from_store"] == 0
    # The consumer's own histograms split its half-rate p99 (the bare server has none).
    assert "half_commit_p99_ms_at_most" not in results["bare"]
    for key in ("half_inside_ack_p99_ms_at_most", "half_commit_p99_ms_at_most"):
        assert consumer[key] is None or consumer[key] > 0, key
    for probe in ("disk_fsync_4k_ms", "disk_fsync_4k_beside_checkpoints_ms"):
        disk = report["machine"][probe]
        # 0 is a true figure on tmpfs, where an fsync rounds to 0.00 ms.
        assert disk["fsyncs"] == 50 and 0 <= disk["p50"] <= disk["p99"] <= disk["p99_9"] <= disk["max"], probe


def test_a_histograms_quantile_is_the_edge_of_its_bucket_between_two_scrapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH.parent))
    from bench_compare import quantile_at_most_ms

    before = {0.001: 10.0, 0.005: 10.0, 0.01: 10.0, math.inf: 10.0}  # observed before the run: not counted
    after = {0.001: 100.0, 0.005: 108.0, 0.01: 109.0, math.inf: 110.0}  # 90, 8, 1 and 1 in the run
    assert quantile_at_most_ms(before, after, 0.5) == 1.0
    assert quantile_at_most_ms(before, after, 0.95) == 5.0
    assert quantile_at_most_ms(before, after, 0.99) == 10.0
    assert quantile_at_most_ms(before, after, 0.999) is None  # beyond the last edge
    assert quantile_at_most_ms(after, after, 0.99) is None  # nothing observed


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc (the bench's C load generator) is not installed")
def test_bench_workers_smoke_run_measures_each_process(tmp_path: Path) -> None:
    """``bench_workers.py`` (where a ``--workers`` consumer spends its CPU) still runs, with tiny counts."""
    generator = tmp_path / "coapload"
    command = [sys.executable, str(BENCH.with_name("bench_workers.py")), "--workers", "2", "--generator"]
    options = ["--meters", "20", "--sockets", "4", "--warm-up", "20", "--count", "200", "--duration-s", "5"]
    completed = subprocess.run([*command, str(generator), *options], capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    assert report["acknowledged_missing"] == 0
    (round_,) = report["rounds"]
    assert round_["acknowledged"] > 0
    assert set(round_["cpu_ms_per_reading"]) == {"consumer", *(f"worker {pid}" for pid in report["worker_pids"])}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc (the bench's C load generator) is not installed")
def test_bench_history_smoke_run_goes_on_from_the_history_it_wrote(tmp_path: Path) -> None:
    """``bench_history.py`` (the consumer on a store whose meters hold a long history) still runs: the store
    it fills is one the consumer opens and goes on from (every reading a NEXT, none refused or lost)."""
    command = [sys.executable, str(BENCH.with_name("bench_history.py")), "--smoke", "--generator"]
    completed = subprocess.run([*command, str(tmp_path / "coapload")], capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    for run in ("new_store", "long_history"):
        assert report[run]["acknowledged_missing_from_store"] == 0, run
        (round_,) = report[run]["rounds"]
        assert round_["readings_per_s"] > 0 and round_["disk_kb_written_per_reading"] > 0, run
    assert report["long_history"]["history_per_meter"] == 30
