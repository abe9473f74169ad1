"""The forecaster: follows each compressed bottle's content from stored readings, records its swaps, forecasts.

Fed by ``ReadingIntake.on_stored`` (as the alert engine): each reading of a fleet meter of a compressed gas
goes into that meter's ``ContentSeries`` (``forecast.py``). A reading whose content stepped up to what a
new bottle holds (``alert_rules.is_swap``, the rule that also spares a swap from the sensor-fault alert)
is a refill: recorded in the store's ``refills`` table (once: keyed by the new bottle's first reading) by
a worker task, and the series starts again; at most one every ``REFILL_MIN_INTERVAL`` per meter. At start
the series are rebuilt from the store: the readings since each meter's last refill, at most
``RELOAD_WINDOW`` back, every n-th of them (about ``MAX_POINTS``).

Liquefied gases and meters missing from the fleet file have no series: their forecast says why.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from smartgas_common.gas import Storage
from smartgas_consumer.alert_rules import Sample, is_swap
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.fleet import Fleet, FleetMeter
from smartgas_consumer.forecast import MAX_POINTS, ContentSeries, Forecast, forecast
from smartgas_consumer.intake import StoredEvent
from smartgas_consumer.store import ReadingStore, format_timestamp, parse_timestamp

_LOG = logging.getLogger(__name__)

#: At start, each series is rebuilt from at most this far back.
RELOAD_WINDOW = timedelta(days=7)
#: A step up within this time after a refill is not another one (a bottle is not swapped twice in ten
#: minutes; a faulty or hostile meter see-sawing its pressure must not fill the table at its reading rate).
REFILL_MIN_INTERVAL = timedelta(minutes=10)
#: Refills listed per meter at most.
MAX_REFILLS_LISTED = 100


@dataclass(frozen=True, slots=True)
class Refill:
    """A bottle swap: the content stepped up from ``before`` to ``after`` at the new bottle's first reading."""

    meter_id: str
    epoch: int
    seq: int
    ts: datetime
    fill_before_pct: float | None
    fill_after_pct: float | None
    content_before_mol: float
    content_after_mol: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "meter_id": self.meter_id,
            "ts": format_timestamp(self.ts),
            "seq": self.seq,
            "fill_before_pct": self.fill_before_pct,
            "fill_after_pct": self.fill_after_pct,
            "content_before_mol": self.content_before_mol,
            "content_after_mol": self.content_after_mol,
        }


