"""Alert records: an alert as stored, its changes, and its SQLite table (one row per alert, revised in place).

An alert opens on the first trip of its (meter, kind), counts further trips as occurrences, and resolves on
a clear; there is at most one open alert per (meter, kind). Every change raises the alert's ``revision``
(its shipping key) and marks it pending for Elasticsearch (``alert_shipping.py``). What people did to an
alert (acknowledged, closed) lives in ``alert_handling``.
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ALERT_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    alert_id    TEXT    PRIMARY KEY,          -- {meter_id}:{kind}:{opened_at}; Elasticsearch _id {alert_id}:{revision}
    meter_id    TEXT    NOT NULL,
    client_id   TEXT,
    site_id     TEXT,
    kind        TEXT    NOT NULL,
    severity    TEXT    NOT NULL,             -- critical or warning
    state       TEXT    NOT NULL,             -- open or resolved
    message     TEXT    NOT NULL,
    value       REAL,
    opened_at   TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    resolved_at TEXT,
    occurrences INTEGER NOT NULL DEFAULT 1,
    revision    INTEGER NOT NULL UNIQUE,      -- raised at every change: the shipping key of that version
    ship_state  INTEGER NOT NULL DEFAULT 0,   -- 0 pending, 1 shipped, 2 dead-lettered (as readings)
    shipped_at  TEXT,
    ship_status INTEGER,                      -- Elasticsearch's status when it refused the alert for good
    ship_reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_open ON alerts (meter_id, kind) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS alerts_pending ON alerts (revision) WHERE ship_state = 0;
CREATE INDEX IF NOT EXISTS alerts_client_opened ON alerts (client_id, opened_at);
CREATE INDEX IF NOT EXISTS alerts_meter_opened ON alerts (meter_id, opened_at);
-- The alert list (newest first, LIMIT): without these, every alert ever opened (a client's, for a client
-- and a state) was read and sorted at each request. CREATE ... IF NOT EXISTS: older stores get them at start.
CREATE INDEX IF NOT EXISTS alerts_opened ON alerts (opened_at);
CREATE INDEX IF NOT EXISTS alerts_client_state_opened ON alerts (client_id, state, opened_at);
-- What people did to an alert (a table of its own, so stores made before acknowledgement need no migration).
CREATE TABLE IF NOT EXISTS alert_handling (
    alert_id        TEXT    PRIMARY KEY REFERENCES alerts (alert_id),
    acknowledged_at TEXT,
    acknowledged_by TEXT,                     -- "admin" or the client id whose key acknowledged it
    closed_by       TEXT                      -- who closed it by hand or retired its meter; NULL: its rule did
);
-- Meters taken out of service: out of the fleet table and the offline rule until they send again.
CREATE TABLE IF NOT EXISTS retired_meters (
    meter_id   TEXT    PRIMARY KEY,
    retired_at TEXT    NOT NULL,
    retired_by TEXT    NOT NULL
);
"""
OPEN = "open"
RESOLVED = "resolved"


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert as stored: open until its condition clears, then resolved for good."""

    alert_id: str
    meter_id: str
    client_id: str | None
    site_id: str | None
    kind: str
    severity: str
    state: str
    message: str
    value: float | None
    opened_at: str
    updated_at: str
    resolved_at: str | None
    occurrences: int
    acknowledged_at: str | None = None  # a person saw it: it stays open, webhooks hear no more until it ends
    acknowledged_by: str | None = None
    closed_by: str | None = None  # resolved by a person (or by retiring its meter), not by its rule

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "meter_id": self.meter_id,
            "client_id": self.client_id,
            "site_id": self.site_id,
            "kind": self.kind,
            "severity": self.severity,
            "state": self.state,
            "message": self.message,
            "value": self.value,
            "opened_at": self.opened_at,
            "updated_at": self.updated_at,
            "resolved_at": self.resolved_at,
            "occurrences": self.occurrences,
            "acknowledged_at": self.acknowledged_at,
            "acknowledged_by": self.acknowledged_by,
            "closed_by": self.closed_by,
        }


ALERT_COLUMNS = (
    "alert_id, meter_id, client_id, site_id, kind, severity, state, message, value, opened_at, updated_at,"
    " resolved_at, occurrences"
)
HANDLING_COLUMNS = "acknowledged_at, acknowledged_by, closed_by"
#: Every alert column, with what people did to it: ``{SELECT_ALERTS} WHERE ...``.
SELECT_ALERTS = f"SELECT {ALERT_COLUMNS}, {HANDLING_COLUMNS} FROM alerts LEFT JOIN alert_handling USING (alert_id)"


def alert_from_row(row: sqlite3.Row) -> Alert:
    return Alert(**dict(row))


class ChangeEvent(enum.StrEnum):
    """What happened to an alert (the webhook's ``event``)."""

    OPENED = "alert.opened"
    UPDATED = "alert.updated"
    RESOLVED = "alert.resolved"
    ACKNOWLEDGED = "alert.acknowledged"  # by a person: still open
    CLOSED = "alert.closed"  # resolved by a person, or because its meter was retired


@dataclass(frozen=True, slots=True)
class AlertChange:
    """One change to one alert, as listeners and webhooks receive it."""

    event: ChangeEvent
    alert: Alert

    def as_dict(self) -> dict[str, Any]:
        return {"event": str(self.event), "alert": self.alert.as_dict()}


#: Called inside the transaction that records a change, so what it writes commits with the change.
Recorder = Callable[[sqlite3.Connection, dict[str, Any]], None]


def save_alert(connection: sqlite3.Connection, alert: Alert) -> None:
    """Insert or update an alert, raise its revision and mark it pending for shipping again."""
    (revision,) = connection.execute("SELECT coalesce(max(revision), 0) + 1 FROM alerts").fetchone()
    connection.execute(
        f"INSERT INTO alerts ({ALERT_COLUMNS}, revision, ship_state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
        " ON CONFLICT (alert_id) DO UPDATE SET state = excluded.state, message = excluded.message,"
        " value = excluded.value, updated_at = excluded.updated_at, resolved_at = excluded.resolved_at,"
        " occurrences = excluded.occurrences, revision = excluded.revision, ship_state = 0,"
        " ship_status = NULL, ship_reason = NULL",
        (
            alert.alert_id,
            alert.meter_id,
            alert.client_id,
            alert.site_id,
            alert.kind,
            alert.severity,
            alert.state,
            alert.message,
            alert.value,
            alert.opened_at,
            alert.updated_at,
            alert.resolved_at,
            alert.occurrences,
            revision,
        ),
    )
    if alert.acknowledged_at is not None or alert.closed_by is not None:
        connection.execute(
            f"INSERT INTO alert_handling (alert_id, {HANDLING_COLUMNS}) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (alert_id) DO UPDATE SET acknowledged_at = excluded.acknowledged_at,"
            " acknowledged_by = excluded.acknowledged_by, closed_by = excluded.closed_by",
            (alert.alert_id, alert.acknowledged_at, alert.acknowledged_by, alert.closed_by),
        )


class AlertNotOpen(Exception):
    """Only an open alert can be acknowledged or closed; this one is resolved already."""

    def __init__(self, alert_id: str, action: str) -> None:
        super().__init__(f"alert {alert_id} is resolved: only an open alert can be {action}")
