"""Admission of meters missing from the fleet file: the cap, the rate limit, forgetting; unit and over CoAP."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from conftest import wire_example
from smartgas_consumer.admission import UnknownMeters
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.error import NewMeterRateLimited, UnknownMeterRefused
from smartgas_consumer.server import Consumer

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_cap_refuses_new_meters_but_not_the_ones_held() -> None:
    meters = UnknownMeters(max_unknown=2, per_minute=1000, forget_after=timedelta(hours=1), clock=Clock())
    meters.admit("a")
    meters.admit("b")
    with pytest.raises(UnknownMeterRefused, match="--max-unknown-meters 2"):
        meters.admit("c")
    meters.admit("a")  # held: always admitted
    assert meters.held == 2


def test_rate_limit_allows_a_minutes_burst_then_says_when_to_retry() -> None:
    clock = Clock()
    meters = UnknownMeters(max_unknown=100, per_minute=6, forget_after=timedelta(hours=1), clock=clock)
    for n in range(6):
        meters.admit(f"m{n}")
    with pytest.raises(NewMeterRateLimited) as raised:
        meters.admit("m6")
    assert raised.value.max_age_s == 10  # one new meter per 10 s
    assert raised.value.to_message().opt.max_age == 10
    clock.now_s += 10
    meters.admit("m6")
    assert meters.held == 7


def test_silent_meters_are_forgotten_and_listeners_release_them() -> None:
    clock = Clock()
    meters = UnknownMeters(max_unknown=2, per_minute=1000, forget_after=timedelta(minutes=5), clock=clock)
    released: list[str] = []
    meters.on_forget.append(released.extend)
    meters.admit("a")
    clock.now_s += 200
    meters.admit("b")
    clock.now_s += 200  # a: silent 400 s; b: 200 s
    meters.admit("c")  # a is forgotten first, so c takes its slot
    assert released == ["a"] and meters.held == 2


@pytest.fixture
async def capped(consumer_config: ConsumerConfig) -> AsyncIterator[Consumer]:
    config = dataclasses.replace(consumer_config, fleet=FLEET_FILE, max_unknown_meters=3, unknown_meters_per_minute=600)
    running = Consumer(config)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def put(coap: aiocoap.Context, consumer: Consumer, meter_id: str) -> aiocoap.Message:
    message = aiocoap.Message(
        code=Code.PUT,
        uri=f"coap://127.0.0.1:{consumer.port}/meters/{meter_id}/reading",
        payload=json.dumps(wire_example("reading-250bar.json")).encode(),
        content_format=50,
    )
    return await coap.request(message).response


@pytest.mark.integration
async def test_over_coap_beyond_the_cap_is_4_03_and_counted(capped: Consumer, coap: aiocoap.Context) -> None:
    for n in range(3):
        assert (await put(coap, capped, f"stranger-{n}")).code == Code.CHANGED
    refused = await put(coap, capped, "stranger-3")
    assert refused.code == Code.FORBIDDEN
    assert b"not in the fleet file" in refused.payload and b"--max-unknown-meters 3" in refused.payload
    assert (await put(coap, capped, "bottle-0001")).code == Code.CHANGED  # listed meters are never capped
    assert (await put(coap, capped, "stranger-0")).code == Code.CHANGED  # nor unknown meters already held
    metrics, _ = capped.metrics.render()
    assert b'smartgas_readings_rejected_total{reason="unknown_meter_refused"} 1.0' in metrics
    assert (await capped.store.summary()).meters == 4


@pytest.mark.integration
async def test_over_coap_too_fast_is_4_29_with_max_age(consumer_config: ConsumerConfig, coap: aiocoap.Context) -> None:
    config = dataclasses.replace(consumer_config, fleet=FLEET_FILE, unknown_meters_per_minute=2)
    running = Consumer(config)
    await running.start()
    try:
        for n in range(2):
            assert (await put(coap, running, f"stranger-{n}")).code == Code.CHANGED
        limited = await put(coap, running, "stranger-2")
        assert limited.code == Code.TOO_MANY_REQUESTS
        assert limited.opt.max_age == 30 and b"retry in 30 s" in limited.payload
        metrics, _ = running.metrics.render()
        assert b'smartgas_readings_rejected_total{reason="new_meter_rate_limited"} 1.0' in metrics
    finally:
        await running.stop()
