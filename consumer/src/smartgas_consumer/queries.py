"""Read-side of the store for the HTTP API and dashboard: the fleet registry, series, statistics, forecasts.

Every query takes the asking client (``None`` for an administrator) and returns only that client's
meters; a meter of another client is indistinguishable from one that does not exist. A retired meter
(``retired_meters``, written by the alert engine) is left out of the fleet list until it sends a reading
again; it stays reachable by its id, with its readings and statistics. Statistics are
computed by SQLite over the readings kept locally (all of them without Elasticsearch; the retention
window with it). Each meter carries its forecast (``forecaster.py``), from its latest reading.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from smartgas_consumer.fleet import Fleet
from smartgas_consumer.forecaster import Forecaster
from smartgas_consumer.store import ReadingStore, format_timestamp, parse_timestamp

#: Measurements with statistics, as named in the readings table and the API.
MEASUREMENTS = ("pressure_bar", "temperature_c", "moles", "fill_pct")
#: The real-gas fields of a reading (realgas.py), as the API shows them beside ``moles``.
REAL_GAS_FIELDS = ("compressibility_z", "real_moles", "mass_kg", "standard_volume_m3", "liquid_state")
_SERIES_COLUMNS = "epoch, seq, ts, received_at, pressure_bar, temperature_c, volume_l, moles, fill_pct, " + ", ".join(
    REAL_GAS_FIELDS
)


@dataclass(frozen=True, slots=True)
class Window:
    """A closed time interval over the meters' timestamps."""

    since: datetime
    until: datetime

    @classmethod
    def last(cls, span: timedelta, now: datetime) -> Window:
        return cls(now - span, now)

    def bounds(self) -> tuple[str, str]:
        return format_timestamp(self.since), format_timestamp(self.until)


