"""The store's schema: its tables, the one timestamp form, and the ordered migrations of older files.

``SCHEMA`` is always the current schema (a new store is created at ``SCHEMA_VERSION`` directly); an older
store is brought up by the steps of ``MIGRATIONS`` above its ``PRAGMA user_version``, each in one
transaction (``store.py`` applies them when it opens the file). Append a step to change the schema.

Timestamps are written in one form everywhere (``format_timestamp``): RFC 3339 UTC, four-digit zero-padded
year, microseconds, ``Z``, so text order is time order.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

_LOG = logging.getLogger(__name__)

#: The real-gas columns of ``readings`` and their SQLite types, in table order (migration 3 adds them).
REAL_GAS_COLUMNS = (
    ("compressibility_z", "REAL"),
    ("real_moles", "REAL"),
    ("mass_kg", "REAL"),
    ("standard_volume_m3", "REAL"),
    ("liquid_state", "TEXT"),
)
#: Bottle swaps (refills): the content stepped up between two readings (forecaster.py); one row per swap,
#: keyed by the new bottle's first reading, so a replayed or re-judged reading records nothing twice.
REFILLS_SCHEMA = """
CREATE TABLE IF NOT EXISTS refills (
    meter_id           TEXT    NOT NULL,
    epoch              INTEGER NOT NULL,
    seq                INTEGER NOT NULL,  -- the first reading of the new bottle
    ts                 TEXT    NOT NULL,
    fill_before_pct    REAL,
    fill_after_pct     REAL,
    content_before_mol REAL    NOT NULL,
    content_after_mol  REAL    NOT NULL,
    recorded_at        TEXT    NOT NULL,
    PRIMARY KEY (meter_id, epoch, seq)
);
CREATE INDEX IF NOT EXISTS refills_meter_ts ON refills (meter_id, ts);
"""
SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS readings (
    id            INTEGER PRIMARY KEY,
    meter_id      TEXT    NOT NULL,
    epoch         INTEGER NOT NULL,
    seq           INTEGER NOT NULL,
    ts            TEXT    NOT NULL,
    received_at   TEXT    NOT NULL,
    pressure_bar  REAL    NOT NULL,
    temperature_c REAL    NOT NULL,
    volume_l      REAL    NOT NULL,
    moles         REAL    NOT NULL,
    fill_pct      REAL,               -- NULL for a meter missing from the fleet file
    -- Real-gas fields (realgas.py): NULL for an unknown meter, outside the physics envelope, and (but for
    -- liquid_state) for a liquefied gas while liquid is left.
    compressibility_z  REAL,
    real_moles         REAL,
    mass_kg            REAL,
    standard_volume_m3 REAL,
    liquid_state       TEXT,
    client_id     TEXT,
    site_id       TEXT,
    meter_known   INTEGER NOT NULL,
    authenticated INTEGER NOT NULL DEFAULT 0,  -- 1: protected by the meter's own OSCORE context
    ship_state    INTEGER NOT NULL DEFAULT 0,  -- 0 pending, 1 shipped, 2 dead-lettered
    shipped_at    TEXT,
    UNIQUE (meter_id, epoch, seq)
);
CREATE INDEX IF NOT EXISTS readings_meter_ts ON readings (meter_id, ts);
CREATE INDEX IF NOT EXISTS readings_client_ts ON readings (client_id, ts);
CREATE INDEX IF NOT EXISTS readings_site_ts ON readings (site_id, ts);
CREATE INDEX IF NOT EXISTS readings_pending ON readings (id) WHERE ship_state = 0;
CREATE INDEX IF NOT EXISTS readings_shipped_at ON readings (shipped_at) WHERE ship_state = 1;
CREATE TABLE IF NOT EXISTS dead_letters (
    reading_id  INTEGER PRIMARY KEY,
    meter_id    TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    failed_at   TEXT    NOT NULL,
    status      INTEGER,
    reason      TEXT    NOT NULL,
    document    TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS meters (
    meter_id    TEXT    PRIMARY KEY,
    known       INTEGER NOT NULL,
    client_id   TEXT,
    site_id     TEXT,
    first_seen  TEXT    NOT NULL,
    last_seen   TEXT    NOT NULL,
    epoch       INTEGER NOT NULL,
    last_seq    INTEGER NOT NULL,
    last_ts     TEXT    NOT NULL,
    readings    INTEGER NOT NULL,
    last_reading_id INTEGER,                  -- readings.id of the newest stored reading
    gaps        INTEGER NOT NULL DEFAULT 0,   -- readings missing between stored seqs
    replays     INTEGER NOT NULL DEFAULT 0,   -- duplicates and replays, acknowledged, not stored
    reboots     INTEGER NOT NULL DEFAULT 0
);
"""
    + REFILLS_SCHEMA
)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 UTC, year zero-padded to four digits, microseconds and 'Z': sortable as text, the one form
    every table uses (strftime's ``%Y`` is not zero-padded below year 1000 on glibc)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


#: What ``format_timestamp`` writes, and what the migration to version 2 repairs other forms into.
CANONICAL_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
#: A timestamp as older versions may have written it (an unpadded year: ``999-01-01T...``).
_LOOSE_TIMESTAMP = re.compile(r"(\d{1,4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?(?:Z|\+00:00)")


def parse_timestamp(text: str) -> datetime:
    """A stored timestamp back to an aware datetime; ValueError if it is not one (a damaged row)."""
    match = _LOOSE_TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"{text[:40]!r} is not a stored timestamp")
    year, month, day, hour, minute, second, fraction = match.groups()
    return datetime(
        int(year),
        int(month),
        int(day),
        int(hour),
        int(minute),
        int(second),
        int((fraction or "0").ljust(6, "0")),
        tzinfo=UTC,
    )


