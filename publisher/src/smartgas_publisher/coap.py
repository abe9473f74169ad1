"""The fleet's CoAP uplink: a few client endpoints (aiocoap contexts) shared by all meters, one PUT each.

A meter PUTs each reading as a CON request with a JSON body (docs/wire-format.md) and waits for the
answer; ``CoapUplink.send`` does that for any meter and translates aiocoap's errors, here and nowhere
else, into an ``Attempt``.

Why a pool and not one endpoint per meter: 10,000 meters each with its own aiocoap context hold 10,000
UDP sockets and as many sets of timers and tasks, and take minutes to start. Why not one shared endpoint:
aiocoap keeps one confirmable exchange in flight per peer and context (NSTART = 1, RFC 7252 §4.7), so
all meters would queue behind one another, and one socket's 16-bit message ids would come round again
within the consumer's duplicate-detection lifetime at a few hundred requests a second (the consumer would
answer a new reading with an old one's cached response). So each request borrows an *idle* context
(least recently used first, so load spreads over all of them), holds it for its one exchange, and gives
it back; a context is made when none is idle, up to ``max_endpoints``, and a request that finds all of
them busy waits for the next one freed (that wait counts in the send delay). A context is retired after
``MESSAGE_IDS_PER_ENDPOINT`` requests, well under the 65,536 ids a socket has, so no socket ever reuses a
message id.

With ``--credentials``, every request of a meter is protected with the meter's own OSCORE context (RFC
8613, docs/security.md) through aiocoap's OSCORE transport. All pooled contexts share one
``MeterCredentials`` map, which finds a meter's context by the meter id in the request path in one dict
look-up (aiocoap's own map sorts and pattern-matches every entry per request, which 10,000 entries make
slow). A meter without a usable context logs why and sends plain; a consumer that refuses a context
answers a plain 4.01 (aiocoap raises it as ``NotAProtectedMessage``), which, like any other 4.01, keeps
the reading buffered and retried.
"""

import asyncio
import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

import aiocoap
from aiocoap import error as coap_error
from aiocoap import oscore
from aiocoap.credentials import CredentialsMap, CredentialsMissingError
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.numbers.contentformat import ContentFormat
from aiocoap.transports.udp6 import UDP6EndpointAddress

from smartgas_publisher.config import PublisherConfig
from smartgas_publisher.model import Reading
from smartgas_publisher.uplink import DIAGNOSTIC_MAX_CHARS, Attempt, Outcome, SendClock

#: Answers that refuse the reading itself; any other 4.xx says the endpoint is wrong, and is retried.
READING_REFUSED = frozenset({Code.BAD_REQUEST, Code.REQUEST_ENTITY_TOO_LARGE})
#: Requests one pooled context sends before it is retired: under the 65,536 message ids of its socket,
#: so no id is ever reused, whatever the rate.
MESSAGE_IDS_PER_ENDPOINT = 30_000

log = logging.getLogger(__name__)


def transport_tuning(ack_timeout_s: float, max_retransmit: int) -> Any:
    """aiocoap transport parameters for the meter's requests: confirmable, with the configured timing."""
    tuning = TransportTuning()
    tuning.ACK_TIMEOUT = ack_timeout_s
    tuning.MAX_RETRANSMIT = max_retransmit
    tuning.reliability = True  # CON: the consumer acknowledges, and aiocoap retransmits until it does
    return tuning


def response_deadline_s(tuning: Any) -> float:
    """How long one PUT may take before the meter gives up on it.

    aiocoap stops retransmitting after MAX_TRANSMIT_WAIT and reports an error, but once the consumer has
    acknowledged the request with an empty ACK, aiocoap waits for the separate response without a limit.
    This deadline bounds that wait; it lies beyond MAX_TRANSMIT_WAIT, so it never cuts an exchange short
    (a context whose exchange were still live would hold up the next request sent through it).
    """
    return float(tuning.MAX_TRANSMIT_WAIT + 2 * tuning.ACK_TIMEOUT)


def encode(reading: Reading) -> bytes:
    """The request body: the reading as compact JSON (Content-Format 50)."""
    return json.dumps(reading.to_dict(), separators=(",", ":")).encode("utf-8")


