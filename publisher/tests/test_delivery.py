"""Integration tests of the delivery policy against real CoAP peers on loopback.

2.04 acknowledges, 4.xx fails for good, 5.xx / silence / a missing consumer are retried with the same
seq, a full buffer drops its oldest reading, and nothing hangs when the consumer never answers.
"""

import asyncio
import logging
import socket
from typing import Any

import pytest
from aiocoap.numbers.codes import Code

from conftest import (
    SILENT_PEER_TIMING,
    FakeConsumer,
    assert_every_reading_accounted_for,
    bounded,
    eventually,
    fast_config,
)
from smartgas_publisher.coap import response_deadline_s, transport_tuning
from smartgas_publisher.fleet import Fleet

pytestmark = pytest.mark.integration


async def test_acknowledged_readings_arrive_as_the_wire_format_says(
    consumer: FakeConsumer, reading_validator: Any
) -> None:
    stats = await bounded(Fleet(fast_config(consumer.uri, count=4)).run())
    assert_every_reading_accounted_for(stats)
    assert (stats.produced, stats.sent, stats.acked, stats.buffered) == (4, 4, 4, 0)
    assert stats.all_acknowledged
    assert consumer.acknowledged_seqs("sim-0001") == [0, 1, 2, 3]
    for received in consumer.received:
        assert received.content_format == 50
        reading_validator.validate(received.body)


async def test_wrong_endpoint_4xx_is_retried_not_dropped(consumer: FakeConsumer) -> None:
    answers = iter([Code.NOT_FOUND, Code.METHOD_NOT_ALLOWED, Code.UNSUPPORTED_CONTENT_FORMAT])

    async def misrouted_at_first(meter_id: str, body: dict[str, Any]) -> tuple[Code, bytes] | None:
        code = next(answers, None)
        return None if code is None else (code, b"not here")

    consumer.responder = misrouted_at_first
    stats = await bounded(Fleet(fast_config(consumer.uri, count=2)).run())
    assert_every_reading_accounted_for(stats)
    assert (stats.acked, stats.failed, stats.retried) == (2, 0, 3)
    assert consumer.acknowledged_seqs("sim-0001") == [0, 1]


async def test_4xx_counts_as_failed_and_is_not_retried(
    consumer: FakeConsumer, caplog: pytest.LogCaptureFixture
) -> None:
    async def refuse_seq_1(meter_id: str, body: dict[str, Any]) -> tuple[Code, bytes] | None:
        if body["seq"] == 1:
            return Code.BAD_REQUEST, b"pressure_bar: must be a finite number, got NaN"
        return None

    consumer.responder = refuse_seq_1
    with caplog.at_level(logging.WARNING, logger="smartgas_publisher"):
        stats = await bounded(Fleet(fast_config(consumer.uri, count=3)).run())
        assert_every_reading_accounted_for(stats)
    assert (stats.acked, stats.failed, stats.retried, stats.sent, stats.buffered) == (2, 1, 0, 3, 0)
    assert not stats.all_acknowledged
    assert [r.body["seq"] for r in consumer.received] == [0, 1, 2]  # seq 1 sent once, then the next
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].levelno == logging.WARNING
    assert "seq=1" in refusals[0].getMessage()
    assert "4.00 Bad Request pressure_bar: must be a finite number, got NaN" in refusals[0].getMessage()


async def test_5xx_is_retried_with_the_same_seq(consumer: FakeConsumer) -> None:
    unavailable_left = {"sim-0001": 2}

    async def unavailable_twice(meter_id: str, body: dict[str, Any]) -> tuple[Code, bytes] | None:
        if body["seq"] == 1 and unavailable_left[meter_id] > 0:
            unavailable_left[meter_id] -= 1
            return Code.SERVICE_UNAVAILABLE, b"store cannot commit"
        return None

    consumer.responder = unavailable_twice
    stats = await bounded(Fleet(fast_config(consumer.uri, count=3)).run())
    assert_every_reading_accounted_for(stats)
    assert (stats.acked, stats.retried, stats.failed, stats.sent) == (3, 2, 0, 5)
    assert stats.all_acknowledged
    bodies = [r.body for r in consumer.received]
    assert [b["seq"] for b in bodies] == [0, 1, 1, 1, 2]
    assert bodies[1] == bodies[2] == bodies[3]  # a re-send is the same reading, not a new one
    assert consumer.acknowledged_seqs("sim-0001") == [0, 1, 2]


