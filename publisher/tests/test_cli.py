"""End-to-end tests of the ``smartgas-publisher`` command, run as a real subprocess against a real peer."""

import asyncio
import dataclasses
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from conftest import FLEET_FILE, FakeConsumer, eventually

pytestmark = pytest.mark.integration

MODULE_COMMAND = (sys.executable, "-m", "smartgas_publisher")


def console_script() -> str:
    """The installed ``smartgas-publisher`` entry point (next to this interpreter, or on PATH)."""
    found = shutil.which("smartgas-publisher", path=str(Path(sys.executable).parent)) or shutil.which(
        "smartgas-publisher"
    )
    if found is None:
        pytest.skip("smartgas-publisher is not installed as a console script (pip install -e .)")
    return found


async def run_publisher(
    *args: str, command: Sequence[str] = MODULE_COMMAND, sigterm_when: Callable[[], bool] | None = None
) -> tuple[int, str]:
    """Run the command (bounded to 30 s); optionally send SIGTERM once ``sigterm_when()`` holds."""
    process = await asyncio.create_subprocess_exec(
        *command, *args, stderr=asyncio.subprocess.PIPE, env=dict(os.environ)
    )
    try:
        if sigterm_when is not None:
            await eventually(sigterm_when, 15)
            process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_count_run_delivers_and_exits_0(consumer: FakeConsumer) -> None:
    code, err = await run_publisher(
        "--consumer",
        consumer.uri,
        "--meters",
        "5",
        "--count",
        "3",
        "--period",
        "0.1",
        "--seed",
        "4",
        command=[console_script()],
    )
    assert code == 0, err
    assert len(set(consumer.acknowledged())) == 15
    assert "fleet finished: meters=5 produced=15 sent=15 acked=15" in err


async def test_environment_configures_the_command(consumer: FakeConsumer, monkeypatch) -> None:
    monkeypatch.setenv("SMARTGAS_PUBLISHER_CONSUMER", consumer.uri)
    monkeypatch.setenv("SMARTGAS_PUBLISHER_ID_PREFIX", "tank")
    monkeypatch.setenv("SMARTGAS_PUBLISHER_COUNT", "2")
    monkeypatch.setenv("SMARTGAS_PUBLISHER_PERIOD", "0.05")
    code, err = await run_publisher()
    assert code == 0, err
    assert consumer.acknowledged() == [("tank-0001", 0), ("tank-0001", 1)]


async def test_unreachable_consumer_exits_1_reporting_unsent(free_udp_port: int) -> None:
    code, err = await run_publisher(
        "--consumer",
        f"coap://127.0.0.1:{free_udp_port}",
        "--count",
        "2",
        "--period",
        "0.05",
        "--drain-timeout",
        "2",
    )
    assert code == 1
    assert "could not deliver seq=0" in err
    assert "acked=0" in err and "unsent=2" in err


async def test_sigterm_stops_an_endless_run_cleanly(consumer: FakeConsumer) -> None:
    code, err = await run_publisher(
        "--consumer",
        consumer.uri,
        "--meters",
        "3",
        "--period",
        "0.1",
        sigterm_when=lambda: len(consumer.acknowledged()) >= 6,
    )
    assert code == 0, err  # everything produced before the signal was delivered
    assert "stop requested" in err
    assert "fleet finished: meters=3" in err and "unsent=0" in err
    assert len(consumer.acknowledged()) >= 6


async def test_bad_configuration_exits_2() -> None:
    code, err = await run_publisher("--period", "-1")
    assert code == 2
    assert "--period: must be a finite number > 0, got -1.0" in err


async def test_fleet_file_and_injection_from_the_environment(consumer: FakeConsumer, monkeypatch) -> None:
    monkeypatch.setenv("SMARTGAS_PUBLISHER_FLEET", str(FLEET_FILE))
    monkeypatch.setenv("SMARTGAS_PUBLISHER_INJECT", "offline:bottle-0003,leak:bottle-0004")
    code, err = await run_publisher("--consumer", consumer.uri, "--count", "3", "--period", "0.1")
    assert code == 0, err
    assert "fleet finished: meters=54 produced=161 sent=161 acked=161" in err
    assert "bottle-0004: injecting fault leak" in err
    assert "bottle-0003: offline fault: silent after 2 readings" in err
    assert consumer.acknowledged_seqs("bottle-0003") == [0, 1]


async def test_unknown_fault_exits_2_naming_it() -> None:
    code, err = await run_publisher("--fleet", str(FLEET_FILE), "--inject", "meltdown:bottle-0001")
    assert code == 2
    assert "unknown fault 'meltdown'" in err


async def test_unknown_gas_in_the_fleet_file_exits_2_naming_it(tmp_path) -> None:
    fleet = tmp_path / "fleet.yaml"
    text = FLEET_FILE.read_text()
    entry = "bottle-0003, site: lyon-gerland, gas: argon,"
    assert entry in text
    fleet.write_text(text.replace(entry, entry.replace("argon", "argn")))
    code, err = await run_publisher("--fleet", str(fleet))
    assert code == 2
    assert f"{fleet}: meters[2].gas: gas 'argn' is not known; known gases: argon, argon-co2," in err
    assert "Traceback" not in err


async def test_help_prints_usage_and_exits_0() -> None:
    # Through the real console script, as a user types it.
    code, out, err = await run_help(console_script())
    assert (code, err) == (0, "")
    assert out.startswith("usage: smartgas-publisher")
    assert "--fleet" in out and "SMARTGAS_PUBLISHER_FLEET" in out


async def test_help_shows_a_percent_sign_in_a_help_text_literally(monkeypatch: pytest.MonkeyPatch) -> None:
    # argparse %-formats help texts; an unescaped % once crashed the consumer's --help.
    from smartgas_publisher import config

    option = dataclasses.replace(config.OPTIONS[1], help="a share, 50 % of it (default 1)")
    monkeypatch.setattr(config, "OPTIONS", (config.OPTIONS[0], option, *config.OPTIONS[2:]))
    assert "a share, 50 % of it" in config.build_parser().format_help()


async def run_help(script: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        script, "--help", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
