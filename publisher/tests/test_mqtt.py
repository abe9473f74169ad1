"""Integration tests of ``--transport mqtt`` against a real Mosquitto on a loopback ephemeral port.

Readings arrive on their meter's topic with the contract's MQTT 5 properties; a reading counts as
delivered when the broker acknowledges it; a broker restart loses nothing the publisher still buffered;
answers on the answer topic are counted, refusals logged; each meter connects with its own credentials.
The consumer's side is stood in for by ``Subscriber`` (a Paho client with a persistent session, and,
when told, answering as the contract says); the real consumer's MQTT ingest is tested in consumer/.
"""

import asyncio
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import assert_every_reading_accounted_for, bounded, eventually, fast_config
from smartgas_common.mosquitto import Mosquitto, mosquitto_binary
from smartgas_publisher.fleet import Fleet
from smartgas_publisher.mqtt import read_credentials

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (apt-get install mosquitto)"),
]

#: Decides the answer to one reading (meter id, body): None for no answer, else the answer's JSON.
Answerer = Callable[[str, dict[str, Any]], dict[str, Any] | None]


@dataclass
class Published:
    """One reading as the broker delivered it."""

    topic: str
    body: dict[str, Any]
    qos: int
    content_type: str | None
    response_topic: str | None
    correlation_data: bytes | None


@dataclass
class Subscriber:
    """A consumer stand-in: a persistent MQTT 5 session on ``smartgas/meters/+/reading`` (Paho's own thread)."""

    port: int
    answerer: Answerer | None = None
    received: list[Published] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: Any = None

    def start(self) -> "Subscriber":
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id="test-consumer",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.reconnect_delay_set(0.1, 0.5)
        client.on_connect = lambda c, *_: c.subscribe("smartgas/meters/+/reading", qos=1)
        client.on_message = self._on_message
        session = Properties(PacketTypes.CONNECT)
        session.SessionExpiryInterval = 3600  # the broker keeps the session (and queues) across a restart
        client.connect("127.0.0.1", self.port, clean_start=False, properties=session)
        client.loop_start()
        self._client = client
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        properties = message.properties
        published = Published(
            message.topic,
            json.loads(message.payload),
            message.qos,
            getattr(properties, "ContentType", None),
            getattr(properties, "ResponseTopic", None),
            getattr(properties, "CorrelationData", None),
        )
        with self._lock:
            self.received.append(published)
        if self.answerer is not None and published.response_topic:
            answer = self.answerer(published.topic.split("/")[2], published.body)
            if answer is not None:
                reply = Properties(PacketTypes.PUBLISH)
                reply.CorrelationData = published.correlation_data
                client.publish(published.response_topic, json.dumps(answer), qos=1, properties=reply)

    def readings(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(p.topic.split("/")[2], p.body["seq"]) for p in self.received}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "broker") as started:
        yield started


@pytest.fixture
def subscriber(broker: Mosquitto) -> Iterator[Subscriber]:
    started = Subscriber(broker.port).start()
    try:
        yield started
    finally:
        started.stop()


def mqtt_config(broker: Mosquitto, **overrides: Any) -> Any:
    return fast_config("coap://127.0.0.1:9", transport="mqtt", broker=broker.url, **overrides)


async def test_readings_arrive_on_their_topics_with_the_contract_properties(
    broker: Mosquitto, subscriber: Subscriber, reading_validator: Any
) -> None:
    config = mqtt_config(broker, meters=3, count=2, period_s=0.1)
    stats = await bounded(Fleet(config).run(), 60)
    assert_every_reading_accounted_for(stats)
    assert (stats.produced, stats.acked, stats.retried) == (6, 6, 0)
    # Acknowledged by the broker means held for the subscriber's session: all six reach it.
    await eventually(lambda: len(subscriber.received) >= 6)
    assert subscriber.readings() == {(meter_id, seq) for meter_id in config.meter_ids() for seq in range(2)}
    for published in subscriber.received:
        meter_id = published.topic.split("/")[2]
        assert published.topic == f"smartgas/meters/{meter_id}/reading"
        assert published.qos == 1
        assert published.content_type == "application/json"
        assert published.response_topic == f"smartgas/meters/{meter_id}/answer"
        assert published.correlation_data == str(published.body["seq"]).encode("ascii")
        reading_validator.validate(published.body)
    assert "answers_accepted=0 answers_refused=0" in stats.summary_line()


