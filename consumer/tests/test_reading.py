"""Unit tests of the validate stage, held to the JSON Schema and examples of docs/wire-format."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import cbor2
import jsonschema
import pytest

from conftest import wire_example
from smartgas_consumer.error import InvalidMeterId, InvalidReading, PayloadTooLarge, UnsupportedFormat
from smartgas_consumer.reading import MAX_PAYLOAD_BYTES, check_meter_id, decode_body, parse_reading

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