class MeterCredentials(CredentialsMap):  # type: ignore[misc]  # aiocoap is untyped
    """The meters' OSCORE contexts by meter id, found from a request's path (``meters/{id}/reading``)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_meter: dict[str, Any] = {}

    def credentials_from_request(self, msg: Any) -> Any:
        path = msg.opt.uri_path
        security = self.by_meter.get(path[1]) if len(path) == 3 and path[0] == "meters" else None
        if security is None:
            raise CredentialsMissingError(f"no OSCORE context for {'/'.join(path)}")
        return security


class KnownConsumer(UDP6EndpointAddress):  # type: ignore[misc]  # aiocoap is untyped
    """The consumer's address as one pooled context learnt it from an answer, reused for its later requests.

    aiocoap derives the printable host and the multicast test from the socket address anew each time it
    asks (parsing it with ``ipaddress``), several times per request; at a thousand requests a second that
    was a fifth of the publisher's time. They never change for one address, so they are computed once.
    """

    def __init__(self, learnt: Any) -> None:
        super().__init__(learnt.sockaddr, learnt.interface, pktinfo=learnt.pktinfo)
        self._hostinfo: str = learnt.hostinfo
        self._is_multicast: bool = learnt.is_multicast
        self._repr = repr(learnt)

    @property
    def hostinfo(self) -> str:
        return self._hostinfo

    @property
    def is_multicast(self) -> bool:
        return self._is_multicast

    def __repr__(self) -> str:
        return self._repr


class _Endpoint:
    """One pooled aiocoap client context (one UDP socket), how many requests it has sent, and the
    consumer's address as this context knows it, once learnt from an answer."""

    __slots__ = ("context", "remote", "requests")

    def __init__(self, context: Any) -> None:
        self.context = context
        self.requests = 0
        self.remote: Any = None


