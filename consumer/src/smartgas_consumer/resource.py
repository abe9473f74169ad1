"""The CoAP edge: the resources under ``/meters``, ``/health``, and their translation to and from the intake.

``/meters/{meter_id}/reading`` takes PUT (a new reading). GET (the latest stored one, without client or
site) only when ``--coap-reading-get`` turns it on: the CoAP side has no caller identity, so anything it
answers, it answers to anyone on the network (docs/security.md). There is no list of meters. ``/health``
answers 2.05 when the store can commit, 5.03 saying why when it cannot. Errors are raised as the domain
errors of ``error.py``, whose CoAP code and diagnostic text aiocoap sends as the response.

Block-wise uploads (RFC 7959 Block1) are reassembled by aiocoap; the body limit is enforced on the first
block that passes it, through aiocoap's ``needs_blockwise_assembly`` hook (called for every block before
it is spooled): a Size1 option announcing more than the limit, or a block ending beyond it, is answered
4.13 at once, so no peer makes the consumer hold more than the limit per upload.

Per reading, the edge skips two things aiocoap's generic classes do for every request and a reading never
needs: ``ReadingSite`` hands ``/meters/{id}/reading`` to its resource without the deep copy of the request
that ``Site`` makes to strip the path (it strips it in place, as ``Site`` itself does for Uri-Path-Abbrev),
and ``MeterReading.render_to_pipe`` answers a request without Block1/Block2 options directly, without the
Block2 cache's key (another copy of the options): the answer to a reading is far below one block. Both are
overrides of aiocoap's documented ``render_to_pipe`` interface; the full path (block-wise transfers,
other resources) is aiocoap's own. Measured in docs/benchmarks.md. A reading's plain PUT does not even get
here: ``ReadingSite.fast_path`` (``fastpath.py``) answers it from the message layer with ``MeterReading.put``.

Refusals are logged per peer at INFO, at most one line per ``RefusalLog.interval_s`` per peer (with a
count of the lines left out), so a flood of bad datagrams cannot flood the log.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2
from aiocoap import Message, error
from aiocoap.blockwise import Block1Spool, IncompleteException
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.pipe import Pipe
from aiocoap.resource import PathCapable, Resource, Site
from aiocoap.util.linkformat import LinkFormat

from smartgas_consumer.device_auth import MeterContext
from smartgas_consumer.error import MeterNotFound, NotAuthenticated, PayloadTooLarge, StoreUnavailable, WrongMeter
from smartgas_consumer.fastpath import ReadingFastPath, is_reading_path
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.reading import CONTENT_FORMAT_CBOR, CONTENT_FORMAT_JSON, MAX_PAYLOAD_BYTES, check_meter_id

READING_RESOURCE_TYPE = "smartgas.reading"
#: The critical options a request here may carry: the URI's parts, Accept (a GET's format), block-wise
#: transfer and Uri-Path-Abbrev (aiocoap's), proxying (aiocoap answers 5.05). Any other critical option,
#: If-Match and If-None-Match included (no resource here takes conditional requests), is answered 4.02;
#: so is OSCORE on a consumer without device authentication (RFC 8613 §8.2), whose wrapper would
#: otherwise have removed it.
RECOGNISED_CRITICAL_OPTIONS = frozenset(
    int(number)
    for number in (
        OptionNumber.URI_HOST,
        OptionNumber.URI_PORT,
        OptionNumber.URI_PATH,
        OptionNumber.URI_QUERY,
        OptionNumber.URI_PATH_ABBREV,
        OptionNumber.ACCEPT,
        OptionNumber.BLOCK1,
        OptionNumber.BLOCK2,
        OptionNumber.PROXY_URI,
        OptionNumber.PROXY_SCHEME,
    )
)
#: What a GET of a reading leaves out even when it is on: whose bottle it is and where.
PRIVATE_FIELDS = ("client_id", "site_id")

_LOG = logging.getLogger(__name__)


class RefusalLog:
    """Logs refused requests: at most one line per peer host per ``interval_s``, and at most ``max_lines``
    lines in all per interval (source ports and, over UDP, source addresses cost an attacker nothing).
    Remembers at most ``max_peers`` hosts."""

    def __init__(
        self,
        interval_s: float = 10.0,
        max_lines: int = 20,
        max_peers: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.max_lines = max_lines
        self.max_peers = max_peers
        self._clock = clock
        # host → (when its last line was logged, refusals left out since)
        self._peers: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._window_started = float("-inf")
        self._window_lines = 0

    def refused(self, peer: str, meter_id: str, err: error.ConstructionRenderableError) -> bool:
        """Log one refusal unless this host had a line within the interval; return whether it was logged."""
        now = self._clock()
        last, left_out = self._peers.get(peer, (float("-inf"), 0))
        if now - self._window_started >= self.interval_s:
            self._window_started, self._window_lines = now, 0
        if now - last < self.interval_s or self._window_lines >= self.max_lines:
            self._peers[peer] = (last, left_out + 1)
            self._peers.move_to_end(peer)
            self._forget_oldest()
            return False
        self._peers[peer] = (now, 0)
        self._peers.move_to_end(peer)
        self._forget_oldest()
        self._window_lines += 1
        _LOG.info(
            "refused %s from %s for meter %r: %s%s",
            err.code,
            peer,
            meter_id[:80],
            err.message[:200],
            f" ({left_out} more refusal(s) from this peer not logged)" if left_out else "",
        )
        return True

    @property
    def hosts_remembered(self) -> int:
        return len(self._peers)

    def _forget_oldest(self) -> None:
        while len(self._peers) > self.max_peers:
            self._peers.popitem(last=False)


class _GuardedBlock1Spool(Block1Spool):
    """aiocoap's Block1 spool, with a block that leaves a gap answered 4.08 (aiocoap raises a bare
    ValueError there, which would be a 5.00 and a traceback at ERROR)."""

    def feed_and_take(self, req: Message) -> Message:
        try:
            return super().feed_and_take(req)
        except ValueError:
            raise IncompleteException() from None


def encode(document: dict[str, Any], content_format: int) -> Message:
    """A 2.xx body in the asked format: CBOR when the peer spoke CBOR, JSON otherwise."""
    if content_format == CONTENT_FORMAT_CBOR:
        return Message(payload=cbor2.dumps(document), content_format=CONTENT_FORMAT_CBOR)
    return Message(payload=json.dumps(document).encode(), content_format=CONTENT_FORMAT_JSON)


class MeterReading(Resource, PathCapable):
    """``/meters/{meter_id}/reading``: PUT stores a reading; GET returns the latest one if ``reading_get``."""

    def __init__(
        self,
        intake: ReadingIntake,
        refusals: RefusalLog | None = None,
        *,
        reading_get: bool = False,
        require_oscore: bool = False,
    ) -> None:
        super().__init__()
        self._intake = intake
        self._reading_get = reading_get
        self._require_oscore = require_oscore
        self._refusals = refusals if refusals is not None else RefusalLog()
        # aiocoap's Resource keeps its Block1 spool here (interfaces.Resource.__init__).
        self._block1 = _GuardedBlock1Spool()

    async def needs_blockwise_assembly(self, request: Message) -> bool:
        """aiocoap asks this for every block before spooling it: refuse an upload once it passes the limit."""
        block1 = request.opt.block1
        if block1 is None:  # any method: aiocoap would spool a POST's blocks as readily as a PUT's
            return True
        announced = request.opt.size1
        received = block1.start + len(request.payload)
        refusal = None
        if announced is not None and announced > MAX_PAYLOAD_BYTES:
            refusal = f"body announced as {announced} bytes (Size1); the limit is {MAX_PAYLOAD_BYTES}"
        elif received > MAX_PAYLOAD_BYTES:
            refusal = (
                f"body passes {MAX_PAYLOAD_BYTES} bytes at block {block1.block_number};"
                f" the limit is {MAX_PAYLOAD_BYTES}"
            )
        if refusal is not None:
            err = PayloadTooLarge(refusal, MAX_PAYLOAD_BYTES)
            self.refused_early(request, request.opt.uri_path[0] if request.opt.uri_path else "", err)
            raise err
        return True

    async def render_to_pipe(self, pipe: Pipe) -> None:
        request = pipe.request
        if request.opt.block1 is not None or request.opt.block2 is not None:
            await super().render_to_pipe(pipe)  # aiocoap's block-wise machinery (needs_blockwise_assembly)
            return
        response = await self.render(request)
        if len(response.payload) > request.remote.maximum_payload_size:  # never for a reading's answer

            async def rendered() -> Message:
                return response

            response = await self._block2.extract_or_insert(request, rendered)
        pipe.add_response(response, is_last=True)

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
            return await self.put(path[0], request, started)
        if request.code != Code.GET:
            raise error.UnallowedMethod()
        if self._require_oscore:
            # A meter reads its own latest reading over OSCORE; nobody else reads readings over CoAP.
            self._authenticated(path[0], request)
            return await self._get(check_meter_id(path[0]), request)
        if not self._reading_get:
            # The same answer for every meter, known or not: the refusal tells nothing about the fleet.
            raise error.UnallowedMethod("GET of readings is off on this consumer (--coap-reading-get)")
        return await self._get(check_meter_id(path[0]), request)

    def _authenticated(self, meter_id: str, request: Message) -> bool:
        """Whether ``meter_id``'s own OSCORE context protected the request; 4.01 or 4.03 if it must be and
        was not. aiocoap's OscoreSiteWrapper verified and decrypted it, and names the context in ``remote``."""
        context = getattr(request.remote, "security_context", None)
        if not isinstance(context, MeterContext):
            if self._require_oscore:
                raise NotAuthenticated(
                    "this consumer takes only OSCORE-protected requests (RFC 8613): provision the meter "
                    "(smartgas-consumer provision-meter) and protect the request with its context"
                )
            return False
        if context.revoked:
            raise NotAuthenticated("this meter's OSCORE context was revoked or rotated: provision it again")
        if context.meter_id != meter_id:
            raise WrongMeter(f"this OSCORE context belongs to another meter, not to {meter_id[:80]!r}")
        return True

    def refused_early(self, request: Message, meter_id: str, err: error.ConstructionRenderableError) -> None:
        """Count and log a reading's PUT refused before the intake took it."""
        self._intake.refused_early(meter_id, err)
        self._refusals.refused(_peer(request), meter_id, err)

    async def put(self, meter_id: str, request: Message, started: float) -> Message:
        """A PUT of ``meter_id``'s reading (from ``render``, or from the fast path): the 2.04, or a refusal
        raised; ``started`` (``time.perf_counter``) is when it arrived, for the ack-latency metric."""
        content_format = request.opt.content_format
        try:
            authenticated = self._authenticated(meter_id, request)
        except error.ConstructionRenderableError as err:
            self.refused_early(request, meter_id, err)
            raise
        try:
            accepted = await self._intake.accept(
                meter_id,
                request.payload,
                None if content_format is None else int(content_format),
                authenticated=authenticated,
            )
        except error.ConstructionRenderableError as err:
            if err.code.class_ == 4:  # the peer's fault; 5.03 is ours and logged where it happens
                self._refusals.refused(_peer(request), meter_id, err)
            raise
        response = encode(accepted.as_dict(), int(content_format or CONTENT_FORMAT_JSON))
        response.code = Code.CHANGED
        self._intake.metrics.ack_latency(time.perf_counter() - started)
        return response

    async def _get(self, meter_id: str, request: Message) -> Message:
        latest = await self._intake.latest(meter_id)
        if latest is None:
            raise MeterNotFound(f"no reading stored for meter {meter_id}")
        accept = request.opt.accept
        document = {name: value for name, value in latest.as_dict().items() if name not in PRIVATE_FIELDS}
        response = encode(document, int(accept) if accept is not None else CONTENT_FORMAT_JSON)
        response.code = Code.CONTENT
        return response


