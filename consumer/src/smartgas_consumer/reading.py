"""The validate stage: turn a CoAP request body into a checked ``Reading``, or say exactly what is wrong.

The rules are the wire contract of ``docs/wire-format.md`` (and its JSON Schema, which the tests hold this
module to). Each field is described once in ``READING_FIELDS``; a failed check raises ``InvalidReading``
(4.00) with a message that names the field, so the meter's operator can fix it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cbor2

from smartgas_consumer.error import InvalidMeterId, InvalidReading, PayloadTooLarge, UnsupportedFormat
from smartgas_consumer.physics import ZERO_CELSIUS_K

CONTENT_FORMAT_JSON = 50
CONTENT_FORMAT_CBOR = 60
#: Largest accepted body; a reading is about 100 bytes. Documented in docs/wire-format.md.
MAX_PAYLOAD_BYTES = 1024
#: Largest seq SQLite's INTEGER holds.
MAX_SEQ = 2**63 - 1
METER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: RFC 3339 in UTC, as in reading.schema.json: Python's fromisoformat alone also takes ISO 8601 forms
#: (week dates, basic format, a space for the T) that the contract does not allow.
UTC_TIMESTAMP_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)")


@dataclass(frozen=True, slots=True)
class Reading:
    """One validated meter reading, in the meter's own units."""

    meter_id: str
    seq: int
    ts: datetime
    pressure_bar: float
    temperature_c: float
    volume_l: float


def check_meter_id(meter_id: str) -> str:
    if not METER_ID_PATTERN.fullmatch(meter_id):
        raise InvalidMeterId(
            f"meter id {meter_id[:80]!r} is invalid: use 1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    return meter_id


def decode_body(payload: bytes, content_format: int | None) -> Any:
    """Parse the body by its Content-Format (absent means JSON); raise the matching CoAP error."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"body is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}", MAX_PAYLOAD_BYTES)
    if content_format is None or content_format == CONTENT_FORMAT_JSON:
        try:
            # parse_constant lets NaN/Infinity through to the finiteness check, whose message is clearer
            return json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidReading(f"malformed JSON body: {err}") from err
    if content_format == CONTENT_FORMAT_CBOR:
        try:
            return cbor2.loads(payload)
        except (cbor2.CBORDecodeError, ValueError, TypeError) as err:
            raise InvalidReading(f"malformed CBOR body: {err}") from err
    raise UnsupportedFormat(
        f"Content-Format {content_format} is not supported; send 50 (application/json) or 60 (application/cbor)"
    )


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidReading(f"{name}: must be an integer, got {type(value).__name__} {value!r}")
    if not 0 <= value <= MAX_SEQ:
        raise InvalidReading(f"{name}: must be between 0 and {MAX_SEQ}, got {value}")
    return value


def _finite_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidReading(f"{name}: must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise InvalidReading(f"{name}: must be a finite number, got {value!r}")
    return number


def _utc_timestamp(name: str, value: Any) -> datetime:
    if not isinstance(value, str):
        raise InvalidReading(f"{name}: must be an RFC 3339 string, got {type(value).__name__}")
    if not UTC_TIMESTAMP_PATTERN.fullmatch(value):
        raise InvalidReading(f"{name}: {value[:40]!r} is not an RFC 3339 date-time in UTC (like 2026-11-23T08:00:00Z)")
    try:
        return datetime.fromisoformat(value).astimezone(UTC)
    except ValueError as err:  # the shape is right but the date is not (2026-02-30)
        raise InvalidReading(f"{name}: {value[:40]!r} is not a valid date-time: {err}") from err


def _pressure(name: str, value: Any) -> float:
    pressure_bar = _finite_number(name, value)
    if pressure_bar < 0:
        raise InvalidReading(f"{name}: absolute pressure cannot be negative, got {pressure_bar}")
    return pressure_bar


def _temperature(name: str, value: Any) -> float:
    temperature_c = _finite_number(name, value)
    if temperature_c <= -ZERO_CELSIUS_K:
        raise InvalidReading(f"{name}: {temperature_c} °C is at or below absolute zero (-273.15 °C)")
    return temperature_c


def _volume(name: str, value: Any) -> float:
    volume_l = _finite_number(name, value)
    if volume_l <= 0:
        raise InvalidReading(f"{name}: a bottle's volume must be positive, got {volume_l}")
    return volume_l


#: Every body field and the check that turns its raw value into the typed one.
READING_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "seq": _integer,
    "ts": _utc_timestamp,
    "pressure_bar": _pressure,
    "temperature_c": _temperature,
    "volume_l": _volume,
}


def parse_reading(meter_id: str, body: Any) -> Reading:
    """Check a decoded body against the contract and build the Reading."""
    if not isinstance(body, dict):
        raise InvalidReading(f"body must be an object with {', '.join(READING_FIELDS)}")
    unknown = sorted(str(key) for key in body if key not in READING_FIELDS)
    if unknown:
        raise InvalidReading(f"unknown field(s): {', '.join(unknown)}")
    missing = [name for name in READING_FIELDS if name not in body]
    if missing:
        raise InvalidReading(f"missing field(s): {', '.join(missing)}")
    values = {name: check(name, body[name]) for name, check in READING_FIELDS.items()}
    return Reading(meter_id=check_meter_id(meter_id), **values)
