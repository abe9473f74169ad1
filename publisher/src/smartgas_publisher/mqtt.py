"""The fleet's MQTT uplink: each meter publishes its readings to the broker over its own MQTT 5 connection.

The contract (named once for both sides in ``smartgas_common.mqtt_contract``): a reading goes to
``smartgas/meters/{meter_id}/reading`` at QoS 1, its payload exactly the CoAP PUT's body (JSON here),
with the MQTT 5 properties Content Type
``application/json``, Response Topic ``smartgas/meters/{meter_id}/answer`` and Correlation Data the
reading's ``seq`` in decimal ASCII. A reading counts as delivered (``acked``) when the broker acknowledges
it (PUBACK): the broker then holds it for the consumer's persistent session. The consumer answers on the
response topic; each meter subscribes to it, and the answers are counted (``answers_accepted``,
``answers_refused``; a refusal is logged with its diagnostic, like a CoAP 4.00).

Each meter connects as itself (client id = meter id), with the user and password of
``--credentials DIR/<meter_id>/mqtt.json`` when given (as ``smartgas-consumer provision-meters`` writes
it; the broker's ACL then lets it publish only under its own topic), else anonymously. Answers and errors
map onto the meter's retry policy (``meter.py``) here, and nowhere else:

====================================================  =============================================
what happened                                         the attempt
====================================================  =============================================
PUBACK with a success reason code                     ``acked``
PUBACK with a failure reason code (not authorised:    retried, as a CoAP 4.01 is: the identity is
the ACL refused the topic, quota exceeded…)           wrong, not the reading
no connection (refused, broker down, CONNACK with     retried one period later; the next attempt
an error such as bad user or password), connection    connects anew
lost before the PUBACK, no PUBACK within the
deadline
====================================================  =============================================

A connection is made fresh (a new Paho client) for the attempt after a failure, so Paho never re-sends a
message of an earlier connection on its own: re-sends are the meter's, with the same ``seq`` (the
consumer keeps one copy). Paho's network I/O runs on the fleet's event loop (its documented external
loop: the socket's readiness drives ``loop_read``/``loop_write``, one task calls every client's
``loop_misc`` each second); only the TCP connect itself is synchronous, bounded by ``CONNECT_TIMEOUT_S``.
"""

import asyncio
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from smartgas_common.mqtt_contract import CONTENT_TYPE_JSON, QOS, answer_topic, reading_topic
from smartgas_publisher.coap import encode
from smartgas_publisher.config import PublisherConfig
from smartgas_publisher.model import Reading
from smartgas_publisher.stats import FleetStats
from smartgas_publisher.uplink import DIAGNOSTIC_MAX_CHARS, Attempt, Outcome, SendClock

log = logging.getLogger(__name__)

#: Seconds between two keep-alive pings of an idle connection.
KEEPALIVE_S = 60
#: Longest a TCP connect to the broker may block the event loop (Paho connects synchronously).
CONNECT_TIMEOUT_S = 5.0
#: How long a meter waits for the broker's CONNACK, and then for each PUBACK.
CONNACK_TIMEOUT_S = 10.0
#: How long closing waits for the connections to say goodbye (DISCONNECT written) before closing them.
CLOSE_TIMEOUT_S = 2.0


class MqttFailure(Exception):
    """A connection could not be made or was lost; the message says why."""


@dataclass(frozen=True)
class BrokerCredentials:
    """A meter's broker user and password (``DIR/<meter_id>/mqtt.json``)."""

    username: str
    password: str


