"""The container healthcheck's probe against a real consumer on loopback (conftest's ``consumer`` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest
from chattr import chattr, immutable  # noqa: F401 (chattr is a fixture)

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.health import PROBE_EVERY_S, Unhealthy, healthcheck, probe, probe_uri
from smartgas_consumer.server import Consumer

pytestmark = pytest.mark.integration


async def test_probe_gets_ok_from_a_running_consumer(consumer: Consumer) -> None:
    assert await probe(f"coap://127.0.0.1:{consumer.port}/health", timeout_s=5) == "ok"


@pytest.mark.usefixtures("chattr")
async def test_healthcheck_fails_while_the_store_cannot_commit(consumer: Consumer) -> None:
    # A real fault: the store's files made immutable under the running consumer. The process answers
    # (no SIGBUS), the probe says unhealthy and why, and healthy again once the fault is gone.
    assert consumer.port is not None
    config = ConsumerConfig(coap_host="127.0.0.1", coap_port=consumer.port)
    db = consumer.config.db
    with immutable(db, db.with_name(db.name + "-wal")):
        await asyncio.sleep(PROBE_EVERY_S)  # past the cached answer of the probe before
        with pytest.raises(Unhealthy, match=r"5\.03.*could not commit"):
            await probe(probe_uri(config), timeout_s=5)
        assert await healthcheck(config, timeout_s=5) == 1
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"http://127.0.0.1:{consumer.http.port}/healthz", timeout=10)
        assert answer.status_code == 503 and "could not commit" in answer.json()["reason"]
    await asyncio.sleep(PROBE_EVERY_S)
    assert await healthcheck(config, timeout_s=5) == 0
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"http://127.0.0.1:{consumer.http.port}/healthz", timeout=10)
    assert (answer.status_code, answer.json()) == (200, {"status": "ok"})


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
        await probe(f"coap://127.0.0.1:{unused_udp_port}/health", timeout_s=1)


@pytest.mark.parametrize(
    ("host", "uri"),
    [
        ("::", "coap://127.0.0.1:5683/health"),
        ("0.0.0.0", "coap://127.0.0.1:5683/health"),
        ("::1", "coap://[::1]:5683/health"),
        ("127.0.0.2", "coap://127.0.0.2:5683/health"),
    ],
)
def test_probe_uri(host: str, uri: str) -> None:
    assert probe_uri(ConsumerConfig(coap_host=host, coap_port=5683)) == uri


def test_probe_uri_needs_a_fixed_port() -> None:
    with pytest.raises(Unhealthy, match="port is 0"):
        probe_uri(ConsumerConfig(coap_port=0))


@pytest.mark.usefixtures("chattr")
async def test_without_coap_the_healthcheck_asks_healthz(consumer_config: ConsumerConfig) -> None:
    """--coap-enabled false (MQTT only): the healthcheck probes GET /healthz, which passes while the store
    commits (even with the broker away: degraded, not unhealthy) and fails while it cannot."""
    from smartgas_common.mosquitto import free_loopback_port

    config = dataclasses.replace(
        consumer_config,
        coap_enabled=False,
        http_port=free_loopback_port(),
        mqtt_broker=f"mqtt://127.0.0.1:{free_loopback_port()}",  # nothing there: MQTT is down
    )
    running = Consumer(config)
    await running.start()
    try:
        assert await healthcheck(config, timeout_s=5) == 0
        db = config.db
        with immutable(db, db.with_name(db.name + "-wal")):
            await asyncio.sleep(PROBE_EVERY_S)  # past the cached answer of the probe before
            assert await healthcheck(config, timeout_s=5) == 1
    finally:
        await running.stop()
    assert await healthcheck(config, timeout_s=2) == 1  # nothing answers any more
