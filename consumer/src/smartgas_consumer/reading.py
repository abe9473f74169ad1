"""The validate stage: turn a CoAP request body into a checked ``Reading``, or say exactly what is wrong.

The rules are the wire contract of ``docs/wire-format.md`` (and its JSON Schema, which the tests hold this
module to). Each field is described once in ``READING_FIELDS``; a failed check raises ``InvalidReading``
(4.00) with a message that names the field, so the meter's operator can fix it.

This is the edge: everything past it may assume a valid, finite, plausible reading. So the decoders are
held to what a reading needs and no more: JSON integers of at most ``MAX_INTEGER_DIGITS`` digits,
nesting at most ``MAX_NESTING_DEPTH`` deep; CBOR is walked once for
well-formedness before it is decoded, refusing tags (a reading needs none, and cbor2 would turn some into
arbitrary objects), nesting and trailing bytes. Values are held to the physical bounds of ``physics.py``
and, given a ``TimeWindow``, ``ts`` to the consumer's clock. Every refusal is a 4.xx with a diagnostic.
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
from smartgas_consumer.physics import (
    MAX_PRESSURE_BAR,
    MAX_TEMPERATURE_C,
    MAX_VOLUME_L,
    MIN_TEMPERATURE_C,
    MIN_VOLUME_L,
)

CONTENT_FORMAT_JSON = 50
CONTENT_FORMAT_CBOR = 60
#: Largest accepted body; a reading is about 100 bytes. Documented in docs/wire-format.md.
MAX_PAYLOAD_BYTES = 1024
#: Largest seq: 2**53 - 1, the largest integer every JSON reader (JavaScript, Elasticsearch's _source in
#: Kibana) holds exactly; a meter sending one reading a millisecond would need 285,000 years to reach it.
MAX_SEQ = 2**53 - 1
#: Longest integer literal a JSON body may hold: MAX_SEQ has 16 digits. Python would otherwise parse up to
#: 4300 digits (and refuse more with an error that is not a JSON error).
MAX_INTEGER_DIGITS = 20
#: Deepest nesting of arrays/maps in a body: a reading is one flat map (depth 1).
MAX_NESTING_DEPTH = 4
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


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """The span of meter timestamps the consumer believes, around its own clock ``now``.

    ``max_age_s`` is the longest backlog a meter may hold (its buffer times its period); ``max_skew_s``
    how far a meter's clock may run ahead of the consumer's.
    """

    now: datetime
    max_age_s: float
    max_skew_s: float

    def check(self, name: str, ts: datetime) -> datetime:
        age_s = (self.now - ts).total_seconds()
        if age_s > self.max_age_s:
            raise InvalidReading(
                f"{name}: {ts.isoformat()} is {age_s:.0f} s before the consumer's clock; readings older than"
                f" {self.max_age_s:.0f} s are refused (check the meter's clock)"
            )
        if -age_s > self.max_skew_s:
            raise InvalidReading(
                f"{name}: {ts.isoformat()} is {-age_s:.0f} s ahead of the consumer's clock; at most"
                f" {self.max_skew_s:.0f} s of clock skew is allowed (check the meter's clock)"
            )
        return ts


def decode_body(payload: bytes, content_format: int | None) -> Any:
    """Parse the body by its Content-Format (absent means JSON); raise the matching CoAP error."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(f"body is {len(payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}", MAX_PAYLOAD_BYTES)
    if content_format is None or content_format == CONTENT_FORMAT_JSON:
        return _decode_json(payload)
    if content_format == CONTENT_FORMAT_CBOR:
        _check_cbor(payload)
        try:
            return cbor2.loads(payload)
        except Exception as err:  # the walk above vetted the bytes; this is only a second line
            raise InvalidReading(f"malformed CBOR body: {err}") from err
    raise UnsupportedFormat(
        f"Content-Format {content_format} is not supported; send 50 (application/json) or 60 (application/cbor)"
    )


def _json_integer(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise InvalidReading(f"malformed JSON body: an integer of {len(literal)} digits is out of range")
    return int(literal)


def _json_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _decode_json(payload: bytes) -> Any:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidReading(f"malformed JSON body: not UTF-8: {err}") from err
    # No deeper than its brackets are many: the walk (a Python loop per character, ~6 µs for a reading's one
    # object) only for a body with more of them than the limit.
    openers = text.count("{") + text.count("[")
    if openers > MAX_NESTING_DEPTH and _json_depth(text) > MAX_NESTING_DEPTH:
        raise InvalidReading(f"malformed JSON body: nested deeper than {MAX_NESTING_DEPTH} levels")
    try:
        # NaN and Infinity pass to the finiteness check of their field, whose message names it.
        return json.loads(text, parse_int=_json_integer)
    except (json.JSONDecodeError, RecursionError) as err:
        raise InvalidReading(f"malformed JSON body: {err}") from err


class _CborWalk:
    """A well-formedness walk over CBOR bytes (RFC 8949 §3) that refuses what a reading never needs."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    def refuse(self, problem: str) -> InvalidReading:
        return InvalidReading(f"malformed CBOR body: {problem} (at byte {self.position})")

    def take(self, count: int) -> bytes:
        end = self.position + count
        if end > len(self.data):
            raise self.refuse("truncated")
        chunk = self.data[self.position : end]
        self.position = end
        return chunk

    def head(self) -> tuple[int, int, int | None]:
        """(major type, additional info, argument; None for an indefinite length)."""
        initial = self.take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info, info
        if info <= 27:
            return major, info, int.from_bytes(self.take(1 << (info - 24)), "big")
        if info == 31 and major in (2, 3, 4, 5, 7):
            return major, info, None
        raise self.refuse(f"reserved additional information {info}")

    def at_break(self) -> bool:
        if self.position < len(self.data) and self.data[self.position] == 0xFF:
            self.position += 1
            return True
        if self.position >= len(self.data):
            raise self.refuse("truncated (no break)")
        return False

    def item(self, depth: int) -> None:
        major, info, argument = self.head()
        if major == 6:
            raise self.refuse(f"tag {argument} is not allowed (a reading uses no CBOR tags)")
        if major in (0, 1):
            return
        if major in (2, 3):
            if argument is not None:
                self.take(argument)
                return
            while not self.at_break():  # an indefinite string: definite chunks of the same type
                chunk_major, _, chunk_length = self.head()
                if chunk_major != major or chunk_length is None:
                    raise self.refuse("bad chunk in an indefinite-length string")
                self.take(chunk_length)
            return
        if major in (4, 5):
            if depth >= MAX_NESTING_DEPTH:
                raise self.refuse(f"nested deeper than {MAX_NESTING_DEPTH} levels")
            per_entry = 2 if major == 5 else 1
            if argument is None:
                while not self.at_break():
                    for _ in range(per_entry):
                        self.item(depth + 1)
                return
            for _ in range(argument * per_entry):  # each item takes a byte at least: truncation ends this
                self.item(depth + 1)
            return
        if info == 31:
            raise self.refuse("unexpected break")


def _check_cbor(payload: bytes) -> None:
    """Refuse CBOR that is not one well-formed, tag-free, shallow item with nothing after it."""
    walk = _CborWalk(payload)
    walk.item(0)
    if walk.position != len(payload):
        raise InvalidReading(f"malformed CBOR body: {len(payload) - walk.position} byte(s) after the reading")


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
    if pressure_bar > MAX_PRESSURE_BAR:
        raise InvalidReading(f"{name}: {pressure_bar} bar is above {MAX_PRESSURE_BAR:g} bar, which no bottle holds")
    return pressure_bar


def _temperature(name: str, value: Any) -> float:
    temperature_c = _finite_number(name, value)
    if not MIN_TEMPERATURE_C <= temperature_c <= MAX_TEMPERATURE_C:
        raise InvalidReading(
            f"{name}: {temperature_c} °C is outside {MIN_TEMPERATURE_C:g} to {MAX_TEMPERATURE_C:g} °C,"
            " the range a bottle's gas can have"
        )
    return temperature_c


def _volume(name: str, value: Any) -> float:
    volume_l = _finite_number(name, value)
    if volume_l <= 0:
        raise InvalidReading(f"{name}: a bottle's volume must be positive, got {volume_l}")
    if not MIN_VOLUME_L <= volume_l <= MAX_VOLUME_L:
        raise InvalidReading(
            f"{name}: {volume_l} L is outside {MIN_VOLUME_L:g} to {MAX_VOLUME_L:g} L, the volumes bottles come in"
        )
    return volume_l


#: Every body field and the check that turns its raw value into the typed one.
READING_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "seq": _integer,
    "ts": _utc_timestamp,
    "pressure_bar": _pressure,
    "temperature_c": _temperature,
    "volume_l": _volume,
}


def parse_reading(meter_id: str, body: Any, window: TimeWindow | None = None) -> Reading:
    """Check a decoded body against the contract and build the Reading; ``ts`` against ``window`` if given."""
    if not isinstance(body, dict):
        raise InvalidReading(f"body must be an object with {', '.join(READING_FIELDS)}")
    unknown = sorted(str(key) for key in body if key not in READING_FIELDS)
    if unknown:
        raise InvalidReading(f"unknown field(s): {', '.join(unknown)}")
    missing = [name for name in READING_FIELDS if name not in body]
    if missing:
        raise InvalidReading(f"missing field(s): {', '.join(missing)}")
    values = {name: check(name, body[name]) for name, check in READING_FIELDS.items()}
    if window is not None:
        window.check("ts", values["ts"])
    return Reading(meter_id=check_meter_id(meter_id), **values)
