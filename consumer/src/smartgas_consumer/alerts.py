"""The alert engine: judges each stored reading (``alert_rules.py``) and each meter's silence, and keeps the alerts.

An alert opens on the first trip of its (meter, kind), counts further trips as occurrences, and resolves on a
clear; there is at most one open alert per (meter, kind). Every change is one SQLite transaction in the
store's file (``alert_records.py``), which also marks the alert pending for Elasticsearch
(``alert_shipping.py``) and lets listeners add rows of their own (the webhook outbox) in that same
transaction. People acknowledge and close alerts and retire meters through the engine too.

Readings reach the engine through ``ReadingIntake.on_stored``: the callback only queues the event, and one
worker task judges the queue in order, so a CoAP answer never waits for an alert and a meter's readings are
judged in the order they were stored.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from smartgas_consumer.admission import FORGET_UNKNOWN_AFTER
from smartgas_consumer.alert_records import (
    OPEN,
    RESOLVED,
    SELECT_ALERTS,
    Alert,
    AlertChange,
    AlertNotOpen,
    ChangeEvent,
    Recorder,
    alert_from_row,
    save_alert,
)
from smartgas_consumer.alert_rules import (
    LEAK_MAX_READINGS,
    LEAK_WINDOW,
    SEVERITY,
    Check,
    Kind,
    MeterTrack,
    Sample,
    Verdict,
    judge,
)
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.fleet import Fleet
from smartgas_consumer.intake import StoredEvent
from smartgas_consumer.store import ReadingStore, format_timestamp, parse_timestamp

_LOG = logging.getLogger(__name__)

#: Seconds between two offline checks.
OFFLINE_CHECK_S = 5.0
#: The worker lets the event loop run other callbacks after judging this many readings in a row. Taking
#: a reading from a non-empty queue does not suspend the task, so a backlog (a burst, a slow commit) was
#: judged in one go: hundreds of readings at 30-80 µs each, a pause of tens of milliseconds for every CoAP
#: answer waiting behind it. 16 readings are about a millisecond.
READINGS_PER_TURN = 16


@dataclass(frozen=True, slots=True)
class _Queued:
    event: StoredEvent
    silent_s: float | None  # how long the meter had been silent before this reading arrived


class AlertEngine:
    """Judges readings and silence, and keeps the alerts. ``await start()``, feed ``on_stored``, ``stop()``.

    Listeners: ``on_change`` (after commit, with ``{"event": ..., "alert": {...}}``) and ``recorders``
    (inside the change's transaction, with the connection and the same dict).
    """

    def __init__(
        self,
        store: ReadingStore,
        config: ConsumerConfig,
        *,
        fleet: Fleet | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        offline_check_s: float = OFFLINE_CHECK_S,
    ) -> None:
        self.store = store
        self.config = config
        self.fleet = fleet or Fleet()
        self._clock = clock
        self._offline_check_s = offline_check_s
        self.offline_after = timedelta(seconds=config.offline_after_periods * config.expected_period_s)
        self.on_change: list[Callable[[dict[str, Any]], None]] = []
        self.recorders: list[Recorder] = []
        self._tracks: dict[str, MeterTrack] = {}
        self._last_received: dict[str, datetime] = {}
        self._open: dict[tuple[str, str], Alert] = {}
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._started_at: datetime | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Meters whose stored state could not be read at start (each logged at WARNING).
        self.skipped_at_start = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load open alerts and each meter's recent readings from the store, then start judging."""
        opened, meters, unwatched = await self.store.read(self._load)
        self._open = {(alert.meter_id, alert.kind): alert for alert in opened}
        for meter_id, client_id, site_id, last_seen, samples in meters:
            track = self._tracks[meter_id] = MeterTrack(meter_id, client_id, site_id)
            meter = self.fleet.meter(meter_id)
            for sample in samples:
                track.observe(sample, meter, self.config)
            if meter_id not in unwatched and self._expects(meter_id):
                self._last_received[meter_id] = max(last_seen, self._last_received.get(meter_id, last_seen))
        # A meter gets a whole offline window from now: the consumer's own downtime is not the meter's fault.
        self._started_at = self._clock()
        self._tasks = [
            asyncio.create_task(self._work(), name="alerts-worker"),
            asyncio.create_task(self._watch_offline(), name="alerts-offline"),
        ]
        _LOG.info("alerts: %d open, %d meters tracked", len(self._open), len(self._tracks))

    async def stop(self) -> None:
        """Judge what is queued, then stop. Call before the store closes."""
        if not self._tasks:
            return
        worker = self._tasks[0]
        if not worker.done():
            await self._queue.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _load(self, connection: sqlite3.Connection) -> tuple[list[Alert], list[Any], set[str]]:
        opened = [
            alert_from_row(row) for row in connection.execute(f"{SELECT_ALERTS} WHERE state = ?", (OPEN,)).fetchall()
        ]
        meters = []
        # A meter missing from the fleet file and silent for longer than the consumer holds such meters
        # is forgotten (admission.py): no memory for it, however many the store remembers.
        forgotten_before = format_timestamp(self._clock() - FORGET_UNKNOWN_AFTER)
        for meter in connection.execute(
            "SELECT meter_id, client_id, site_id, epoch, last_seen, last_ts FROM meters"
        ).fetchall():
            if not self._expects(meter["meter_id"]) and meter["last_seen"] < forgotten_before:
                continue
            try:
                meters.append(self._load_meter(connection, meter))
            except ValueError as err:
                # A row the consumer cannot read (damaged by hand or by an old version) must not stop the
                # start: the meter is tracked afresh from its next reading.
                self.skipped_at_start += 1
                _LOG.warning(
                    "alerts: skipped meter %r at start, its stored state is unreadable: %s", meter["meter_id"], err
                )
        # Meters whose silence is nobody's concern until they send again: retired ones, and those whose
        # offline alert a person closed.
        unwatched = {
            row[0]
            for row in connection.execute(
                "SELECT meter_id FROM retired_meters JOIN meters USING (meter_id) WHERE last_seen <= retired_at"
                " UNION SELECT alerts.meter_id FROM alerts JOIN alert_handling USING (alert_id)"
                " JOIN meters USING (meter_id) WHERE kind = ? AND closed_by IS NOT NULL AND resolved_at >= last_seen",
                (str(Kind.OFFLINE),),
            )
        }
        return opened, meters, unwatched

    @staticmethod
    def _load_meter(connection: sqlite3.Connection, meter: sqlite3.Row) -> tuple[Any, ...]:
        since = format_timestamp(parse_timestamp(meter["last_ts"]) - LEAK_WINDOW)
        rows = connection.execute(
            "SELECT epoch, seq, ts, pressure_bar, temperature_c, coalesce(real_moles, moles) AS moles, fill_pct,"
            " liquid_state FROM readings"
            " WHERE meter_id = ? AND epoch = ? AND ts >= ? ORDER BY seq DESC LIMIT ?",
            (meter["meter_id"], meter["epoch"], since, LEAK_MAX_READINGS),
        ).fetchall()
        samples = [
            Sample(
                row["epoch"],
                row["seq"],
                parse_timestamp(row["ts"]),
                row["pressure_bar"],
                row["temperature_c"],
                row["moles"],
                row["fill_pct"],
                row["liquid_state"],
            )
            for row in reversed(rows)
        ]
        last_seen = parse_timestamp(meter["last_seen"])
        return meter["meter_id"], meter["client_id"], meter["site_id"], last_seen, samples

    # -- readings ------------------------------------------------------------------------------------------

    def _expects(self, meter_id: str) -> bool:
        """Whether the meter's silence is an alert: listed in the fleet file, or any meter with no fleet file.

        A meter missing from a fleet file is nobody's bottle: nobody expects it to report, so it never
        opens an offline alert (and a peer minting ids cannot open thousands of them).
        """
        return not self.fleet.meters or self.fleet.meter(meter_id) is not None

    def forget(self, meter_ids: Iterable[str]) -> None:
        """Release what the engine holds for meters the consumer forgot (admission.UnknownMeters)."""
        for meter_id in meter_ids:
            self._tracks.pop(meter_id, None)
            self._last_received.pop(meter_id, None)

    @property
    def tracked(self) -> int:
        """Meters the engine holds memory for (history or arrival times)."""
        return len(self._tracks.keys() | self._last_received.keys())

    def on_stored(self, event: StoredEvent) -> None:
        """The intake's listener: note the arrival (for offline) and queue the reading to be judged."""
        meter_id = event.reading.meter_id
        previous = self._last_received.get(meter_id)
        silent_s = (event.received_at - previous).total_seconds() if previous is not None else None
        if (previous is None or event.received_at > previous) and self._expects(meter_id):
            self._last_received[meter_id] = event.received_at
        self._queue.put_nowait(_Queued(event, silent_s))

    async def flush(self) -> None:
        """Wait until every reading queued so far has been judged (and its changes committed)."""
        await self._queue.join()

    @property
    def backlog(self) -> int:
        """Readings queued and not yet judged."""
        return self._queue.qsize()

    async def _work(self) -> None:
        judged = 0
        while True:
            queued = await self._queue.get()
            try:
                async with self._lock:
                    await self._evaluate(queued)
            except Exception:  # one bad reading (or a store error) must not stop the judging of the others
                _LOG.exception("alerts: could not judge reading of %s", queued.event.reading.meter_id)
            finally:
                self._queue.task_done()
            judged += 1
            if judged % READINGS_PER_TURN == 0:
                await asyncio.sleep(0)  # one turn of the loop: answers and new readings go first

    async def _evaluate(self, queued: _Queued) -> None:
        event = queued.event
        meter_id = event.reading.meter_id
        track = self._tracks.get(meter_id)
        if track is None:
            track = self._tracks[meter_id] = MeterTrack(meter_id)
        track.client_id, track.site_id = event.enrichment.client_id, event.enrichment.site_id
        changes: list[AlertChange] = []
        offline = self._open.get((meter_id, Kind.OFFLINE))
        if offline is not None:
            silent = f"{queued.silent_s:.0f} s" if queued.silent_s is not None else "a while"
            at = format_timestamp(event.received_at)
            changes.append(self._resolve(offline, queued.silent_s, f"reading received after {silent} of silence", at))
        observation = track.observe(Sample.of(event), event.meter, self.config)
        if observation is not None:
            at = format_timestamp(event.reading.ts)
            for kind, check in judge(observation).items():
                change = self._decide(track, kind, check, at)
                if change is not None:
                    changes.append(change)
        if changes:
            await self._commit(changes)

    def _decide(self, track: MeterTrack, kind: Kind, check: Check, at: str) -> AlertChange | None:
        current = self._open.get((track.meter_id, kind))
        if check.verdict is Verdict.TRIP:
            if current is None:
                return self._open_alert(track, kind, check.value, check.message, at)
            updated = replace(
                current,
                value=check.value,
                message=check.message,
                updated_at=max(at, current.updated_at),
                occurrences=current.occurrences + 1,
            )
            return AlertChange(ChangeEvent.UPDATED, updated)
        if current is not None:
            return self._resolve(current, check.value, check.message, at)
        return None

    @staticmethod
    def _open_alert(track: MeterTrack, kind: Kind, value: float | None, message: str, at: str) -> AlertChange:
        alert = Alert(
            alert_id=f"{track.meter_id}:{kind}:{at}",
            meter_id=track.meter_id,
            client_id=track.client_id,
            site_id=track.site_id,
            kind=str(kind),
            severity=SEVERITY[kind],
            state=OPEN,
            message=message,
            value=value,
            opened_at=at,
            updated_at=at,
            resolved_at=None,
            occurrences=1,
        )
        return AlertChange(ChangeEvent.OPENED, alert)

    @staticmethod
    def _resolve(alert: Alert, value: float | None, message: str, at: str) -> AlertChange:
        at = max(at, alert.opened_at)  # a meter clock that stepped back must not resolve before opening
        resolved = replace(alert, state=RESOLVED, value=value, message=message, updated_at=at, resolved_at=at)
        return AlertChange(ChangeEvent.RESOLVED, resolved)

    async def _commit(
        self, changes: list[AlertChange], also: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        """Record the changes (and ``also``'s writes) in one transaction, then tell the listeners."""
        payloads = [change.as_dict() for change in changes]

        def write(connection: sqlite3.Connection) -> None:
            if also is not None:
                also(connection)
            for change, payload in zip(changes, payloads, strict=True):
                save_alert(connection, change.alert)
                for recorder in self.recorders:
                    recorder(connection, payload)

        await self.store.write(write)
        for change in changes:
            key = (change.alert.meter_id, change.alert.kind)
            if change.alert.state == OPEN:
                self._open[key] = change.alert
            else:
                self._open.pop(key, None)
            if change.event is not ChangeEvent.UPDATED:
                log = _LOG.warning if change.event is ChangeEvent.OPENED else _LOG.info
                log(
                    "alert %s: %s %s (%s) %s",
                    str(change.event).removeprefix("alert."),
                    change.alert.meter_id,
                    change.alert.kind,
                    change.alert.severity,
                    change.alert.message,
                )
        for payload in payloads:
            for listener in self.on_change:
                listener(payload)

    # -- what people do ------------------------------------------------------------------------------------

    async def acknowledge(self, alert_id: str, *, client_id: str | None, by: str) -> dict[str, Any] | None:
        """Mark an open alert as seen by ``by``: it stays open, and webhooks hear of it again only when it ends.

        None when no such alert is visible to ``client_id`` (None: an administrator); AlertNotOpen when it
        is resolved. Acknowledging again changes nothing: the first acknowledgement stands.
        """
        async with self._lock:
            alert = await self._find(alert_id, client_id)
            if alert is None:
                return None
            if alert.state != OPEN:
                raise AlertNotOpen(alert.alert_id, "acknowledged")
            if alert.acknowledged_at is not None:
                return alert.as_dict()
            at = format_timestamp(self._clock())
            seen = replace(alert, acknowledged_at=at, acknowledged_by=by, updated_at=max(at, alert.updated_at))
            await self._commit([AlertChange(ChangeEvent.ACKNOWLEDGED, seen)])
            return seen.as_dict()

    async def close(self, alert_id: str, *, client_id: str | None, by: str) -> dict[str, Any] | None:
        """Resolve an open alert by hand (None and AlertNotOpen as ``acknowledge``).

        If its condition still holds, the next reading that trips the rule opens a new alert; a closed
        offline alert is not opened again until its meter has sent a reading (a person saw the silence).
        """
        async with self._lock:
            alert = await self._find(alert_id, client_id)
            if alert is None:
                return None
            if alert.state != OPEN:
                raise AlertNotOpen(alert.alert_id, "closed")
            change = self._closed(alert, by, format_timestamp(self._clock()))
            await self._commit([change])
            if alert.kind == Kind.OFFLINE:
                self._last_received.pop(alert.meter_id, None)
            return change.alert.as_dict()

    async def retire(self, meter_id: str, *, by: str) -> str:
        """Take a meter out of service: its open alerts close and its silence is no longer watched.

        Recorded in ``retired_meters`` with the time (returned) in the same transaction as the closures.
        A reading received later brings the meter back (``docs/alerts.md``).
        """
        async with self._lock:
            at = format_timestamp(self._clock())
            changes = [self._closed(alert, by, at) for (owner, _kind), alert in self._open.items() if owner == meter_id]

            def record(connection: sqlite3.Connection) -> None:
                connection.execute(
                    "INSERT INTO retired_meters (meter_id, retired_at, retired_by) VALUES (?, ?, ?)"
                    " ON CONFLICT (meter_id) DO UPDATE SET retired_at = excluded.retired_at,"
                    " retired_by = excluded.retired_by",
                    (meter_id, at, by),
                )

            await self._commit(changes, also=record)
            self._last_received.pop(meter_id, None)
            _LOG.info("meter %s retired by %s (%d open alert(s) closed)", meter_id, by, len(changes))
            return at

    async def _find(self, alert_id: str, client_id: str | None) -> Alert | None:
        alert = next((a for a in self._open.values() if a.alert_id == alert_id), None)
        if alert is None:
            row = await self.store.read(
                lambda connection: connection.execute(f"{SELECT_ALERTS} WHERE alert_id = ?", (alert_id,)).fetchone()
            )
            alert = alert_from_row(row) if row is not None else None
        if alert is None or (client_id is not None and alert.client_id != client_id):
            return None
        return alert

    @staticmethod
    def _closed(alert: Alert, by: str, at: str) -> AlertChange:
        at = max(at, alert.opened_at)
        closed = replace(alert, state=RESOLVED, updated_at=max(at, alert.updated_at), resolved_at=at, closed_by=by)
        return AlertChange(ChangeEvent.CLOSED, closed)

    # -- silence -------------------------------------------------------------------------------------------

    async def _watch_offline(self) -> None:
        while True:
            await asyncio.sleep(self._offline_check_s)
            try:
                await self.evaluate_offline(self._clock())
            except Exception:  # the next tick tries again; a failed check must not end the timer
                _LOG.exception("alerts: offline check failed")

    async def evaluate_offline(self, now: datetime) -> None:
        """Open an offline alert for every registered meter silent longer than the offline window."""
        async with self._lock:
            changes = []
            at = format_timestamp(now)
            for meter_id, last in self._last_received.items():
                if (meter_id, Kind.OFFLINE) in self._open:
                    continue
                since = max(last, self._started_at) if self._started_at is not None else last
                if now - since <= self.offline_after:
                    continue
                track = self._tracks.get(meter_id) or MeterTrack(meter_id)
                silent_s = (now - last).total_seconds()
                # A text that stays true while the alert is open (the dashboard counts the silence as it shows
                # it): "since" a moment, not "for" a duration measured once.
                message = (
                    f"no reading since {format_timestamp(last)} (expected every {self.config.expected_period_s:g} s,"
                    f" offline after {self.offline_after.total_seconds():g} s)"
                )
                changes.append(self._open_alert(track, Kind.OFFLINE, silent_s, message, at))
            if changes:
                await self._commit(changes)

    # -- reading alerts back ----------------------------------------------------------------------------------

    def open_counts(self) -> dict[str, int]:
        """Open alerts by kind (every kind present, zero included), for metrics."""
        counts = {str(kind): 0 for kind in Kind}
        for _meter_id, kind in self._open:
            counts[kind] += 1
        return counts

    def open_by_meter(self) -> dict[str, int]:
        """Open alerts per meter, for the fleet table."""
        counts: dict[str, int] = {}
        for meter_id, _kind in self._open:
            counts[meter_id] = counts.get(meter_id, 0) + 1
        return counts

    async def list_alerts(
        self,
        *,
        client_id: str | None = None,
        state: str | None = None,
        meter_id: str | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Alerts, newest opened first, filtered by client, state and meter (None: any)."""
        conditions, parameters = [], []
        for column, wanted in (("client_id", client_id), ("state", state), ("meter_id", meter_id)):
            if wanted is not None:
                conditions.append(f"{column} = ?")
                parameters.append(wanted)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        query = f"{SELECT_ALERTS}{where} ORDER BY opened_at DESC, alert_id LIMIT ?"

        def select(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = connection.execute(query, (*parameters, limit)).fetchall()
            return [alert_from_row(row).as_dict() for row in rows]

        return await self.store.read(select)
