"""``--workers N``: worker processes on one CoAP port (SO_REUSEPORT), committing through the consumer's store.

Real processes on loopback: a consumer with two workers, meters each sending from its own client socket
(its own source port, as a real meter does), the store read after the consumer stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from running import consumer_process

from smartgas_consumer.config import ConfigError, ConsumerConfig

#: Meters not in any fleet file (no fleet: the workers start without building gas models), all admitted.
UNKNOWN_METERS = ("--max-unknown-meters", "200", "--unknown-meters-per-minute", "6000", "--device-auth", "none")
#: One reading of ``meter_id`` answered by one worker, as the worker's --log-readings line says.
STORED_BY_WORKER = re.compile(r"\(worker PID (\d+)\): reading (?:stored|re-sent) meter=(\S+) seq=(\d+)")


def body(seq: int, ts: str) -> bytes:
    return json.dumps({"seq": seq, "ts": ts, "pressure_bar": 180.5, "temperature_c": 15.0, "volume_l": 50.0}).encode()


async def send(port: int, meter_id: str, readings: list[tuple[int, str]]) -> list[tuple[Code, dict[str, object]]]:
    """The readings of one meter from its own client socket, one after the other; their answers."""
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    answers = []
    try:
        for seq, ts in readings:
            request = aiocoap.Message(
                code=Code.PUT,
                uri=f"coap://127.0.0.1:{port}/meters/{meter_id}/reading",
                payload=body(seq, ts),
                content_format=50,
            )
            response = await asyncio.wait_for(context.request(request).response, 60)
            answers.append((response.code, json.loads(response.payload) if response.payload else {}))
    finally:
        await context.shutdown()
    return answers


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def stored_pairs(db: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as connection:
        return [(meter, seq) for meter, seq in connection.execute("SELECT meter_id, seq FROM readings")]


def test_workers_above_one_refuse_oscore_and_coap_get() -> None:
    with pytest.raises(ConfigError, match="--workers above 1 needs --device-auth none"):
        ConsumerConfig(workers=2, device_auth="oscore")
    with pytest.raises(ConfigError, match="--coap-reading-get"):
        ConsumerConfig(workers=2, coap_reading_get=True)
    assert ConsumerConfig(workers=1, device_auth="oscore").workers == 1


@pytest.mark.integration
async def test_two_workers_store_every_acknowledged_reading_once_and_keep_a_meter_on_one(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    meters = [f"worker-meter-{index:02d}" for index in range(30)]
    with consumer_process(db, *UNKNOWN_METERS, "--workers", "2", "--log-readings", "true") as consumer:
        worker_pids = {
            int((await asyncio.to_thread(consumer.logged, rf"CoAP worker {number} started, PID (\d+)")).group(1))
            for number in (1, 2)
        }
        readings = {meter: [(seq, now()) for seq in range(4)] for meter in meters}
        answers = await asyncio.gather(*(send(consumer.coap_port, meter, readings[meter]) for meter in meters))
        # A re-send of a stored reading (same seq and ts): acknowledged, answered as not stored again.
        (resend,) = await send(consumer.coap_port, meters[0], [readings[meters[0]][0]])
        assert await asyncio.to_thread(consumer.stop) == 0
    for meter_answers in answers:
        assert [code for code, _ in meter_answers] == [Code.CHANGED] * 4
        assert all(answer["stored"] is True for _, answer in meter_answers)
    assert resend[0] == Code.CHANGED and resend[1]["stored"] is False
    stored = stored_pairs(db)
    assert sorted(stored) == sorted((meter, seq) for meter in meters for seq in range(4))  # each exactly once
    # Which worker answered which meter: both took traffic, and every meter stayed on one of them.
    workers_of: defaultdict[str, set[int]] = defaultdict(set)
    for line in consumer.lines:
        if match := STORED_BY_WORKER.search(line):
            workers_of[match.group(2)].add(int(match.group(1)))
    assert set(workers_of) == set(meters)
    assert all(len(pids) == 1 for pids in workers_of.values()), workers_of
    assert set().union(*workers_of.values()) == worker_pids
    assert any("consumer stopped: received=121 stored=120 duplicates=1" in line for line in consumer.lines)


@pytest.mark.integration
async def test_a_killed_worker_is_restarted_and_readings_keep_being_stored(tmp_path: Path) -> None:
    db = tmp_path / "store.db"
    with consumer_process(db, *UNKNOWN_METERS, "--workers", "2") as consumer:
        killed = int((await asyncio.to_thread(consumer.logged, r"CoAP worker 1 started, PID (\d+)")).group(1))
        await asyncio.to_thread(consumer.logged, r"CoAP worker 2 started")
        mark = len(consumer.lines)
        os.kill(killed, signal.SIGKILL)  # the worker: a process of the consumer this test started
        await asyncio.to_thread(
            consumer.logged, rf"CoAP worker 1 \(PID {killed}\) exited with code -9; restarting", after=mark
        )
        restarted = int(
            (await asyncio.to_thread(consumer.logged, r"CoAP worker 1 started, PID (\d+)", after=mark)).group(1)
        )
        assert restarted != killed
        meters = [f"after-kill-{index:02d}" for index in range(20)]
        answers = await asyncio.gather(*(send(consumer.coap_port, meter, [(0, now()), (1, now())]) for meter in meters))
        assert await asyncio.to_thread(consumer.stop) == 0
    assert all([code for code, _ in meter_answers] == [Code.CHANGED] * 2 for meter_answers in answers)
    assert sorted(stored_pairs(db)) == sorted((meter, seq) for meter in meters for seq in range(2))
