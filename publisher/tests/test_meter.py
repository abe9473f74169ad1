"""Unit tests of a meter without a network: request timing, staggering, the request body."""

import json
from datetime import UTC, datetime

import pytest

from conftest import fast_config
from smartgas_publisher.coap import CoapUplink, encode, response_deadline_s, transport_tuning
from smartgas_publisher.meter import Meter
from smartgas_publisher.stats import FleetStats, SendDelays


def test_response_deadline_outlasts_aiocoap_retransmissions() -> None:
    tuning = transport_tuning(2.0, 4)
    assert tuning.MAX_TRANSMIT_WAIT == pytest.approx(93.0)  # RFC 7252 defaults
    assert response_deadline_s(tuning) > tuning.MAX_TRANSMIT_WAIT
    assert tuning.reliability is True  # requests are confirmable


def test_first_sends_are_staggered_deterministically() -> None:
    config = fast_config("coap://127.0.0.1:9", meters=50, period_s=10.0)
    uplink = CoapUplink(config, config.meter_ids())
    delays = [Meter(i, config, FleetStats(), uplink).first_delay_s for i in config.meter_ids()]
    again = [Meter(i, config, FleetStats(), uplink).first_delay_s for i in config.meter_ids()]
    assert delays == again
    assert all(0 <= d < 10.0 for d in delays)
    assert len(set(delays)) == 50
    assert min(delays) < 2.5 and max(delays) > 7.5  # spread across the period


def test_body_is_compact_json_of_the_five_fields() -> None:
    config = fast_config("coap://127.0.0.1:9")
    meter = Meter("bottle-0001", config, FleetStats(), CoapUplink(config, ["bottle-0001"]))
    reading = meter.model.next_reading(datetime(2026, 11, 23, 8, tzinfo=UTC))
    body = encode(reading)
    assert json.loads(body) == reading.to_dict()
    assert set(json.loads(body)) == {"seq", "ts", "pressure_bar", "temperature_c", "volume_l"}
    assert b" " not in body and len(body) < 1024


def test_send_delays_percentiles_and_late_count() -> None:
    delays = SendDelays()
    for delay_s in [0.001] * 98 + [0.5, 2.5]:
        delays.record(delay_s)
    assert (delays.total, delays.late) == (100, 1)
    assert delays.percentile_ms(0.5) == 1
    assert delays.percentile_ms(0.99) == 500
    assert delays.percentile_ms(1.0) == 2500
    assert "late_over_1s=1/100 (1.00%)" in delays.summary()
    delays.record(-0.2)  # a send that left before its schedule (clock rounding) counts as on time
    delays.record(3600.0)  # beyond the histogram: in its last bucket, and the maximum kept exactly
    assert delays.percentile_ms(1.0) == 60_000 and round(delays.max_s) == 3600


def test_no_sends_no_percentiles() -> None:
    assert SendDelays().summary() == "send_delay_ms p50=0 p99=0 max=0 late_over_1s=0/0 (0.00%)"
