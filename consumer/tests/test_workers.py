"""``--workers N``: worker processes on one CoAP port (SO_REUSEPORT), committing through the consumer's store.

Real processes on loopback: a consumer with two workers, meters each sending from its own client socket
(its own source port, as a real meter does), the store read after the consumer stopped.
"""

from __future__ import annotations

import asyncio
import json
import marshal
import os
import re
import signal
import socket
import sqlite3
import struct
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from running import consumer_process

from smartgas_consumer.config import ConfigError, ConsumerConfig
from smartgas_consumer.error import StoreUnavailable
from smartgas_consumer.handoff import decode_commit
from smartgas_consumer.reading import Reading
from smartgas_consumer.store import Enrichment
from smartgas_consumer.workers import ConsumerLink

#: Meters not in any fleet file (no fleet: the workers start without building gas models), all admitted.
UNKNOWN_METERS = ("--max-unknown-meters", "200", "--unknown-meters-per-minute", "6000", "--device-auth", "none")
#: One reading of ``meter_id`` answered by one worker, as the worker's --log-readings line says (the re-send
#: below comes from another client socket, so it is left out).
STORED_BY_WORKER = re.compile(r"\(worker PID (\d+)\): reading stored meter=(\S+) seq=(\d+)")


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
            # A 2.04 carries the answer's JSON, a refusal its diagnostic text.
            document = json.loads(response.payload) if response.code.is_successful() else {"text": response.payload}
            answers.append((response.code, document))
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


async def read_items(reader: asyncio.StreamReader, count: int) -> list[tuple[object, ...]]:
    """The next ``count`` items of the marshal frames (a 4-byte length, then the body) on ``reader``."""
    items: list[tuple[object, ...]] = []
    while len(items) < count:
        (length,) = struct.unpack("!I", await asyncio.wait_for(reader.readexactly(4), 10))
        items.extend(marshal.loads(await asyncio.wait_for(reader.readexactly(length), 10)))
    return items


async def test_a_worker_answers_503_at_once_when_too_many_readings_wait_for_the_commit() -> None:
    """A consumer that does not answer (the far end of a real socket pair that only reads: a stand-in for a
    consumer slower than its workers) holds at most ``max_waiting`` readings of a worker; the next is
    refused 5.03 at once instead of piling up in memory."""
    worker_end, consumer_end = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, link = await loop.create_unix_connection(lambda: ConsumerLink(max_waiting=2), sock=worker_end)
    consumer_reader, consumer_writer = await asyncio.open_unix_connection(sock=consumer_end)
    reading = Reading("slow-0001", 1, datetime.now(UTC), 180.0, 15.0, 50.0)
    waiting = [asyncio.create_task(link.commit(reading, 1.0, Enrichment())) for _ in range(2)]
    received = await read_items(consumer_reader, 2)
    assert [decode_commit(item)[0] for item in received] == [reading, reading]
    with pytest.raises(StoreUnavailable, match="2 readings of this worker wait for the commit"):
        await link.commit(reading, 1.0, Enrichment())
    consumer_writer.close()  # the consumer goes: the waiting readings are refused 5.03, not left hanging
    for task in waiting:
        with pytest.raises(StoreUnavailable, match="the consumer stopped"):
            await asyncio.wait_for(task, 10)
    await link.wait_closed()


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


@pytest.mark.integration
async def test_a_refusal_of_the_commit_step_reaches_the_meter_through_its_worker(tmp_path: Path) -> None:
    """The admission of unknown meters is the consumer's: its 4.03 and its text come back through the worker."""
    db = tmp_path / "store.db"
    options = ("--max-unknown-meters", "2", "--device-auth", "none", "--workers", "2")
    with consumer_process(db, *options) as consumer:
        admitted = [await send(consumer.coap_port, f"held-{index}", [(0, now())]) for index in range(2)]
        ((code, refusal),) = await send(consumer.coap_port, "one-too-many", [(0, now())])
        assert await asyncio.to_thread(consumer.stop) == 0
    assert [answers[0][0] for answers in admitted] == [Code.CHANGED, Code.CHANGED]
    assert code == Code.FORBIDDEN
    assert b"--max-unknown-meters 2" in refusal["text"]  # type: ignore[operator]
    assert sorted(stored_pairs(db)) == [("held-0", 0), ("held-1", 0)]
    assert any("rejected=1 (unknown_meter_refused=1)" in line for line in consumer.lines)
