"""The status report: what a store holds and how far shipping lags, for a person or a script.

``smartgas-consumer status`` prints it as JSON. A running consumer holds its store alone (the WAL index
lives in its own memory, see store.py), so it also writes the same report beside the store every status
interval, as ``<db>.status.json`` (replaced atomically); ``status`` prints that snapshot, with its age and
the serving consumer's PID, when it cannot open the store itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from smartgas_consumer.store import DeadLetter, StoreSummary, format_timestamp, parse_timestamp

#: What the report says instead of a shipping lag when no Elasticsearch is configured.
NOT_SHIPPING = "not shipping: no Elasticsearch URL set (--elasticsearch-url), so nothing is pending"


def describe_lag(summary: StoreSummary, now: datetime) -> str:
    """Shipping lag for a person: how many readings wait, and how old the oldest is."""
    age = "-"
    if summary.oldest_pending_received_at is not None:
        oldest = parse_timestamp(summary.oldest_pending_received_at)
        age = f"{max(0.0, (now - oldest).total_seconds()):.1f}s"
    return f"pending={summary.pending} oldest_pending_age={age} dead_letters={summary.dead_letters}"


def build_report(
    db: Path, summary: StoreSummary, letters: list[DeadLetter], *, shipping: bool, now: datetime
) -> dict[str, Any]:
    """The report of a store; ``pending`` and the lag only when readings are shipped somewhere."""
    counts = dataclasses.asdict(summary)
    if not shipping:
        # Readings wait for a sink only when there is one: without it the store is the end of the line.
        del counts["pending"], counts["oldest_pending_received_at"]
    return {
        "db": str(db),
        **counts,
        "shipping_lag": describe_lag(summary, now) if shipping else NOT_SHIPPING,
        "dead_letter_examples": [dataclasses.asdict(letter) for letter in letters],
    }


def snapshot_path(db: Path) -> Path:
    """Where a running consumer keeps the report of its store."""
    return db.with_name(db.name + ".status.json")


def write_snapshot(db: Path, report: dict[str, Any], *, now: datetime) -> None:
    """Replace the snapshot atomically (a reader never sees half a file); raises OSError on a disk fault."""
    path = snapshot_path(db)
    document = {**report, "as_of": format_timestamp(now), "served_by_pid": os.getpid()}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)


def read_snapshot(db: Path, now: datetime) -> dict[str, Any] | None:
    """The snapshot a running consumer wrote, with its age in seconds; None if there is none readable."""
    try:
        document: dict[str, Any] = json.loads(snapshot_path(db).read_text(encoding="utf-8"))
        as_of = parse_timestamp(document["as_of"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    document["age_s"] = round(max(0.0, (now - as_of).total_seconds()), 1)
    return document
