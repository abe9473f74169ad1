"""The edge against a hostile network: a real consumer on loopback, real clients, a real SQLite file.

Each test here is one class of attack from issue 7 (items 1, 2, 3 and 7): implausible readings, readings
that poison a group commit, stored data that broke later starts, and block-wise uploads reassembled to
megabytes before the size limit answered. Every one failed on the code before the fix.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import shutil
import sqlite3
from dataclasses import fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import httpx
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from conftest import reading_uri
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.reading import MAX_PAYLOAD_BYTES
from smartgas_consumer.server import Consumer
from smartgas_consumer.store import SCHEMA_VERSION

pytestmark = pytest.mark.integration

COAP_CLIENT = shutil.which("coap-client-notls")
ADMIN_KEY = secrets.token_urlsafe(32)


def now_ts(offset_s: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_s)).isoformat(timespec="microseconds").replace("+00:00", "Z")


def body(seq: int, offset_s: float = 0.0, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "ts": now_ts(offset_s), "pressure_bar": 200.0, "temperature_c": 20.0, "volume_l": 50.0} | fields


@pytest.fixture
def consumer_config(consumer_config: ConsumerConfig) -> ConsumerConfig:
    """conftest's consumer (its ``consumer`` fixture runs this), but on the documented time window, the
    edge under test, and with an admin key."""
    default_age_s = next(f.default for f in fields(ConsumerConfig) if f.name == "max_reading_age_s")
    return replace(consumer_config, max_reading_age_s=default_age_s, admin_key=ADMIN_KEY)


def logged_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Lines at ERROR or above, by any logger (aiocoap's included): a peer must never cause one."""
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


async def put(
    context: aiocoap.Context, uri: str, payload: bytes, content_format: int = 50, **options: Any
) -> aiocoap.Message:
    message = aiocoap.Message(code=Code.PUT, uri=uri, payload=payload, content_format=content_format, **options)
    return await asyncio.wait_for(context.request(message).response, timeout=15)


async def put_json(context: aiocoap.Context, uri: str, document: Any) -> aiocoap.Message:
    return await put(context, uri, json.dumps(document).encode())


def stored_rows(db: Path, meter_id: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as connection:
        return connection.execute(
            "SELECT epoch, seq, ts, moles FROM readings WHERE meter_id = ? ORDER BY id", (meter_id,)
        ).fetchall()


# -- item 1: plausibility at the edge --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "document", "words"),
    [
        ("a year-999 timestamp", body(0) | {"ts": "0999-01-01T00:00:00Z"}, "older than"),
        ("a day beyond the backlog", body(0, offset_s=-26 * 3600), "older than"),
        ("ten minutes ahead", body(0, offset_s=600), "ahead of the consumer's clock"),
        ("moles overflow", body(0, pressure_bar=1e300, volume_l=1e300), "pressure_bar"),
        ("a tiny volume", body(0, volume_l=1e-300), "volume_l"),
        ("a seq beyond 2^53 - 1", body(2**63 - 1), "seq"),
    ],
)
async def test_implausible_readings_are_refused_naming_the_problem(
    consumer: Consumer, coap: aiocoap.Context, caplog: pytest.LogCaptureFixture, name: str, document: Any, words: str
) -> None:
    response = await put_json(coap, reading_uri(consumer, "m-edge"), document)
    assert response.code == Code.BAD_REQUEST, (name, response.payload)
    assert words in response.payload.decode(), response.payload
    assert stored_rows(consumer.config.db, "m-edge") == []
    assert logged_errors(caplog) == []


@pytest.mark.parametrize(
    ("name", "payload", "words"),
    [
        ("valid CBOR then garbage", cbor2.dumps(body(0)) + b"\x00garbage", "after the reading"),
        ("an epoch-time tag", cbor2.dumps(body(0) | {"ts": datetime.now(UTC)}), "tag"),
        ("a bignum tag", cbor2.dumps(body(0) | {"seq": 2**70}), "tag 2"),
        ("nested 500 deep", b"\x81" * 500 + b"\x00", "nested deeper"),
        ("a shared reference", bytes.fromhex("d81c81d81d00"), "tag 28"),
        ("truncated", cbor2.dumps(body(0))[:-3], "truncated"),
    ],
    # Named, not by their bytes: a body carries the current time, and pytest-xdist's workers must collect
    # the same test ids.
    ids=["trailing-garbage", "epoch-time-tag", "bignum-tag", "nested-500", "shared-reference", "truncated"],
)
async def test_malformed_cbor_is_refused_naming_the_problem(
    consumer: Consumer, coap: aiocoap.Context, caplog: pytest.LogCaptureFixture, name: str, payload: bytes, words: str
) -> None:
    response = await put(coap, reading_uri(consumer, "m-cbor"), payload, content_format=60)
    assert response.code == Code.BAD_REQUEST, (name, response.code, response.payload)
    assert words in response.payload.decode(), response.payload
    assert stored_rows(consumer.config.db, "m-cbor") == []
    assert logged_errors(caplog) == []


