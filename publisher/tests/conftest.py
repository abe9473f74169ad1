"""Shared test peers and fixtures: the wire contract's files, a fake consumer on loopback, test settings.

``FakeConsumer`` is a real aiocoap server standing in for the consumer: it serves
``/meters/{meter_id}/reading`` as docs/wire-format.md says, records every PUT and answers 2.04 with the
consumer's JSON result, unless a test gives it a responder that answers otherwise (4.00, 5.03, never...).
It binds an ephemeral port on 127.0.0.1, never 5683.
"""

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
import jsonschema
import pytest
from aiocoap import resource
from aiocoap.numbers.codes import Code

from smartgas_publisher.config import PublisherConfig
from smartgas_publisher.model import amount_mol
from smartgas_publisher.stats import FleetStats

WIRE_FORMAT_DIR = Path(__file__).resolve().parents[2] / "docs" / "wire-format"
#: The repository's fleet file (50 meters), which the consumer reads too.
FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"

Answer = tuple[Code, bytes]
Responder = Callable[[str, dict[str, Any]], Awaitable[Answer | None]]


@dataclass
class Received:
    """One PUT as the fake consumer saw it, and the code it answered."""

    meter_id: str
    body: dict[str, Any]
    content_format: int | None
    code: Code | None = None
    #: The meter side's UDP port and the request's message id (the publisher's sockets are pooled).
    source_port: int = 0
    message_id: int = 0


@dataclass
class FakeConsumer:
    """A real aiocoap server on 127.0.0.1 recording readings; ``responder`` may override the answer."""

    responder: Responder | None = None
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _context: Any = None

    async def start(self, port: int = 0) -> "FakeConsumer":
        site = resource.Site()
        site.add_resource(["meters"], _ReadingResource(self))
        self._context = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", port), transports=["udp6"])
        interface = self._context.request_interfaces[0].token_interface.message_interface
        self.port = interface.transport.get_extra_info("socket").getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            await context.shutdown()

    @property
    def uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    def acknowledged(self) -> list[tuple[str, int]]:
        """(meter_id, seq) of every PUT answered with 2.04, in arrival order."""
        return [(r.meter_id, r.body["seq"]) for r in self.received if r.code == Code.CHANGED]

    def acknowledged_seqs(self, meter_id: str) -> list[int]:
        return [seq for mid, seq in self.acknowledged() if mid == meter_id]


class _ReadingResource(resource.Resource, resource.PathCapable):
    """Everything below /meters: only PUT .../{meter_id}/reading is served."""

    def __init__(self, consumer: FakeConsumer) -> None:
        super().__init__()
        self._consumer = consumer
        self._stored: set[tuple[str, int]] = set()

    async def render_put(self, request: aiocoap.Message) -> aiocoap.Message:
        path = request.opt.uri_path
        if len(path) != 2 or path[1] != "reading":
            return aiocoap.Message(code=Code.NOT_FOUND)
        meter_id = path[0]
        body = json.loads(request.payload)
        seen = Received(meter_id, body, request.opt.content_format, None, request.remote.sockaddr[1], request.mid)
        self._consumer.received.append(seen)
        answer = None
        if self._consumer.responder is not None:
            answer = await self._consumer.responder(meter_id, body)
        if answer is None:
            answer = (Code.CHANGED, self._result(meter_id, body))
        seen.code = answer[0]
        return aiocoap.Message(code=answer[0], payload=answer[1], content_format=50)

    def _result(self, meter_id: str, body: dict[str, Any]) -> bytes:
        key = (meter_id, body["seq"])
        stored = key not in self._stored
        self._stored.add(key)
        moles = amount_mol(body["pressure_bar"], body["temperature_c"], body["volume_l"])
        result = {"meter_id": meter_id, "seq": body["seq"], "moles": round(moles, 4), "stored": stored}
        return json.dumps(result).encode()


#: CoAP timing for a peer that answers: an ACK may be seconds late on a loaded machine (tests share two
#: cores with other suites) without the exchange failing; up to ~10 s of retransmissions before it does.
#: A tighter timing made readings fail with ConRetransmitsExceeded (0.05 s, one retransmission).
PATIENT_ACK_TIMEOUT_S = 1.0
PATIENT_MAX_RETRANSMIT = 2
#: CoAP timing for tests whose peer never answers, where waiting is all a test would do.
SILENT_PEER_TIMING: dict[str, Any] = {"ack_timeout_s": 0.05, "max_retransmit": 1}


def fast_config(consumer_uri: str, **overrides: Any) -> PublisherConfig:
    """A configuration for tests: short period, patient CoAP timeouts (so load never fails a send), bounded drain."""
    settings: dict[str, Any] = {
        "consumer": consumer_uri,
        "meters": 1,
        "period_s": 0.05,
        "count": 3,
        "status_interval_s": 60.0,
        "ack_timeout_s": PATIENT_ACK_TIMEOUT_S,
        "max_retransmit": PATIENT_MAX_RETRANSMIT,
        "drain_timeout_s": 20.0,
    }
    settings.update(overrides)
    return PublisherConfig(**settings)


def assert_every_reading_accounted_for(stats: FleetStats) -> None:
    """Each reading produced ends acknowledged, failed, dropped or still buffered: exactly one of them."""
    assert stats.produced == stats.acked + stats.failed + stats.dropped + stats.buffered, stats
    assert stats.sent >= stats.acked + stats.failed + stats.retried, stats


async def bounded(awaitable: Awaitable[Any], seconds: float = 20.0) -> Any:
    """Await with an upper bound, so a broken test fails instead of hanging the suite."""
    return await asyncio.wait_for(awaitable, seconds)


async def eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until ``condition()`` holds, checking every 20 ms, for at most ``seconds`` (TimeoutError)."""
    async with asyncio.timeout(seconds):
        # Polling: the counters and recordings watched here have no event to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@pytest.fixture
async def consumer() -> AsyncIterator[FakeConsumer]:
    fake = await FakeConsumer().start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
def free_udp_port() -> int:
    """A UDP port that was free a moment ago, for a peer that starts later in the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="session")
def reading_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((WIRE_FORMAT_DIR / "reading.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


@pytest.fixture(autouse=True)
def _no_publisher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the developer's shell must not leak into tests (or their subprocesses)."""
    for name in list(os.environ):
        if name.startswith("SMARTGAS_PUBLISHER_"):
            monkeypatch.delenv(name)
