"""MQTT ingest against a real Mosquitto (smartgas_common.mosquitto): the consumer in this process, meters as
plain Paho clients (mqtt_meter.py). Readings, answers, refusals with their diagnostics, a broker restart,
MQTT alone, and the health and metrics that say how the link is."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from chattr import chattr, immutable  # noqa: F401 (chattr is a fixture)
from mqtt_meter import MqttMeter, reading_body

from conftest import wire_example
from smartgas_common.mosquitto import Mosquitto, mosquitto_binary
from smartgas_common.mqtt_contract import answer_topic, reading_topic
from smartgas_consumer.config import ConfigError, ConsumerConfig, load
from smartgas_consumer.server import Consumer, StartupError

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make deps installs it)"),
]

INVALID = wire_example("invalid-readings.json")
#: Long enough for a loaded 2-core machine; the waits return as soon as the condition holds.
WAIT_S = 30.0


@pytest.fixture
def mqtt_config(consumer_config: ConsumerConfig, broker: Mosquitto) -> ConsumerConfig:
    # Readings dated now: the default time window applies.
    return replace(consumer_config, mqtt_broker=broker.url, max_reading_age_s=25 * 3600.0)


@pytest.fixture
async def running(mqtt_config: ConsumerConfig) -> AsyncIterator[Consumer]:
    consumer = Consumer(mqtt_config)
    await consumer.start()
    try:
        await until(lambda: consumer.mqtt is not None and consumer.mqtt.link.connected, "the consumer subscribed")
        yield consumer
    finally:
        await consumer.stop()


@pytest.fixture
async def meter(broker: Mosquitto) -> AsyncIterator[MqttMeter]:
    connected = await asyncio.to_thread(MqttMeter(broker.port, "m1").connect)
    try:
        yield connected
    finally:
        await asyncio.to_thread(connected.close)


async def until(condition: Any, what: str, timeout_s: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls state the consumer changes on its own
            await asyncio.sleep(0.02)
    assert condition(), what


async def stored(consumer: Consumer, meter_id: str | None = None) -> list[tuple[str, int, int]]:
    """(meter_id, seq, authenticated) of the stored readings, through the consumer's own store."""

    def query(connection: sqlite3.Connection) -> list[tuple[str, int, int]]:
        sql = "SELECT meter_id, seq, authenticated FROM readings"
        if meter_id is None:
            return list(connection.execute(sql + " ORDER BY meter_id, seq"))
        return list(connection.execute(sql + " WHERE meter_id = ? ORDER BY seq", (meter_id,)))

    rows: list[tuple[str, int, int]] = await consumer.store.read(query)
    return [tuple(row) for row in rows]  # type: ignore[misc]


def metric(consumer: Consumer, line_start: str) -> float:
    text = consumer.metrics.render()[0].decode()
    (value,) = [line.split()[-1] for line in text.splitlines() if line.startswith(line_start + " ")]
    return float(value)


async def test_every_reading_of_a_short_run_is_stored_and_answered(running: Consumer, broker: Mosquitto) -> None:
    meters = [await asyncio.to_thread(MqttMeter(broker.port, f"run-{n}").connect) for n in range(4)]
    try:

        def send(meter: MqttMeter) -> list[str]:
            return [str(meter.publish_reading(seq)) for seq in range(25)]

        outcomes = await asyncio.gather(*(asyncio.to_thread(send, meter) for meter in meters))
        assert all(outcome == "Success" for sent in outcomes for outcome in sent)
        for meter in meters:
            answers = await asyncio.to_thread(meter.wait_answers, 25)
            assert sorted(int(a.correlation_data or b"-1") for a in answers) == list(range(25))
            assert {a.document["code"] for a in answers} == {"2.04"}
            assert {a.topic for a in answers} == {answer_topic(meter.meter_id)}
            assert {a.content_type for a in answers} == {"application/json"}
            assert all(a.document["meter_id"] == meter.meter_id and a.document["stored"] for a in answers)
            # The answer carries the same fields as the CoAP 2.04 body, seq included.
            assert {a.document["seq"] for a in answers} == set(range(25))
            assert answers[0].document["moles"] > 0
    finally:
        for meter in meters:
            await asyncio.to_thread(meter.close)
    rows = await stored(running)
    assert sorted((m, s) for m, s, _ in rows) == sorted((f"run-{n}", s) for n in range(4) for s in range(25))
    # Anonymous broker: nothing proved the meters' identity.
    assert {authenticated for _, _, authenticated in rows} == {0}
    assert metric(running, 'smartgas_transport_readings_received_total{transport="mqtt"}') == 100
    assert metric(running, 'smartgas_transport_readings_accepted_total{transport="mqtt"}') == 100
    assert metric(running, 'smartgas_transport_readings_received_total{transport="coap"}') == 0
    assert metric(running, "smartgas_mqtt_connected") == 1


