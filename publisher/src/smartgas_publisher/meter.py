"""One simulated meter: a bottle model, a buffer of unsent readings and its own CoAP client.

Two loops per meter. ``produce`` takes a reading every period (the first one after a seeded, per-meter
delay, so a fleet's requests spread over the period instead of bursting) and appends it to the buffer; a
meter simulating the offline fault stops taking readings after a few and stays up, silent.
``send`` PUTs buffered readings to the consumer oldest-first, one at a time, as CON requests with JSON
bodies (docs/wire-format.md). They are separate so a slow or dead consumer never delays a measurement.

What happens to a reading follows from the consumer's answer:

========================================  ============================================================
answer                                    the reading
========================================  ============================================================
2.xx (2.04 Changed)                       acknowledged, durable at the consumer: removed
4.00 Bad Request, 4.13 Entity Too Large  this reading will never be accepted: counted ``failed``,
                                          WARNING logged with the diagnostic, removed (not retried)
other 4.xx (4.04, 4.05, 4.15, 4.01, …)    the endpoint is wrong, not the reading (a misconfigured
                                          ``--consumer``): kept and retried as below, so a fix of the
                                          address loses nothing
5.xx, no answer, network error            kept at the head of the buffer, counted ``retried``, sent
                                          again one period later with the same ``seq`` (the consumer
                                          keeps one copy of a re-sent reading)
========================================  ============================================================

The buffer holds at most ``--buffer`` readings; when a new one would overflow it, the oldest unsent
reading is dropped, counted ``dropped`` and logged (never silently).

Each meter has its own aiocoap context, hence its own UDP socket: aiocoap numbers messages per pair of
endpoints, and one shared socket runs out of message ids at around 250 requests a second.

With ``--credentials``, a meter protects every request with its own OSCORE context (RFC 8613,
docs/security.md) through aiocoap's OSCORE transport; a consumer that refuses the context answers a plain
4.01 (aiocoap raises it as ``NotAProtectedMessage``), which is logged with its diagnostic and, like any
other 4.01, keeps the reading buffered and retried.
"""

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from random import Random
from typing import Any

import aiocoap
from aiocoap import error as coap_error
from aiocoap import oscore
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.numbers.contentformat import ContentFormat

from smartgas_publisher.config import PublisherConfig
from smartgas_publisher.model import BottleModel, Reading
from smartgas_publisher.stats import FleetStats

#: Answers that refuse the reading itself; any other 4.xx says the endpoint is wrong, and is retried.
READING_REFUSED = frozenset({Code.BAD_REQUEST, Code.REQUEST_ENTITY_TOO_LARGE})

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

#: How much of a diagnostic payload goes into a log line.
DIAGNOSTIC_MAX_CHARS = 200


def utc_now() -> datetime:
    """The meter's clock: the host's wall clock, in UTC."""
    return datetime.now(UTC)


class Outcome(Enum):
    """What one PUT attempt means for its reading."""

    ACKED = "acked"
    FAILED = "failed"
    RETRY = "retry"


