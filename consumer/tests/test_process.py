"""The consumer as a real process: stopped by SIGTERM/SIGINT under load and restarted, losing nothing."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from running import consumer_process, run_serve

from conftest import EXAMPLES_MAX_AGE_S, wire_example
from smartgas_consumer.status import snapshot_path

pytestmark = pytest.mark.integration

#: The wire examples are dated 2026-11-23: the time window is widened for them.
EXAMPLES = ("--max-reading-age", str(EXAMPLES_MAX_AGE_S))


async def send_until_refused(
    port: int, meter_ids: list[str], acknowledged: set[tuple[str, int]], stop_after: asyncio.Event
) -> None:
    """Each meter sends readings with increasing seq until its requests stop being answered."""

    async def meter(meter_id: str) -> None:
        context = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            for seq in range(10_000):  # bounded; the process stop ends it far earlier
                body = json.dumps({**wire_example("reading-250bar.json"), "seq": seq}).encode()
                message = aiocoap.Message(
                    code=Code.PUT,
                    uri=f"coap://127.0.0.1:{port}/meters/{meter_id}/reading",
                    payload=body,
                    content_format=50,
                )
                try:
                    response = await asyncio.wait_for(context.request(message).response, timeout=1.5)
                except (aiocoap.error.Error, TimeoutError):
                    return
                if response.code == Code.CHANGED:
                    acknowledged.add((meter_id, seq))
                    if len(acknowledged) >= 100:
                        stop_after.set()
                else:
                    return
        finally:
            await context.shutdown()

    await asyncio.gather(*(meter(m) for m in meter_ids))


def stored_keys(db: Path) -> set[tuple[str, int]]:
    with sqlite3.connect(db) as connection:
        return set(connection.execute("SELECT meter_id, seq FROM readings"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_stop_under_load_loses_nothing_acknowledged(tmp_path: Path, signum: signal.Signals) -> None:
    db = tmp_path / "store.db"
    acknowledged: set[tuple[str, int]] = set()
    with consumer_process(db, *EXAMPLES) as consumer:
        enough = asyncio.Event()
        meters = [f"m{i}" for i in range(10)]
        senders = asyncio.create_task(send_until_refused(consumer.coap_port, meters, acknowledged, enough))
        await asyncio.wait_for(enough.wait(), timeout=30)
        # mid-stream: requests are in flight
        assert await asyncio.to_thread(consumer.stop, signum) == 0, consumer.log()
        await asyncio.wait_for(senders, timeout=30)
    assert len(acknowledged) >= 100
    assert acknowledged <= stored_keys(db)


async def test_restart_keeps_readings_and_answers_resends(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    body = wire_example("reading-250bar.json")
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:

        async def put(port: int, seq: int) -> aiocoap.Message:
            message = aiocoap.Message(
                code=Code.PUT,
                uri=f"coap://127.0.0.1:{port}/meters/m1/reading",
                payload=json.dumps({**body, "seq": seq}).encode(),
                content_format=50,
            )
            return await asyncio.wait_for(context.request(message).response, timeout=10)

        with consumer_process(db, *EXAMPLES) as consumer:
            for seq in range(5):
                assert (await put(consumer.coap_port, seq)).code == Code.CHANGED
            assert await asyncio.to_thread(consumer.stop) == 0
        with consumer_process(db, *EXAMPLES, "--coap-reading-get", "true") as consumer:
            resend = await put(consumer.coap_port, 4)  # the meter never saw this answer: it sends again
            assert json.loads(resend.payload)["stored"] is False
            latest = aiocoap.Message(code=Code.GET, uri=f"coap://127.0.0.1:{consumer.coap_port}/meters/m1/reading")
            answer = await asyncio.wait_for(context.request(latest).response, timeout=10)
            assert json.loads(answer.payload)["seq"] == 4
            assert await asyncio.to_thread(consumer.stop) == 0
    finally:
        await context.shutdown()
    assert stored_keys(db) == {("m1", seq) for seq in range(5)}


def test_bad_configuration_exits_2_naming_the_setting(tmp_path: Path) -> None:
    result = run_serve(tmp_path / "x.db", "--coap-port", "70000")
    assert result.returncode == 2
    assert "--coap-port='70000'" in result.stderr


async def run_status(db: Path) -> tuple[int | None, bytes, bytes]:
    status = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smartgas_consumer",
        "status",
        "--db",
        str(db),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(status.communicate(), timeout=20)
    return status.returncode, stdout, stderr


async def test_status_command_reports_store(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    # One snapshot, written at start: the test removes it and must not see it come back.
    with consumer_process(db, *EXAMPLES, "--status-interval", "3600") as consumer:
        port = consumer.coap_port
        context = await aiocoap.Context.create_client_context(transports=["udp6"])
        message = aiocoap.Message(
            code=Code.PUT,
            uri=f"coap://127.0.0.1:{port}/meters/m9/reading",
            payload=json.dumps(wire_example("reading-250bar.json")).encode(),
            content_format=50,
        )
        await asyncio.wait_for(context.request(message).response, timeout=10)
        await context.shutdown()
        # While the consumer serves the store, only it can read it (its WAL index is in its memory): status
        # prints the snapshot the consumer wrote of it (at start, then every status interval).
        returncode, stdout, stderr = await run_status(db)
        assert returncode == 0, stderr
        snapshot = json.loads(stdout)
        assert snapshot["served_by_pid"] == consumer.pid and snapshot["db"] == str(db)
        assert {"as_of", "age_s", "readings", "meters", "shipping_lag"} <= set(snapshot)
        snapshot_path(db).unlink()  # without one, status names the consumer that holds the store
        returncode, _, stderr = await run_status(db)
        assert returncode == 2
        assert f"served by the consumer with PID {consumer.pid}".encode() in stderr
        assert await asyncio.to_thread(consumer.stop) == 0
    returncode, stdout, _ = await run_status(db)
    assert returncode == 0
    report = json.loads(stdout)
    assert (report["readings"], report["meters"]) == (1, 1)
    with consumer_process(db, *EXAMPLES, "--store-shared-memory", "true"):  # the WAL index in a shared -shm
        returncode, stdout, _ = await run_status(db)
        assert returncode == 0 and json.loads(stdout)["readings"] == 1
