"""Alerts shipped to Elasticsearch: each change of an alert is a document of the alerts data stream.

A second source for the Elasticsearch sink (``elasticsearch_sink.py``), beside the readings.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Any

from smartgas_consumer.alert_records import ALERT_COLUMNS, HANDLING_COLUMNS, Alert
from smartgas_consumer.elasticsearch_sink import Refusal, Shipment
from smartgas_consumer.store import ReadingStore, ShipState, format_timestamp


def to_alert_document(alert: Alert) -> dict[str, Any]:
    """The Elasticsearch document of an alert (fields as in the alerts index template).

    ``@timestamp`` is the last change, so an alert that is still changing stays in the dashboard's window.
    """
    document: dict[str, Any] = {
        "@timestamp": alert.updated_at,
        "alert_id": alert.alert_id,
        "meter_id": alert.meter_id,
        "kind": alert.kind,
        "state": alert.state,
        "severity": alert.severity,
        "message": alert.message,
        "opened_at": alert.opened_at,
        "updated_at": alert.updated_at,
        "occurrences": alert.occurrences,
    }
    optional = {
        "client_id": alert.client_id,
        "site": alert.site_id,
        "value": alert.value,
        "resolved_at": alert.resolved_at,
        "acknowledged_at": alert.acknowledged_at,
        "acknowledged_by": alert.acknowledged_by,
        "closed_by": alert.closed_by,
    }
    document.update({name: value for name, value in optional.items() if value is not None})
    return document


def alert_document_id(alert: Alert, revision: int) -> str:
    """The ``_id`` of one version of an alert: a replay of that version is answered 409, a change is new."""
    return f"{alert.alert_id}:{revision}"


class AlertSource:
    """Alerts from the store, shipped to the alerts data stream: each change is a document of its own.

    A data stream is append-only, so the alerts stream is the history of every alert: each version is a
    document with ``_id`` = ``{alert_id}:{revision}`` (the latest ``updated_at`` per ``alert_id`` is the
    current state). The shipping key is the alert's ``revision``: a change made while a batch is in
    flight raises it, so confirming the old version never marks the new one shipped. Alerts are kept
    (``prune`` removes none).
    """

    name = "alerts"

    def __init__(self, store: ReadingStore, *, index: str = "smartgas-alerts") -> None:
        self.store = store
        self.index = index

    async def pending(self, limit: int) -> list[Shipment]:
        def select(connection: sqlite3.Connection) -> list[Shipment]:
            rows = connection.execute(
                f"SELECT revision, {ALERT_COLUMNS}, {HANDLING_COLUMNS} FROM alerts"
                " LEFT JOIN alert_handling USING (alert_id) WHERE ship_state = ? ORDER BY revision LIMIT ?",
                (ShipState.PENDING, limit),
            ).fetchall()
            shipments = []
            for row in rows:
                values = dict(row)
                revision = values.pop("revision")
                alert = Alert(**values)
                shipments.append(Shipment(revision, alert_document_id(alert, revision), to_alert_document(alert)))
            return shipments

        return await self.store.read(select)

    async def mark_shipped(self, shipments: list[Shipment], at: datetime) -> None:
        shipped_at = format_timestamp(at)

        def update(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "UPDATE alerts SET ship_state = ?, shipped_at = ? WHERE revision = ? AND ship_state = ?",
                [(ShipState.SHIPPED, shipped_at, s.key, ShipState.PENDING) for s in shipments],
            )

        await self.store.write(update)

    async def dead_letter(self, refusals: list[Refusal], at: datetime) -> None:
        failed_at = format_timestamp(at)

        def update(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "UPDATE alerts SET ship_state = ?, shipped_at = ?, ship_status = ?, ship_reason = ?"
                " WHERE revision = ? AND ship_state = ?",
                [
                    (ShipState.DEAD_LETTERED, failed_at, r.status, r.reason, r.shipment.key, ShipState.PENDING)
                    for r in refusals
                ],
            )

        await self.store.write(update)

    async def prune(self, now: datetime) -> int:
        return 0
