"""The container healthcheck's probe against a real consumer on loopback (conftest's ``consumer`` fixture)."""

from __future__ import annotations

import asyncio

import pytest

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.health import Unhealthy, healthcheck, probe, probe_uri
from smartgas_consumer.server import Consumer

pytestmark = pytest.mark.integration


async def test_probe_gets_the_link_format_of_a_running_consumer(consumer: Consumer) -> None:
    links = await probe(f"coap://127.0.0.1:{consumer.port}/.well-known/core", timeout_s=5)
    assert "</meters>" in links


async def test_healthcheck_exit_code_follows_the_consumer(consumer: Consumer) -> None:
    assert consumer.port is not None
    config = ConsumerConfig(coap_host="::", coap_port=consumer.port)  # a wildcard bind: probe the loopback
    assert await healthcheck(config, timeout_s=5) == 0
    await consumer.stop()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await healthcheck(config, timeout_s=2) == 1
    assert loop.time() - started < 4  # bounded, well inside the compose healthcheck's timeout


async def test_something_else_on_the_port_is_not_healthy(unused_udp_port: int) -> None:
    # Nothing listens there: the probe fails (ICMP refusal or its own timeout), it does not hang.
    with pytest.raises(Unhealthy):
        await probe(f"coap://127.0.0.1:{unused_udp_port}/.well-known/core", timeout_s=1)


@pytest.mark.parametrize(
    ("host", "uri"),
    [
        ("::", "coap://127.0.0.1:5683/.well-known/core"),
        ("0.0.0.0", "coap://127.0.0.1:5683/.well-known/core"),
        ("::1", "coap://[::1]:5683/.well-known/core"),
        ("127.0.0.2", "coap://127.0.0.2:5683/.well-known/core"),
    ],
)
def test_probe_uri(host: str, uri: str) -> None:
    assert probe_uri(ConsumerConfig(coap_host=host, coap_port=5683)) == uri


def test_probe_uri_needs_a_fixed_port() -> None:
    with pytest.raises(Unhealthy, match="port is 0"):
        probe_uri(ConsumerConfig(coap_port=0))
