"""The consumer's CoAP interface, exercised by a real aiocoap client over loopback (ephemeral port)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber

from conftest import reading_uri, wire_example
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.reading import MAX_PAYLOAD_BYTES
from smartgas_consumer.server import Consumer

pytestmark = pytest.mark.integration

INVALID = wire_example("invalid-readings.json")
FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"


async def request(
    context: aiocoap.Context, code: Code, uri: str, payload: bytes = b"", **options: object
) -> aiocoap.Message:
    message = aiocoap.Message(code=code, uri=uri, payload=payload, **options)
    return await asyncio.wait_for(context.request(message).response, timeout=10)


async def put_json(context: aiocoap.Context, uri: str, body: object) -> aiocoap.Message:
    return await request(context, Code.PUT, uri, json.dumps(body).encode(), content_format=50)


@pytest.fixture
async def fleet_consumer(consumer_config: ConsumerConfig) -> AsyncIterator[Consumer]:
    """A consumer with the repository's fleet file: bottle-0001 is a 50 L oxygen bottle."""
    running = Consumer(dataclasses.replace(consumer_config, fleet=FLEET_FILE))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_put_stores_and_answers_moles_and_real_gas(fleet_consumer: Consumer, coap: aiocoap.Context) -> None:
    response = await put_json(coap, reading_uri(fleet_consumer), wire_example("reading-250bar.json"))
    assert response.code == Code.CHANGED
    assert response.opt.content_format == 50
    answer = json.loads(response.payload)
    expected = wire_example("response-250bar.json")
    assert answer == pytest.approx(expected)
    # Oxygen at 250 bar and 25 °C is denser than an ideal gas: 4 % more moles than n = PV/RT.
    # (Within 1e-4, not exactly: the reference equation carries its own fitted gas constant R.)
    assert answer["real_moles"] / answer["moles"] == pytest.approx(1 / answer["compressibility_z"], rel=1e-4)
    assert (await fleet_consumer.store.summary()).readings == 1
    # A re-send is answered with the stored copy's fields, real-gas ones included.
    again = json.loads((await put_json(coap, reading_uri(fleet_consumer), wire_example("reading-250bar.json"))).payload)
    assert again == pytest.approx({**expected, "stored": False})


async def test_a_meter_missing_from_the_fleet_gets_moles_and_no_real_gas(
    consumer: Consumer, coap: aiocoap.Context
) -> None:
    answer = json.loads((await put_json(coap, reading_uri(consumer), wire_example("reading-250bar.json"))).payload)
    expected = wire_example("response-250bar.json")
    assert answer["moles"] == pytest.approx(expected["moles"])
    real_fields = ("compressibility_z", "real_moles", "mass_kg", "standard_volume_m3", "liquid_state")
    assert {name: answer[name] for name in real_fields} == dict.fromkeys(real_fields)


async def test_cbor_in_cbor_out(consumer: Consumer, coap: aiocoap.Context) -> None:
    body = cbor2.dumps(wire_example("reading-200bar.json"))
    response = await request(coap, Code.PUT, reading_uri(consumer, "cbor-meter"), body, content_format=60)
    assert response.code == Code.CHANGED and response.opt.content_format == 60
    assert cbor2.loads(response.payload)["moles"] == pytest.approx(205.1379, abs=1e-3)


async def test_resend_acknowledged_again_stored_once(consumer: Consumer, coap: aiocoap.Context) -> None:
    body = wire_example("reading-250bar.json")
    first = json.loads((await put_json(coap, reading_uri(consumer), body)).payload)
    again = await put_json(coap, reading_uri(consumer), body)
    assert again.code == Code.CHANGED
    assert first["stored"] is True and json.loads(again.payload)["stored"] is False
    assert (await consumer.store.summary()).readings == 1
    assert consumer.intake.counters.duplicates == 1


@pytest.mark.parametrize("case", INVALID, ids=[c["name"] for c in INVALID])
async def test_invalid_bodies_get_400_with_diagnostic(
    consumer: Consumer, coap: aiocoap.Context, case: dict[str, str]
) -> None:
    response = await request(coap, Code.PUT, reading_uri(consumer), case["payload"].encode(), content_format=50)
    assert str(response.code).startswith(case["code"])
    assert case["diagnostic_contains"] in response.payload.decode()
    assert (await consumer.store.summary()).readings == 0


async def test_bad_input_never_touches_accepted_data(consumer: Consumer, coap: aiocoap.Context) -> None:
    await put_json(coap, reading_uri(consumer), wire_example("reading-250bar.json"))
    for case in INVALID:
        await request(coap, Code.PUT, reading_uri(consumer), case["payload"].encode(), content_format=50)
    latest = await consumer.store.latest("bottle-0001")
    assert latest is not None and (latest.pressure_bar, latest.seq) == (250.0, 0)
    assert (await consumer.store.summary()).readings == 1


