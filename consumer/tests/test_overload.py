"""Readings arriving faster than the store commits: beyond ``--max-pending-readings`` they are refused 5.03 at
once, so a sustained overload cannot grow the consumer's memory without end; those already waiting are
committed and acknowledged as usual.

A real consumer on loopback and a real SQLite file; the commit is held back by a real write of the store's
own API that keeps its writer thread busy (what a slow disk does), not by a stand-in.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from conftest import reading_uri
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.server import Consumer

pytestmark = pytest.mark.integration

MAX_PENDING = 3
METERS = 8


@pytest.fixture
def consumer_config(consumer_config: ConsumerConfig) -> ConsumerConfig:
    return replace(consumer_config, max_pending_readings=MAX_PENDING)


async def test_beyond_max_pending_readings_a_reading_is_refused_5_03_at_once_and_the_rest_are_stored(
    consumer: Consumer, coap: aiocoap.Context
) -> None:
    release = threading.Event()
    # The writer thread is busy until released: readings queue for the group commit behind it.
    blocker = asyncio.create_task(consumer.store.write(lambda _connection: release.wait(60)))

    async def put(meter_id: str) -> aiocoap.Message:
        body = {"seq": 1, "ts": "2026-11-23T08:00:00Z", "pressure_bar": 180.0, "temperature_c": 15.0, "volume_l": 50.0}
        message = aiocoap.Message(
            code=Code.PUT, uri=reading_uri(consumer, meter_id), payload=json.dumps(body).encode(), content_format=50
        )
        return await asyncio.wait_for(coap.request(message).response, timeout=60)

    sent = [asyncio.create_task(put(f"m-{n}")) for n in range(METERS)]
    for _ in range(6000):  # bounded: 60 s
        if consumer.intake.pending >= MAX_PENDING and sum(task.done() for task in sent) >= METERS - MAX_PENDING:
            break
        await asyncio.sleep(0.01)
    refused = [task.result() for task in sent if task.done()]
    assert len(refused) == METERS - MAX_PENDING  # answered while the store still could not commit
    for answer in refused:
        assert answer.code == Code.SERVICE_UNAVAILABLE
        assert b"readings wait for the commit (--max-pending-readings 3)" in answer.payload
    release.set()
    await blocker
    answers = await asyncio.gather(*sent)
    assert sum(answer.code == Code.CHANGED for answer in answers) == MAX_PENDING
    stored = await consumer.store.read(lambda c: c.execute("SELECT count(*) FROM readings").fetchone()[0])
    assert stored == MAX_PENDING  # every acknowledged reading, and no refused one
    assert consumer.intake.pending == 0
    assert consumer.intake.counters.rejected["overloaded"] == METERS - MAX_PENDING
