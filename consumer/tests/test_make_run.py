"""``make run`` as the README says to run it, for real: the consumer and the publisher on free ports.

Each test starts make in a session of its own (as a terminal would run it), waits until the dashboard
answers and readings are stored, then sends one stop signal to make's whole process group, as Ctrl-C
(SIGINT) or ``kill -TERM -PGID`` does, and checks that each service was asked to stop exactly once,
stopped cleanly, and that every reading the publisher saw acknowledged is in the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from running import stored_in_file, stored_per_metrics

from smartgas_common.gas import Storage
from smartgas_consumer.fleet import load_fleet

REPO = Path(__file__).resolve().parents[2]
MAKE = shutil.which("make")
#: Bounds of each phase, for a loaded two-core machine (the run itself needs a few seconds).
START_BOUND_S = 120
STOP_BOUND_S = 180
#: The meters make run simulates: every one of the fleet file's.
FLEET_METERS = len(load_fleet(REPO / "fleet" / "fleet.yaml").meters)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MAKE is None, reason="make is not installed"),
    pytest.mark.skipif(
        not (REPO / ".venv" / "bin" / "smartgas-consumer").exists(),
        reason="no .venv in the repository (make venv): make run uses it",
    ),
]


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def default_interrupt_signals() -> None:
    """In the child, before make starts: SIGINT and SIGQUIT back to their default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def make_run(run_dir: Path, coap_port: int, http_port: int, *extra: str) -> subprocess.Popen[str]:
    """``make run`` with the README's documented variables (and ``extra`` ones), in a new session."""
    assert MAKE is not None
    # No settings of the user's shell, no display to open a browser on, and none of a make running this suite.
    ignored = ("SMARTGAS_", "DISPLAY", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(ignored)}
    return subprocess.Popen(
        [
            MAKE,
            "--no-print-directory",
            # The test runs inside the .venv that `make test` built: never reinstall it from here.
            "-o",
            ".venv/.installed",
            "run",
            f"RUN_PORT={coap_port}",
            f"RUN_HTTP_PORT={http_port}",
            "RUN_PERIOD=1",
            f"RUN_DIR={run_dir}",
            *extra,
        ],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # As a terminal's make: Ctrl-C not ignored. A suite started in the background by a non-interactive
        # shell (as CI may) inherits SIGINT ignored, and a shell cannot trap a signal ignored on entry.
        preexec_fn=default_interrupt_signals,
        text=True,
        start_new_session=True,
    )


def service_pids(run_dir: Path, command: str = "smartgas-") -> list[int]:
    """The services ``make run`` started for ``run_dir``: their argv names the command and the folder.

    The services run in sessions of their own, so a signal to make's process group never reaches them;
    a test that fails half-way ends them by their process ids (``stop_everything``).
    """
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
                # The services run as ``python .venv/bin/smartgas-...``, the broker as ``mosquitto -c``.
                names = {Path(argv[0]).name, Path(argv[1]).name} if len(argv) > 1 else set()
                if any(name.startswith(command) for name in names) and any(str(run_dir) in a for a in argv):
                    found.append(int(entry.name))
    return found


