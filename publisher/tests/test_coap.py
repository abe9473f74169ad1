"""Integration tests of the CoAP uplink's socket pool against a real aiocoap server on loopback.

The meters share a few sockets: a request borrows an idle one, a new one is made only while all are
busy (at most ``--coap-endpoints``), and a socket is replaced after its share of message ids.
"""

import asyncio
from collections import Counter
from typing import Any

import pytest
from aiocoap.numbers.codes import Code

from conftest import FakeConsumer, assert_every_reading_accounted_for, bounded, fast_config
from smartgas_publisher import coap
from smartgas_publisher.fleet import Fleet

pytestmark = pytest.mark.integration


async def test_meters_share_few_sockets_and_every_reading_arrives(consumer: FakeConsumer) -> None:
    config = fast_config(consumer.uri, meters=60, count=3, period_s=0.5)
    stats = await bounded(Fleet(config).run(), 60)
    assert_every_reading_accounted_for(stats)
    assert stats.acked == stats.produced == 180
    assert set(consumer.acknowledged()) == {(meter_id, seq) for meter_id in config.meter_ids() for seq in range(3)}
    ports = {received.source_port for received in consumer.received}
    # One socket per meter would be 60; a prompt consumer keeps only a few busy at once.
    assert len(ports) < 60
    # A socket carries many meters' readings, never two exchanges with one message id.
    per_port = Counter(received.source_port for received in consumer.received)
    assert max(per_port.values()) > 3
    ids = [(received.source_port, received.message_id) for received in consumer.received]
    assert len(set(ids)) == len(ids)


async def test_no_more_sockets_than_the_limit_when_the_consumer_is_slow(consumer: FakeConsumer) -> None:
    in_exchange: set[int] = set()
    most_at_once = 0

    async def slow(meter_id: str, body: dict[str, Any]) -> tuple[Code, bytes] | None:
        nonlocal most_at_once
        in_exchange.add(body["seq"] * 100 + int(meter_id[-4:]))
        most_at_once = max(most_at_once, len(in_exchange))
        await asyncio.sleep(0.1)
        in_exchange.discard(body["seq"] * 100 + int(meter_id[-4:]))
        return None

    consumer.responder = slow
    stats = await bounded(Fleet(fast_config(consumer.uri, meters=12, count=2, coap_endpoints=3)).run(), 60)
    assert stats.acked == stats.produced == 24
    assert len({received.source_port for received in consumer.received}) == 3
    assert most_at_once <= 3  # the meters beyond three waited for a free socket
    assert stats.send_delays.total == 24


async def test_a_socket_is_replaced_before_its_message_ids_could_repeat(
    consumer: FakeConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(coap, "MESSAGE_IDS_PER_ENDPOINT", 4)
    stats = await bounded(Fleet(fast_config(consumer.uri, meters=1, count=12, coap_endpoints=1)).run(), 60)
    assert stats.acked == 12
    # Three sockets in turn, four requests each: a socket's message ids count up by one from a random
    # start, so a new socket shows as a new port (or, should the system hand out a port again, a new start).
    runs: list[int] = []
    previous: tuple[int, int] | None = None
    for received in consumer.received:
        if previous == (received.source_port, (received.message_id - 1) & 0xFFFF):
            runs[-1] += 1
        else:
            runs.append(1)
        previous = (received.source_port, received.message_id)
    assert runs == [4, 4, 4]
