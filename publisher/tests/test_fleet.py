"""Integration tests of the fleet: many meters at once, status lines, stopping, and clean shutdown."""

import asyncio
import logging
import os
from typing import Any

import pytest
import yaml

from conftest import (
    FLEET_FILE,
    FakeConsumer,
    assert_every_reading_accounted_for,
    bounded,
    eventually,
    fast_config,
)
from smartgas_publisher import fleet as fleet_module
from smartgas_publisher.fault import parse_injection
from smartgas_publisher.fleet import Fleet

pytestmark = pytest.mark.integration


async def test_fleet_of_20_delivers_every_reading_exactly(consumer: FakeConsumer, reading_validator: Any) -> None:
    config = fast_config(consumer.uri, meters=20, count=3, period_s=0.1)
    stats = await bounded(Fleet(config).run())
    assert_every_reading_accounted_for(stats)
    assert (stats.meters, stats.produced, stats.acked, stats.sent) == (20, 60, 60, 60)
    assert (stats.retried, stats.failed, stats.dropped, stats.buffered) == (0, 0, 0, 0)
    assert stats.all_acknowledged
    delivered = consumer.acknowledged()
    assert len(delivered) == 60
    assert set(delivered) == {(meter_id, seq) for meter_id in config.meter_ids() for seq in range(3)}
    for received in consumer.received:
        reading_validator.validate(received.body)
    # Each meter is its own bottle: one volume per meter, and more than one across the fleet.
    volumes = {r.meter_id: r.body["volume_l"] for r in consumer.received}
    assert len(set(volumes.values())) > 1


async def test_same_seed_same_bottles_across_runs(consumer: FakeConsumer) -> None:
    config = fast_config(consumer.uri, meters=5, count=1, seed=123)
    await bounded(Fleet(config).run())
    first = {r.meter_id: r.body["volume_l"] for r in consumer.received}
    consumer.received.clear()
    await bounded(Fleet(config).run())
    assert {r.meter_id: r.body["volume_l"] for r in consumer.received} == first


async def test_status_line_is_logged_every_interval(consumer: FakeConsumer, caplog: pytest.LogCaptureFixture) -> None:
    config = fast_config(consumer.uri, meters=2, count=6, period_s=0.05, status_interval_s=0.05)
    with caplog.at_level(logging.INFO, logger="smartgas_publisher"):
        await bounded(Fleet(config).run())
    lines = [r.getMessage() for r in caplog.records]
    status = [line for line in lines if line.startswith("fleet: meters=2 ")]
    assert len(status) >= 2
    for key in ("produced=", "sent=", "acked=", "retried=", "failed=", "dropped=", "buffered="):
        assert key in status[0]
    assert lines[-1].startswith(
        "fleet finished: meters=2 produced=12 sent=12 acked=12 retried=0 failed=0 dropped=0 unsent=0 send_delay_ms p50="
    )
    assert "late_over_1s=" in lines[-1]


async def test_stop_request_ends_an_endless_run_after_draining(consumer: FakeConsumer) -> None:
    fleet = Fleet(fast_config(consumer.uri, meters=3, count=None, period_s=0.05))
    run = asyncio.create_task(fleet.run())
    try:
        await eventually(lambda: fleet.stats.acked >= 9)
        fleet.request_stop()
        stats = await bounded(run, 10)
        assert_every_reading_accounted_for(stats)
    finally:
        run.cancel()
    assert stats.produced >= 9
    assert stats.acked == stats.produced  # what was buffered at the stop was still delivered
    produced_after_stop = stats.produced
    await asyncio.sleep(0.2)
    assert fleet.stats.produced == produced_after_stop


async def test_second_stop_request_quits_without_waiting(free_udp_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nobody listens: the first stop would wait up to SHUTDOWN_DRAIN_S (an hour here, so that the run
    # ending at all proves the second request ended the wait, with no clock in the assertion).
    monkeypatch.setattr(fleet_module, "SHUTDOWN_DRAIN_S", 3600.0)
    fleet = Fleet(fast_config(f"coap://127.0.0.1:{free_udp_port}", meters=2, count=None))
    run = asyncio.create_task(fleet.run())
    try:
        await eventually(lambda: fleet.stats.produced >= 4)
        fleet.request_stop()
        await asyncio.sleep(0.1)
        assert not run.done()  # the first request drains
        fleet.request_stop()
        stats = await bounded(run, 60)
        assert_every_reading_accounted_for(stats)
    finally:
        run.cancel()
    assert stats.acked == 0
    assert stats.buffered == stats.produced >= 4
    assert not stats.all_acknowledged


async def test_every_coap_context_is_shut_down(consumer: FakeConsumer) -> None:
    open_before = len(os.listdir("/proc/self/fd"))
    fleet = Fleet(fast_config(consumer.uri, meters=25, count=1))
    await bounded(fleet.run())
    assert fleet.stats.acked == 25
    assert len(os.listdir("/proc/self/fd")) == open_before  # every meter's socket is closed again


# ---- the fleet file


async def test_fleet_file_meters_deliver_with_their_ids_and_bottles(
    consumer: FakeConsumer, reading_validator: Any
) -> None:
    raw = {entry["id"]: entry for entry in yaml.safe_load(FLEET_FILE.read_text())["meters"]}
    config = fast_config(consumer.uri, fleet_path=str(FLEET_FILE), count=2, period_s=0.1)
    stats = await bounded(Fleet(config).run())
    assert_every_reading_accounted_for(stats)
    assert (stats.meters, stats.produced, stats.acked) == (54, 108, 108)
    assert stats.all_acknowledged
    # Delivery is at least once: a reading whose acknowledgement came late may arrive twice (the consumer
    # keeps one copy), so the readings acknowledged are compared as a set, and the publisher counted each once.
    assert set(consumer.acknowledged()) == {(meter_id, seq) for meter_id in raw for seq in range(2)}
    for received in consumer.received:
        reading_validator.validate(received.body)
        assert received.body["volume_l"] == raw[received.meter_id]["volume_l"]


async def test_offline_meter_stops_after_two_readings_and_counts_as_done(consumer: FakeConsumer) -> None:
    config = fast_config(
        consumer.uri,
        fleet_path=str(FLEET_FILE),
        count=4,
        period_s=0.1,
        inject=(parse_injection("offline:bottle-0003"),),
    )
    stats = await bounded(Fleet(config).run())
    assert_every_reading_accounted_for(stats)
    assert (stats.produced, stats.acked) == (53 * 4 + 2, 53 * 4 + 2)
    assert stats.all_acknowledged
    assert consumer.acknowledged_seqs("bottle-0003") == [0, 1]
    assert consumer.acknowledged_seqs("bottle-0004") == [0, 1, 2, 3]


async def test_offline_meter_stays_silent_while_an_endless_fleet_runs(consumer: FakeConsumer) -> None:
    config = fast_config(consumer.uri, meters=2, count=None, inject=(parse_injection("offline:sim-0001"),))
    fleet = Fleet(config)
    run = asyncio.create_task(fleet.run())
    try:
        await eventually(lambda: len(consumer.acknowledged_seqs("sim-0002")) >= 8)
        assert not run.done()  # the silent meter does not end the run
        fleet.request_stop()
        stats = await bounded(run, 10)
    finally:
        run.cancel()
    assert consumer.acknowledged_seqs("sim-0001") == [0, 1]
    assert stats.all_acknowledged
