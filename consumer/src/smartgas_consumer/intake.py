"""The ingest pipeline, free of any transport: body → validate → transform (moles, real gas) → durable
store → answer.

``ReadingIntake.accept`` is what a PUT on ``/meters/{id}/reading`` does, and what a PUBLISH on
``smartgas/meters/{id}/reading`` does; the CoAP resource and the MQTT ingest only translate. Counters
here feed the status log (and the metrics endpoint).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

from aiocoap.error import ConstructionRenderableError

from smartgas_consumer import physics
from smartgas_consumer.admission import UnknownMeters
from smartgas_consumer.error import ImplausibleReading, Overloaded, StoreUnavailable
from smartgas_consumer.fleet import Fleet, FleetMeter
from smartgas_consumer.metrics import Metrics
from smartgas_consumer.reading import Reading, TimeWindow, check_meter_id, decode_body, parse_reading
from smartgas_consumer.realgas import RealGas, RealGasPhysics
from smartgas_consumer.store import (
    CommitResult,
    Enrichment,
    ReadingRefused,
    ReadingStore,
    SequenceOutcome,
    StoreClosed,
    StoredReading,
)

_LOG = logging.getLogger(__name__)
#: A forwarded reading while its batch is committed: the future of its result, or its refusal.
_Pending: TypeAlias = "asyncio.Future[CommitResult] | ConstructionRenderableError"


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A reading that was just stored, with everything later stages (sinks, alerts, metrics) need."""

    reading: Reading
    moles: float
    received_at: datetime
    result: CommitResult
    enrichment: Enrichment
    meter: FleetMeter | None  # None: the meter is not in the fleet file


@dataclass(frozen=True, slots=True)
class Accepted:
    """The answer to an accepted reading."""

    meter_id: str
    seq: int
    moles: float
    stored: bool
    real: RealGas

    def as_dict(self) -> dict[str, Any]:
        return {
            "meter_id": self.meter_id,
            "seq": self.seq,
            "moles": self.moles,
            **self.real.answer_fields(),
            "stored": self.stored,
        }