#: CANONICAL_TIMESTAMP as an SQLite GLOB, to find the rows to repair without reading every row into Python.
_CANONICAL_GLOB = (
    "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9].[0-9][0-9][0-9][0-9][0-9][0-9]Z"
)


def _repair_timestamps(connection: sqlite3.Connection) -> None:
    """Migration 1 → 2: rewrite every timestamp a meter could influence into the canonical form."""
    columns = {
        "readings": ("ts",),
        "meters": ("last_ts",),
        "alerts": ("opened_at", "updated_at", "resolved_at"),
    }
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    repaired = 0
    for table, names in columns.items():
        if table not in tables:
            continue
        for name in names:
            rows = connection.execute(
                f"SELECT rowid, {name} FROM {table} WHERE {name} IS NOT NULL AND NOT ({name} GLOB '{_CANONICAL_GLOB}')"
            ).fetchall()
            for rowid, text in rows:
                try:
                    fixed = format_timestamp(parse_timestamp(text))
                except ValueError:
                    continue  # beyond repair: readers skip such a row and say so
                connection.execute(f"UPDATE {table} SET {name} = ? WHERE rowid = ?", (fixed, rowid))
                repaired += 1
    if repaired:
        _LOG.warning("store migration: rewrote %d timestamp(s) into the canonical zero-padded form", repaired)


def _add_real_gas_columns(connection: sqlite3.Connection) -> None:
    """Migration 2 → 3: the real-gas columns; readings stored before have none (NULL: not computed then)."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(readings)")}
    for column, kind in REAL_GAS_COLUMNS:
        if column not in present:
            connection.execute(f"ALTER TABLE readings ADD COLUMN {column} {kind}")


def _add_authenticated(connection: sqlite3.Connection) -> None:
    """Migration 3 → 4: readings record whether the meter's own OSCORE context protected them."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(readings)")}
    if "authenticated" not in columns:
        connection.execute("ALTER TABLE readings ADD COLUMN authenticated INTEGER NOT NULL DEFAULT 0")


def _add_refills(connection: sqlite3.Connection) -> None:
    """Migration 4 → 5: the refills table (swaps before it were not recorded)."""
    # Statement by statement: executescript would commit the migration's transaction half-way.
    for statement in REFILLS_SCHEMA.split(";"):
        if statement.strip():
            connection.execute(statement)


def _drop_meter_seq_index(connection: sqlite3.Connection) -> None:
    """Migration 5 → 6: the (meter_id, seq) index goes. The re-send check finds a copy by (meter_id, ts),
    an index every meter's chart needs anyway; this one cost a page of every commit for nothing else (in
    a store whose meters each hold a few hundred readings, ~1 of the ~4 pages each reading writes)."""
    connection.execute("DROP INDEX IF EXISTS readings_meter_seq")


@dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: applied, in one transaction, to a store whose version is below ``version``."""

    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


#: The store's schema history, in order; append a step to change the schema. A new store is created at
#: the latest version directly (``SCHEMA`` is always the current schema).
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "timestamps zero-padded to a four-digit year (sortable as text)", _repair_timestamps),
    Migration(3, "real-gas columns on readings (Z, real moles, kg, standard m³, liquid state)", _add_real_gas_columns),
    Migration(4, "readings record whether OSCORE authenticated them (--device-auth)", _add_authenticated),
    Migration(5, "bottle swaps (refills) recorded per meter", _add_refills),
    Migration(6, "the (meter_id, seq) index dropped: nothing needs it", _drop_meter_seq_index),
)
SCHEMA_VERSION = MIGRATIONS[-1].version

#: A one-row table the health probe writes to: proof that a commit reaches the disk now.
PROBE_SCHEMA = "CREATE TABLE IF NOT EXISTS store_probe (id INTEGER PRIMARY KEY CHECK (id = 1), probed_at TEXT)"
