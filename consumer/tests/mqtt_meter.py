"""A meter for the MQTT tests: a plain MQTT 5 client (Paho, its own network thread) on a real broker.

It publishes readings at QoS 1 to ``smartgas/meters/{meter_id}/reading`` (or any topic it is told) and
collects what arrives on its answer topic. Its calls block until the broker answered (PUBACK, SUBACK), so
async tests call them through ``asyncio.to_thread``: the consumer under test runs on the test's loop.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from smartgas_common.mqtt_contract import answer_topic, reading_topic

#: How long one broker round trip may take on a loaded 2-core machine before the test fails.
ROUND_TRIP_S = 20.0


def now_ts() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def reading_body(seq: int, *, ts: str | None = None, pressure_bar: float = 200.0) -> bytes:
    document = {"seq": seq, "ts": ts or now_ts(), "pressure_bar": pressure_bar, "temperature_c": 15.0, "volume_l": 50.0}
    return json.dumps(document).encode()


@dataclass(frozen=True)
class Answer:
    topic: str
    document: dict[str, Any]
    correlation_data: bytes | None
    content_type: str | None


class MqttMeter:
    """One meter's MQTT session. ``connect()`` first; ``close()`` at the end."""

    def __init__(
        self,
        port: int,
        meter_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
        subscribe_answers: bool = True,
    ) -> None:
        self.meter_id = meter_id
        self.port = port
        self.answers: list[Answer] = []
        self._subscribe_answers = subscribe_answers
        self._lock = threading.Condition()
        self._published: dict[int, ReasonCode] = {}
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"meter-{meter_id}", protocol=paho.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.connack: ReasonCode | None = None

    def connect(self) -> MqttMeter:
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(ROUND_TRIP_S), "no CONNACK"
        assert self.connack is not None and not self.connack.is_failure, f"CONNACK {self.connack}"
        if self._subscribe_answers:
            self.client.subscribe(answer_topic(self.meter_id), qos=1)
            assert self._subscribed.wait(ROUND_TRIP_S), "no SUBACK"
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(
        self,
        payload: bytes,
        *,
        topic: str | None = None,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        qos: int = 1,
    ) -> ReasonCode | None:
        """Publish at QoS 1 and return the reason code of the broker's PUBACK (at QoS 0: None, once sent)."""
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if content_type is not None:
            properties.ContentType = content_type
        if response_topic is not None:
            properties.ResponseTopic = response_topic
        if correlation_data is not None:
            properties.CorrelationData = correlation_data
        with self._lock:
            info = self.client.publish(topic or reading_topic(self.meter_id), payload, qos=qos, properties=properties)
            assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS, info.rc
            if qos == 0:
                return None
            assert self._lock.wait_for(lambda: info.mid in self._published, ROUND_TRIP_S), "no PUBACK"
            return self._published.pop(info.mid)

    def publish_reading(self, seq: int, *, answer: bool = True, **fields: Any) -> ReasonCode | None:
        """A valid reading, asking for an answer (Response Topic and Correlation Data = seq) by default."""
        return self.publish(
            reading_body(seq, **fields),
            response_topic=answer_topic(self.meter_id) if answer else None,
            correlation_data=str(seq).encode() if answer else None,
        )

    def wait_answers(self, count: int, timeout_s: float = ROUND_TRIP_S) -> list[Answer]:
        with self._lock:
            assert self._lock.wait_for(lambda: len(self.answers) >= count, timeout_s), (
                f"{len(self.answers)} answers of {count}"
            )
            return list(self.answers)

    def _on_connect(self, _client: Any, _userdata: Any, _flags: Any, reason: ReasonCode, _properties: Any) -> None:
        self.connack = reason
        self._connected.set()

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason: ReasonCode, _properties: Any) -> None:
        with self._lock:
            self._published[mid] = reason
            self._lock.notify_all()

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        properties = getattr(message, "properties", None)
        answer = Answer(
            topic=message.topic,
            document=json.loads(message.payload),
            correlation_data=getattr(properties, "CorrelationData", None),
            content_type=getattr(properties, "ContentType", None),
        )
        with self._lock:
            self.answers.append(answer)
            self._lock.notify_all()


def wait_until(condition: Any, timeout_s: float, what: str) -> None:
    """Poll ``condition()`` (blocking: for threads) until true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
