"""The CoAP edge: the resources under ``/meters``, ``/health``, and their translation to and from the intake.

``/meters/{meter_id}/reading`` takes PUT (a new reading). GET (the latest stored one, without client or
site) only when ``--coap-reading-get`` turns it on: the CoAP side has no caller identity, so anything it
answers, it answers to anyone on the network (docs/security.md). There is no list of meters. ``/health``
answers 2.05 when the store can commit, 5.03 saying why when it cannot. Errors are raised as the domain
errors of ``error.py``, whose CoAP code and diagnostic text aiocoap sends as the response.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2
from aiocoap import Message, error
from aiocoap.numbers.codes import Code
from aiocoap.resource import PathCapable, Resource
from aiocoap.util.linkformat import LinkFormat

from smartgas_consumer.error import MeterNotFound, StoreUnavailable
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.reading import CONTENT_FORMAT_CBOR, CONTENT_FORMAT_JSON, check_meter_id

READING_RESOURCE_TYPE = "smartgas.reading"
#: What a GET of a reading leaves out even when it is on: whose bottle it is and where.
PRIVATE_FIELDS = ("client_id", "site_id")


def encode(document: dict[str, Any], content_format: int) -> Message:
    """A 2.xx body in the asked format: CBOR when the peer spoke CBOR, JSON otherwise."""
    if content_format == CONTENT_FORMAT_CBOR:
        return Message(payload=cbor2.dumps(document), content_format=CONTENT_FORMAT_CBOR)
    return Message(payload=json.dumps(document).encode(), content_format=CONTENT_FORMAT_JSON)


class MeterReading(Resource, PathCapable):
    """``/meters/{meter_id}/reading``: PUT stores a reading; GET returns the latest one if ``reading_get``."""

    def __init__(self, intake: ReadingIntake, *, reading_get: bool = False) -> None:
        super().__init__()
        self._intake = intake
        self._reading_get = reading_get

    def get_resources_as_linkheader(self) -> LinkFormat:
        # No per-meter resource is listed anywhere: the list of meters is not for anyone on the network.
        return LinkFormat([])

    async def render(self, request: Message) -> Message:
        started = time.perf_counter()
        path = request.opt.uri_path
        if len(path) != 2 or path[1] != "reading":
            raise error.NotFound()
        if request.code == Code.PUT:
            # The intake checks the meter id itself, so a bad one is counted as a rejected reading.
            return await self._put(path[0], request, started)
        if request.code != Code.GET:
            raise error.UnallowedMethod()
        if not self._reading_get:
            # The same answer for every meter, known or not: the refusal tells nothing about the fleet.
            raise error.UnallowedMethod("GET of readings is off on this consumer (--coap-reading-get)")
        return await self._get(check_meter_id(path[0]), request)

    async def _put(self, meter_id: str, request: Message, started: float) -> Message:
        content_format = request.opt.content_format
        accepted = await self._intake.accept(
            meter_id, request.payload, None if content_format is None else int(content_format)
        )
        response = encode(accepted.as_dict(), int(content_format or CONTENT_FORMAT_JSON))
        response.code = Code.CHANGED
        self._intake.metrics.ack_latency(time.perf_counter() - started)
        return response

    async def _get(self, meter_id: str, request: Message) -> Message:
        latest = await self._intake.store.latest(meter_id)
        if latest is None:
            raise MeterNotFound(f"no reading stored for meter {meter_id}")
        accept = request.opt.accept
        document = {name: value for name, value in latest.as_dict().items() if name not in PRIVATE_FIELDS}
        response = encode(document, int(accept) if accept is not None else CONTENT_FORMAT_JSON)
        response.code = Code.CONTENT
        return response


class Health(Resource):
    """``/health``: 2.05 ``ok`` when the store commits now, 5.03 with the reason when it cannot."""

    rt = "smartgas.health"

    def __init__(self, store_fault: Callable[[], Awaitable[str | None]]) -> None:
        super().__init__()
        self._store_fault = store_fault

    async def render_get(self, request: Message) -> Message:
        fault = await self._store_fault()
        if fault is not None:
            raise StoreUnavailable(f"store {fault}")
        return Message(code=Code.CONTENT, payload=b"ok", content_format=0)
