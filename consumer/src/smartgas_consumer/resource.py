"""The CoAP edge: the resources under ``/meters`` and their translation to and from the intake.

``/meters/{meter_id}/reading`` takes PUT (a new reading) and GET (the latest stored one); ``/meters``
lists the known meters in link format. Errors are raised as the domain errors of ``error.py``, whose
CoAP code and diagnostic text aiocoap sends as the response.
"""

from __future__ import annotations

import json
import time
from typing import Any

import cbor2
from aiocoap import Message, error
from aiocoap.numbers.codes import Code
from aiocoap.resource import PathCapable, Resource
from aiocoap.util.linkformat import Link, LinkFormat

from smartgas_consumer.error import MeterNotFound
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.reading import CONTENT_FORMAT_CBOR, CONTENT_FORMAT_JSON, check_meter_id

READING_RESOURCE_TYPE = "smartgas.reading"


def encode(document: dict[str, Any], content_format: int) -> Message:
    """A 2.xx body in the asked format: CBOR when the peer spoke CBOR, JSON otherwise."""
    if content_format == CONTENT_FORMAT_CBOR:
        return Message(payload=cbor2.dumps(document), content_format=CONTENT_FORMAT_CBOR)
    return Message(payload=json.dumps(document).encode(), content_format=CONTENT_FORMAT_JSON)


class MeterReading(Resource, PathCapable):
    """``/meters/{meter_id}/reading``: PUT stores a reading, GET returns the latest one."""

    def __init__(self, intake: ReadingIntake) -> None:
        super().__init__()
        self._intake = intake

    def get_resources_as_linkheader(self) -> LinkFormat:
        # The per-meter resources are listed by GET /meters; .well-known/core names the collection.
        return LinkFormat([])

    async def render(self, request: Message) -> Message:
        started = time.perf_counter()
        path = request.opt.uri_path
        if len(path) != 2 or path[1] != "reading":
            raise error.NotFound()
        if request.code == Code.PUT:
            # The intake checks the meter id itself, so a bad one is counted as a rejected reading.
            return await self._put(path[0], request, started)
        meter_id = check_meter_id(path[0])
        if request.code == Code.GET:
            return await self._get(meter_id, request)
        raise error.UnallowedMethod()

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
        response = encode(latest.as_dict(), int(accept) if accept is not None else CONTENT_FORMAT_JSON)
        response.code = Code.CONTENT
        return response


class MeterList(Resource):
    """``/meters``: link format with one ``</meters/{id}/reading>`` per meter the registry knows."""

    ct = "40"
    rt = "smartgas.meters"

    def __init__(self, intake: ReadingIntake) -> None:
        super().__init__()
        self._intake = intake

    async def render_get(self, request: Message) -> Message:
        meter_ids = await self._intake.store.meter_ids()
        links = LinkFormat([Link(f"/meters/{m}/reading", rt=READING_RESOURCE_TYPE) for m in meter_ids])
        return Message(code=Code.CONTENT, payload=str(links).encode(), content_format=40)
