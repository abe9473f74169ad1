"""CI smoke runs of ``make bench-mqtt`` and ``make bench-scale``: the scripts still run and their checks pass.

Tiny counts, no timing assertions (timing goals belong to the benches): a real consumer process fed by the
real publisher, over CoAP and through a real Mosquitto (``bench_mqtt.py``), and on its schedule
(``bench_scale.py``); each script exits 0 only if the store holds every reading acknowledged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smartgas_common.mosquitto import mosquitto_binary

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (apt-get install mosquitto)")
def test_mqtt_bench_smoke_run_stores_every_reading_over_both_transports() -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO / "consumer" / "bench" / "bench_mqtt.py"), "--meters", "5", "--readings", "4"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in completed.stdout.splitlines()[1:]}
    assert rows["in_store"] == ["20", "20"]  # coap, mqtt
    # Timed from the last look that found nothing stored, 50 ms apart: never shorter than one look (20
    # readings all stored between two looks were once timed at 0.0 s, millions of readings a second).
    assert all(float(seconds) >= 0.05 for seconds in rows["seconds"]), rows["seconds"]


def test_scale_bench_smoke_run_reports_send_delays() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "publisher" / "bench" / "bench_scale.py"),
            "--meters",
            "20",
            "--period",
            "1",
            "--readings",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["produced"] == result["acknowledged"] == result["stored"] == 40
    assert result["never_sent"] == 0 and result["send_delay_ms_max"] >= 0