async def test_a_resent_reading_is_answered_again_and_stored_once(running: Consumer, meter: MqttMeter) -> None:
    body = reading_body(7)
    for _ in range(2):
        await asyncio.to_thread(meter.publish, body, response_topic=answer_topic("m1"), correlation_data=b"7")
    answers = await asyncio.to_thread(meter.wait_answers, 2)
    assert [a.document["stored"] for a in answers] == [True, False]
    assert answers[0].document["moles"] == answers[1].document["moles"]
    assert await stored(running, "m1") == [("m1", 7, 0)]


async def test_accepted_readings_are_answered_only_when_asked(running: Consumer, meter: MqttMeter) -> None:
    await asyncio.to_thread(meter.publish_reading, 1, answer=False)
    await asyncio.to_thread(meter.publish, b"{not json")  # refused: answered without being asked
    (answer,) = await asyncio.to_thread(meter.wait_answers, 1)
    assert answer.document["code"] == "4.00" and answer.correlation_data is None
    mqtt = running.mqtt
    assert mqtt is not None
    await until(lambda: mqtt.accepted + mqtt.refused == 2, "both readings handled")
    assert len(meter.answers) == 1
    assert await stored(running, "m1") == [("m1", 1, 0)]


@pytest.mark.parametrize("case", INVALID, ids=[case["name"] for case in INVALID])
async def test_invalid_readings_are_answered_with_their_diagnostics(
    running: Consumer, meter: MqttMeter, case: dict[str, Any]
) -> None:
    await asyncio.to_thread(
        meter.publish, case["payload"].encode(), response_topic=answer_topic("m1"), correlation_data=b"42"
    )
    (answer,) = await asyncio.to_thread(meter.wait_answers, 1)
    assert answer.document["code"] == case["code"]
    assert case["diagnostic_contains"] in answer.document["diagnostic"]
    assert answer.correlation_data == b"42"
    assert await stored(running, "m1") == []


@pytest.mark.parametrize(
    ("name", "payload", "content_type", "code", "words"),
    [
        ("CBOR with a tag", cbor2.dumps({"seq": 1, "ts": cbor2.CBORTag(1, 1.7e9)}), "application/cbor", "4.00", "tag"),
        ("CBOR then garbage", cbor2.dumps({"seq": 1}) + b"\x00", "application/cbor", "4.00", "after the reading"),
        ("JSON sent as CBOR", reading_body(1), "application/cbor", "4.00", "CBOR"),
        ("another content type", reading_body(1), "text/plain", "4.15", "application/json"),
        ("over 1024 bytes", b" " * 1500 + reading_body(1), None, "4.13", "1024"),
        ("out of range", reading_body(1, pressure_bar=5000.0), None, "4.00", "pressure_bar"),
        ("an old timestamp", reading_body(1, ts="2020-01-01T00:00:00Z"), None, "4.00", "before the consumer's clock"),
    ],
)
async def test_malformed_payloads_are_refused_naming_the_problem(
    running: Consumer, meter: MqttMeter, name: str, payload: bytes, content_type: str | None, code: str, words: str
) -> None:
    await asyncio.to_thread(meter.publish, payload, content_type=content_type)
    (answer,) = await asyncio.to_thread(meter.wait_answers, 1)
    assert answer.topic == answer_topic("m1")
    assert answer.document["code"] == code, answer.document
    assert words in answer.document["diagnostic"]
    assert await stored(running, "m1") == []
    assert metric(running, 'smartgas_transport_readings_refused_total{transport="mqtt"}') == 1


async def test_a_qos_0_reading_is_refused_with_an_answer_saying_why(running: Consumer, meter: MqttMeter) -> None:
    """A QoS 0 reading has no PUBACK that could follow its commit: refused 4.00, answered, counted, not stored
    (it used to be dropped without a word: a misconfigured meter heard nothing)."""
    await asyncio.to_thread(meter.publish, reading_body(1), qos=0)
    (answer,) = await asyncio.to_thread(meter.wait_answers, 1)
    assert answer.document["code"] == "4.00"
    assert "QoS 1" in answer.document["diagnostic"] and reading_topic("m1") in answer.document["diagnostic"]
    assert metric(running, 'smartgas_transport_readings_refused_total{transport="mqtt"}') == 1
    await asyncio.to_thread(meter.publish_reading, 2)  # the same meter at QoS 1 goes on as usual
    answers = await asyncio.to_thread(meter.wait_answers, 2)
    assert answers[1].document["code"] == "2.04"
    assert await stored(running, "m1") == [("m1", 2, 0)]


