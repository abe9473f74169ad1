"""Shared fixtures: the wire contract's files, a real consumer on a loopback ephemeral port, a CoAP client,
and one real Elasticsearch node for the session (elasticsearch_node.py)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from elasticsearch_node import ElasticsearchNode, NodeUnavailable, make_node
from webhook_receiver import Receiver

from smartgas_common.mosquitto import Mosquitto
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.dedup import BoundedDedupMessageManager
from smartgas_consumer.server import Consumer

WIRE_DIR = Path(__file__).resolve().parents[2] / "docs" / "wire-format"
#: The wire examples are dated 2026-11-23; consumers under test believe readings that old, so the examples
#: stay valid as time passes. The time window itself is tested with its own settings (test_edge.py).
EXAMPLES_MAX_AGE_S = 20 * 365 * 86400.0


def wire_example(name: str) -> Any:
    return json.loads((WIRE_DIR / "examples" / name).read_text())


@pytest.fixture
def reading_schema() -> dict[str, Any]:
    return json.loads((WIRE_DIR / "reading.schema.json").read_text())


@pytest.fixture
def consumer_config(tmp_path: Path) -> ConsumerConfig:
    # Port 0: the kernel picks a free port, so parallel runs never collide (and never touch 5683).
    return ConsumerConfig(
        coap_host="127.0.0.1",
        coap_port=0,
        http_port=0,
        db=tmp_path / "store.db",
        status_interval_s=3600,
        max_reading_age_s=EXAMPLES_MAX_AGE_S,
    )


@pytest.fixture
async def consumer(consumer_config: ConsumerConfig) -> AsyncIterator[Consumer]:
    running = Consumer(consumer_config)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def coap() -> AsyncIterator[aiocoap.Context]:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield context
    finally:
        await context.shutdown()


def reading_uri(consumer: Consumer, meter_id: str = "bottle-0001") -> str:
    return f"coap://127.0.0.1:{consumer.port}/meters/{meter_id}/reading"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook receiver on a loopback ephemeral port."""
    server = Receiver()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def elasticsearch_node() -> Iterator[ElasticsearchNode | str]:
    """The session's real Elasticsearch node, started on first use and stopped at the end.

    ``SMARTGAS_TEST_ELASTICSEARCH_URL`` names a node that is already running instead (yielded as its URL);
    when no node can be had, the reason is yielded and the tests that need one skip with it.
    """
    external = os.environ.get("SMARTGAS_TEST_ELASTICSEARCH_URL")
    if external:
        yield external.rstrip("/")
        return
    try:
        node = make_node()
        node.start()
    except NodeUnavailable as err:
        yield f"no real Elasticsearch: {err}"
        return
    print(f"\nElasticsearch {node.version} started in {node.start_seconds:.1f} s at {node.url}")
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
def elasticsearch_url(elasticsearch_node: ElasticsearchNode | str) -> str:
    """The URL of the session's real Elasticsearch node (the test skips, by name, without one)."""
    if isinstance(elasticsearch_node, ElasticsearchNode):
        return elasticsearch_node.url
    if elasticsearch_node.startswith("http"):
        return elasticsearch_node
    pytest.skip(elasticsearch_node)


@pytest.fixture
def restartable_elasticsearch(elasticsearch_node: ElasticsearchNode | str) -> ElasticsearchNode:
    """The session's node itself, for tests that kill and restart it (not possible with an external one)."""
    if isinstance(elasticsearch_node, ElasticsearchNode):
        return elasticsearch_node
    if elasticsearch_node.startswith("http"):
        pytest.skip("SMARTGAS_TEST_ELASTICSEARCH_URL names an external node, which this test cannot kill")
    pytest.skip(elasticsearch_node)


@pytest.fixture
def peer() -> Iterator[socket.socket]:
    """A raw UDP socket on loopback, non-blocking: a CoAP peer that sends hand-made datagrams."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


def message_manager(consumer: Consumer) -> BoundedDedupMessageManager:
    """The running consumer's CoAP message layer (``dedup.py``'s subclass of aiocoap's)."""
    assert consumer._context is not None
    (interface,) = consumer._context.request_interfaces
    manager = interface.token_interface
    assert isinstance(manager, BoundedDedupMessageManager)
    return manager


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto on a free loopback port, stopped after the test (the MQTT tests skip by name
    where mosquitto is not installed)."""
    with Mosquitto(tmp_path / "broker") as running:
        yield running