def with_options(message: aiocoap.Message, *options: tuple[int, bytes]) -> aiocoap.Message:
    for number, value in options:
        message.opt.add_option(OptionNumber(number).create_option(value=value))
    return message


@pytest.mark.parametrize(
    ("option", "name"),
    [
        ((int(OptionNumber.IF_MATCH), b"\x01"), "If-Match"),
        ((int(OptionNumber.IF_NONE_MATCH), b""), "If-None-Match"),
        ((int(OptionNumber.OSCORE), b"\x09\x00"), "OSCORE on a consumer without device authentication"),
        ((65001, b"x"), "an unknown critical option"),
    ],
)
async def test_a_critical_option_nobody_here_acts_on_is_4_02_and_nothing_is_stored(
    consumer: Consumer, coap: aiocoap.Context, option: tuple[int, bytes], name: str
) -> None:
    body = json.dumps(wire_example("reading-250bar.json")).encode()
    message = aiocoap.Message(code=Code.PUT, uri=reading_uri(consumer), payload=body, content_format=50)
    response = await asyncio.wait_for(coap.request(with_options(message, option)).response, timeout=10)
    assert response.code == Code.BAD_OPTION, name
    assert f"critical option(s) {option[0]} not supported" in response.payload.decode()
    assert (await consumer.store.summary()).readings == 0
    counters = consumer.intake.counters
    assert (counters.received, counters.rejected["bad_option"]) == (1, 1)


async def test_an_elective_option_unknown_here_is_ignored(consumer: Consumer, coap: aiocoap.Context) -> None:
    body = json.dumps(wire_example("reading-250bar.json")).encode()
    message = aiocoap.Message(code=Code.PUT, uri=reading_uri(consumer), payload=body, content_format=50)
    response = await asyncio.wait_for(coap.request(with_options(message, (65000, b"x"))).response, timeout=10)
    assert response.code == Code.CHANGED
    health = aiocoap.Message(code=Code.GET, uri=f"coap://127.0.0.1:{consumer.port}/health?verbose")
    assert (await asyncio.wait_for(coap.request(health).response, timeout=10)).code == Code.CONTENT


async def test_invalid_meter_id_is_400(consumer: Consumer, coap: aiocoap.Context) -> None:
    response = await put_json(coap, reading_uri(consumer, "-bad"), wire_example("reading-250bar.json"))
    assert response.code == Code.BAD_REQUEST
    assert "meter id" in response.payload.decode()


async def test_other_content_format_is_415(consumer: Consumer, coap: aiocoap.Context) -> None:
    response = await request(coap, Code.PUT, reading_uri(consumer), b"seq=1", content_format=0)
    assert response.code == Code.UNSUPPORTED_CONTENT_FORMAT
    assert "Content-Format 0" in response.payload.decode()


async def test_oversized_body_is_413_with_size1(consumer: Consumer, coap: aiocoap.Context) -> None:
    body = wire_example("reading-250bar.json")
    payload = json.dumps(body).encode().ljust(MAX_PAYLOAD_BYTES + 200)  # valid JSON padded with spaces
    response = await request(coap, Code.PUT, reading_uri(consumer), payload, content_format=50)
    assert response.code == Code.REQUEST_ENTITY_TOO_LARGE
    assert response.opt.size1 == MAX_PAYLOAD_BYTES
    assert str(MAX_PAYLOAD_BYTES) in response.payload.decode()


@pytest.mark.parametrize("path", ["nothing", "meters/m1", "meters/m1/reading/extra", "meters/m1/pressure"])
async def test_unknown_paths_are_404(consumer: Consumer, coap: aiocoap.Context, path: str) -> None:
    response = await request(coap, Code.GET, f"coap://127.0.0.1:{consumer.port}/{path}")
    assert response.code == Code.NOT_FOUND


@pytest.mark.parametrize("code", [Code.POST, Code.DELETE])
async def test_wrong_method_is_405(consumer: Consumer, coap: aiocoap.Context, code: Code) -> None:
    response = await request(coap, code, reading_uri(consumer))
    assert response.code == Code.METHOD_NOT_ALLOWED