@dataclass(frozen=True)
class Attempt:
    """The outcome of one PUT and a line of text for the log (response code and diagnostic, or error)."""

    outcome: Outcome
    detail: str


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
    (aiocoap keeps one exchange in flight per peer, and a live one would hold up the next request).
    """
    return float(tuning.MAX_TRANSMIT_WAIT + 2 * tuning.ACK_TIMEOUT)


def encode(reading: Reading) -> bytes:
    """The request body: the reading as compact JSON (Content-Format 50)."""
    return json.dumps(reading.to_dict(), separators=(",", ":")).encode("utf-8")


class Meter:
    """A meter's identity, bottle model, buffer and CoAP client, with a produce loop and a send loop."""

    def __init__(self, meter_id: str, config: PublisherConfig, stats: FleetStats, clock: Clock = utc_now) -> None:
        self.meter_id = meter_id
        self.model = BottleModel(meter_id, config.seed, config.bottle(meter_id), config.fault(meter_id))
        self._uri = config.reading_uri(meter_id)
        self._period_s = config.period_s
        self._count = config.count
        self._buffer_limit = config.buffer
        self._tuning = transport_tuning(config.ack_timeout_s, config.max_retransmit)
        self._deadline_s = response_deadline_s(self._tuning)
        # A stream of its own, so the schedule never shifts the readings' random sequence.
        self._first_delay_s = Random(f"{config.seed}:{meter_id}:schedule").uniform(0, config.period_s)
        self._stats = stats
        self._clock = clock
        self._context: Any = None
        self._credentials = Path(config.credentials_path) / meter_id if config.credentials_path else None
        self._security: Any = None  # the meter's OSCORE context, when it has one
        self._waiting: deque[Reading] = deque()
        self._in_flight: Reading | None = None
        self._failing = False
        self._wake_sender = asyncio.Event()
        self._stop_producing = asyncio.Event()
        self._production_done = asyncio.Event()
        self._drained = asyncio.Event()

    # ---- lifecycle

    async def open(self) -> None:
        """Create the meter's own client context (one UDP socket), protecting its requests with its OSCORE
        context when ``--credentials`` holds one; without one, its readings go out plain (and a consumer
        that requires OSCORE refuses them with 4.01, which keeps them buffered)."""
        if self._credentials is None:
            self._context = await aiocoap.Context.create_client_context(transports=["udp6"])
            return
        self._context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
        if not (self._credentials / "settings.json").is_file():
            log.warning("%s: no OSCORE context in %s: sending unprotected", self.meter_id, self._credentials)
            return
        try:
            self._security = oscore.FilesystemSecurityContext(str(self._credentials))
        except Exception as err:  # missing, damaged or held by another process: say which, send plain
            log.warning(
                "%s: no usable OSCORE context in %s (%s): sending unprotected", self.meter_id, self._credentials, err
            )
            return
        # The request URI's scheme, host and port, as aiocoap matches credentials against it.
        self._context.client_credentials[self._uri.split("/meters/", 1)[0] + "/*"] = self._security

    async def close(self) -> None:
        if self._context is not None:
            context, self._context = self._context, None
            await context.shutdown()
        if self._security is not None:
            security, self._security = self._security, None
            security._destroy()  # persists the sequence number and unlocks the context directory

    def stop_producing(self) -> None:
        """Take no more readings; the send loop carries on with what is buffered."""
        self._stop_producing.set()

    async def wait_drained(self) -> None:
        """Return once production has ended and every reading has been acknowledged, failed or dropped."""
        await self._drained.wait()

    @property
    def unsent(self) -> int:
        """Readings produced but not yet settled (waiting or in flight)."""
        return len(self._waiting) + (self._in_flight is not None)

    @property
    def first_delay_s(self) -> float:
        return self._first_delay_s

    # ---- production

    async def produce(self) -> None:
        """Take a reading every period until ``count`` readings (if set) or ``stop_producing``.

        A meter that falls silent (the offline fault) counts as done with ``count``; without it, it waits
        silently for ``stop_producing`` like the others.
        """
        loop = asyncio.get_running_loop()
        due = loop.time() + self._first_delay_s
        produced = 0
        silent_after = self.model.silent_after
        try:
            while self._count is None or produced < self._count:
                if silent_after is not None and produced >= silent_after:
                    log.info("%s: offline fault: silent after %d readings", self.meter_id, produced)
                    if self._count is None:
                        await self._stop_producing.wait()
                    break
                if await self._stopped_before(due):
                    break
                self._buffer(self.model.next_reading(self._clock()))
                produced += 1
                due += self._period_s
                late_s = loop.time() - due
                if late_s > 0:
                    # The loop was stalled: skip the missed slots instead of catching up in a burst.
                    due += (late_s // self._period_s + 1) * self._period_s
        finally:
            self._production_done.set()
            self._update_drained()

    async def _stopped_before(self, due: float) -> bool:
        """Wait until loop time ``due``; True if ``stop_producing`` came first."""
        delay_s = due - asyncio.get_running_loop().time()
        if self._stop_producing.is_set() or delay_s <= 0:
            return self._stop_producing.is_set()
        try:
            async with asyncio.timeout(delay_s):
                await self._stop_producing.wait()
        except TimeoutError:
            return False
        return True

    def _buffer(self, reading: Reading) -> None:
        self._stats.produced += 1
        self._stats.buffered += 1
        self._waiting.append(reading)
        self._evict_overflow()
        self._drained.clear()
        self._wake_sender.set()

    def _evict_overflow(self) -> None:
        while len(self._waiting) > self._buffer_limit:
            dropped = self._waiting.popleft()
            self._stats.dropped += 1
            self._stats.buffered -= 1
            log.warning(
                "%s: buffer full (%d unsent readings), dropped the oldest: seq=%d ts=%s",
                self.meter_id,
                self._buffer_limit,
                dropped.seq,
                dropped.ts,
            )

    # ---- delivery

    async def send(self) -> None:
        """Deliver buffered readings oldest-first, forever (the fleet cancels this task)."""
        while True:
            while not self._waiting:
                self._update_drained()
                self._wake_sender.clear()
                await self._wake_sender.wait()
            reading = self._waiting.popleft()
            self._in_flight = reading
            self._stats.sent += 1
            try:
                attempt = await self._put(reading)
            except asyncio.CancelledError:
                self._waiting.appendleft(reading)  # still unsent: reported as such
                raise
            finally:
                self._in_flight = None
            self._settle(reading, attempt)
            if attempt.outcome is Outcome.RETRY:
                await asyncio.sleep(self._period_s)

    async def _put(self, reading: Reading) -> Attempt:
        """PUT one reading. aiocoap's errors are translated here, and nowhere else, into an Attempt."""
        request = aiocoap.Message(
            code=aiocoap.PUT,
            uri=self._uri,
            payload=encode(reading),
            content_format=ContentFormat.JSON,
            transport_tuning=self._tuning,
        )
        try:
            async with asyncio.timeout(self._deadline_s):
                response = await self._context.request(request).response
        except oscore.NotAProtectedMessage as err:
            # The consumer refused the meter's context (unknown, revoked, replay) with a plain 4.01.
            response = err.plain_message
        except coap_error.Error as err:
            cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
            return Attempt(Outcome.RETRY, f"{err}{cause}")
        except TimeoutError:
            return Attempt(Outcome.RETRY, f"no response within {self._deadline_s:g} s")
        code = response.code
        diagnostic = response.payload.decode("utf-8", errors="replace")[:DIAGNOSTIC_MAX_CHARS]
        detail = f"{code} {diagnostic}".rstrip()
        if code.is_successful():
            return Attempt(Outcome.ACKED, detail)
        if code in READING_REFUSED:
            return Attempt(Outcome.FAILED, detail)
        return Attempt(Outcome.RETRY, detail)

    def _settle(self, reading: Reading, attempt: Attempt) -> None:
        stats = self._stats
        match attempt.outcome:
            case Outcome.ACKED:
                stats.acked += 1
                stats.buffered -= 1
                if self._failing:
                    self._failing = False
                    log.info("%s: consumer reachable again (seq=%d acknowledged)", self.meter_id, reading.seq)
            case Outcome.FAILED:
                stats.failed += 1
                stats.buffered -= 1
                log.warning(
                    "%s: consumer refused reading seq=%d, not retrying: %s",
                    self.meter_id,
                    reading.seq,
                    attempt.detail,
                )
            case Outcome.RETRY:
                stats.retried += 1
                self._waiting.appendleft(reading)
                self._evict_overflow()
                # One warning when delivery starts failing, not one per attempt: a fleet of thousands
                # facing a dead consumer would otherwise drown its own log.
                level = logging.DEBUG if self._failing else logging.WARNING
                self._failing = True
                log.log(
                    level,
                    "%s: could not deliver seq=%d (%s); keeping %d unsent, retrying every %g s",
                    self.meter_id,
                    reading.seq,
                    attempt.detail,
                    len(self._waiting),
                    self._period_s,
                )

    def _update_drained(self) -> None:
        if self._production_done.is_set() and not self._waiting and self._in_flight is None:
            self._drained.set()
        else:
            self._drained.clear()
