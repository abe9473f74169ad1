"""Unit tests of a meter without a network: request timing, staggering, the request body."""

import json
from datetime import UTC, datetime

import pytest

from conftest import fast_config
from smartgas_publisher.meter import Meter, encode, response_deadline_s, transport_tuning
from smartgas_publisher.stats import FleetStats


def test_response_deadline_outlasts_aiocoap_retransmissions() -> None:
    tuning = transport_tuning(2.0, 4)
    assert tuning.MAX_TRANSMIT_WAIT == pytest.approx(93.0)  # RFC 7252 defaults
    assert response_deadline_s(tuning) > tuning.MAX_TRANSMIT_WAIT
    assert tuning.reliability is True  # requests are confirmable


def test_first_sends_are_staggered_deterministically() -> None:
    config = fast_config("coap://127.0.0.1:9", meters=50, period_s=10.0)
    delays = [Meter(i, config, FleetStats()).first_delay_s for i in config.meter_ids()]
    again = [Meter(i, config, FleetStats()).first_delay_s for i in config.meter_ids()]
    assert delays == again
    assert all(0 <= d < 10.0 for d in delays)
    assert len(set(delays)) == 50
    assert min(delays) < 2.5 and max(delays) > 7.5  # spread across the period


def test_body_is_compact_json_of_the_five_fields() -> None:
    meter = Meter("bottle-0001", fast_config("coap://127.0.0.1:9"), FleetStats())
    reading = meter.model.next_reading(datetime(2026, 11, 23, 8, tzinfo=UTC))
    body = encode(reading)
    assert json.loads(body) == reading.to_dict()
    assert set(json.loads(body)) == {"seq", "ts", "pressure_bar", "temperature_c", "volume_l"}
    assert b" " not in body and len(body) < 1024
