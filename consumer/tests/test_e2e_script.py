"""deploy/e2e.sh (`make e2e`) cleans up on every path: logs printed on failure, `down -v` always.

No Docker engine runs here, so `docker` and the compose command are stand-ins: small scripts that record
their arguments and answer as told (the real ones are what `make e2e` uses on a Docker machine). What is
real is the script under test, run by bash, with its traps and exit codes.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "e2e.sh"

pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="deploy/e2e.sh is not in this tree (image build)")


def stub(path: Path, body: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def run_e2e(
    tmp_path: Path, *, up_exit: int = 0, health: str = "healthy", kibana_setup: str = "exited 0", suite_exit: int = 0
) -> tuple[int, list[str], str]:
    calls = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    compose = stub(
        tmp_path / "compose",
        f'echo "compose $*" >> {calls}\n'
        f'if [ "$1" = up ]; then exit {up_exit}; fi\n'
        'if [ "$1 $2" = "ps -q" ]; then echo kibana-setup-id; fi\n',
    )
    stub(
        bin_dir / "docker",
        f'echo "docker $*" >> {calls}\n'
        f'case "$*" in *Health*) echo {health};; *ExitCode*) echo "{kibana_setup}";; esac\n',
    )
    python = stub(tmp_path / "python", f'echo "suite $*" >> {calls}\nexit {suite_exit}\n')
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "COMPOSE": str(compose),
        "PYTHON": str(python),
        "E2E_WAIT_S": "0",  # any wait that does not pass at once times out at once
    }
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    return done.returncode, calls.read_text().splitlines(), done.stdout + done.stderr


def compose_calls(calls: list[str]) -> list[str]:
    return [call.removeprefix("compose ") for call in calls if call.startswith("compose ")]


def test_a_failed_up_prints_logs_and_removes_the_stack(tmp_path: Path) -> None:
    code, calls, output = run_e2e(tmp_path, up_exit=17)
    assert code == 17
    assert compose_calls(calls) == ["up -d --build", "ps", "logs --no-color --tail 80", "down -v --remove-orphans"]
    assert not [call for call in calls if call.startswith("suite")]
    assert "failed (exit 17)" in output


def test_a_consumer_never_healthy_prints_logs_and_removes_the_stack(tmp_path: Path) -> None:
    code, calls, output = run_e2e(tmp_path, health="unhealthy")
    assert code != 0
    assert compose_calls(calls)[-2:] == ["logs --no-color --tail 80", "down -v --remove-orphans"]
    assert "the consumer is healthy: not reached" in output


def test_a_kibana_import_never_done_fails_the_run(tmp_path: Path) -> None:
    code, calls, output = run_e2e(tmp_path, kibana_setup="restarting 1")
    assert code != 0
    assert compose_calls(calls)[-1] == "down -v --remove-orphans"
    assert "the Kibana import is done: not reached" in output


def test_a_failing_suite_returns_its_code_and_removes_the_stack(tmp_path: Path) -> None:
    code, calls, _ = run_e2e(tmp_path, suite_exit=3)
    assert code == 3
    assert "suite -m pytest -m live -rs consumer/tests" in calls
    assert compose_calls(calls)[-2:] == ["logs --no-color --tail 80", "down -v --remove-orphans"]


def test_a_passing_run_removes_the_stack_without_printing_logs(tmp_path: Path) -> None:
    code, calls, _ = run_e2e(tmp_path)
    assert code == 0
    assert compose_calls(calls) == ["up -d --build", "ps -q kibana-setup", "down -v --remove-orphans"]
