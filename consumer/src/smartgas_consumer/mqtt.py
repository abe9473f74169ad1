"""The MQTT edge: readings published to ``smartgas/meters/{meter_id}/reading``, through the same intake as CoAP.

Each QoS 1 PUBLISH the broker delivers (``broker.py``) is one reading: the meter id from the topic, the
body exactly a CoAP PUT's, its format from the MQTT 5 Content Type (``application/json``, the default, or
``application/cbor``; anything else is refused 4.15). ``ReadingIntake.accept`` validates, computes and
commits it, as for CoAP, and the CoAP code the same reading would get decides the answer:

- 2.04: committed (or a duplicate of a committed one) → answered when the meter gave a Response Topic,
  then acknowledged (PUBACK);
- 4.xx: refused → answered, whether or not the meter gave a Response Topic, then acknowledged, so that a
  reading that can never pass does not come back forever;
- 5.03 (the store cannot commit now): neither answered nor acknowledged; the connection is dropped and
  made again after a pause, and the broker sends the reading again.

Answers are JSON (``{"code": "2.04", …the 2.04 body…}`` or ``{"code": "4.00", "diagnostic": "…"}``), QoS 1,
with the reading's Correlation Data, and always go to ``smartgas/meters/{meter_id}/answer`` of the topic's
meter: a Response Topic naming anything else is not followed (a meter must not make the consumer publish
on another meter's topic). A reading that is answered is acknowledged once the broker acknowledged its
answer, so the broker has the answer before it lets the reading go; if the broker refuses an answer
topic (an ACL without the consumer's write permission), that topic is not answered again, and its
readings are acknowledged unanswered rather than sent back forever.

``receive_maximum`` workers take deliveries from a queue, which holds at most that many: the link stops
reading from the broker while as many readings await their PUBACK (``broker.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiocoap.error import ConstructionRenderableError
from aiocoap.numbers.codes import Code

from smartgas_common.mqtt_contract import (
    CONTENT_TYPE_CBOR,
    CONTENT_TYPE_JSON,
    answer_topic,
    meter_id_of_reading_topic,
    reading_topic,
    shared_filter,
)
from smartgas_consumer.broker import BrokerCredentials, BrokerLink, Delivery, publish_properties
from smartgas_consumer.config import BrokerAddress
from smartgas_consumer.error import InvalidMeterId, StoreUnavailable, UnacknowledgedQoS, UnsupportedFormat
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.metrics import Metrics
from smartgas_consumer.reading import CONTENT_FORMAT_CBOR, CONTENT_FORMAT_JSON
from smartgas_consumer.resource import RefusalLog

_LOG = logging.getLogger(__name__)
TRANSPORT = "mqtt"
#: Answer topics the broker refused, remembered (oldest forgotten first) so that they are not tried again.
MAX_UNANSWERABLE_TOPICS = 1024
#: How long a stop waits for the readings being committed to be acknowledged.
DRAIN_TIMEOUT_S = 10.0
#: Content types read as JSON or CBOR (parameters such as ``; charset=utf-8`` are ignored).
CONTENT_FORMATS = {CONTENT_TYPE_JSON: CONTENT_FORMAT_JSON, CONTENT_TYPE_CBOR: CONTENT_FORMAT_CBOR}


class CredentialsFileError(Exception):
    """``--mqtt-credentials`` cannot be used; the message names the file and the fix."""


def load_credentials(path: Path) -> BrokerCredentials:
    """The consumer's broker user, from the JSON file ``provision-meters`` writes (``consumer.json``)."""
    fix = "give the file provision-meters writes (<device-credentials>/mosquitto/consumer.json)"
    try:
        document = json.loads(path.read_text())
    except OSError as err:
        raise CredentialsFileError(f"--mqtt-credentials {path}: {err.strerror or err}; {fix}") from err
    except ValueError as err:
        raise CredentialsFileError(f"--mqtt-credentials {path}: not JSON ({err}); {fix}") from err
    username = document.get("username") if isinstance(document, dict) else None
    password = document.get("password") if isinstance(document, dict) else None
    if not isinstance(username, str) or not username or not isinstance(password, str) or not password:
        raise CredentialsFileError(
            f'--mqtt-credentials {path}: must be {{"username": "...", "password": "..."}}, both non-empty'
            f" strings; {fix}"
        )
    return BrokerCredentials(username, password)


def content_format(content_type: str | None) -> int:
    """The CoAP Content-Format of an MQTT 5 Content Type (none: JSON); 4.15 for any other."""
    if content_type is None:
        return CONTENT_FORMAT_JSON
    media_type = content_type.split(";", 1)[0].strip().lower()
    found = CONTENT_FORMATS.get(media_type)
    if found is None:
        raise UnsupportedFormat(
            f"content type {content_type[:80]!r} is not supported; send {CONTENT_TYPE_JSON} or {CONTENT_TYPE_CBOR}"
        )
    return found


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """What the MQTT ingest is told at start-up (from ``ConsumerConfig``)."""

    address: BrokerAddress
    client_id: str
    shared_group: str | None
    credentials: BrokerCredentials | None
    receive_maximum: int