async def test_an_integer_beyond_float_range_is_refused_without_a_traceback(
    consumer: Consumer, coap: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    document = json.dumps(body(0)).replace('"pressure_bar": 200.0', '"pressure_bar": 1' + "0" * 400)
    response = await put(coap, reading_uri(consumer, "m-int"), document.encode())
    assert response.code == Code.BAD_REQUEST and b"out of range" in response.payload, response
    assert logged_errors(caplog) == []


async def test_deep_json_nesting_is_refused_without_a_traceback(
    consumer: Consumer, coap: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    response = await put(coap, reading_uri(consumer, "m-deep"), b"[" * 1000 + b"]" * 24)
    assert response.code == Code.BAD_REQUEST and b"nested deeper" in response.payload
    assert logged_errors(caplog) == []


async def test_a_forged_reading_cannot_silence_a_meter(consumer: Consumer, coap: aiocoap.Context) -> None:
    uri = reading_uri(consumer, "m-forged")
    for seq in range(3):
        assert (await put_json(coap, uri, body(seq, offset_s=seq - 10))).code == Code.CHANGED
    # A forger sends the largest seq the edge takes, as far ahead in time as the edge allows.
    forged = await put_json(coap, uri, body(2**53 - 1, offset_s=290))
    assert forged.code == Code.CHANGED
    # Every later genuine reading is still stored (before: acknowledged as a "replay" and discarded).
    for seq in range(3, 6):
        answer = json.loads((await put_json(coap, uri, body(seq, offset_s=seq - 10))).payload)
        assert answer["stored"] is True, answer
    seqs = [row[1] for row in stored_rows(consumer.config.db, "m-forged")]
    assert seqs.count(3) == seqs.count(4) == seqs.count(5) == 1
    with sqlite3.connect(consumer.config.db) as connection:
        (gaps,) = connection.execute("SELECT gaps FROM meters WHERE meter_id = 'm-forged'").fetchone()
    assert gaps == 0  # the forged seq is not taken for 2^53 missing readings


async def test_refusals_are_logged_rate_limited_per_peer(
    consumer: Consumer, coap: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smartgas_consumer.resource")
    for _ in range(20):
        response = await put(coap, reading_uri(consumer, "m-flood"), b"{not json")
        assert response.code == Code.BAD_REQUEST
    lines = [r for r in caplog.records if r.name == "smartgas_consumer.resource" and "refused" in r.getMessage()]
    assert len(lines) == 1 and "127.0.0.1" in lines[0].getMessage() and "malformed JSON" in lines[0].getMessage()


# -- item 2: a reading the database refuses fails alone ----------------------------------------------------


async def test_a_reading_the_database_refuses_fails_alone_and_with_4xx(consumer: Consumer) -> None:
    """Through the intake, with a stand-in fault: the edge now refuses every value SQLite would, so the
    poison is a SQLite trigger that refuses one meter's rows (what a future constraint would do)."""
    await consumer.store.write(
        lambda c: c.execute(
            "CREATE TEMP TRIGGER poison BEFORE INSERT ON readings WHEN NEW.meter_id = 'm-poison'"
            " BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
        )
    )
    consumer.store.group_window_s = 0.05  # one group for all of them
    intake = consumer.intake
    payloads = {meter_id: json.dumps(body(0)).encode() for meter_id in ("m-a", "m-poison", "m-b", "m-c")}
    results = await asyncio.gather(
        *(intake.accept(meter_id, payload, 50) for meter_id, payload in payloads.items()), return_exceptions=True
    )
    outcomes = dict(zip(payloads, results, strict=True))
    refused = outcomes.pop("m-poison")
    assert isinstance(refused, aiocoap.error.ConstructionRenderableError), refused
    assert refused.code == Code.BAD_REQUEST and "poisoned row" in refused.message
    assert all(not isinstance(result, BaseException) and result.stored for result in outcomes.values()), outcomes
    assert stored_rows(consumer.config.db, "m-poison") == []


# -- item 3: timestamps a start can always read --------------------------------------------------------------


async def test_a_store_with_a_year_999_reading_starts_repairs_and_serves(consumer_config: ConsumerConfig) -> None:
    """A store as the previous version wrote it: a year-999 reading in strftime's unpadded form,
    user_version 1. Before the fix, the next start failed in the alerts' load (Invalid isoformat string)."""
    old = Consumer(replace(consumer_config, max_reading_age_s=1e12))
    await old.start()
    try:
        for seq, ts in enumerate(["0999-06-01T00:00:00Z", "0999-06-01T00:00:10Z"]):
            assert (await old.intake.accept("m-999", json.dumps(body(seq) | {"ts": ts}).encode(), 50)).stored
    finally:
        await old.stop()
    with sqlite3.connect(consumer_config.db) as connection:  # what strftime("%Y") wrote on glibc
        connection.execute("UPDATE readings SET ts = replace(ts, '0999-', '999-') WHERE meter_id = 'm-999'")
        connection.execute("UPDATE meters SET last_ts = replace(last_ts, '0999-', '999-') WHERE meter_id = 'm-999'")
        connection.execute("PRAGMA user_version = 1")
        assert connection.execute("SELECT ts FROM readings LIMIT 1").fetchone()[0].startswith("999-06-01T")
    restarted = Consumer(consumer_config)
    await restarted.start()
    try:
        assert restarted.alerts.skipped_at_start == 0
        with sqlite3.connect(consumer_config.db) as connection:
            assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert [row[0] for row in connection.execute("SELECT ts FROM readings ORDER BY ts")] == [
                "0999-06-01T00:00:00.000000Z",
                "0999-06-01T00:00:10.000000Z",
            ]
        headers = {"X-API-Key": ADMIN_KEY}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{restarted.http.port}", timeout=15) as http:
            chart = await http.get("/dashboard/api/meters/m-999/chart.svg", headers=headers)
            assert chart.status_code == 200 and chart.text.startswith("<svg")
            # A window in year 999 is outside what the API answers for (1970 to 9999): 422, never a 500.
            window = {"since": "0999-05-31T00:00:00Z", "until": "0999-06-02T00:00:00Z"}
            chart = await http.get("/dashboard/api/meters/m-999/chart.svg", params=window, headers=headers)
            assert chart.status_code == 422
            meter = await http.get("/api/meters/m-999", headers=headers)
            assert meter.status_code == 200 and meter.json()["last_ts"] == "0999-06-01T00:00:10.000000Z"
    finally:
        await restarted.stop()


async def test_a_start_skips_what_it_cannot_read(
    consumer_config: ConsumerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    first = Consumer(consumer_config)
    await first.start()
    try:
        assert (await first.intake.accept("m-bad", json.dumps(body(0)).encode(), 50)).stored
        assert (await first.intake.accept("m-good", json.dumps(body(0)).encode(), 50)).stored
    finally:
        await first.stop()
    with sqlite3.connect(consumer_config.db) as connection:  # damage beyond the migration's repair
        connection.execute("UPDATE meters SET last_ts = 'not a time' WHERE meter_id = 'm-bad'")
    again = Consumer(consumer_config)
    await again.start()
    try:
        assert again.alerts.skipped_at_start == 1
        assert any("m-bad" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    finally:
        await again.stop()


# -- item 7: block-wise uploads are refused at the first block past the limit -----------------------------


def block(number: int, more: bool, payload: bytes, uri: str, **options: Any) -> aiocoap.Message:
    message = aiocoap.Message(code=Code.PUT, uri=uri, payload=payload, content_format=50, **options)
    message.opt.block1 = BlockOption.BlockwiseTuple(number, more, 6)  # 1024-byte blocks
    return message


async def send_block(context: aiocoap.Context, message: aiocoap.Message) -> aiocoap.Message:
    return await asyncio.wait_for(context.request(message, handle_blockwise=False).response, timeout=15)


async def test_block1_size1_beyond_the_limit_is_refused_at_the_first_block(
    consumer: Consumer, coap: aiocoap.Context
) -> None:
    first = block(0, True, b"x" * 1024, reading_uri(consumer), size1=4 * 1024 * 1024)
    response = await send_block(coap, first)
    assert response.code == Code.REQUEST_ENTITY_TOO_LARGE  # before: 2.31 Continue, and the spool grew
    assert response.opt.size1 == MAX_PAYLOAD_BYTES and b"Size1" in response.payload
    assert consumer.intake.counters.rejected["payload_too_large"] == 1  # counted like any refused reading


async def test_block1_running_total_beyond_the_limit_is_refused_at_that_block(
    consumer: Consumer, coap: aiocoap.Context
) -> None:
    uri = reading_uri(consumer)
    assert (await send_block(coap, block(0, True, b" " * 1024, uri))).code == Code.CONTINUE
    response = await send_block(coap, block(1, True, b" " * 1024, uri))
    assert response.code == Code.REQUEST_ENTITY_TOO_LARGE and b"at block 1" in response.payload


async def test_block1_limit_holds_for_any_method(consumer: Consumer, coap: aiocoap.Context) -> None:
    message = block(0, True, b" " * 1024, reading_uri(consumer), size1=10**6)
    message.code = Code.POST
    assert (await send_block(coap, message)).code == Code.REQUEST_ENTITY_TOO_LARGE


async def test_a_block1_gap_is_4_08_not_5_00(
    consumer: Consumer, coap: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    uri = reading_uri(consumer)
    small = [block(0, True, b" " * 16, uri), block(2, False, b" " * 16, uri)]
    for message in small:
        message.opt.block1 = BlockOption.BlockwiseTuple(message.opt.block1.block_number, message.opt.block1.more, 0)
    assert (await send_block(coap, small[0])).code == Code.CONTINUE
    assert (await send_block(coap, small[1])).code == Code.REQUEST_ENTITY_INCOMPLETE
    assert logged_errors(caplog) == []


async def test_aiocoap_client_blockwise_upload_over_the_limit_is_refused(
    consumer: Consumer, coap: aiocoap.Context
) -> None:
    response = await put(coap, reading_uri(consumer), b" " * (64 * 1024))
    assert response.code == Code.REQUEST_ENTITY_TOO_LARGE


async def test_a_valid_reading_in_small_blocks_is_stored(consumer: Consumer, coap: aiocoap.Context) -> None:
    payload = json.dumps(body(0)).encode() + b" " * 100
    uri = reading_uri(consumer, "m-blocks")
    chunks = [payload[i : i + 16] for i in range(0, len(payload), 16)]
    for number, chunk in enumerate(chunks):
        message = block(number, number < len(chunks) - 1, chunk, uri)
        message.opt.block1 = BlockOption.BlockwiseTuple(number, number < len(chunks) - 1, 0)  # 16 bytes
        response = await send_block(coap, message)
    assert response.code == Code.CHANGED and json.loads(response.payload)["stored"] is True
    assert len(stored_rows(consumer.config.db, "m-blocks")) == 1


@pytest.mark.skipif(COAP_CLIENT is None, reason="coap-client-notls not installed (Debian libcoap3-bin)")
@pytest.mark.parametrize(("size", "expected"), [(200, "2.04"), (4000, "4.13")])
async def test_libcoap_blockwise_upload(consumer: Consumer, tmp_path: Path, size: int, expected: str) -> None:
    assert COAP_CLIENT is not None
    document = json.dumps(body(0)).encode()
    payload_file = tmp_path / "body.json"
    payload_file.write_bytes(document + b" " * (size - len(document)))
    process = await asyncio.create_subprocess_exec(
        COAP_CLIENT,
        "-B",
        "10",
        "-m",
        "put",
        "-t",
        "50",
        "-b",
        "64",
        "-f",
        str(payload_file),
        reading_uri(consumer, "m-libcoap"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    if expected == "2.04":
        assert json.loads(out)["stored"] is True, (out, err)
        assert len(stored_rows(consumer.config.db, "m-libcoap")) == 1
    else:
        assert err.decode().strip().startswith("4.13"), (out, err)
        assert stored_rows(consumer.config.db, "m-libcoap") == []