async def test_cbor_readings_are_taken_like_json_ones(running: Consumer, meter: MqttMeter) -> None:
    body = cbor2.dumps(json.loads(reading_body(3)))
    await asyncio.to_thread(
        meter.publish, body, content_type="application/cbor", response_topic=answer_topic("m1"), correlation_data=b"3"
    )
    (answer,) = await asyncio.to_thread(meter.wait_answers, 1)
    assert answer.document["code"] == "2.04" and answer.document["seq"] == 3
    assert answer.content_type == "application/json"  # answers are JSON whatever the reading was
    assert await stored(running, "m1") == [("m1", 3, 0)]


async def test_a_packet_beyond_the_maximum_packet_size_is_dropped_by_the_broker(
    running: Consumer, meter: MqttMeter
) -> None:
    """The CONNECT's Maximum Packet Size (16 KiB) makes the broker drop a huge PUBLISH before it reaches the
    consumer, which goes on taking the meter's next reading."""
    assert str(await asyncio.to_thread(meter.publish, b"x" * 100_000)) == "Success"  # the broker took it
    await asyncio.to_thread(meter.publish_reading, 1)
    (answer,) = await asyncio.to_thread(meter.wait_answers, 1)
    assert answer.document["code"] == "2.04"
    assert running.mqtt is not None and running.mqtt.received == 1
    assert await stored(running, "m1") == [("m1", 1, 0)]


async def test_a_flood_of_refused_readings_does_not_silence_the_consumer(
    running: Consumer, broker: Mosquitto, meter: MqttMeter
) -> None:
    """Mosquitto 2.0 keeps to the Receive Maximum only while its client publishes nothing: to a consumer that
    answers as it acknowledges, it sends far beyond it (1,203 unacknowledged for a Receive Maximum of 4,
    measured with two Paho clients). A consumer that dropped the connection then got them all again at once
    on resuming its session, dropped it again, and so on: a flood of garbage silenced MQTT for good. Every
    reading is taken, the connection stays, and the next good reading is stored and answered."""
    flooded = 1500

    def flood() -> None:
        flooder = MqttMeter(broker.port, "flood", subscribe_answers=False).connect()
        try:
            sent = [flooder.client.publish(reading_topic(f"f{n}"), b"garbage", qos=1) for n in range(flooded)]
            for info in sent:
                info.wait_for_publish(WAIT_S)
        finally:
            flooder.close()

    await asyncio.to_thread(flood)
    assert running.mqtt is not None
    mqtt = running.mqtt
    await until(lambda: mqtt.refused == flooded, f"{flooded} refusals", timeout_s=2 * WAIT_S)
    await asyncio.to_thread(meter.publish_reading, 1)
    (answer,) = await asyncio.to_thread(meter.wait_answers, 1, WAIT_S)
    assert answer.document["code"] == "2.04"
    assert await stored(running, "m1") == [("m1", 1, 0)]
    assert mqtt.link.connects == 1 and mqtt.link.connected


async def test_answers_never_go_to_another_meters_topic(running: Consumer, broker: Mosquitto) -> None:
    """A Response Topic naming another meter's answer topic is not followed: the answer goes to the
    publishing meter's own topic (with the Correlation Data), nothing to the other one."""
    attacker = await asyncio.to_thread(MqttMeter(broker.port, "m1").connect)
    victim = await asyncio.to_thread(MqttMeter(broker.port, "m2").connect)
    try:
        for seq, response_topic in enumerate([answer_topic("m2"), "elsewhere/entirely"]):
            await asyncio.to_thread(
                attacker.publish, reading_body(seq), response_topic=response_topic, correlation_data=b"c%d" % seq
            )
        answers = await asyncio.to_thread(attacker.wait_answers, 2)
        own = answer_topic("m1")
        assert [(a.topic, a.correlation_data) for a in answers] == [(own, b"c0"), (own, b"c1")]
        await asyncio.sleep(0.5)  # time for a stray answer to arrive, if one were sent
        assert victim.answers == []
    finally:
        await asyncio.to_thread(attacker.close)
        await asyncio.to_thread(victim.close)