def stop_everything(process: subprocess.Popen[str], run_dir: Path) -> None:
    """After a failure: make's group and the services it started, so that nothing outlives the test."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    for pid in service_pids(run_dir) + service_pids(run_dir, "mosquitto"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=30)


def dashboard_answers(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/dashboard/", timeout=2) as response:
            return response.status == 200 and b"<html" in response.read().lower()
    except OSError:
        return False


def stop_output(process: subprocess.Popen[str], bound_s: float) -> str:
    """What make run printed until it ended, at most ``bound_s`` after the stop; on overrun, fail with it."""
    try:
        output, _ = process.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired as late:
        printed = late.output.decode(errors="replace") if isinstance(late.output, bytes) else (late.output or "")
        pytest.fail(f"make run did not stop within {bound_s} s; it printed, last:\n{printed[-4000:]}")
    return output


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str], what: str) -> None:
    """Wait until ``condition()`` holds, at most START_BOUND_S; the caller's ``finally`` cleans up."""
    deadline = time.monotonic() + START_BOUND_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"make run ended (exit {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {START_BOUND_S} s")
        time.sleep(0.2)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_make_run_serves_the_dashboard_stores_readings_and_stops_each_service_once(
    tmp_path: Path, signum: signal.Signals
) -> None:
    http_port = free_port(socket.SOCK_STREAM)
    coap_port = free_port(socket.SOCK_DGRAM)
    db = tmp_path / "smartgas.db"
    process = make_run(tmp_path, coap_port, http_port)
    try:
        wait_for(lambda: dashboard_answers(http_port), process, "dashboard")
        # Every meter of the fleet file has sent at least once (one reading a second each).
        wait_for(lambda: stored_per_metrics(http_port) >= FLEET_METERS + 10, process, "readings")
        os.killpg(process.pid, signum)
        output = stop_output(process, STOP_BOUND_S)
    finally:
        if process.poll() is None or service_pids(tmp_path):
            stop_everything(process, tmp_path)
    assert f"http://127.0.0.1:{http_port}/dashboard/#key=" in output
    assert "Traceback" not in output
    assert "MQTT broker" not in output  # RUN_TRANSPORT defaults to coap
    # The publisher was asked once, drained, and reported everything delivered.
    assert output.count("stop requested: no more readings") == 1, output
    assert "second stop request" not in output
    finished = re.search(
        rf"fleet finished: meters={FLEET_METERS} produced=(\d+) sent=\d+ acked=(\d+) .* unsent=0", output
    )
    assert finished is not None, output
    produced, acked = int(finished[1]), int(finished[2])
    assert acked == produced
    # The consumer was asked once, after the publisher had finished, and stopped cleanly.
    assert output.count("SIGINT received: stopping") == 1, output
    assert "received again" not in output
    assert output.index("fleet finished") < output.index("SIGINT received: stopping") < output.index("consumer stopped")
    # Every reading acknowledged is in the store (and nothing else: the store was new).
    assert stored_in_file(db) == acked


def test_make_run_fails_clearly_and_starts_no_publisher_when_the_consumer_cannot_start(tmp_path: Path) -> None:
    # The HTTP port is taken by someone else: the consumer cannot start, so the publisher must not either.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = make_run(tmp_path, free_port(socket.SOCK_DGRAM), taken.getsockname()[1])
        try:
            output, _ = process.communicate(timeout=START_BOUND_S)
        finally:
            if process.poll() is None or service_pids(tmp_path):
                stop_everything(process, tmp_path)
    assert process.returncode != 0
    assert "make run: the consumer stopped before it answered (its error is above)" in output
    assert "smartgas_publisher" not in output


def test_make_run_stops_the_publisher_when_the_consumer_dies(tmp_path: Path) -> None:
    http_port = free_port(socket.SOCK_STREAM)
    process = make_run(tmp_path, free_port(socket.SOCK_DGRAM), http_port)
    try:
        wait_for(lambda: dashboard_answers(http_port), process, "dashboard")
        wait_for(lambda: stored_per_metrics(http_port) >= 10, process, "readings")
        (consumer,) = service_pids(tmp_path, "smartgas-consumer")
        os.kill(consumer, signal.SIGKILL)  # a crash: nothing the consumer could answer or log
        output = stop_output(process, STOP_BOUND_S)
    finally:
        if process.poll() is None or service_pids(tmp_path):
            stop_everything(process, tmp_path)
    assert process.returncode != 0
    assert "make run: the consumer stopped (its error is above); stopping the publisher" in output
    assert output.count("stop requested: no more readings") == 1
    assert f"fleet finished: meters={FLEET_METERS}" in output