async def test_readings_buffered_while_the_consumer_is_down_arrive_later_in_order(
    free_udp_port: int,
) -> None:
    config = fast_config(f"coap://127.0.0.1:{free_udp_port}", meters=3, count=8, drain_timeout_s=10.0)
    fleet = Fleet(config)
    run = asyncio.create_task(fleet.run())
    late = FakeConsumer()
    try:
        # every meter has failed at least once and kept producing
        await eventually(lambda: fleet.stats.retried >= 3 and fleet.stats.produced >= 9)
        assert fleet.stats.acked == 0
        await late.start(free_udp_port)
        stats = await bounded(run)
        assert_every_reading_accounted_for(stats)
    finally:
        run.cancel()
        await late.stop()
    assert (stats.produced, stats.acked, stats.dropped, stats.failed, stats.buffered) == (24, 24, 0, 0, 0)
    assert stats.retried >= 3
    for meter_id in config.meter_ids():
        assert late.acknowledged_seqs(meter_id) == list(range(8))  # none lost, oldest first


async def test_full_buffer_drops_the_oldest_and_counts_it(free_udp_port: int, caplog: pytest.LogCaptureFixture) -> None:
    config = fast_config(f"coap://127.0.0.1:{free_udp_port}", count=6, buffer=3, drain_timeout_s=10.0)
    fleet = Fleet(config)
    late = FakeConsumer()
    with caplog.at_level(logging.WARNING, logger="smartgas_publisher"):
        run = asyncio.create_task(fleet.run())
        try:
            await eventually(lambda: fleet.stats.produced >= 6)
            await late.start(free_udp_port)
            stats = await bounded(run)
            assert_every_reading_accounted_for(stats)
        finally:
            run.cancel()
            await late.stop()
    assert (stats.produced, stats.dropped, stats.acked, stats.buffered) == (6, 3, 3, 0)
    assert late.acknowledged_seqs("sim-0001") == [3, 4, 5]
    drops = [r.getMessage() for r in caplog.records if "dropped the oldest" in r.getMessage()]
    assert [d.split("seq=")[1].split()[0] for d in drops] == ["0", "1", "2"]
    assert not stats.all_acknowledged


async def test_silent_consumer_counts_retries_and_reports_unsent() -> None:
    # A socket that never answers: aiocoap retransmits MAX_RETRANSMIT times, then gives up.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        config = fast_config(f"coap://127.0.0.1:{port}", count=2, drain_timeout_s=2.0, **SILENT_PEER_TIMING)
        stats = await bounded(Fleet(config).run())
        assert_every_reading_accounted_for(stats)
        silent.setblocking(False)
        datagrams = 0
        while datagrams < 1000:
            try:
                silent.recv(2048)
            except BlockingIOError:
                break
            datagrams += 1
    assert stats.acked == 0
    assert stats.retried >= 1
    assert stats.buffered == 2  # both readings reported unsent
    assert datagrams >= 2 * stats.retried  # each failed attempt was the request and a retransmission
    assert not stats.all_acknowledged


async def test_a_response_that_never_comes_is_bounded_by_the_deadline(consumer: FakeConsumer) -> None:
    # The server ACKs (empty ACK after aiocoap's 0.1 s) but never sends the separate response.
    release = asyncio.Event()

    async def hang(meter_id: str, body: dict[str, Any]) -> tuple[Code, bytes] | None:
        await release.wait()
        return None

    consumer.responder = hang
    config = fast_config(consumer.uri, count=1, ack_timeout_s=0.05, max_retransmit=2, drain_timeout_s=2.5)
    deadline_s = response_deadline_s(transport_tuning(0.05, 2))
    assert deadline_s < 2.5 / 2
    try:
        stats = await bounded(Fleet(config).run())
        assert_every_reading_accounted_for(stats)
    finally:
        release.set()
    assert stats.acked == 0
    assert stats.retried >= 1  # at least one attempt ended by the deadline, and the next one started
    assert stats.sent >= 2