def _peer(request: Message) -> str:
    """The peer's host, without its port (a new source port must not buy a new log line)."""
    try:
        host, _, port = str(request.remote.hostinfo).rpartition(":")
        return host if port.isdigit() else str(request.remote.hostinfo)
    except Exception:  # a remote without host information (never for UDP): log it as unknown
        return "unknown peer"


class ReadingSite(Site):
    """aiocoap's ``Site``, with ``/meters/{id}/reading`` dispatched without copying the request, and the
    ``fast_path`` its context's message layer hands readings' PUTs to (``fastpath.py``), unless turned off."""

    def __init__(self, meters: MeterReading, *, fast_path: bool = True) -> None:
        super().__init__()
        self._meters = meters
        self.add_resource(["meters"], meters)
        self.fast_path = ReadingFastPath(meters.put) if fast_path else None

    async def render_to_pipe(self, pipe: Pipe) -> None:
        options = pipe.request.opt
        path = options.uri_path
        self._refuse_unrecognised_critical_options(pipe.request)
        if len(path) == 3 and path[0] == "meters" and options.uri_path_abbrev is None:
            options.uri_path = path[1:]  # what Site's stripped copy would hold: (meter_id, "reading")
            await self._meters.render_to_pipe(pipe)
            return
        await super().render_to_pipe(pipe)

    def _refuse_unrecognised_critical_options(self, request: Message) -> None:
        """4.02 Bad Option for a request carrying a critical option nobody here acts on (RFC 7252 §5.4.1).

        aiocoap 0.4.17 leaves this to each resource (its issue #268) and, over UDP, processes such a
        request as if the option were absent: a PUT with If-Match, or protected with OSCORE on a consumer
        without device authentication, would be stored and answered 2.04."""
        numbers = {int(option.number) for option in request.opt.option_list()}
        # Odd option numbers are critical (RFC 7252 §5.4.6).
        unrecognised = sorted(number for number in numbers - RECOGNISED_CRITICAL_OPTIONS if number & 1)
        if not unrecognised:
            return
        err = error.BadOption(
            f"critical option(s) {', '.join(map(str, unrecognised))} not supported here"
            " (RFC 7252 §5.4.1: a request carrying one is refused, not processed without it)"
        )
        path = request.opt.uri_path
        if request.code == Code.PUT and is_reading_path(path):
            self._meters.refused_early(request, path[1], err)  # counted as a refused reading, logged per peer
        raise err


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