async def test_answers_are_counted_and_a_refusal_logged_with_its_diagnostic(
    broker: Mosquitto, subscriber: Subscriber, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse_seq_1(meter_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if body["seq"] == 1:
            return {"code": "4.00", "diagnostic": "pressure_bar: must be at most 400, got 999"}
        return {"code": "2.04", "meter_id": meter_id, "seq": body["seq"], "stored": True}

    subscriber.answerer = refuse_seq_1
    fleet = Fleet(mqtt_config(broker, meters=2, count=None, period_s=0.1))
    with caplog.at_level(logging.WARNING, logger="smartgas_publisher"):
        run = asyncio.create_task(fleet.run())
        try:
            await eventually(lambda: fleet.stats.answers_refused == 2 and fleet.stats.answers_accepted >= 4, 30)
            fleet.request_stop()
            stats = await bounded(run, 30)
        finally:
            run.cancel()
    assert stats.answers_refused == 2  # seq 1 of each meter, and no other
    assert not stats.all_acknowledged  # a refused reading makes the exit code 1
    refusals = [r.getMessage() for r in caplog.records if "refused reading" in r.getMessage()]
    assert sorted(refusals) == [
        f"{meter_id}: consumer refused reading seq=1: 4.00 pressure_bar: must be at most 400, got 999"
        for meter_id in ("sim-0001", "sim-0002")
    ]
    assert "answers_refused=2" in stats.summary_line()


async def test_a_broker_restart_loses_nothing_the_publisher_buffered(broker: Mosquitto, subscriber: Subscriber) -> None:
    fleet = Fleet(mqtt_config(broker, meters=2, count=None, period_s=0.1))
    run = asyncio.create_task(fleet.run())
    try:
        await eventually(lambda: fleet.stats.acked >= 4, 30)
        await asyncio.to_thread(broker.stop)
        await eventually(lambda: fleet.stats.retried >= 2 and fleet.stats.buffered >= 4, 30)
        await asyncio.to_thread(broker.start)  # the same port
        acked_before = fleet.stats.acked
        await eventually(lambda: fleet.stats.acked >= acked_before + 6, 30)
        fleet.request_stop()
        stats = await bounded(run, 30)
    finally:
        run.cancel()
    assert_every_reading_accounted_for(stats)
    assert stats.retried >= 2 and stats.dropped == 0
    assert stats.all_acknowledged, stats.summary_line()
    # The stand-in consumer reconnects after the restart on its own schedule, and the broker then delivers
    # its session's queue: wait for as many readings as the publisher produced before comparing (read
    # at once, the subscriber could still be behind: a failure seen on a loaded machine).
    await eventually(lambda: len(subscriber.readings()) >= stats.produced, 30)
    produced = {meter_id: 0 for meter_id in ("sim-0001", "sim-0002")}
    for meter_id in produced:
        produced[meter_id] = 1 + max(seq for mid, seq in subscriber.readings() if mid == meter_id)
    assert sum(produced.values()) == stats.produced
    expected = {(meter_id, seq) for meter_id, count in produced.items() for seq in range(count)}
    assert subscriber.readings() == expected  # every reading, none skipped across the outage


async def test_each_meter_connects_with_its_own_credentials(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    password_file = tmp_path / "password_file"
    password_file.touch()
    for user, password in (("sim-0001", "right-one"), ("test-consumer", "consumer-secret")):
        subprocess.run(["mosquitto_passwd", "-b", str(password_file), user, password], check=True)  # noqa: ASYNC221
    password_file.chmod(0o600)
    credentials = tmp_path / "meter-credentials"
    for meter_id, password in (("sim-0001", "right-one"), ("sim-0002", "not-its-password")):
        (credentials / meter_id).mkdir(parents=True)
        (credentials / meter_id / "mqtt.json").write_text(json.dumps({"username": meter_id, "password": password}))
    broker = Mosquitto(tmp_path / "broker", password_file=password_file).start()
    try:
        config = mqtt_config(broker, meters=2, count=None, period_s=0.1, credentials_path=str(credentials))
        fleet = Fleet(config)
        caplog.set_level(logging.WARNING, logger="smartgas_publisher")
        run = asyncio.create_task(fleet.run())
        try:
            await eventually(lambda: fleet.stats.acked >= 3 and fleet.stats.retried >= 2, 30)
            fleet.request_stop()
            stats = await bounded(run, 30)
        finally:
            run.cancel()
    finally:
        broker.stop()
    # sim-0001 delivers with its password; sim-0002's is wrong: refused by the broker, kept and retried.
    assert stats.acked >= 3 and stats.buffered >= 1
    failures = [r.getMessage() for r in caplog.records if "could not deliver" in r.getMessage()]
    assert failures and all(message.startswith("sim-0002: ") for message in failures)
    assert "the broker refused the connection: Not authorized" in failures[0]


def test_credentials_file_must_hold_a_username_and_password(tmp_path: Path) -> None:
    path = tmp_path / "mqtt.json"
    path.write_text('{"username": "sim-0001", "password": "x"}')
    assert read_credentials(path).username == "sim-0001"
    path.write_text('{"username": "sim-0001"}')
    with pytest.raises(ValueError, match="non-empty username and password"):
        read_credentials(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="cannot read"):
        read_credentials(path)


async def test_the_command_publishes_over_mqtt_and_exits_0(broker: Mosquitto, subscriber: Subscriber) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smartgas_publisher",
        "--transport",
        "mqtt",
        "--broker",
        broker.url,
        "--meters",
        "3",
        "--count",
        "2",
        "--period",
        "0.1",
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await bounded(process.communicate(), 60)
    text = err.decode()
    assert process.returncode == 0, text
    assert f"broker={broker.url}" in text
    assert "fleet finished: meters=3 produced=6 sent=6 acked=6" in text
    await eventually(lambda: len(subscriber.readings()) == 6)