class CoapUplink:
    """Sends any meter's readings over a pool of shared aiocoap client contexts."""

    def __init__(self, config: PublisherConfig, meter_ids: list[str]) -> None:
        self._consumer = config.consumer
        self._meter_ids = meter_ids
        self._tuning = transport_tuning(config.ack_timeout_s, config.max_retransmit)
        self._deadline_s = response_deadline_s(self._tuning)
        self._max_endpoints = max(1, config.coap_endpoints)
        self._credentials_dir = Path(config.credentials_path) if config.credentials_path else None
        self._credentials = MeterCredentials()
        self._transports = ["oscore", "udp6"] if self._credentials_dir is not None else ["udp6"]
        self._idle: deque[_Endpoint] = deque()
        self._endpoints = 0  # made and not yet retired: idle, lent, or being made
        self._waiters: deque[asyncio.Future[_Endpoint | None]] = deque()
        self._retiring: set[asyncio.Future[Any]] = set()
        self._closing = False

    @property
    def endpoints(self) -> int:
        """Client contexts (UDP sockets) open now."""
        return self._endpoints

    @property
    def files_needed(self) -> int:
        """Open files this uplink may hold: its sockets, and each OSCORE context's lock file."""
        return self._max_endpoints + (len(self._meter_ids) if self._credentials_dir is not None else 0)

    async def open(self) -> None:
        """Load each meter's OSCORE context when ``--credentials`` is given; sockets are made when needed."""
        if self._credentials_dir is None:
            return
        for meter_id in self._meter_ids:
            directory = self._credentials_dir / meter_id
            if not (directory / "settings.json").is_file():
                log.warning("%s: no OSCORE context in %s: sending unprotected", meter_id, directory)
                continue
            try:
                self._credentials.by_meter[meter_id] = oscore.FilesystemSecurityContext(str(directory))
            except Exception as err:  # missing, damaged or held by another process: say which, send plain
                log.warning("%s: no usable OSCORE context in %s (%s): sending unprotected", meter_id, directory, err)

    async def close(self) -> None:
        """Shut every idle context down and release the OSCORE contexts (persisting their sequence numbers)."""
        self._closing = True
        while self._idle:
            self._give_back(self._idle.popleft())
        await asyncio.gather(*self._retiring)
        for security in self._credentials.by_meter.values():
            security._destroy()  # persists the sequence number and unlocks the context directory
        self._credentials.by_meter.clear()

    async def send(self, meter_id: str, reading: Reading, sent: SendClock) -> Attempt:
        """PUT one reading; ``sent`` is told the moment it leaves (after any wait for a free context)."""
        endpoint = await self._borrow()
        request = aiocoap.Message(
            code=aiocoap.PUT,
            payload=encode(reading),
            content_format=ContentFormat.JSON,
            transport_tuning=self._tuning,
        )
        if endpoint.remote is None:
            request.set_request_uri(f"{self._consumer}/meters/{meter_id}/reading")
        else:
            # aiocoap resolves a request's URI host anew for every request (getaddrinfo in a thread, a
            # third of the publisher's time at 1,000 requests/s); the address an answer came from is
            # reusable for later requests through the same context, as aiocoap documents.
            request.remote = endpoint.remote
            request.opt.uri_path = ("meters", meter_id, "reading")
        try:
            sent()
            return await self._exchange(endpoint, request)
        finally:
            self._give_back(endpoint)

    async def _exchange(self, endpoint: _Endpoint, request: Any) -> Attempt:
        try:
            async with asyncio.timeout(self._deadline_s):
                # Without aiocoap's block-wise layer: a reading is far below one block (1024 bytes).
                response = await endpoint.context.request(request, handle_blockwise=False).response
        except oscore.NotAProtectedMessage as err:
            # The consumer refused the meter's context (unknown, revoked, replay) with a plain 4.01.
            response = err.plain_message
        except coap_error.Error as err:
            cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
            return Attempt(Outcome.RETRY, f"{err}{cause}")
        except TimeoutError:
            return Attempt(Outcome.RETRY, f"no response within {self._deadline_s:g} s")
        if endpoint.remote is None and response.remote is not None:
            # Through OSCORE the answer's address wraps the meter's security context: keep the plain one.
            learnt = getattr(response.remote, "underlying_address", response.remote)
            if isinstance(learnt, UDP6EndpointAddress):
                endpoint.remote = KnownConsumer(learnt)
        code = response.code
        diagnostic = response.payload.decode("utf-8", errors="replace")[:DIAGNOSTIC_MAX_CHARS]
        detail = f"{code} {diagnostic}".rstrip()
        if code.is_successful():
            return Attempt(Outcome.ACKED, detail)
        if code in READING_REFUSED:
            return Attempt(Outcome.FAILED, detail)
        return Attempt(Outcome.RETRY, detail)

    async def _borrow(self) -> _Endpoint:
        """An idle context (the least recently used), a new one if none is idle, or the next one freed."""
        while True:
            if self._idle:
                endpoint = self._idle.popleft()
                break
            if self._endpoints < self._max_endpoints:
                self._endpoints += 1
                try:
                    context = await aiocoap.Context.create_client_context(transports=self._transports)
                except BaseException:
                    self._endpoints -= 1
                    self._hand_over(None)
                    raise
                context.client_credentials = self._credentials
                endpoint = _Endpoint(context)
                break
            # All lent out: wait for one given back (or for a retired one's slot: None).
            handed: asyncio.Future[_Endpoint | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(handed)
            try:
                given = await handed
            except asyncio.CancelledError:
                if handed.done() and not handed.cancelled():
                    self._hand_over(handed.result())  # handed over just as this request was cancelled
                raise
            if given is not None:
                endpoint = given
                break
        endpoint.requests += 1
        return endpoint

    def _give_back(self, endpoint: _Endpoint) -> None:
        """Return a context after its exchange; one that has sent its share of message ids is retired."""
        if self._closing or endpoint.requests >= MESSAGE_IDS_PER_ENDPOINT:
            self._endpoints -= 1
            retiring = asyncio.ensure_future(endpoint.context.shutdown())
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
            self._hand_over(None)
        else:
            self._hand_over(endpoint)

    def _hand_over(self, endpoint: _Endpoint | None) -> None:
        """Give ``endpoint`` (or, for None, a free slot) to the longest-waiting request, else keep it idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(endpoint)
                return
        if endpoint is not None:
            self._idle.append(endpoint)