def read_credentials(path: Path) -> BrokerCredentials:
    """The credentials in ``path``; ValueError saying what is wrong with the file."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(content, dict) or not all(
        isinstance(content.get(key), str) and content[key] for key in ("username", "password")
    ):
        raise ValueError(f"{path}: must be a JSON object with a non-empty username and password")
    return BrokerCredentials(content["username"], content["password"])


class _Connection:
    """One meter's MQTT 5 connection (one Paho client) driven by the event loop, and its waiting publishes."""

    def __init__(self, uplink: "MqttUplink", meter_id: str) -> None:
        self._uplink = uplink
        self._loop = asyncio.get_running_loop()
        self.meter_id = meter_id
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=meter_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.connect_timeout = CONNECT_TIMEOUT_S
        credentials = uplink.credentials.get(meter_id)
        if credentials is not None:
            self.client.username_pw_set(credentials.username, credentials.password)
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.connected: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._publishes: dict[int, asyncio.Future[ReasonCode]] = {}
        self._socket: Any = None

    # ---- Paho's external-loop callbacks: the socket's readiness drives its reads and writes

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._socket = sock
        self._loop.add_reader(sock, client.loop_read)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_reader(sock)
        self._loop.remove_writer(sock)
        self._socket = None
        self._fail(MqttFailure("connection closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def _on_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._loop.remove_writer(sock)

    # ---- MQTT events

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        if reason_code.is_failure:
            self._fail(MqttFailure(f"the broker refused the connection: {reason_code}"))
            return
        client.subscribe(answer_topic(self.meter_id), qos=QOS)
        if not self.connected.done():
            self.connected.set_result(None)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason_code: ReasonCode, properties: Any
    ) -> None:
        self._fail(MqttFailure(f"disconnected: {reason_code}"))

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode, properties: Any
    ) -> None:
        waiting = self._publishes.pop(mid, None)
        if waiting is None:
            # Acknowledged before ``publish`` returned its id: kept for ``acknowledged`` to find.
            waiting = self._loop.create_future()
            self._publishes[mid] = waiting
        if not waiting.done():
            waiting.set_result(reason_code)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._uplink.count_answer(self.meter_id, message)

    def _fail(self, problem: MqttFailure) -> None:
        waiters: list[asyncio.Future[Any]] = [self.connected, *self._publishes.values()]
        for waiting in waiters:
            if not waiting.done():
                waiting.set_exception(problem)
                waiting.exception()  # retrieved: a failure nobody awaits any more is not an error
        self._publishes.clear()

    # ---- what the uplink asks

    @property
    def is_open(self) -> bool:
        return self._socket is not None and not self.closed.done()

    async def open(self, host: str, port: int) -> None:
        """Connect and wait for the broker's CONNACK (MqttFailure if it refuses or cannot be reached)."""
        try:
            self.client.connect(host, port, keepalive=KEEPALIVE_S, clean_start=True)
        except (OSError, ValueError) as err:  # refused, unreachable, unresolvable, timed out
            raise MqttFailure(f"cannot connect to the broker at {host}:{port}: {err}") from None
        try:
            async with asyncio.timeout(CONNACK_TIMEOUT_S):
                await self.connected
        except TimeoutError:
            raise MqttFailure(f"no CONNACK from the broker within {CONNACK_TIMEOUT_S:g} s") from None

    def publish(self, topic: str, payload: bytes, properties: Properties) -> asyncio.Future[ReasonCode]:
        """Publish at QoS 1; the future gets the PUBACK's reason code (or MqttFailure)."""
        info = self.client.publish(topic, payload, qos=QOS, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise MqttFailure(f"publish failed: {paho.error_string(info.rc)}")
        waiting = self._publishes.get(info.mid)
        if waiting is None:
            waiting = self._loop.create_future()
            self._publishes[info.mid] = waiting
        return waiting

    def loop_misc(self) -> None:
        self.client.loop_misc()

    async def close(self) -> None:
        """Say goodbye (DISCONNECT), wait briefly for the socket to close, then close it in any case."""
        if self._socket is None:
            return
        self.client.disconnect()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await asyncio.shield(self.closed)
        except TimeoutError:
            sock, self._socket = self._socket, None
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
            sock.close()


class MqttUplink:
    """Sends each meter's readings over its own MQTT 5 connection to the broker."""

    def __init__(self, config: PublisherConfig, meter_ids: list[str], stats: FleetStats, deadline_s: float) -> None:
        parts = urlsplit(config.broker)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 1883
        self._meter_ids = meter_ids
        self._stats = stats
        self._deadline_s = deadline_s
        self._credentials_dir = Path(config.credentials_path) if config.credentials_path else None
        self.credentials: dict[str, BrokerCredentials] = {}
        self._connections: dict[str, _Connection] = {}
        self._keepalive: asyncio.Task[None] | None = None
        stats.answers_counted = True

    @property
    def files_needed(self) -> int:
        """One TCP connection per meter."""
        return len(self._meter_ids)

    async def open(self) -> None:
        """Read each meter's broker credentials when ``--credentials`` is given; connections come later."""
        self._keepalive = asyncio.create_task(self._keep_alive(), name="mqtt keep-alive")
        if self._credentials_dir is None:
            return
        for meter_id in self._meter_ids:
            path = self._credentials_dir / meter_id / "mqtt.json"
            if not path.is_file():
                log.warning("%s: no broker credentials in %s: connecting anonymously", meter_id, path)
                continue
            try:
                self.credentials[meter_id] = read_credentials(path)
            except ValueError as err:
                log.warning("%s: unusable broker credentials (%s): connecting anonymously", meter_id, err)

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            await asyncio.gather(self._keepalive, return_exceptions=True)
        connections, self._connections = list(self._connections.values()), {}
        await asyncio.gather(*(connection.close() for connection in connections))

    async def send(self, meter_id: str, reading: Reading, sent: SendClock) -> Attempt:
        """Publish one reading at QoS 1 and wait for the broker's PUBACK."""
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # untyped in Paho
        properties.ContentType = CONTENT_TYPE_JSON
        properties.ResponseTopic = answer_topic(meter_id)
        properties.CorrelationData = str(reading.seq).encode("ascii")
        try:
            connection = await self._connection(meter_id)
            acknowledged = connection.publish(reading_topic(meter_id), encode(reading), properties)
            sent()
            async with asyncio.timeout(self._deadline_s):
                reason_code = await acknowledged
        except MqttFailure as err:
            self._drop(meter_id)
            return Attempt(Outcome.RETRY, str(err))
        except TimeoutError:
            self._drop(meter_id)
            return Attempt(Outcome.RETRY, f"no PUBACK within {self._deadline_s:g} s")
        if reason_code.is_failure:
            return Attempt(Outcome.RETRY, f"the broker refused the reading: {reason_code}")
        return Attempt(Outcome.ACKED, f"PUBACK {reason_code}")

    async def _connection(self, meter_id: str) -> _Connection:
        connection = self._connections.get(meter_id)
        if connection is not None and connection.is_open and connection.connected.done():
            connection.connected.result()  # raises the failure of a refused connection
            return connection
        self._drop(meter_id)
        connection = _Connection(self, meter_id)
        self._connections[meter_id] = connection
        await connection.open(self._host, self._port)
        return connection

    def _drop(self, meter_id: str) -> None:
        """Forget a meter's connection after a failure; the next attempt connects anew."""
        connection = self._connections.pop(meter_id, None)
        if connection is not None:
            closing = asyncio.ensure_future(connection.close())
            closing.add_done_callback(lambda done: done.exception())

    async def _keep_alive(self) -> None:
        """Paho's timed duties (pings, timeouts) for every connection, once a second."""
        while True:
            await asyncio.sleep(1.0)
            for connection in list(self._connections.values()):
                connection.loop_misc()

    def count_answer(self, meter_id: str, message: paho.MQTTMessage) -> None:
        """Count the consumer's answer to one reading; log a refusal with its diagnostic."""
        correlation = getattr(message.properties, "CorrelationData", b"") if message.properties else b""
        seq = bytes(correlation).decode("ascii", errors="replace") or "?"
        try:
            answer = json.loads(message.payload)
            code = str(answer["code"])
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable answer on %s: %r", meter_id, message.topic, message.payload[:80])
            return
        if code.startswith("2."):
            self._stats.answers_accepted += 1
            return
        self._stats.answers_refused += 1
        diagnostic = str(answer.get("diagnostic", ""))[:DIAGNOSTIC_MAX_CHARS]
        log.warning("%s: consumer refused reading seq=%s: %s %s", meter_id, seq, code, diagnostic)
