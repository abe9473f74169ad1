"""MQTT ingest by real consumer processes on a real Mosquitto: ``kill -9`` under load and a shared
subscription over two consumers, every reading accounted for in the store files afterwards."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
from pathlib import Path

import pytest
from mqtt_meter import MqttMeter
from running import ConsumerProcess, consumer_process

from smartgas_common.mosquitto import Mosquitto, mosquitto_binary

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make deps installs it)"),
]

#: Bounds for a loaded 2-core machine; every wait returns as soon as its condition holds.
WAIT_S = 90.0
METERS = 4


async def until(condition: object, what: str, timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # type: ignore[operator]  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(0.1)


def mqtt_options(broker: Mosquitto, client_id: str, *extra: str) -> list[str]:
    return ["--mqtt-broker", broker.url, "--mqtt-client-id", client_id, "--status-interval", "1", *extra]


def stored_keys(db: Path) -> list[tuple[str, int]]:
    """Every stored (meter_id, seq), duplicates kept: the store file of a consumer that has stopped."""
    with sqlite3.connect(db) as connection:
        return [tuple(row) for row in connection.execute("SELECT meter_id, seq FROM readings")]


def publish_all(meters: list[MqttMeter], readings: int, published: list[tuple[str, int]]) -> None:
    """Each meter publishes seq 0..readings-1 (asking for answers), each waiting for the broker's PUBACK."""

    def one(meter: MqttMeter) -> None:
        for seq in range(readings):
            assert str(meter.publish_reading(seq)) == "Success"
            published.append((meter.meter_id, seq))

    threads = [threading.Thread(target=one, args=(meter,)) for meter in meters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive(), "a meter did not finish publishing"


async def stop(consumer: ConsumerProcess) -> None:
    assert await asyncio.to_thread(consumer.stop) == 0, consumer.log()


async def test_kill_9_under_mqtt_load_loses_nothing_and_stores_each_reading_once(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """A consumer killed with SIGKILL mid-stream: nothing it acknowledged (answered 2.04) is lost, and the
    restarted consumer (same session) gets from the broker every reading it had not acknowledged, so that
    each published reading ends up stored exactly once."""
    db, readings = tmp_path / "store.db", 150
    meters = [await asyncio.to_thread(MqttMeter(broker.port, f"kill-{n}").connect) for n in range(METERS)]
    published: list[tuple[str, int]] = []
    try:
        with consumer_process(db, *mqtt_options(broker, "smartgas-kill")) as first:
            await until(lambda: first.metric("smartgas_mqtt_connected") == 1, "the first consumer subscribed")
            publishing = asyncio.create_task(asyncio.to_thread(publish_all, meters, readings, published))
            await until(lambda: first.metric("smartgas_readings_stored_total") >= readings, "a quarter stored")
            # mid-stream: readings in flight, some committed unacked
            await asyncio.to_thread(first.stop, signal.SIGKILL)
        answered_before = {(m.meter_id, a.document["seq"]) for m in meters for a in m.answers}
        await asyncio.wait_for(publishing, timeout=WAIT_S)  # the broker took every reading meanwhile
        assert len(published) == METERS * readings
        with consumer_process(db, *mqtt_options(broker, "smartgas-kill")) as second:

            def all_answered() -> bool:
                return all({a.document["seq"] for a in m.answers} >= set(range(readings)) for m in meters)

            await until(all_answered, "every reading answered")
            await stop(second)
    finally:
        for meter in meters:
            await asyncio.to_thread(meter.close)
    keys = stored_keys(db)
    assert len(keys) == len(set(keys)) == METERS * readings  # each once, none missing
    assert set(keys) == set(published)
    assert answered_before and answered_before <= set(keys)  # acknowledged before the kill: kept
    assert 0 < len(answered_before) < METERS * readings  # the kill did land mid-stream
    assert {a.document["code"] for m in meters for a in m.answers} == {"2.04"}


async def test_two_consumers_on_one_shared_subscription_store_each_reading_once(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Two consumer processes, two stores, one shared subscription ($share/ingest/…): the broker gives each
    reading to one of them; together they store every reading, and no reading twice."""
    readings = 50
    dbs = [tmp_path / "a.db", tmp_path / "b.db"]
    meters = [await asyncio.to_thread(MqttMeter(broker.port, f"shared-{n}").connect) for n in range(METERS)]
    published: list[tuple[str, int]] = []
    try:
        with (
            consumer_process(dbs[0], *mqtt_options(broker, "smartgas-a", "--mqtt-shared-group", "ingest")) as a,
            consumer_process(dbs[1], *mqtt_options(broker, "smartgas-b", "--mqtt-shared-group", "ingest")) as b,
        ):
            for consumer in (a, b):
                await until(lambda c=consumer: c.metric("smartgas_mqtt_connected") == 1, "both subscribed")
            await asyncio.to_thread(publish_all, meters, readings, published)
            await until(lambda: sum(len(m.answers) for m in meters) >= METERS * readings, "every reading answered")
            await stop(a)
            await stop(b)
    finally:
        for meter in meters:
            await asyncio.to_thread(meter.close)
    first, second = (stored_keys(db) for db in dbs)
    assert first and second  # the broker shared the readings out
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(published)
