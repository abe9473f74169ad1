"""Unit tests of the validate stage, held to the JSON Schema and examples of docs/wire-format."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

import cbor2
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wire_example
from smartgas_consumer import physics
from smartgas_consumer.error import InvalidMeterId, InvalidReading, PayloadTooLarge, UnsupportedFormat
from smartgas_consumer.reading import (
    MAX_PAYLOAD_BYTES,
    MAX_SEQ,
    TimeWindow,
    check_meter_id,
    decode_body,
    parse_reading,
)

INVALID = wire_example("invalid-readings.json")


def _schema_judgeable(case: dict[str, str]) -> bool:
    """Cases the schema can judge: JSON that parses, without NaN/Infinity (JSON Schema has no finiteness)."""
    try:
        json.loads(case["payload"], parse_constant=lambda name: 1 / 0)
    except (json.JSONDecodeError, ZeroDivisionError):
        return False
    return True


SCHEMA_CASES = [case for case in INVALID if _schema_judgeable(case)]


@pytest.mark.parametrize("name", ["reading-250bar.json", "reading-200bar.json"])
def test_valid_examples_pass_schema_and_parser(name: str, reading_schema: dict[str, Any]) -> None:
    body = wire_example(name)
    jsonschema.validate(body, reading_schema)
    reading = parse_reading("bottle-0001", body)
    assert reading.seq == body["seq"]
    assert reading.pressure_bar == body["pressure_bar"]
    assert reading.ts.tzinfo is not None and reading.ts.utcoffset().total_seconds() == 0


def test_cbor_body_decodes_like_json() -> None:
    body = wire_example("reading-250bar.json")
    assert decode_body(cbor2.dumps(body), 60) == decode_body(json.dumps(body).encode(), 50) == body


@pytest.mark.parametrize("case", INVALID, ids=[c["name"] for c in INVALID])
def test_invalid_examples_are_refused_naming_the_problem(case: dict[str, str]) -> None:
    with pytest.raises(InvalidReading) as caught:
        parse_reading("bottle-0001", decode_body(case["payload"].encode(), 50))
    assert case["diagnostic_contains"] in caught.value.message


def test_most_invalid_cases_are_schema_judgeable() -> None:
    assert len(SCHEMA_CASES) >= len(INVALID) - 3


@pytest.mark.parametrize("case", SCHEMA_CASES, ids=[c["name"] for c in SCHEMA_CASES])
def test_schema_refuses_what_the_parser_refuses(case: dict[str, str], reading_schema: dict[str, Any]) -> None:
    body = json.loads(case["payload"])
    validator = jsonschema.Draft202012Validator(reading_schema, format_checker=jsonschema.FormatChecker())
    assert not validator.is_valid(body)


def test_content_formats() -> None:
    body = json.dumps(wire_example("reading-250bar.json")).encode()
    assert decode_body(body, None)["seq"] == 0  # absent Content-Format is read as JSON
    with pytest.raises(UnsupportedFormat, match="Content-Format 0"):
        decode_body(body, 0)


def test_payload_limit() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        decode_body(b" " * (MAX_PAYLOAD_BYTES + 1), 50)
    assert caught.value.to_message().opt.size1 == MAX_PAYLOAD_BYTES


def test_malformed_cbor() -> None:
    with pytest.raises(InvalidReading, match="malformed CBOR"):
        decode_body(b"\xa1\x61", 60)  # a map cut short


@pytest.mark.parametrize("meter_id", ["bottle-0001", "a", "site3.b12_x", "A" * 64])
def test_good_meter_ids(meter_id: str) -> None:
    assert check_meter_id(meter_id) == meter_id


@pytest.mark.parametrize("meter_id", ["", "-lead", "has space", "é", "a" * 65, "a/b", "x;y"])
def test_bad_meter_ids(meter_id: str) -> None:
    with pytest.raises(InvalidMeterId, match="meter id"):
        check_meter_id(meter_id)


def test_timestamp_is_utc_datetime() -> None:
    reading = parse_reading("m", wire_example("reading-200bar.json"))
    assert reading.ts == datetime(2026, 11, 23, 8, 0, 10, 250000, tzinfo=UTC)


# -- the edge's own bounds (issue 7, item 1) -------------------------------------------------------------


def test_time_window_refuses_the_too_old_and_the_too_far_ahead() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    window = TimeWindow(now, max_age_s=3600, max_skew_s=60)
    body = wire_example("reading-250bar.json")
    for ts, words in [("2026-11-29T10:59:59Z", "older than 3600 s"), ("2026-11-29T12:01:01Z", "at most 60 s")]:
        with pytest.raises(InvalidReading, match=words):
            parse_reading("m1", body | {"ts": ts}, window)
    for ts in ("2026-11-29T11:00:01Z", "2026-11-29T12:00:59Z"):
        assert parse_reading("m1", body | {"ts": ts}, window).ts.isoformat().startswith(ts[:19])


def test_every_derived_amount_is_bounded() -> None:
    """The largest bounds a reading may have still give a finite amount under MAX_MOLES."""
    largest = physics.moles(physics.MAX_PRESSURE_BAR, physics.MIN_TEMPERATURE_C, physics.MAX_VOLUME_L)
    assert physics.plausible_moles(largest)
    assert not physics.plausible_moles(float("inf")) and not physics.plausible_moles(float("nan"))


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (cbor2.dumps(wire_example("reading-250bar.json")) + b"\x00", r"1 byte\(s\) after the reading"),
        (cbor2.dumps(wire_example("reading-250bar.json") | {"seq": 2**64}), "tag 2"),
        (cbor2.dumps(wire_example("reading-250bar.json") | {"ts": datetime(2026, 11, 23, tzinfo=UTC)}), "tag"),
        (b"\x9f" * 10 + b"\xff" * 10, "nested deeper"),
        (b"\xff", "unexpected break"),
        (b"\x1c", "reserved"),
        (b"\x5a\xff\xff\xff\xff", "truncated"),
        (b"\xbf\x61a", "truncated"),
    ],
)
def test_cbor_walk_refuses_tags_depth_trailing_bytes(payload: bytes, words: str) -> None:
    with pytest.raises(InvalidReading, match=words):
        decode_body(payload, 60)


def test_indefinite_length_cbor_is_still_a_reading() -> None:
    body = wire_example("reading-250bar.json")
    encoded = b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in body.items()) + b"\xff"
    assert decode_body(encoded, 60) == body


def test_json_integer_beyond_float_range_is_refused() -> None:
    with pytest.raises(InvalidReading, match="out of range"):
        decode_body(b'{"pressure_bar": 1' + b"0" * 400 + b"}", 50)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=MAX_PAYLOAD_BYTES), content_format=st.sampled_from([None, 50, 60]))
def test_any_bytes_are_a_reading_or_a_coded_refusal(payload: bytes, content_format: int | None) -> None:
    """Whatever a peer sends, the edge answers with a reading or a 4.xx error; nothing else escapes."""
    try:
        reading = parse_reading("m1", decode_body(payload, content_format))
    except (InvalidReading, PayloadTooLarge, UnsupportedFormat):
        return
    assert math.isfinite(reading.pressure_bar) and physics.plausible_moles(
        physics.moles(reading.pressure_bar, reading.temperature_c, reading.volume_l)
    )


@settings(max_examples=1000, deadline=None)
@given(
    document=st.dictionaries(
        st.sampled_from(["seq", "ts", "pressure_bar", "temperature_c", "volume_l"]),
        st.one_of(
            st.integers(),
            st.floats(allow_nan=True, allow_infinity=True),
            st.text(max_size=40),
            st.datetimes(timezones=st.just(UTC)).map(lambda d: d.isoformat().replace("+00:00", "Z")),
        ),
    ),
    as_cbor=st.booleans(),
)
def test_any_reading_shaped_body_is_plausible_or_refused(document: dict[str, Any], as_cbor: bool) -> None:
    payload = cbor2.dumps(document) if as_cbor else json.dumps(document).encode()
    try:
        reading = parse_reading("m1", decode_body(payload, 60 if as_cbor else 50))
    except (InvalidReading, PayloadTooLarge):
        return
    assert 0 <= reading.seq <= MAX_SEQ
    assert physics.plausible_moles(physics.moles(reading.pressure_bar, reading.temperature_c, reading.volume_l))
