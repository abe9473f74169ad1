"""The consumer's connection to its MQTT broker: Eclipse Paho's MQTT 5 client, driven by the asyncio loop.

Paho (``paho-mqtt`` 2.x) is used for its manual acknowledgement (``manual_ack=True``, ``Client.ack``): a
reading's PUBACK is sent only when the ingest says so, after its commit. Paho's documented external-loop
interface drives it from the consumer's event loop (its socket is watched with ``add_reader`` /
``add_writer``, ``loop_misc`` runs every second for keep-alive), so the callbacks run on the loop like
every other ingest code; only the blocking TCP connect (name resolution, a broker that drops SYNs) runs
in a thread, on a client nothing else touches yet.

One ``Client`` per connection: what a connection had in flight (unacknowledged readings, answers waiting
for their PUBACK) dies with it. The broker keeps the persistent session (Clean Start 0, a Session Expiry
Interval of ``SESSION_EXPIRY_S``), so it sends every reading that was not acknowledged again on the next
connection, and the store keeps each reading once. ``BrokerLink`` reconnects with capped backoff until it
is stopped; the consumer goes on serving CoAP meanwhile. This module is the boundary where Paho's return
codes and reason codes become ``BrokerRefused`` (the broker said no) or ``OSError`` (no connection).

In the CONNECT the consumer tells the broker its Receive Maximum (how many QoS 1 readings may await its
PUBACK at once) and its Maximum Packet Size (larger messages are dropped by the broker, never sent to the
consumer). Mosquitto 2.0 keeps to the Receive Maximum only loosely (on a resumed session it sends the
whole backlog at once), so the consumer enforces it itself: while that many readings are being handled
(not yet committed or refused) it stops reading the socket, and TCP's flow control holds the rest back in
the broker. That is the bound on what a broker, or a flood of meters behind it, can make the consumer hold.

A reading that gets an answer is acknowledged when the broker has acknowledged the answer (its PUBACK
is read like any packet, so the wait never holds up reading): the answer is then in the broker before the
reading leaves it. Paho sends at most 20 QoS 1 messages at a time and queues the rest, so handing both
over in order would not be enough: a PUBACK could overtake a queued answer, and a crash lose the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from smartgas_consumer.config import BrokerAddress
from smartgas_consumer.elasticsearch_sink import Backoff

_LOG = logging.getLogger(__name__)

#: How long the broker keeps the consumer's session (its subscription and every reading not yet
#: acknowledged) while the consumer is away: a week, well past the 25 h a reading may be late.
SESSION_EXPIRY_S = 7 * 24 * 3600
KEEPALIVE_S = 30
#: Largest MQTT packet the broker may send the consumer: a reading's body is at most 1024 bytes
#: (reading.py), so a body up to here is still answered 4.13, and a larger packet is dropped by the broker.
MAX_PACKET_BYTES = 16 * 1024
#: How long a connection attempt (TCP, then CONNACK, then SUBACK) may take before it counts as failed.
CONNECT_TIMEOUT_S = 10.0
#: How long a clean stop waits for the DISCONNECT to be written.
DISCONNECT_TIMEOUT_S = 2.0
#: Backoff between connection attempts: 0.5 s doubling up to this, with jitter.
RECONNECT_BACKOFF_CAP_S = 30.0
#: A connection that lasted this long resets the backoff.
STABLE_CONNECTION_S = 30.0


class BrokerRefused(Exception):
    """The broker answered, and said no (CONNACK or SUBACK with a failure reason code)."""


def publish_properties() -> Properties:
    """An empty set of MQTT 5 PUBLISH properties (Paho's constructor has no type hints)."""
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class BrokerCredentials:
    """The user the consumer logs in to the broker as (``--mqtt-credentials``)."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One PUBLISH from the broker, until the ingest acknowledges it through ``BrokerLink.ack`` (a QoS 0 one
    has nothing to acknowledge: the ingest refuses it, with an answer)."""

    topic: str
    payload: bytes
    content_type: str | None
    response_topic: str | None
    correlation_data: bytes | None
    mid: int
    connection: _Connection = field(repr=False)
    qos: int = 1


class _Connection:
    """One TCP connection and the Paho client on it; everything in it is touched from the loop thread only
    (the connect thread only until ``open`` returns)."""

    def __init__(self, link: BrokerLink) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.loop_thread = threading.get_ident()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=link.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        # A callback that raised would otherwise leave Paho's read in the middle of a packet.
        self.client.suppress_exceptions = True
        if link.credentials is not None:
            self.client.username_pw_set(link.credentials.username, link.credentials.password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write
        self.sock: socket.socket | None = None
        self.watching = False
        self.connack: asyncio.Future[tuple[ReasonCode, bool]] = self.loop.create_future()
        self.suback: asyncio.Future[list[ReasonCode]] = self.loop.create_future()
        self.closed = asyncio.Event()
        self.close_reason = "closed"
        self.ready = False  # CONNACK received and the subscription in place (or kept by the session)
        # mid → (topic, the reading to acknowledge then) of each answer the broker has not PUBACKed yet
        self.pending_answers: dict[int, tuple[str, Delivery]] = {}
        self.handling = 0  # deliveries handed to the ingest and not settled yet
        self.paused = False  # not reading the socket: as many readings held as the Receive Maximum

    # -- opening and closing (loop thread, except the blocking connect) --------------------------------

    async def open(self) -> bool:
        """Connect, then subscribe; return whether the broker had kept our session. Raise OSError or
        BrokerRefused."""
        link = self.link
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        properties.ReceiveMaximum = link.receive_maximum
        properties.MaximumPacketSize = MAX_PACKET_BYTES
        await asyncio.to_thread(
            self.client.connect,
            link.address.host,
            link.address.port,
            keepalive=KEEPALIVE_S,
            clean_start=False,
            properties=properties,
        )
        sock = self.client.socket()
        if not isinstance(sock, socket.socket):
            raise OSError("the MQTT connection closed as it opened")
        self.sock = sock
        self.watching = True
        self.loop.add_reader(sock, self._readable)
        if self.client.want_write():
            self.loop.add_writer(sock, self._writable)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reason, session_present = await self.connack
        if reason.is_failure:
            raise BrokerRefused(f"connection refused: {reason}")
        # Subscribed every time (a changed --mqtt-shared-group takes effect). A resumed session already has
        # the subscription, and its backlog arrives before the SUBACK: readings flow from now on, and the
        # SUBACK is checked when it comes. A new session waits for it.
        result, _mid = self.client.subscribe(link.subscription, qos=1)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise OSError(f"subscribe failed: {paho.error_string(result)}")
        if not session_present:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self.suback
        self.ready = True
        return session_present

    def close(self, reason: str) -> None:
        """Drop the connection now (no DISCONNECT): the broker sends again what was not acknowledged."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        self._unwatch()  # Paho is never called on this connection again: its client is dropped with it
        if self.sock is not None:
            self.sock.close()
        self._closed()

    async def disconnect(self) -> None:
        """A clean MQTT DISCONNECT (the session stays with the broker), bounded in time."""
        if self.closed.is_set():
            return
        self.client.disconnect()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DISCONNECT_TIMEOUT_S):
                await self.closed.wait()
        self.close("stopped")

    def _closed(self) -> None:
        self._unwatch()
        for future in (self.connack, self.suback):
            if not future.done():
                future.set_exception(OSError(f"the broker closed the connection: {self.close_reason}"))
                future.exception()  # retrieved here: nobody may be waiting for it any more
        self.pending_answers.clear()
        self.ready = False
        self.closed.set()

    def _unwatch(self) -> None:
        if self.watching and self.sock is not None:
            self.loop.remove_reader(self.sock)
            self.loop.remove_writer(self.sock)
        self.watching = False

    # -- the socket, driven by the loop ------------------------------------------------------------------

    def _readable(self) -> None:
        self.client.loop_read()
        if self.watching and not self.paused and self.handling >= self.link.receive_maximum:
            assert self.sock is not None
            self.loop.remove_reader(self.sock)
            self.paused = True

    def settled(self) -> None:
        """One delivery of this connection is handled (committed or refused, or given up): read on if paused."""
        self.handling -= 1
        if self.paused and self.watching and self.handling < self.link.receive_maximum:
            assert self.sock is not None
            self.loop.add_reader(self.sock, self._readable)
            self.paused = False

    def _writable(self) -> None:
        self.client.loop_write()

    def misc(self) -> None:
        """Paho's keep-alive: PINGREQ when idle, and the connection dropped if no PINGRESP came."""
        self.client.loop_misc()

    def _on_register_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if threading.get_ident() == self.loop_thread and self.watching:
            self.loop.add_writer(sock, self._writable)
        # From the connect thread: ``open`` registers the writer once connect() returned.

    def _on_unregister_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        if threading.get_ident() == self.loop_thread and self.watching:
            self.loop.remove_writer(sock)

    def _on_socket_close(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        if threading.get_ident() == self.loop_thread:
            self._unwatch()  # before Paho closes the descriptor, which the kernel may then reuse

    # -- MQTT events (loop thread) --------------------------------------------------------------------

    def _on_connect(self, _client: Any, _userdata: Any, flags: Any, reason: ReasonCode, _properties: Any) -> None:
        if not self.connack.done():
            self.connack.set_result((reason, bool(flags.session_present)))

    def _on_subscribe(
        self, _client: Any, _userdata: Any, _mid: int, reasons: list[ReasonCode], _properties: Any
    ) -> None:
        if not self.suback.done():
            self.suback.set_result(reasons)
        refused = [reason for reason in reasons if reason.is_failure]
        if refused:
            # Not from inside Paho's read; the link logs the reason and retries with backoff.
            self.loop.call_soon(self.close, f"subscription to {self.link.subscription} refused: {refused[0]}")

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason: ReasonCode, _properties: Any) -> None:
        pending = self.pending_answers.pop(mid, None)
        if pending is None:
            return
        topic, delivery = pending
        if reason.is_failure and self.link.on_publish_refused is not None:
            self.link.on_publish_refused(topic, str(reason))
        if not self.closed.is_set():
            self.client.ack(delivery.mid, delivery.qos)  # QoS 0: nothing to send

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: ReasonCode, _properties: Any) -> None:
        if not self.closed.is_set():
            self.close_reason = str(reason)
            self._closed()

    def _on_message(self, _client: Any, _userdata: Any, message: paho.MQTTMessage) -> None:
        properties = getattr(message, "properties", None)
        content_type = getattr(properties, "ContentType", None)
        response_topic = getattr(properties, "ResponseTopic", None)
        correlation_data = getattr(properties, "CorrelationData", None)
        self.handling += 1
        self.link.most_handled = max(self.link.most_handled, self.handling)
        self.link.on_delivery(
            Delivery(
                topic=message.topic,
                payload=bytes(message.payload),
                content_type=content_type if isinstance(content_type, str) else None,
                response_topic=response_topic if isinstance(response_topic, str) else None,
                correlation_data=bytes(correlation_data) if isinstance(correlation_data, bytes | bytearray) else None,
                mid=message.mid,
                connection=self,
                qos=message.qos,
            )
        )


class BrokerLink:
    """The consumer's MQTT 5 session: connect, subscribe, hand each reading over, acknowledge, reconnect.

    ``on_delivery`` gets every QoS 1 message of the subscription, on the event loop; the ingest then calls
    ``ack`` once the reading is committed (or refused and answered), and ``publish`` for answers.
    """

    def __init__(
        self,
        address: BrokerAddress,
        *,
        client_id: str,
        subscription: str,
        credentials: BrokerCredentials | None,
        receive_maximum: int,
        on_delivery: Callable[[Delivery], None],
        backoff: Backoff | None = None,
        on_state: Callable[[bool], None] | None = None,
        on_publish_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.subscription = subscription
        self.credentials = credentials
        self.receive_maximum = receive_maximum
        self.on_delivery = on_delivery
        self._backoff = backoff or Backoff(cap_s=RECONNECT_BACKOFF_CAP_S)
        self._on_state = on_state
        self.on_publish_refused = on_publish_refused
        self._rng = random.Random()
        self._connection: _Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connects = 0
        self.most_handled = 0  # the most readings handled at once on one connection, since start
        self.last_error: str | None = "not connected yet"
        self.down_since = time.monotonic()

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.ready

    def fault(self) -> str | None:
        """None while connected and subscribed; else how long the link has been down, and why."""
        if self.connected:
            return None
        return f"{self.last_error}, for {time.monotonic() - self.down_since:.0f} s"

    def describe(self) -> str:
        connection, fault = self._connection, self.fault()
        if connection is None or fault is not None:
            return f"down ({fault})"
        paused = ", not reading: Receive Maximum reached" if connection.paused else ""
        return (
            f"connected to {self.address.url}, {connection.handling} reading(s) being handled,"
            f" {len(connection.pending_answers)} answer(s) awaiting the broker{paused}"
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="mqtt-link")

    async def stop(self) -> None:
        """A clean DISCONNECT (the broker keeps the session and what was not acknowledged), then stop."""
        self._stopping = True
        connection = self._connection
        if connection is not None:
            await connection.disconnect()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def answers_settled(self) -> None:
        """Wait until the broker acknowledged every answer sent (and so its reading was acknowledged)."""
        while (connection := self._connection) is not None and connection.pending_answers:  # noqa: ASYNC110 - at stop only
            await asyncio.sleep(0.01)

    def recycle(self, reason: str) -> None:
        """Drop the connection (the broker sends again what was not acknowledged) and reconnect after a pause."""
        if self._connection is not None:
            self._connection.close(reason)

    def settle(self, delivery: Delivery, *, acknowledge: bool) -> bool:
        """Done with ``delivery``: PUBACK it if asked and its connection is still the live one (else the
        broker sends it again); return whether a PUBACK was sent. Every delivery is settled once."""
        connection = delivery.connection
        connection.settled()
        if not acknowledge or connection is not self._connection or connection.closed.is_set():
            return False
        return connection.client.ack(delivery.mid, delivery.qos) == MQTTErrorCode.MQTT_ERR_SUCCESS

    def answer_then_acknowledge(self, delivery: Delivery, topic: str, payload: bytes, properties: Properties) -> bool:
        """Publish an answer at QoS 1 on ``delivery``'s connection, and acknowledge ``delivery`` once the
        broker acknowledged the answer (even with a failure reason code, reported to ``on_publish_refused``:
        a reading must not come back forever for want of an answer). False if the connection is gone: the
        reading is then not acknowledged, and the broker sends it again."""
        connection = delivery.connection
        if connection is not self._connection or connection.closed.is_set():
            return False
        info = connection.client.publish(topic, payload, qos=1, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        connection.pending_answers[info.mid] = (topic, delivery)
        return True

    async def _run(self) -> None:
        attempt = 0
        losses = 0
        while not self._stopping:
            connection = _Connection(self)
            self._connection = connection
            try:
                session_present = await connection.open()
            except (OSError, BrokerRefused, TimeoutError) as err:
                reason = f"{type(err).__name__}: {err}" if isinstance(err, TimeoutError) else str(err)
                connection.close(reason or "connection failed")
                self._connection = None
                self._went_down(f"cannot connect to {self.address.url}: {reason or type(err).__name__}")
                await asyncio.sleep(self._backoff.delay(attempt, self._rng))
                attempt += 1
                continue
            attempt = 0
            self.connects += 1
            self.last_error = None
            _LOG.info(
                "MQTT: connected to %s as %r, subscribed to %s (session %s)",
                self.address.url,
                self.client_id,
                self.subscription,
                "resumed" if session_present else "new",
            )
            if self._on_state is not None:
                self._on_state(True)
            connected_at = time.monotonic()
            while not connection.closed.is_set():
                connection.misc()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await connection.closed.wait()
            self._connection = None
            if not self._stopping:
                self._went_down(f"connection to {self.address.url} lost: {connection.close_reason}")
                # A connection that keeps failing soon after it opened (a store that cannot commit, a broker
                # that drops us) backs off like a failed connect; one that lived a while reconnects at once.
                losses = losses + 1 if time.monotonic() - connected_at < STABLE_CONNECTION_S else 0
                await asyncio.sleep(self._backoff.delay(losses, self._rng))

    def _went_down(self, reason: str) -> None:
        was_up = self.last_error is None
        if was_up:
            self.down_since = time.monotonic()
        # Logged when it changes, not at every attempt of a broker that stays away.
        if reason != self.last_error:
            _LOG.warning("MQTT: %s; retrying with backoff", reason)
        self.last_error = reason
        if was_up and self._on_state is not None:
            self._on_state(False)