class FleetQueries:
    """Queries over the store, shaped for the API. Created once, shared by every request."""

    def __init__(
        self,
        store: ReadingStore,
        fleet: Fleet,
        *,
        offline_after: timedelta,
        open_alerts_by_meter: Callable[[], dict[str, int]] = dict,
        forecaster: Forecaster | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.offline_after = offline_after
        self._open_alerts_by_meter = open_alerts_by_meter
        self.forecaster = forecaster
        self._clock = clock

    def now(self) -> datetime:
        return self._clock()

    # -- the registry --------------------------------------------------------------------------------

    async def meters(self, client_id: str | None, *, include_retired: bool = False) -> list[dict[str, Any]]:
        """Every meter the client may see: those registered (seen at least once) and those in the fleet file,
        without the retired ones unless asked."""
        rows, retired = await self.store.read(lambda c: (_registry_rows(c, None), _retired(c, None)))
        described = self._describe(rows, retired, client_id)
        return [m for m in described if include_retired or m["retired_at"] is None]

    async def meter(self, client_id: str | None, meter_id: str) -> dict[str, Any] | None:
        rows, retired = await self.store.read(lambda c: (_registry_rows(c, meter_id), _retired(c, meter_id)))
        described = self._describe(rows, retired, client_id, only=meter_id)
        return described[0] if described else None

    def _describe(
        self, rows: list[sqlite3.Row], retired: dict[str, str], client_id: str | None, only: str | None = None
    ) -> list[dict[str, Any]]:
        now = self.now()
        open_alerts = self._open_alerts_by_meter()
        by_id = {row["meter_id"]: row for row in rows}
        fleet_ids = [
            meter_id
            for meter_id, meter in self.fleet.meters.items()
            if (client_id is None or meter.client_id == client_id) and (only is None or meter_id == only)
        ]
        described = []
        for meter_id in sorted(set(by_id) | set(fleet_ids)):
            row = by_id.get(meter_id)
            meter = self.fleet.meter(meter_id)
            # The fleet file decides who owns a meter; a meter missing from it belongs to no client,
            # and only administrators see it.
            owner = meter.client_id if meter is not None else None
            if client_id is not None and owner != client_id:
                continue
            last_seen = row["last_seen"] if row is not None else None
            online = last_seen is not None and now - datetime.fromisoformat(last_seen) <= self.offline_after
            # Retired until it sends again: a reading received after the retirement brings the meter back.
            retired_at = retired.get(meter_id)
            if retired_at is not None and last_seen is not None and last_seen > retired_at:
                retired_at = None
            described.append(
                {
                    "meter_id": meter_id,
                    "known": meter is not None,
                    "registered": row is not None,
                    "client_id": owner,
                    "client_name": self.fleet.clients.get(meter.client_id) if meter else None,
                    "site_id": meter.site.site_id if meter else (row["site_id"] if row else None),
                    "site_name": meter.site.name if meter else None,
                    "latitude": meter.site.latitude if meter else None,
                    "longitude": meter.site.longitude if meter else None,
                    "gas": meter.gas.name if meter else None,
                    "gas_storage": meter.gas.storage.value if meter else None,
                    "volume_l": meter.volume_l if meter else (row["volume_l"] if row else None),
                    "nominal_pressure_bar": meter.nominal_pressure_bar if meter else None,
                    "first_seen": row["first_seen"] if row else None,
                    "last_seen": last_seen,
                    "online": online,
                    "epoch": row["epoch"] if row else None,
                    "last_seq": row["last_seq"] if row else None,
                    "readings": row["readings"] if row else 0,
                    "gaps": row["gaps"] if row else 0,
                    "replays": row["replays"] if row else 0,
                    "reboots": row["reboots"] if row else 0,
                    "last_ts": row["ts"] if row else None,
                    "pressure_bar": row["pressure_bar"] if row else None,
                    "temperature_c": row["temperature_c"] if row else None,
                    "moles": row["moles"] if row else None,
                    "fill_pct": row["fill_pct"] if row else None,
                    **{name: row[name] if row else None for name in REAL_GAS_FIELDS},
                    "open_alerts": open_alerts.get(meter_id, 0),
                    "retired_at": retired_at,
                    "forecast": self._forecast(meter_id, row),
                }
            )
        return described

    def _forecast(self, meter_id: str, row: sqlite3.Row | None) -> dict[str, Any] | None:
        """The meter's forecast from its latest reading (None without a forecaster: tests of other parts)."""
        if self.forecaster is None:
            return None
        ts = row["ts"] if row is not None else None
        content = (row["real_moles"] if row["real_moles"] is not None else row["moles"]) if row is not None else None
        try:
            moment = parse_timestamp(ts) if ts is not None else None
        except ValueError:  # a damaged latest reading: no figure from it
            moment = None
        result = self.forecaster.forecast(
            meter_id,
            ts=moment,
            content_mol=content,
            fill_pct=row["fill_pct"] if row is not None else None,
            liquid_state=row["liquid_state"] if row is not None else None,
        ).as_dict()
        empty_at = result["empty_at"]
        result["empty_at"] = format_timestamp(empty_at) if isinstance(empty_at, datetime) else None
        last_refill = self.forecaster.last_refill(meter_id)
        result["last_refill_at"] = format_timestamp(last_refill) if last_refill is not None else None
        return result

    async def refills(
        self, client_id: str | None, meter_id: str, since: str | None = None
    ) -> list[dict[str, Any]] | None:
        """The meter's recorded refills, oldest first; None if the meter is not the client's (or unknown)."""
        if await self.meter(client_id, meter_id) is None:
            return None
        if self.forecaster is None:
            return []
        return await self.forecaster.refills(meter_id, since=since)

    # -- series and statistics -----------------------------------------------------------------------

    async def readings(
        self, client_id: str | None, meter_id: str, window: Window, limit: int
    ) -> list[dict[str, Any]] | None:
        """The meter's readings in the window, oldest first (the newest ``limit`` of them); None if unseen."""
        if await self.meter(client_id, meter_id) is None:
            return None
        since, until = window.bounds()

        def query(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = connection.execute(
                f"SELECT {_SERIES_COLUMNS} FROM readings WHERE meter_id = ? AND ts >= ? AND ts <= ?"
                " ORDER BY ts DESC LIMIT ?",
                (meter_id, since, until, limit),
            ).fetchall()
            return [dict(row) for row in reversed(rows)]

        return await self.store.read(query)

    async def meter_stats(self, client_id: str | None, meter_id: str, window: Window) -> dict[str, Any] | None:
        if await self.meter(client_id, meter_id) is None:
            return None
        stats = await self.store.read(lambda c: _statistics(c, "meter_id = ?", (meter_id,), window))
        return {"meter_id": meter_id, **_window_dict(window), **stats}

    async def group_stats(
        self, client_id: str | None, group: str, group_id: str, window: Window
    ) -> dict[str, Any] | None:
        """Statistics over every reading of a client's or a site's meters (``group``: client or site)."""
        if group == "client":
            if client_id is not None and group_id != client_id:
                return None
            known = group_id in self.fleet.clients
            condition, parameters = "client_id = ?", (group_id,)
        elif group == "site":
            site = self.fleet.sites.get(group_id)
            if site is None or (client_id is not None and site.client_id != client_id):
                return None
            known = True
            condition, parameters = "site_id = ?", (group_id,)
        else:
            raise ValueError(f"unknown group {group!r}")
        stats = await self.store.read(lambda c: _statistics(c, condition, parameters, window))
        if not known and stats["count"] == 0:
            return None
        return {f"{group}_id": group_id, **_window_dict(window), **stats}


def _registry_rows(connection: sqlite3.Connection, meter_id: str | None) -> list[sqlite3.Row]:
    where, parameters = ("WHERE m.meter_id = ?", [meter_id]) if meter_id is not None else ("", [])
    return connection.execute(
        "SELECT m.meter_id, m.client_id, m.site_id, m.first_seen, m.last_seen, m.epoch, m.last_seq, m.readings,"
        " m.gaps, m.replays, m.reboots, r.ts, r.pressure_bar, r.temperature_c, r.volume_l, r.moles, r.fill_pct, "
        + ", ".join(f"r.{name}" for name in REAL_GAS_FIELDS)
        + f" FROM meters m LEFT JOIN readings r ON r.id = m.last_reading_id {where} ORDER BY m.meter_id",
        parameters,
    ).fetchall()


def _retired(connection: sqlite3.Connection, meter_id: str | None) -> dict[str, str]:
    where, parameters = ("WHERE meter_id = ?", [meter_id]) if meter_id is not None else ("", [])
    rows = connection.execute(f"SELECT meter_id, retired_at FROM retired_meters {where}", parameters).fetchall()
    return {row["meter_id"]: row["retired_at"] for row in rows}


def _statistics(
    connection: sqlite3.Connection, condition: str, parameters: tuple[str, ...], window: Window
) -> dict[str, Any]:
    since, until = window.bounds()
    aggregates = ", ".join(f"avg({m}), min({m}), max({m})" for m in MEASUREMENTS)
    row = connection.execute(
        f"SELECT count(*), count(DISTINCT meter_id), {aggregates} FROM readings"
        f" WHERE {condition} AND ts >= ? AND ts <= ?",
        (*parameters, since, until),
    ).fetchone()
    last = connection.execute(
        f"SELECT {', '.join(MEASUREMENTS)} FROM readings WHERE {condition} AND ts >= ? AND ts <= ?"
        " ORDER BY ts DESC LIMIT 1",
        (*parameters, since, until),
    ).fetchone()
    result: dict[str, Any] = {"count": row[0], "meters": row[1]}
    for index, measurement in enumerate(MEASUREMENTS):
        mean, low, high = row[2 + 3 * index : 5 + 3 * index]
        result[measurement] = {
            "mean": mean,
            "min": low,
            "max": high,
            "last": last[measurement] if last is not None else None,
        }
    return result


def _window_dict(window: Window) -> dict[str, str]:
    since, until = window.bounds()
    return {"since": since, "until": until}