class MqttIngest:
    """Takes readings from the broker into the intake, answers and acknowledges them; one per consumer."""

    def __init__(self, intake: ReadingIntake, settings: MqttSettings, metrics: Metrics | None = None) -> None:
        self._intake = intake
        self._metrics = metrics if metrics is not None else intake.metrics
        # The broker authenticated every meter and its ACL let each publish on its own topic only: a
        # consumer that logs in with the provisioned credentials talks to such a broker (docs/security.md).
        self.authenticated = settings.credentials is not None
        self.link = BrokerLink(
            settings.address,
            client_id=settings.client_id,
            subscription=shared_filter(settings.shared_group),
            credentials=settings.credentials,
            receive_maximum=settings.receive_maximum,
            on_delivery=self._delivered,
            on_state=self._metrics.mqtt_state,
            on_publish_refused=self._answer_refused,
        )
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._refusals = RefusalLog()
        self._unanswerable: OrderedDict[str, None] = OrderedDict()
        self.received = 0
        self.accepted = 0
        self.refused = 0
        self.held_back = 0  # 5.03: neither answered nor acknowledged, sent again by the broker

    def describe(self) -> str:
        return (
            f"{self.link.describe()}, received={self.received} accepted={self.accepted} refused={self.refused}"
            f" held_back={self.held_back}"
        )

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"mqtt-ingest-{n}") for n in range(self.link.receive_maximum)
        ]
        self.link.start()

    async def stop(self) -> None:
        """Let the readings being committed be acknowledged (bounded), then DISCONNECT: the rest stays with
        the broker, for the next start."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                await self._queue.join()
                await self.link.answers_settled()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await self.link.stop()

    def _delivered(self, delivery: Delivery) -> None:
        self._queue.put_nowait(delivery)

    async def _work(self) -> None:
        while True:
            delivery = await self._queue.get()
            acknowledge = False
            try:
                acknowledge = await self.handle(delivery)
            except Exception:  # a bug must cost one reading (sent again by the broker), not the worker
                _LOG.exception("MQTT: reading on %r not handled", delivery.topic[:120])
                self.link.recycle("a reading failed unexpectedly")
            finally:
                self.link.settle(delivery, acknowledge=acknowledge)
                self._queue.task_done()

    async def handle(self, delivery: Delivery) -> bool:
        """One reading: intake, then answer; return whether to acknowledge it now. Not for 5.03 (the broker
        sends it again), nor when it is answered: then it is acknowledged once the answer is in the broker."""
        self.received += 1
        meter_id = meter_id_of_reading_topic(delivery.topic)
        answer: dict[str, Any] | None
        try:
            if meter_id is None:  # the subscription's filter makes this impossible; refused all the same
                err = InvalidMeterId(f"topic {delivery.topic[:120]!r} is not smartgas/meters/METER_ID/reading")
                self._intake.refused_early("", err, TRANSPORT)
                raise err
            try:
                if delivery.qos == 0:
                    # Taken, it could be lost unseen (no PUBACK after commit); refused, the meter hears why.
                    raise UnacknowledgedQoS(
                        f"readings are published at QoS 1 on {reading_topic(meter_id)}; this one came at QoS 0,"
                        " which nothing could acknowledge after its commit"
                    )
                coap_format = content_format(delivery.content_type)
            except ConstructionRenderableError as err:
                self._intake.refused_early(meter_id, err, TRANSPORT)
                raise
            accepted = await self._intake.accept(
                meter_id, delivery.payload, coap_format, authenticated=self.authenticated, transport=TRANSPORT
            )
        except StoreUnavailable as err:
            self.held_back += 1
            _LOG.warning("MQTT: reading of %r held back (the broker sends it again): %s", meter_id, err.message)
            self.link.recycle("the store cannot commit now")
            return False
        except ConstructionRenderableError as err:
            self.refused += 1
            self._refusals.refused(f"mqtt meter {(meter_id or '?')[:64]}", meter_id or "", err)
            answer = {"code": err.code.dotted, "diagnostic": err.message}
        else:
            self.accepted += 1
            answer = {"code": Code.CHANGED.dotted, **accepted.as_dict()} if delivery.response_topic else None
        if answer is not None and meter_id is not None and self._answer(delivery, meter_id, answer):
            return False  # acknowledged when the broker has the answer
        return True

    def _answer(self, delivery: Delivery, meter_id: str, answer: dict[str, Any]) -> bool:
        """Publish the answer, the reading to be acknowledged after it; False if it is not sent (a topic
        the broker refused before: the reading is acknowledged unanswered)."""
        topic = answer_topic(meter_id)
        if topic in self._unanswerable:
            return False
        if delivery.response_topic is not None and delivery.response_topic != topic:
            _LOG.debug("MQTT: response topic %r of %r not followed", delivery.response_topic[:120], meter_id)
        properties = publish_properties()
        properties.ContentType = CONTENT_TYPE_JSON
        if delivery.correlation_data is not None:
            properties.CorrelationData = delivery.correlation_data
        # If the connection is gone, nothing is sent, and acknowledging then does nothing either.
        self.link.answer_then_acknowledge(delivery, topic, json.dumps(answer).encode(), properties)
        return True

    def _answer_refused(self, topic: str, reason: str) -> None:
        """The broker refused an answer (its ACL does not let the consumer write there; Mosquitto then also
        drops the connection): that topic is not answered again, or its reading would come back forever."""
        if topic not in self._unanswerable:
            _LOG.warning(
                "MQTT: the broker refused the answer on %s (%s): that topic is not answered again", topic, reason
            )
        self._unanswerable[topic] = None
        while len(self._unanswerable) > MAX_UNANSWERABLE_TOPICS:
            self._unanswerable.popitem(last=False)