async def test_coap_and_mqtt_feed_one_store(running: Consumer, meter: MqttMeter) -> None:
    import aiocoap  # the CoAP side of the same process

    await asyncio.to_thread(meter.publish_reading, 1)
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        request = aiocoap.Message(
            code=aiocoap.PUT,
            uri=f"coap://127.0.0.1:{running.port}/meters/m1/reading",
            payload=reading_body(2),
            content_format=50,
        )
        response = await asyncio.wait_for(context.request(request).response, timeout=WAIT_S)
    finally:
        await context.shutdown()
    assert response.code == aiocoap.CHANGED
    await asyncio.to_thread(meter.wait_answers, 1)
    assert [seq for _, seq, _ in await stored(running, "m1")] == [1, 2]
    assert metric(running, 'smartgas_transport_readings_accepted_total{transport="coap"}') == 1
    assert metric(running, 'smartgas_transport_readings_accepted_total{transport="mqtt"}') == 1


async def test_a_broker_restart_is_survived(running: Consumer, broker: Mosquitto, meter: MqttMeter) -> None:
    """The broker stops: /healthz says MQTT is down (200, degraded), CoAP goes on; it comes back on the same
    port: the consumer reconnects with backoff and takes what the meter published after the restart."""
    await asyncio.to_thread(meter.publish_reading, 1)
    await asyncio.to_thread(meter.wait_answers, 1)
    await asyncio.to_thread(meter.close)
    await asyncio.to_thread(broker.stop)
    assert running.mqtt is not None
    mqtt = running.mqtt
    await until(lambda: not mqtt.link.connected, "the consumer noticed the broker went")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http.port}") as http:
        health = await http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "degraded" and health.json()["mqtt"].startswith("down: ")
        assert metric(running, "smartgas_mqtt_connected") == 0
        await asyncio.to_thread(broker.start)
        await until(lambda: mqtt.link.connected, "the consumer reconnected")
        assert (await http.get("/healthz")).json() == {"status": "ok", "mqtt": "connected"}
    again = await asyncio.to_thread(MqttMeter(broker.port, "m1").connect)
    try:
        for seq in (2, 3):
            await asyncio.to_thread(again.publish_reading, seq)
        await asyncio.to_thread(again.wait_answers, 2)
    finally:
        await asyncio.to_thread(again.close)
    assert [seq for _, seq, _ in await stored(running, "m1")] == [1, 2, 3]
    assert metric(running, "smartgas_mqtt_connects_total") == 2


async def test_readings_published_while_the_consumer_is_away_wait_in_its_session(
    mqtt_config: ConsumerConfig, broker: Mosquitto, meter: MqttMeter
) -> None:
    """The persistent session: the broker keeps what arrives for a stopped consumer and delivers it on restart."""
    first = Consumer(mqtt_config)
    await first.start()
    await until(lambda: first.mqtt is not None and first.mqtt.link.connected, "subscribed")
    await first.stop()
    for seq in range(5):
        assert str(await asyncio.to_thread(meter.publish_reading, seq)) == "Success"
    second = Consumer(mqtt_config)
    await second.start()
    try:
        answers = await asyncio.to_thread(meter.wait_answers, 5)
        assert {a.document["code"] for a in answers} == {"2.04"}
        assert [seq for _, seq, _ in await stored(second, "m1")] == list(range(5))
    finally:
        await second.stop()


async def test_mqtt_alone_without_coap(mqtt_config: ConsumerConfig, meter: MqttMeter) -> None:
    consumer = Consumer(replace(mqtt_config, coap_enabled=False))
    await consumer.start()
    try:
        assert consumer.port is None  # no CoAP socket
        await until(lambda: consumer.mqtt is not None and consumer.mqtt.link.connected, "subscribed")
        await asyncio.to_thread(meter.publish_reading, 1)
        (answer,) = await asyncio.to_thread(meter.wait_answers, 1)
        assert answer.document["code"] == "2.04"
    finally:
        await consumer.stop()


async def test_a_broker_that_is_not_there_does_not_stop_the_start(consumer_config: ConsumerConfig) -> None:
    from smartgas_common.mosquitto import free_loopback_port

    consumer = Consumer(replace(consumer_config, mqtt_broker=f"mqtt://127.0.0.1:{free_loopback_port()}"))
    await consumer.start()
    try:
        assert consumer.mqtt is not None
        mqtt = consumer.mqtt
        await until(lambda: mqtt.link.last_error is not None and "cannot connect" in mqtt.link.last_error, "a try")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{consumer.http.port}") as http:
            health = (await http.get("/healthz")).json()
        assert health["status"] == "degraded" and "cannot connect to mqtt://127.0.0.1:" in health["mqtt"]
    finally:
        await consumer.stop()


