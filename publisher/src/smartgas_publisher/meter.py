"""One simulated meter: a bottle model, a buffer of unsent readings, and the fleet's uplink to send them.

Production and delivery are separate. The fleet's one scheduler calls ``take_reading`` when a reading
is due, every period (the first one after a seeded, per-meter delay, so a fleet's requests spread over
the period instead of bursting), and it appends the reading to the buffer; a meter simulating the offline
fault stops taking readings after a few and stays up, silent. The meter's own task, ``send``, delivers
buffered readings oldest-first, one at a time, through the fleet's uplink (CoAP PUTs, ``coap.py``, or
MQTT publishes, ``mqtt.py``; docs/wire-format.md). They are separate so a slow or dead consumer never
delays a measurement. Each reading keeps the loop time it was due, and its first send
records how late it left (``FleetStats.send_delays``).

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

How a transport's answers map onto these outcomes is the transport's (``coap.py``, ``mqtt.py``); the
policy above is the meter's.
"""

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from random import Random

from smartgas_publisher.config import PublisherConfig
from smartgas_publisher.model import BottleModel, Reading
from smartgas_publisher.stats import FleetStats
from smartgas_publisher.uplink import Attempt, Outcome, Uplink

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The meter's clock: the host's wall clock, in UTC."""
    return datetime.now(UTC)


@dataclass
class Pending:
    """A buffered reading, the loop time it was due, and whether it was ever sent."""

    reading: Reading
    due: float
    sent_before: bool = False


class Meter:
    """A meter's identity, bottle model and buffer; readings taken when the scheduler says, and a send loop."""

    def __init__(
        self, meter_id: str, config: PublisherConfig, stats: FleetStats, uplink: Uplink, clock: Clock = utc_now
    ) -> None:
        self.meter_id = meter_id
        self.model = BottleModel(meter_id, config.seed, config.bottle(meter_id), config.fault(meter_id))
        self._period_s = config.period_s
        self._count = config.count
        self._buffer_limit = config.buffer
        # A stream of its own, so the schedule never shifts the readings' random sequence.
        self._first_delay_s = Random(f"{config.seed}:{meter_id}:schedule").uniform(0, config.period_s)
        self._stats = stats
        self._clock = clock
        self._uplink = uplink
        self._waiting: deque[Pending] = deque()
        self._in_flight: Pending | None = None
        self._failing = False
        self._wake_sender = asyncio.Event()
        self._produced = 0
        self._production_done = False
        self._drained = asyncio.Event()

    # ---- lifecycle

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

    def take_reading(self, due: float, now: float) -> float | None:
        """Take the reading due at loop time ``due`` (it is ``now``); return when the next one is due, or
        None when this meter takes no more (``count`` reached, or silent with the offline fault).

        A meter that falls silent counts as done with ``count``; without it, it stays silent until the
        fleet ends production for all (``end_production``).
        """
        if not self._silent():
            self._buffer(Pending(self.model.next_reading(self._clock()), due))
            self._produced += 1
        if self._silent():
            log.info("%s: offline fault: silent after %d readings", self.meter_id, self._produced)
            if self._count is not None:
                self.end_production()
            return None
        if self._count is not None and self._produced >= self._count:
            self.end_production()
            return None
        next_due = due + self._period_s
        if now > next_due:
            # The loop was stalled: skip the missed slots instead of catching up in a burst.
            next_due += ((now - next_due) // self._period_s + 1) * self._period_s
        return next_due

    def _silent(self) -> bool:
        silent_after = self.model.silent_after
        return silent_after is not None and self._produced >= silent_after

    def end_production(self) -> None:
        """Take no more readings; the send loop carries on with what is buffered."""
        self._production_done = True
        self._update_drained()

    def _buffer(self, pending: Pending) -> None:
        self._stats.produced += 1
        self._stats.buffered += 1
        self._waiting.append(pending)
        self._evict_overflow()
        self._drained.clear()
        self._wake_sender.set()

    def _evict_overflow(self) -> None:
        while len(self._waiting) > self._buffer_limit:
            dropped = self._waiting.popleft().reading
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
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._update_drained()
                self._wake_sender.clear()
                await self._wake_sender.wait()
            pending = self._waiting.popleft()
            self._in_flight = pending

            def leaving(pending: Pending = pending) -> None:
                if not pending.sent_before:
                    pending.sent_before = True
                    self._stats.send_delays.record(loop.time() - pending.due)

            self._stats.sent += 1  # an attempt, even one that fails before anything leaves (no connection)
            try:
                attempt = await self._uplink.send(self.meter_id, pending.reading, leaving)
            except asyncio.CancelledError:
                self._waiting.appendleft(pending)  # still unsent: reported as such
                raise
            finally:
                self._in_flight = None
            self._settle(pending, attempt)
            if attempt.outcome is Outcome.RETRY:
                await asyncio.sleep(self._period_s)

    def _settle(self, pending: Pending, attempt: Attempt) -> None:
        stats = self._stats
        reading = pending.reading
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
                self._waiting.appendleft(pending)
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
        if self._production_done and not self._waiting and self._in_flight is None:
            self._drained.set()
        else:
            self._drained.clear()