class Forecaster:
    """Each compressed bottle's content series and refills. ``await start()``, feed ``on_stored``, ``stop()``."""

    def __init__(
        self,
        store: ReadingStore,
        config: ConsumerConfig,
        fleet: Fleet,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.config = config
        self.fleet = fleet
        self._clock = clock
        self._series: dict[str, ContentSeries] = {}
        self._last: dict[str, Sample] = {}
        self._last_refill: dict[str, datetime] = {}
        self._queue: asyncio.Queue[Refill] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def _followed(self, meter_id: str) -> FleetMeter | None:
        meter = self.fleet.meter(meter_id)
        return meter if meter is not None and meter.gas.storage is Storage.COMPRESSED else None

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild every followed meter's series from the store, then start recording refills."""
        rebuilt = await self.store.read(self._reload)
        for meter_id, last_refill, last_sample, points in rebuilt:
            meter = self._followed(meter_id)
            if meter is None:
                continue
            series = self._series[meter_id] = ContentSeries()
            for ts, content_mol in points:
                series.add(meter.site, ts, content_mol)
            if last_sample is not None:
                self._last[meter_id] = last_sample
            if last_refill is not None:
                self._last_refill[meter_id] = last_refill
        self._worker = asyncio.create_task(self._record_refills(), name="forecast-refills")
        _LOG.info("forecast: %d meters followed", len(self._series))

    async def stop(self) -> None:
        """Record the refills queued, then stop. Call before the store closes."""
        if self._worker is None:
            return
        if not self._worker.done():
            await self._queue.join()
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        self._worker = None

    def _reload(self, connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
        rebuilt = []
        since_window = format_timestamp(self._clock() - RELOAD_WINDOW)
        for (meter_id,) in connection.execute("SELECT meter_id FROM meters").fetchall():
            if self._followed(meter_id) is None:
                continue
            try:
                rebuilt.append(self._reload_meter(connection, meter_id, since_window))
            except ValueError as err:  # a damaged row: the meter's series starts afresh from its next reading
                _LOG.warning("forecast: meter %r's stored readings are unreadable, starting afresh: %s", meter_id, err)
        return rebuilt

    @staticmethod
    def _reload_meter(connection: sqlite3.Connection, meter_id: str, since_window: str) -> tuple[Any, ...]:
        row = connection.execute("SELECT max(ts) FROM refills WHERE meter_id = ?", (meter_id,)).fetchone()
        last_refill = row[0]
        since = max(since_window, last_refill) if last_refill is not None else since_window
        (count,) = connection.execute(
            "SELECT count(*) FROM readings WHERE meter_id = ? AND ts >= ?", (meter_id, since)
        ).fetchone()
        # Every stride-th reading: about MAX_POINTS of them, evenly spread over the window, as the series
        # would have thinned them while they arrived.
        stride = max(1, -(-count // MAX_POINTS))
        sampled = connection.execute(
            "SELECT ts, content FROM (SELECT ts, coalesce(real_moles, moles) AS content,"
            " row_number() OVER (ORDER BY ts) AS n FROM readings WHERE meter_id = ? AND ts >= ?)"
            " WHERE (n - 1) % ? = 0 OR n = ? ORDER BY ts",
            (meter_id, since, stride, count),
        ).fetchall()
        latest = connection.execute(
            "SELECT r.epoch, r.seq, r.ts, r.pressure_bar, r.temperature_c, coalesce(r.real_moles, r.moles),"
            " r.fill_pct, r.liquid_state FROM meters m JOIN readings r ON r.id = m.last_reading_id"
            " WHERE m.meter_id = ?",
            (meter_id,),
        ).fetchone()
        last_sample = None
        if latest is not None:
            epoch, seq, ts, pressure_bar, temperature_c, content, fill_pct, liquid_state = latest
            last_sample = Sample(
                epoch, seq, parse_timestamp(ts), pressure_bar, temperature_c, content, fill_pct, liquid_state
            )
        points = [(parse_timestamp(ts), content) for ts, content in sampled if content is not None]
        refilled = parse_timestamp(last_refill) if last_refill is not None else None
        return meter_id, refilled, last_sample, points

    # -- readings --------------------------------------------------------------------------------------

    def on_stored(self, event: StoredEvent) -> None:
        """The intake's listener: the reading joins its meter's series; a swap is queued to be recorded."""
        meter_id = event.reading.meter_id
        meter = self._followed(meter_id)
        if meter is None:
            return
        sample = Sample.of(event)
        previous = self._last.get(meter_id)
        if previous is not None and (sample.epoch, sample.seq) <= (previous.epoch, previous.seq):
            return  # older than what the series holds (the store took it, the series is in time order)
        self._last[meter_id] = sample
        series = self._series.setdefault(meter_id, ContentSeries())
        last_refill = self._last_refill.get(meter_id)
        recent_refill = last_refill is not None and abs(sample.ts - last_refill) < REFILL_MIN_INTERVAL
        if previous is not None and not recent_refill and is_swap(previous, sample, meter, self.config):
            series.restart()
            self._last_refill[meter_id] = sample.ts
            self._queue.put_nowait(
                Refill(
                    meter_id,
                    sample.epoch,
                    sample.seq,
                    sample.ts,
                    previous.fill_pct,
                    sample.fill_pct,
                    previous.moles,
                    sample.moles,
                )
            )
        series.add(meter.site, sample.ts, sample.moles)

    async def flush(self) -> None:
        """Wait until every refill queued so far is recorded."""
        await self._queue.join()

    async def _record_refills(self) -> None:
        while True:
            refill = await self._queue.get()
            try:
                await self.store.write(functools.partial(_save_refill, refill=refill, now=self._clock()))
                _LOG.info(
                    "refill: %s at %s, %.0f → %.0f mol",
                    refill.meter_id,
                    format_timestamp(refill.ts),
                    refill.content_before_mol,
                    refill.content_after_mol,
                )
            except Exception:  # one failed write (a store error) must not stop the recording of the others
                _LOG.exception("forecast: could not record the refill of %s", refill.meter_id)
            finally:
                self._queue.task_done()

    # -- answers ---------------------------------------------------------------------------------------

    def forecast(
        self,
        meter_id: str,
        *,
        ts: datetime | None,
        content_mol: float | None,
        fill_pct: float | None,
        liquid_state: str | None,
    ) -> Forecast:
        """The forecast for a meter whose reading at ``ts`` holds ``content_mol`` (its latest, or one shipped)."""
        return forecast(
            self.fleet.meter(meter_id),
            self._series.get(meter_id),
            ts=ts,
            content_mol=content_mol,
            fill_pct=fill_pct,
            liquid_state=liquid_state,
            reserve_fill_pct=self.config.forecast_reserve_fill_pct,
        )

    def last_refill(self, meter_id: str) -> datetime | None:
        return self._last_refill.get(meter_id)

    async def refills(self, meter_id: str, *, since: str | None = None) -> list[dict[str, Any]]:
        """The meter's recorded refills, oldest first (at most MAX_REFILLS_LISTED, the newest ones)."""

        def select(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = connection.execute(
                "SELECT meter_id, epoch, seq, ts, fill_before_pct, fill_after_pct, content_before_mol,"
                " content_after_mol FROM refills WHERE meter_id = ? AND ts >= ? ORDER BY ts DESC LIMIT ?",
                (meter_id, since or "", MAX_REFILLS_LISTED),
            ).fetchall()
            refills = []
            for row in reversed(rows):
                try:
                    refills.append(Refill(row[0], row[1], row[2], parse_timestamp(row[3]), *row[4:]).as_dict())
                except ValueError:
                    continue  # a damaged row is not listed
            return refills

        return await self.store.read(select)


def _save_refill(connection: sqlite3.Connection, *, refill: Refill, now: datetime) -> None:
    connection.execute(
        "INSERT INTO refills (meter_id, epoch, seq, ts, fill_before_pct, fill_after_pct, content_before_mol,"
        " content_after_mol, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (
            refill.meter_id,
            refill.epoch,
            refill.seq,
            format_timestamp(refill.ts),
            refill.fill_before_pct,
            refill.fill_after_pct,
            refill.content_before_mol,
            refill.content_after_mol,
            format_timestamp(now),
        ),
    )