def test_mqtt_settings_are_checked_at_start(tmp_path: Path) -> None:
    assert load({"mqtt_broker": "mqtt://broker.example:1884"}, {}).mqtt_broker == "mqtt://broker.example:1884"
    assert load({}, {"SMARTGAS_CONSUMER_MQTT_BROKER": "mqtt://mosquitto"}).mqtt_broker == "mqtt://mosquitto:1883"
    for bad, words in [
        ("http://broker:1883", "mqtt://HOST:PORT"),
        ("mqtts://broker:8883", "not supported"),
        ("mqtt://user:secret@broker", "--mqtt-credentials"),
        ("mqtt://broker:99999", "PORT 1 to 65535"),
        ("mqtt://:1883", "no host"),
    ]:
        with pytest.raises(ConfigError, match="--mqtt-broker") as raised:
            load({"mqtt_broker": bad}, {})
        assert words in str(raised.value)
    with pytest.raises(ConfigError, match="--mqtt-broker"):
        load({"coap_enabled": "false"}, {})
    with pytest.raises(ConfigError, match="--mqtt-shared-group"):
        load({"mqtt_shared_group": "a/b"}, {})
    with pytest.raises(ConfigError, match="--mqtt-receive-maximum"):
        load({"mqtt_receive_maximum": "0"}, {})


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, "No such file"), ("not json", "not JSON"), ('{"username": "consumer"}', "both non-empty")],
)
def test_a_bad_credentials_file_stops_the_start(
    consumer_config: ConsumerConfig, tmp_path: Path, content: str | None, words: str
) -> None:
    path = tmp_path / "consumer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StartupError, match="--mqtt-credentials") as raised:
        Consumer(replace(consumer_config, mqtt_broker="mqtt://127.0.0.1:1883", mqtt_credentials=path))
    assert words in str(raised.value)


def test_topics_of_the_contract() -> None:
    from smartgas_common.mqtt_contract import meter_id_of_reading_topic, shared_filter

    assert reading_topic("bottle-0001") == "smartgas/meters/bottle-0001/reading"
    assert meter_id_of_reading_topic("smartgas/meters/bottle-0001/reading") == "bottle-0001"
    for not_a_reading in ["smartgas/meters//reading", "smartgas/meters/a/b/reading", "smartgas/meters/a/answer", "x"]:
        assert meter_id_of_reading_topic(not_a_reading) is None
    assert shared_filter(None) == "smartgas/meters/+/reading"
    assert shared_filter("ingest") == "$share/ingest/smartgas/meters/+/reading"


async def test_a_backlog_is_taken_no_more_than_receive_maximum_at_a_time(
    mqtt_config: ConsumerConfig, meter: MqttMeter
) -> None:
    """Mosquitto 2.0 sends a resumed session's whole backlog at once, whatever the Receive Maximum: the
    consumer stops reading the socket while it handles --mqtt-receive-maximum readings, so a backlog (or a
    flood) costs it no more than that, and every reading of it is stored."""
    config = replace(mqtt_config, mqtt_receive_maximum=8)
    first = Consumer(config)
    await first.start()
    await until(lambda: first.mqtt is not None and first.mqtt.link.connected, "subscribed")
    await first.stop()

    def publish_backlog() -> None:
        for seq in range(300):
            assert str(meter.publish_reading(seq, answer=False)) == "Success"

    await asyncio.to_thread(publish_backlog)
    second = Consumer(config)
    await second.start()
    try:
        mqtt = second.mqtt
        assert mqtt is not None
        await until(lambda: mqtt.accepted == 300, "the backlog taken")
        assert 1 < mqtt.link.most_handled <= 8
        assert [seq for _, seq, _ in await stored(second, "m1")] == list(range(300))
    finally:
        await second.stop()


@pytest.mark.usefixtures("chattr")
async def test_a_store_that_cannot_commit_holds_readings_back_for_the_broker(
    running: Consumer, meter: MqttMeter
) -> None:
    """5.03 over MQTT: the reading is neither answered nor acknowledged, the consumer drops the connection,
    and once the store commits again the broker's copy is stored, once, and answered. (A real fault: the
    store's files made immutable with chattr +i.)"""
    mqtt = running.mqtt
    assert mqtt is not None
    db = running.config.db
    with immutable(db, db.with_name(db.name + "-wal")):
        await asyncio.to_thread(meter.publish_reading, 1)
        await until(lambda: mqtt.held_back >= 1, "the reading held back")
        assert meter.answers == [] and await stored(running, "m1") == []
    (answer,) = await asyncio.to_thread(meter.wait_answers, 1, 60.0)
    assert answer.document["code"] == "2.04" and answer.document["stored"] is True
    assert await stored(running, "m1") == [("m1", 1, 0)]
    assert mqtt.link.connects >= 2  # reconnected to be sent the reading again
