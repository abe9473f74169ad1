"""The repository README's commands, run as written (only ports and the store's folder are swapped for free
ones in a temporary folder, so a test never touches 5683, 8080 or the user's var/).

``make run`` itself is run by test_make_run.py with the variables the README documents; here: the service
commands in the activated .venv, the hand PUT with libcoap's client, and what ``make test`` resolves to.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from running import stored_in_file, stored_per_metrics

from smartgas_consumer.status import NOT_SHIPPING

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
VENV_BIN = REPO / ".venv" / "bin"
BOUND_S = 120

pytestmark = pytest.mark.integration


def section(heading: str) -> str:
    return README.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def fenced_blocks(text: str) -> list[list[str]]:
    """The fenced code blocks of ``text``, each as its commands (continuation lines joined)."""
    blocks = re.findall(r"^( *)```\n(.*?)^\1```", text, flags=re.MULTILINE | re.DOTALL)
    commands = []
    for indent, body in blocks:
        joined = re.sub(r"\\\n\s*", "", "\n".join(line.removeprefix(indent) for line in body.splitlines()))
        commands.append([line for line in joined.splitlines() if line.strip()])
    return commands


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def shell_environment() -> dict[str, str]:
    """The user's shell before activation: no SmartGas settings, and .venv/bin not on PATH."""
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep) if Path(entry) != VENV_BIN]
    # Nor the settings of a make that runs this suite (make test): a make started here is the user's own.
    ignored = ("SMARTGAS_", "VIRTUAL_ENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    environment = {k: v for k, v in os.environ.items() if not k.startswith(ignored)}
    return {**environment, "PATH": os.pathsep.join(path)}


def in_shell(activate: str, command: str) -> list[str]:
    return ["bash", "-c", f"{activate} && exec {command}"]


def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {BOUND_S} s")
        time.sleep(0.2)


@contextlib.contextmanager
def background(argv: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        argv, cwd=REPO, env=env or shell_environment(), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def healthy(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.skipif(not (VENV_BIN / "smartgas-consumer").exists(), reason="no .venv in the repository (make venv)")
def test_service_commands_run_as_written_in_the_activated_venv(tmp_path: Path) -> None:
    coap_port, http_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)

    def as_here(line: str) -> str:
        return line.replace("5683", str(coap_port)).replace("8080", str(http_port)).replace("var/", f"{tmp_path}/")

    using = section("Using each service")
    blocks = fenced_blocks(using)
    activate, serve, publish, status = (as_here(line) for line in blocks[0])
    assert activate == ". .venv/bin/activate"
    assert serve.startswith("smartgas-consumer serve ") and serve.endswith(" &")
    assert publish.startswith("smartgas-publisher ")
    assert status.startswith("smartgas-consumer status ")
    # Without activation, the README's lines are exactly what failed with "command not found".
    plain = subprocess.run(["bash", "-c", status], cwd=REPO, env=shell_environment(), capture_output=True, check=False)
    assert plain.returncode == 127

    db = tmp_path / "smartgas.db"
    # A status snapshot every second instead of every ten, so the test need not wait (the README's lines
    # are otherwise run as written).
    environment = {**shell_environment(), "SMARTGAS_CONSUMER_STATUS_INTERVAL_S": "1"}
    with background(in_shell(activate, serve.removesuffix("&").strip()), env=environment) as consumer:
        eventually(lambda: healthy(http_port) or consumer.poll() is not None, "consumer")
        assert consumer.poll() is None, consumer.communicate()[1]
        with background(in_shell(activate, publish)) as publisher:
            eventually(lambda: stored_per_metrics(http_port) >= 5, "readings stored")
            code, err = stop(publisher)
        assert code == 0, err  # every reading it produced was acknowledged
        acknowledged = stored_per_metrics(http_port)

        def status_report() -> dict[str, Any]:
            report = subprocess.run(
                in_shell(activate, status),
                cwd=REPO,
                env=shell_environment(),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert report.returncode == 0, report.stderr
            parsed: dict[str, Any] = json.loads(report.stdout)
            return parsed

        # Beside the running consumer, status prints the snapshot the consumer writes of its store.
        eventually(lambda: status_report()["readings"] == acknowledged, "a status snapshot with every reading")
        summary = status_report()
        assert summary["served_by_pid"] > 0 and summary["age_s"] < 60
        assert summary["shipping_lag"] == NOT_SHIPPING

        if shutil.which("coap-client-notls") is None:
            pytest.skip("coap-client-notls (Debian libcoap3-bin, installed by make deps) is missing for the hand PUT")
        (put,) = (as_here(line) for line in blocks[1])
        for attempt in range(2):
            answer = subprocess.run(
                ["bash", "-c", put], env=shell_environment(), capture_output=True, text=True, timeout=60
            )
            assert answer.returncode == 0, answer.stderr
            stored = json.loads(answer.stdout)
            assert stored["meter_id"] == "hand-0001"
            assert stored["moles"] == pytest.approx(417.4, abs=0.1)
            assert stored["stored"] is True, f"attempt {attempt}: {stored}"
            time.sleep(1.1)  # the seq is the current second: the README's line run again is a new reading
        code, err = stop(consumer)
    assert code == 0, err
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as connection:
        meters = {row[0] for row in connection.execute("SELECT DISTINCT meter_id FROM readings")}
        hand = connection.execute("SELECT count(*), max(seq) FROM readings WHERE meter_id = 'hand-0001'").fetchone()
    assert hand == (2, stored["seq"])
    assert all(meter.startswith("sim-") for meter in meters - {"hand-0001"})  # never a fleet file's id
    assert stored_in_file(db) == acknowledged + 2
    # Stopped, the store is the consumer's no more: status reads it itself.
    assert status_report()["readings"] == acknowledged + 2
    assert "consumer stopped" in err


def test_readme_names_make_run_and_make_test_and_the_variables_test_make_run_uses() -> None:
    commands = [line.split("#")[0].strip() for line in fenced_blocks(section("Two commands"))[0]]
    assert commands == ["make run", "make test"]
    text = README.read_text()
    for variable in ("RUN_PORT=", "RUN_HTTP_PORT=", "RUN_PERIOD=", "RUN_DIR=", "RUN_WAIT_S"):
        assert variable in text


def test_ci_runs_make_test_and_make_test_resolves() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, flags=re.MULTILINE)
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(
        [make, "-n", "test"], cwd=REPO, env=shell_environment(), capture_output=True, text=True, timeout=60, check=False
    )
    assert dry.returncode == 0, dry.stderr
    assert "setup.py -q test" in dry.stdout