@dataclass(slots=True)
class IntakeCounters:
    """Running totals since start: what arrived, what was stored, what was refused and why."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    missing: int = 0
    reboots: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        refused = ", ".join(f"{reason}={count}" for reason, count in sorted(self.rejected.items()))
        return (
            f"received={self.received} stored={self.stored} duplicates={self.duplicates} "
            f"missing={self.missing} reboots={self.reboots} "
            f"rejected={sum(self.rejected.values())}" + (f" ({refused})" if refused else "")
        )


def _commit_refusal(err: ReadingRefused | StoreClosed) -> ConstructionRenderableError:
    """The CoAP-coded refusal of a reading the store did not commit."""
    if isinstance(err, ReadingRefused):
        return ImplausibleReading(str(err))
    return StoreUnavailable(f"reading not stored, retry later: {err}")


def rejection_reason(error: Exception) -> str:
    """A stable snake_case name for a rejection, e.g. InvalidReading → invalid_reading."""
    name = type(error).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


class ReadingIntake:
    """Accepts readings for the store; one instance per consumer, shared by every CoAP request."""

    def __init__(
        self,
        store: ReadingStore,
        *,
        fleet: Fleet | None = None,
        gas_physics: RealGasPhysics | None = None,
        log_readings: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics | None = None,
        unknown_meters: UnknownMeters | None = None,
        max_reading_age_s: float = 25 * 3600.0,
        max_clock_skew_s: float = 300.0,
        max_pending: int = 2048,
    ) -> None:
        self.store = store
        # The cap and rate limit on meters missing from the fleet file; None takes every meter (tests).
        self.unknown_meters = unknown_meters
        self.fleet = fleet or Fleet()
        # Built by the caller once, at start (CoolProp); without it, readings get no real-gas fields.
        self.gas_physics = gas_physics or RealGasPhysics.empty()
        self.counters = IntakeCounters()
        self.metrics = metrics if metrics is not None else Metrics(process=False)
        self._log_readings = log_readings
        self._clock = clock
        self._max_reading_age_s = max_reading_age_s
        self._max_clock_skew_s = max_clock_skew_s
        # Readings in ``accept`` now (most waiting for the group commit): beyond ``max_pending`` a reading is
        # refused 5.03 at once. Without the bound, a peer sending faster than the store commits piled
        # requests up in memory without end (measured: +132 MB in two minutes at twice the commit rate).
        self.pending = 0
        self._max_pending = max_pending
        # Called after each newly stored reading (sinks wake up to ship it, alerts evaluate it).
        self.on_stored: list[Callable[[StoredEvent], None]] = []

    async def accept(
        self,
        meter_id: str,
        payload: bytes,
        content_format: int | None,
        *,
        authenticated: bool = False,
        transport: str = "coap",
    ) -> Accepted:
        """Validate, compute and durably store one reading; raise a CoAP-coded error if it is refused.

        ``authenticated``: the meter's identity was proven (its own OSCORE context protected it, or the
        broker's ACL let only that meter publish on its topic), stored with the reading. ``transport``:
        ``coap`` or ``mqtt``, for the per-transport counts."""
        self.counters.received += 1
        self.metrics.reading_received(transport)
        self.pending += 1
        try:
            if self.pending > self._max_pending:
                raise Overloaded(
                    f"reading not stored, retry later: {self.pending - 1} readings wait for the commit"
                    f" (--max-pending-readings {self._max_pending})"
                )
            window = TimeWindow(self._clock(), self._max_reading_age_s, self._max_clock_skew_s)
            reading = parse_reading(check_meter_id(meter_id), decode_body(payload, content_format), window)
            accepted = await self._store(reading, authenticated)
        except ConstructionRenderableError as err:
            self._count_refusal(meter_id, err, transport)
            raise
        finally:
            self.pending -= 1
        self.metrics.reading_accepted(transport)
        return accepted

    def refused_early(self, meter_id: str, err: ConstructionRenderableError, transport: str = "coap") -> None:
        """Count a reading an edge refused before it reached ``accept`` (a Block1 upload over the limit, an
        MQTT content type that is neither JSON nor CBOR), so that received = stored + duplicates + rejected
        still holds."""
        self.counters.received += 1
        self.metrics.reading_received(transport)
        self._count_refusal(meter_id, err, transport)

    def _count_refusal(self, meter_id: str, err: ConstructionRenderableError, transport: str) -> None:
        reason = rejection_reason(err)
        self.counters.rejected[reason] += 1
        self.metrics.reading_rejected(reason, transport)
        _LOG.debug("refused reading for %r: %s", meter_id[:80], err.message)

    def enrich(self, reading: Reading) -> tuple[Enrichment, FleetMeter | None]:
        """Client, site, real-gas fields and fill % from the fleet file; an unknown meter gets none of them."""
        meter = self.fleet.meter(reading.meter_id)
        if meter is None:
            return Enrichment(), None
        real = self.gas_physics.evaluate(meter, reading.pressure_bar, reading.temperature_c, reading.volume_l)
        return Enrichment(meter.client_id, meter.site.site_id, real.fill_pct, True, real), meter

    async def _store(self, reading: Reading, authenticated: bool = False) -> Accepted:
        moles = physics.moles(reading.pressure_bar, reading.temperature_c, reading.volume_l)
        if not physics.plausible_moles(moles):  # the bounds on its inputs keep it so; this keeps it honest
            raise ImplausibleReading(f"moles: {moles!r} computed from this reading is beyond {physics.MAX_MOLES:g}")
        enrichment, meter = self.enrich(reading)
        enrichment = dataclasses.replace(enrichment, authenticated=authenticated)
        result = await self.commit(reading, moles, enrichment, meter)
        if self._log_readings:
            _LOG.info(
                "reading %s meter=%s seq=%d pressure_bar=%.2f temperature_c=%.2f moles=%.2f",
                "stored" if result.stored else "re-sent",
                reading.meter_id,
                reading.seq,
                reading.pressure_bar,
                reading.temperature_c,
                result.moles,
            )
        return Accepted(reading.meter_id, reading.seq, result.moles, result.stored, result.real)

    async def commit(
        self, reading: Reading, moles: float, enrichment: Enrichment, meter: FleetMeter | None
    ) -> CommitResult:
        """A validated, computed reading into the store (admission of unknown meters, the durable commit),
        then the listeners. In a ``--workers`` worker this is the one step done by the consumer process
        (``workers.py``: ``ForwardingIntake``; there ``commit_forwarded`` does it for a batch)."""
        if meter is None and self.unknown_meters is not None:
            self.unknown_meters.admit(reading.meter_id)  # 4.03 beyond the cap, 4.29 beyond the rate
        received_at = self._clock()
        try:
            result = await self.store.add(reading, moles, received_at, enrichment)
        except (ReadingRefused, StoreClosed) as err:
            raise _commit_refusal(err) from err
        self._committed(StoredEvent(reading, moles, received_at, result, enrichment, meter))
        return result

    def _committed(self, event: StoredEvent) -> None:
        """What follows a commit: the counters, and for a reading newly stored, the listeners."""
        result = event.result
        self.metrics.reading_stored(result)
        if result.stored:
            self.counters.stored += 1
            self.counters.missing += result.missing
            self.counters.reboots += result.outcome is SequenceOutcome.REBOOT
            for listener in self.on_stored:
                listener(event)
        else:
            self.counters.duplicates += 1

    async def commit_forwarded(
        self, forwarded: Sequence[tuple[Reading, float, Enrichment]]
    ) -> list[CommitResult | ConstructionRenderableError]:
        """``commit`` for a batch of readings that a worker process validated and computed (``--workers``):
        all queued for the group commit at once, then waited for, so a batch costs one coroutine, not one
        task a reading. Each gets its result or its refusal (the others of the batch are not affected).
        Counted here as received, and as rejected if refused, so the consumer's counters cover them."""
        received_at = self._clock()
        queued: list[tuple[Reading, float, Enrichment, FleetMeter | None, _Pending]] = []
        for reading, moles, enrichment in forwarded:
            self.counters.received += 1
            self.metrics.reading_received("coap")  # the workers take CoAP only; MQTT stays in this process
            meter = self.fleet.meter(reading.meter_id)
            pending: _Pending
            try:
                if meter is None and self.unknown_meters is not None:
                    self.unknown_meters.admit(reading.meter_id)  # 4.03 beyond the cap, 4.29 beyond the rate
                pending = self.store.submit(reading, moles, received_at, enrichment)
            except StoreClosed as err:
                pending = _commit_refusal(err)
            except ConstructionRenderableError as err:
                pending = err
            queued.append((reading, moles, enrichment, meter, pending))
        outcomes: list[CommitResult | ConstructionRenderableError] = []
        for reading, moles, enrichment, meter, pending in queued:
            if isinstance(pending, asyncio.Future):
                try:
                    result = await pending
                except (ReadingRefused, StoreClosed) as err:
                    pending = _commit_refusal(err)
                else:
                    self._committed(StoredEvent(reading, moles, received_at, result, enrichment, meter))
                    self.metrics.reading_accepted("coap")
                    outcomes.append(result)
                    continue
            self._count_refusal(reading.meter_id, pending, "coap")
            outcomes.append(pending)
        return outcomes

    async def latest(self, meter_id: str) -> StoredReading | None:
        """The meter's latest stored reading (CoAP GET)."""
        return await self.store.latest(meter_id)