def meters_as_admin(http_port: int, key: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/api/meters", headers={"X-API-Key": key})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            meters: list[dict[str, Any]] = json.loads(response.read())["meters"]
            return meters
    except OSError:
        return []


def test_make_run_shows_days_to_empty_for_every_compressed_bottle_and_the_state_of_liquefied_ones(
    tmp_path: Path,
) -> None:
    """Issue 10's "done when": the fleet's compressed bottles each get a days-to-empty figure (the fleet
    file's draw while the fit learns, at night when the sites are idle too), the liquefied ones their state."""
    fleet = load_fleet(REPO / "fleet" / "fleet.yaml")
    liquefied = {m.meter_id for m in fleet.meters.values() if m.gas.storage is Storage.LIQUEFIED}
    assert liquefied and len(liquefied) < len(fleet.meters)
    http_port = free_port(socket.SOCK_STREAM)
    process = make_run(tmp_path, free_port(socket.SOCK_DGRAM), http_port, "RUN_LOG_READINGS=false")
    printed: list[str] = []
    assert process.stdout is not None
    # Drained all along: a full pipe would block make's services mid-run.
    drain = threading.Thread(target=lambda: printed.extend(process.stdout or ()), daemon=True)
    drain.start()
    seen: list[dict[str, Any]] = []

    def every_meter_forecast() -> bool:
        keys = [m[1] for line in list(printed) if (m := re.search(r"/dashboard/#key=(\S+)", line))]
        if not keys:
            return False
        seen[:] = meters_as_admin(http_port, keys[0])
        shown = {m["meter_id"]: m for m in seen if m["last_ts"] is not None}
        return set(shown) == set(fleet.meters) and all(
            m["liquid_state"] is not None if m["meter_id"] in liquefied else m["forecast"]["days_to_empty"] is not None
            for m in shown.values()
        )

    try:
        wait_for(every_meter_forecast, process, "a forecast for every meter")
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=STOP_BOUND_S)
    finally:
        if process.poll() is None or service_pids(tmp_path):
            stop_everything(process, tmp_path)
    for meter in seen:
        forecast = meter["forecast"]
        if meter["meter_id"] in liquefied:
            assert forecast["days_to_empty"] is None and "liquefied" in forecast["note"], meter
        else:
            assert forecast["basis"] in ("measured", "declared") and forecast["days_to_empty"] > 0, meter
            assert forecast["consumption_mol_per_day"] > 0 and forecast["empty_at"] is not None


def test_make_run_over_mqtt_shows_the_fleet_and_stops_the_broker_last(tmp_path: Path) -> None:
    """Issue 13's "done when": the fleet's readings reach the consumer through a Mosquitto that make starts
    with the provisioned users and ACL (each meter logs in as itself), and the dashboard shows every meter."""
    http_port = free_port(socket.SOCK_STREAM)
    mqtt_port = free_port(socket.SOCK_STREAM)
    process = make_run(
        tmp_path,
        free_port(socket.SOCK_DGRAM),
        http_port,
        "RUN_TRANSPORT=mqtt",
        f"RUN_MQTT_PORT={mqtt_port}",
        "RUN_LOG_READINGS=false",
    )
    printed: list[str] = []
    assert process.stdout is not None
    drain = threading.Thread(target=lambda: printed.extend(process.stdout or ()), daemon=True)
    drain.start()
    shown: list[dict[str, Any]] = []

    def every_meter_shown() -> bool:
        keys = [m[1] for line in list(printed) if (m := re.search(r"/dashboard/#key=(\S+)", line))]
        if not keys:
            return False
        shown[:] = [m for m in meters_as_admin(http_port, keys[0]) if m["last_ts"] is not None]
        return len(shown) == FLEET_METERS

    try:
        wait_for(every_meter_shown, process, "every meter's readings over MQTT")
        assert service_pids(tmp_path, "mosquitto"), "no broker running for this run"
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=STOP_BOUND_S)
        drain.join(timeout=10)
    finally:
        if process.poll() is None or service_pids(tmp_path) or service_pids(tmp_path, "mosquitto"):
            stop_everything(process, tmp_path)
    output = "".join(printed)  # make itself ends by SIGINT, as after Ctrl-C: its exit status says nothing
    assert f"MQTT broker on mqtt://127.0.0.1:{mqtt_port}" in output
    assert "Traceback" not in output
    assert f"broker=mqtt://127.0.0.1:{mqtt_port}" in output  # the publisher spoke MQTT only
    finished = re.search(
        rf"fleet finished: meters={FLEET_METERS} produced=(\d+) sent=\d+ acked=(\d+) .* unsent=0"
        r" answers_accepted=\d+ answers_refused=0",
        output,
    )
    assert finished is not None, output[-4000:]
    assert int(finished[1]) == int(finished[2])
    assert not service_pids(tmp_path, "mosquitto")  # the broker stopped with the run
    # What the consumer stored came over MQTT, and never more than the broker acknowledged to the meters
    # (the rest waits in the consumer's persistent session on the broker, for its next start).
    assert FLEET_METERS <= stored_in_file(tmp_path / "smartgas.db") <= int(finished[2])