@pytest.fixture
async def consumer_with_reading_get(consumer_config: ConsumerConfig) -> AsyncIterator[Consumer]:
    running = Consumer(dataclasses.replace(consumer_config, coap_reading_get=True))
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def test_get_latest_reading_when_turned_on(consumer_with_reading_get: Consumer, coap: aiocoap.Context) -> None:
    consumer = consumer_with_reading_get
    missing = await request(coap, Code.GET, reading_uri(consumer))
    assert missing.code == Code.NOT_FOUND and "bottle-0001" in missing.payload.decode()
    for seq, pressure in [(0, 250.0), (2, 240.0), (1, 245.0)]:  # seq 1 arrives late
        await put_json(
            coap,
            reading_uri(consumer),
            {**wire_example("reading-250bar.json"), "seq": seq, "pressure_bar": pressure},
        )
    latest = await request(coap, Code.GET, reading_uri(consumer))
    assert latest.code == Code.CONTENT
    document = json.loads(latest.payload)
    assert (document["seq"], document["pressure_bar"]) == (2, 240.0)
    assert document["moles"] == pytest.approx(240 * 1e5 * 0.05 / (8.314462618 * 298.15))
    assert document["received_at"].endswith("Z")
    assert "client_id" not in document and "site_id" not in document  # never on the unauthenticated side


async def test_read_side_is_off_by_default(consumer: Consumer, coap: aiocoap.Context) -> None:
    # Anyone on the network can ask over CoAP: no list of meters, no readings, and no hint whether a
    # meter exists (the same refusal for a stored meter and an unknown one).
    await put_json(coap, reading_uri(consumer, "b-1"), wire_example("reading-250bar.json"))
    for meter_id in ("b-1", "never-seen"):
        answer = await request(coap, Code.GET, reading_uri(consumer, meter_id))
        assert answer.code == Code.METHOD_NOT_ALLOWED
        assert answer.payload.decode() == "GET of readings is off on this consumer (--coap-reading-get)"
    listing = await request(coap, Code.GET, f"coap://127.0.0.1:{consumer.port}/meters")
    assert listing.code == Code.NOT_FOUND and b"b-1" not in listing.payload


async def test_well_known_core_lists_only_what_is_served(consumer: Consumer, coap: aiocoap.Context) -> None:
    await put_json(coap, reading_uri(consumer, "b-1"), wire_example("reading-250bar.json"))
    wkc = await request(coap, Code.GET, f"coap://127.0.0.1:{consumer.port}/.well-known/core")
    assert wkc.code == Code.CONTENT and wkc.opt.content_format == 40
    assert wkc.payload.decode() == '</.well-known/core>;ct="40",</health>;rt="smartgas.health"'


async def test_health_answers_2_05_when_the_store_commits(consumer: Consumer, coap: aiocoap.Context) -> None:
    answer = await request(coap, Code.GET, f"coap://127.0.0.1:{consumer.port}/health")
    assert (answer.code, answer.payload) == (Code.CONTENT, b"ok")


async def test_many_meters_concurrently_all_stored(consumer: Consumer) -> None:
    # One client endpoint per meter, as real meters have; 200 meters x 5 readings, bounded by the timeout.
    contexts = [await aiocoap.Context.create_client_context(transports=["udp6"]) for _ in range(200)]
    try:

        async def meter(index: int, context: aiocoap.Context) -> list[int]:
            codes = []
            for seq in range(5):
                body = {**wire_example("reading-250bar.json"), "seq": seq}
                codes.append((await put_json(context, reading_uri(consumer, f"m{index}"), body)).code)
            return codes

        results = await asyncio.wait_for(asyncio.gather(*(meter(i, c) for i, c in enumerate(contexts))), 60)
    finally:
        await asyncio.gather(*(c.shutdown() for c in contexts))
    assert all(code == Code.CHANGED for codes in results for code in codes)
    assert (await consumer.store.summary()).readings == 1000


async def test_receive_buffer_raised(consumer: Consumer) -> None:
    from smartgas_consumer.server import receive_buffer_bytes, udp_socket

    assert consumer._context is not None
    # The Linux default is 208 KiB (~190 readings); the consumer asks for 4 MiB and must get it here.
    assert receive_buffer_bytes(udp_socket(consumer._context)) >= consumer.config.udp_receive_buffer_bytes


async def test_stopped_consumer_kept_what_it_acknowledged(consumer_config, coap: aiocoap.Context) -> None:  # type: ignore[no-untyped-def]
    running = Consumer(consumer_config)
    await running.start()
    acknowledged = 0
    for seq in range(20):
        response = await put_json(coap, reading_uri(running), {**wire_example("reading-250bar.json"), "seq": seq})
        acknowledged += response.code == Code.CHANGED
    await running.stop()
    with sqlite3.connect(consumer_config.db) as connection:
        assert connection.execute("SELECT count(*) FROM readings").fetchone()[0] == acknowledged == 20
