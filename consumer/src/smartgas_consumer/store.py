"""The durable store: every accepted reading is committed to SQLite (WAL mode) before it is acknowledged.

One thread owns the SQLite connection; the event loop hands it work and awaits the result, so CoAP
traffic is never blocked on disk. Writes are grouped: readings that arrive within ``group_window_s`` of
each other share one transaction and one fsync, and every waiter is released only after that transaction
has committed. The window is kept far below aiocoap's 100 ms empty-ACK delay so that answers still travel
piggybacked on the ACK.

Tables (schema version in ``PRAGMA user_version``):

- ``readings``: one row per (meter_id, epoch, seq), with the meter's fields, the computed moles (ideal gas)
  and real-gas fields (``realgas.py``: Z, real moles, kg, standard m³, a liquefied gas's state) and fill %,
  the client and site it belongs to, the meter's timestamp and the receive time. ``id`` is the commit
  order, the cursor that sinks ship from.
- ``meters``: the meter registry; a meter is created on first sight, with first/last seen, its epoch,
  last seq and meter timestamp, and counts of gaps, replays and reboots.
- ``dead_letters``: readings a sink can never deliver (the sink refused that item with a 4xx), with why.

Threads: one thread owns the writing connection (every commit, in order); a second thread owns a read-only
connection for queries (the API, statistics, status). In WAL mode a reader never blocks the writer, so a
long statistics query cannot hold back acknowledgements.

Sequence rule (per meter, applied inside the commit so concurrent readings see each other):

- a reading identical in (meter_id, seq, ts) to one stored is a re-send (a duplicate): acknowledged, not
  stored again, answered with the stored copy's moles (an old epoch's reading re-sent after a reboot must
  not pass for a new one);
- seq above the last stored, by at most what the time since the meter's last stored reading allows
  (``SEQ_JUMP_SLACK`` plus one per ``MIN_READING_PERIOD_S`` of the consumer's clock): stored;
  ``seq - last - 1`` readings are counted missing (a gap);
- seq below the last stored, timestamp not later than the last stored one, and that seq not yet stored
  in the current epoch: a reading that arrives late. It is stored in its place, and fills one of the
  meter's counted gaps;
- anything else (seq at or below the last stored with a later timestamp or a seq already taken, or a
  seq running further ahead than time allows): the meter restarted its counter, or someone forged a
  reading. A new epoch begins and the reading is stored (counted as a reboot); ``(meter_id, epoch, seq)``
  stays unique.

So every reading that is not a re-send is stored: no reading, forged or genuine, can make the consumer
discard a meter's later genuine readings as replays (the meter's clock and counter are not trusted for
that). A forged reading costs an epoch, never a genuine reading.

Group commit isolation: each reading of a group is written inside its own SAVEPOINT. A reading the
database refuses (a constraint it breaks) is rolled back alone and answered with ``ReadingRefused``; the
others of its group commit. Only a failure of the transaction itself (disk full, I/O error, lock) fails
the whole group, and nobody in it is acknowledged.

Timestamps are written in one form everywhere (``format_timestamp``): RFC 3339 UTC, four-digit zero-padded
year, microseconds, ``Z``, so text order is time order. Schema changes are the ordered ``MIGRATIONS``
(``schema.py``, with the tables; the lock file and the refusals of opening are ``storefile.py``'s).

Opening: the store runs ``PRAGMA quick_check`` and refuses a damaged file (``StoreUnusable``, naming the
file and the fix). By default both connections use SQLite's ``unix-excl`` VFS: the WAL index lives in the
process's heap instead of a memory-mapped ``-shm`` file. A mapped ``-shm`` made immutable (``chattr +i``)
or otherwise unwritable under the running consumer kills it with SIGBUS on the next write to the mapping
(ext4 refuses the page fault); with the index in heap memory such faults come back as I/O errors that the
commit turns into 5.03. The price: no other process can open the store while the consumer holds it
(``status``, ``sqlite3 .backup``); ``shared_memory=True`` (``--store-shared-memory``) trades the SIGBUS
protection back for that.

Shipping state lives on each reading (``ship_state``: pending, shipped or dead-lettered), so the store is
the sinks' durable buffer: a reading is pending until a sink confirmed it, across restarts and outages.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from smartgas_consumer.reading import Reading
from smartgas_consumer.realgas import NO_REAL_GAS, RealGas

# The schema and the store's file have modules of their own (schema.py, storefile.py); their names are
# re-exported here, where the other stages have always imported them from.
from smartgas_consumer.schema import CANONICAL_TIMESTAMP as CANONICAL_TIMESTAMP
from smartgas_consumer.schema import MIGRATIONS as MIGRATIONS
from smartgas_consumer.schema import PROBE_SCHEMA, SCHEMA
from smartgas_consumer.schema import REAL_GAS_COLUMNS as REAL_GAS_COLUMNS
from smartgas_consumer.schema import SCHEMA_VERSION as SCHEMA_VERSION
from smartgas_consumer.schema import Migration as Migration
from smartgas_consumer.schema import format_timestamp as format_timestamp
from smartgas_consumer.schema import parse_timestamp as parse_timestamp
from smartgas_consumer.storefile import SQLITE_VFS as SQLITE_VFS
from smartgas_consumer.storefile import NotAStoreError as NotAStoreError
from smartgas_consumer.storefile import StoreInUse as StoreInUse
from smartgas_consumer.storefile import StoreLock as StoreLock
from smartgas_consumer.storefile import StoreUnusable as StoreUnusable
from smartgas_consumer.storefile import check_existing_store as check_existing_store
from smartgas_consumer.storefile import describe_open_failure as describe_open_failure

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

#: A seq may run ahead of the meter's last stored one by this many readings whatever the time...
SEQ_JUMP_SLACK = 1000
#: ...plus one for every this many seconds since that reading was received (the fastest a meter may send).
MIN_READING_PERIOD_S = 0.1


class StoreClosed(Exception):
    """The store is closed or closing and takes no more readings."""


class ReadingRefused(Exception):
    """The database refused this one reading (it breaks a constraint); the others of its group commit."""


@dataclass(frozen=True, slots=True)
class StoredReading:
    """A reading as the store holds it: the meter's fields plus what the consumer added."""

    id: int
    meter_id: str
    epoch: int
    seq: int
    ts: str
    received_at: str
    pressure_bar: float
    temperature_c: float
    volume_l: float
    moles: float
    fill_pct: float | None
    client_id: str | None
    site_id: str | None
    meter_known: bool
    compressibility_z: float | None = None
    real_moles: float | None = None
    mass_kg: float | None = None
    standard_volume_m3: float | None = None
    liquid_state: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "meter_id": self.meter_id,
            "epoch": self.epoch,
            "seq": self.seq,
            "ts": self.ts,
            "pressure_bar": self.pressure_bar,
            "temperature_c": self.temperature_c,
            "volume_l": self.volume_l,
            "moles": self.moles,
            "compressibility_z": self.compressibility_z,
            "real_moles": self.real_moles,
            "mass_kg": self.mass_kg,
            "standard_volume_m3": self.standard_volume_m3,
            "liquid_state": self.liquid_state,
            "fill_pct": self.fill_pct,
            "client_id": self.client_id,
            "site_id": self.site_id,
            "meter_known": self.meter_known,
            "received_at": self.received_at,
        }


class SequenceOutcome(enum.Enum):
    """How a reading's seq relates to what the meter sent before (see the module's sequence rule)."""

    FIRST = "first"
    NEXT = "next"
    GAP = "gap"
    REBOOT = "reboot"
    LATE = "late"
    DUPLICATE = "duplicate"

    @property
    def stored(self) -> bool:
        return self is not SequenceOutcome.DUPLICATE


@dataclass(frozen=True, slots=True)
class Enrichment:
    """What the consumer adds to a reading from the fleet file."""

    client_id: str | None = None
    site_id: str | None = None
    fill_pct: float | None = None
    known: bool = False
    real: RealGas = NO_REAL_GAS
    authenticated: bool = False  # protected by the meter's own OSCORE context (device_auth.py)


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What became of one reading: stored (and how its seq fitted), or a duplicate/replay not stored."""

    outcome: SequenceOutcome
    moles: float
    epoch: int
    missing: int = 0  # readings skipped before this one (a gap)
    #: The real-gas fields of the reading, or of the stored copy for a re-send (like ``moles``).
    real: RealGas = NO_REAL_GAS

    @property
    def stored(self) -> bool:
        return self.outcome.stored


class ShipState(enum.IntEnum):
    """Where a reading is on its way to the sinks."""

    PENDING = 0
    SHIPPED = 1
    DEAD_LETTERED = 2


@dataclass(frozen=True, slots=True)
class StoreSummary:
    """Counts for the status command and logs, shipping lag included."""

    readings: int
    meters: int
    newest_received_at: str | None
    pending: int
    oldest_pending_received_at: str | None
    dead_letters: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A reading a sink refused for good, and the sink's reason."""

    reading_id: int
    meter_id: str
    seq: int
    status: int | None
    reason: str
    document: str


@dataclass(slots=True)
class _PendingReading:
    reading: Reading
    moles: float
    enrichment: Enrichment
    received_at: datetime
    done: asyncio.Future[CommitResult]


_READING_COLUMNS = (
    "id, meter_id, epoch, seq, ts, received_at, pressure_bar, temperature_c, volume_l, moles,"
    " fill_pct, client_id, site_id, meter_known, compressibility_z, real_moles, mass_kg, standard_volume_m3,"
    " liquid_state"
)


def stored_reading(row: sqlite3.Row) -> StoredReading:
    values = dict(row)
    values["meter_known"] = bool(values["meter_known"])
    return StoredReading(**values)


class ReadingStore:
    """SQLite-backed durable store with group commit. Create, ``await open()``, use, ``await close()``."""

    def __init__(
        self,
        path: Path,
        *,
        group_window_s: float = 0.002,
        max_group_size: int = 1024,
        on_commit: Callable[[int, float], None] | None = None,
        extra_schema: Sequence[str] = (),
        shared_memory: bool = False,
    ) -> None:
        self.path = path
        # True: the WAL index in a mapped -shm file, so other processes can read beside this one.
        self.shared_memory = shared_memory
        # Tables of other stages (alerts, webhook deliveries) that live in the same file and transactions.
        self._extra_schema = tuple(extra_schema)
        self.group_window_s = group_window_s
        self.max_group_size = max_group_size
        # Called on the loop after each group commit with (rows, seconds): a hook for metrics.
        self._on_commit = on_commit
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._reader_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
        self._connection: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[_PendingReading] = asyncio.Queue()
        self._committer: asyncio.Task[None] | None = None
        self._closing = False
        #: Why the last commit failed (an I/O error, a read-only file), None once one succeeds again.
        self.fault: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open_connection)
        await self._run_reader(self._open_reader)
        self._committer = asyncio.create_task(self._commit_loop(), name="store-committer")

    async def close(self) -> None:
        """Commit everything already queued, then close. Later ``add`` calls raise StoreClosed."""
        self._closing = True
        if self._committer is not None:
            await self._queue.join()
            self._committer.cancel()
            await asyncio.gather(self._committer, return_exceptions=True)
            self._committer = None
        if self._reader is not None:
            await self._run_reader(self._close_reader)
        if self._connection is not None:
            await self._run(self._close_connection)
        self._reader_executor.shutdown(wait=True)
        self._executor.shutdown(wait=True)

    def _open_connection(self) -> None:
        try:
            self._connect()
        except Exception as err:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
            if isinstance(err, StoreUnusable):
                raise
            if not isinstance(err, sqlite3.Error | OSError):
                raise
            raise StoreUnusable(describe_open_failure(self.path, err)) from err

    def _uri(self, mode: str) -> str:
        vfs = "" if self.shared_memory else f"&vfs={SQLITE_VFS}"
        return f"{self.path.resolve().as_uri()}?mode={mode}{vfs}"

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self._uri("rwc"), uri=True, isolation_level=None, check_same_thread=False)
        self._connection = connection
        connection.row_factory = sqlite3.Row
        # A damaged page would otherwise pass the start and fail every commit that touches it.
        problems = [" ".join(str(row[0]).split()) for row in connection.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StoreUnusable(
                f"--db {self.path}: failed its integrity check ({'; '.join(problems)[:300]}); restore it from "
                "a backup, or move it away (`sqlite3 FILE .recover` saves what it can)"
            )
        mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"{self.path}: could not switch to WAL mode (got {mode})")
        # FULL: in WAL mode, NORMAL may lose the last transactions on power loss, and an
        # acknowledged reading must survive that.
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=5000")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnusable(
                f"--db {self.path}: schema version {version}, newer than this consumer's {SCHEMA_VERSION}; "
                "run the consumer version that wrote it"
            )
        fresh = version == 0
        connection.executescript(SCHEMA)
        if not fresh:
            for migration in MIGRATIONS:
                if migration.version > version:
                    _LOG.info(
                        "store %s: migrating to version %d (%s)", self.path, migration.version, migration.description
                    )
                    self._connection = connection
                    with self._transaction():
                        migration.apply(connection)
                        connection.execute(f"PRAGMA user_version={migration.version}")
        for schema in self._extra_schema:
            connection.executescript(schema)
        connection.execute(PROBE_SCHEMA)
        connection.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _open_reader(self) -> None:
        reader = sqlite3.connect(self._uri("ro"), uri=True, check_same_thread=False)
        reader.row_factory = sqlite3.Row
        reader.execute("PRAGMA busy_timeout=5000")
        self._reader = reader

    def _close_connection(self) -> None:
        assert self._connection is not None
        self._connection.close()
        self._connection = None

    def _close_reader(self) -> None:
        assert self._reader is not None
        self._reader.close()
        self._reader = None

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _run_reader(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._reader_executor, function, *args)

    def _query(self, function: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._reader is None:
            raise StoreClosed("the store is closed")
        return function(self._reader)

    # -- writing -------------------------------------------------------------------------------------

    async def add(
        self, reading: Reading, moles: float, received_at: datetime, enrichment: Enrichment | None = None
    ) -> CommitResult:
        """Store a reading durably; return only once its transaction has committed."""
        return await self.submit(reading, moles, received_at, enrichment)

    def submit(
        self, reading: Reading, moles: float, received_at: datetime, enrichment: Enrichment | None = None
    ) -> asyncio.Future[CommitResult]:
        """``add`` without the wait: queue the reading for the next group commit and return the future of its
        result, so that one coroutine can queue many readings and then wait for them (a ``--workers``
        worker's batch) instead of one task each."""
        if self._closing or self._committer is None:
            raise StoreClosed("the store is closed")
        done: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_PendingReading(reading, moles, enrichment or Enrichment(), received_at, done))
        return done

    async def _commit_loop(self) -> None:
        while True:
            group = [await self._queue.get()]
            if self.group_window_s > 0:
                await asyncio.sleep(self.group_window_s)
            while len(group) < self.max_group_size and not self._queue.empty():
                group.append(self._queue.get_nowait())
            started = time.perf_counter()
            try:
                results = await self._run(self._commit_group, group)
            except Exception as err:  # any failure to commit: nobody in this group is acknowledged
                if self.fault is None:  # once per fault, not once per group while it lasts
                    _LOG.error("store %s: commit failed: %s (5.03 until it recovers)", self.path, err)
                self.fault = f"could not commit: {err}"
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(StoreClosed(f"could not commit: {err}"))
            else:
                if self.fault is not None:
                    _LOG.warning("store %s commits again after: %s", self.path, self.fault)
                    self.fault = None
                for pending, result in zip(group, results, strict=True):
                    if pending.done.done():
                        continue
                    if isinstance(result, ReadingRefused):
                        pending.done.set_exception(result)
                    else:
                        pending.done.set_result(result)
                if self._on_commit is not None:
                    self._on_commit(len(group), time.perf_counter() - started)
            finally:
                for _ in group:
                    self._queue.task_done()

    def _commit_group(self, group: Sequence[_PendingReading]) -> list[CommitResult | ReadingRefused]:
        connection = self._connection
        assert connection is not None
        with self._transaction():
            return [self._insert_alone(connection, pending) for pending in group]

    def _insert_alone(self, connection: sqlite3.Connection, pending: _PendingReading) -> CommitResult | ReadingRefused:
        """Insert one reading inside its own SAVEPOINT: if the database refuses it, only it is undone."""
        connection.execute("SAVEPOINT reading")
        try:
            result = self._insert(connection, pending)
        except (sqlite3.IntegrityError, sqlite3.DataError, OverflowError) as err:
            # The reading's own fault (a constraint it breaks, a value SQLite cannot hold). Anything else
            # (OperationalError: disk full, I/O, lock) is the store's and fails the whole group.
            connection.execute("ROLLBACK TO reading")
            connection.execute("RELEASE reading")
            _LOG.warning("store refused a reading of meter %r: %s", pending.reading.meter_id[:80], err)
            return ReadingRefused(f"the store refused this reading: {err}")
        connection.execute("RELEASE reading")
        return result

    @staticmethod
    def _insert(connection: sqlite3.Connection, pending: _PendingReading) -> CommitResult:
        reading, extra = pending.reading, pending.enrichment
        received_at = format_timestamp(pending.received_at)
        ts = format_timestamp(reading.ts)
        meter = connection.execute(
            "SELECT epoch, last_seq, last_ts, last_seen FROM meters WHERE meter_id = ?", (reading.meter_id,)
        ).fetchone()
        missing = 0
        # INDEXED BY: left to itself, SQLite serves the ORDER BY from the (meter_id, epoch, seq) index and
        # walks every reading the meter ever sent; (meter_id, ts) finds the one candidate, or none.
        copy = connection.execute(
            "SELECT moles, compressibility_z, real_moles, mass_kg, standard_volume_m3, liquid_state FROM readings"
            " INDEXED BY readings_meter_ts WHERE meter_id = ? AND ts = ? AND seq = ? ORDER BY epoch DESC LIMIT 1",
            (reading.meter_id, ts, reading.seq),
        ).fetchone()
        if copy is not None and meter is not None:
            # A re-send: the first copy stays, and its moles and real-gas fields are the answer.
            connection.execute("UPDATE meters SET replays = replays + 1 WHERE meter_id = ?", (reading.meter_id,))
            real = RealGas(
                copy["compressibility_z"],
                copy["real_moles"],
                copy["mass_kg"],
                copy["standard_volume_m3"],
                copy["liquid_state"],
            )
            return CommitResult(SequenceOutcome.DUPLICATE, float(copy["moles"]), meter["epoch"], real=real)
        if meter is None:
            outcome, epoch = SequenceOutcome.FIRST, 0
        elif meter["last_seq"] < reading.seq and (
            # Within the slack whatever the time: the common case, without parsing last_seen.
            reading.seq <= meter["last_seq"] + SEQ_JUMP_SLACK
            or reading.seq <= meter["last_seq"] + _allowed_jump(meter["last_seen"], pending.received_at)
        ):
            epoch = meter["epoch"]
            missing = reading.seq - meter["last_seq"] - 1
            outcome = SequenceOutcome.GAP if missing else SequenceOutcome.NEXT
        elif reading.seq < meter["last_seq"] and ts <= meter["last_ts"] and not _taken(connection, reading, meter):
            return _insert_late(connection, pending, ts, received_at, meter["epoch"])
        else:
            # Counter restarted, clock went back, or a forged reading came before: a new epoch, stored.
            outcome, epoch = SequenceOutcome.REBOOT, meter["epoch"] + 1
        inserted = _insert_reading(connection, pending, epoch, ts, received_at)
        connection.execute(
            "INSERT INTO meters (meter_id, known, client_id, site_id, first_seen, last_seen, epoch, last_seq,"
            " last_ts, last_reading_id, readings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)"
            " ON CONFLICT (meter_id) DO UPDATE SET known = excluded.known, client_id = excluded.client_id,"
            " site_id = excluded.site_id, last_seen = excluded.last_seen, epoch = excluded.epoch,"
            " last_seq = excluded.last_seq, last_ts = excluded.last_ts, last_reading_id = excluded.last_reading_id,"
            " readings = readings + 1, gaps = gaps + ?, reboots = reboots + ?",
            (
                reading.meter_id,
                int(extra.known),
                extra.client_id,
                extra.site_id,
                received_at,
                received_at,
                epoch,
                reading.seq,
                ts,
                inserted.lastrowid,
                missing,
                int(outcome is SequenceOutcome.REBOOT),
            ),
        )
        return CommitResult(outcome, pending.moles, epoch, missing, extra.real)

    # -- access for other stages ----------------------------------------------------------------------

    async def read(self, query: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``query(connection)`` on the reader thread; it sees every write committed before it starts."""
        return await self._run_reader(self._query, query)

    async def write(self, change: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``change(connection)`` on the writer thread inside one transaction (rolled back on error)."""
        return await self._run(self._change, change)

    def _change(self, function: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._connection is None:
            raise StoreClosed("the store is closed")
        with self._transaction() as connection:
            return function(connection)

    async def probe(self, now: datetime) -> None:
        """Commit one tiny write now; raise StoreClosed saying why if the store cannot commit."""
        try:
            await self.write(
                lambda connection: connection.execute(
                    "INSERT OR REPLACE INTO store_probe (id, probed_at) VALUES (1, ?)", (format_timestamp(now),)
                )
            )
        except sqlite3.Error as err:
            self.fault = f"could not commit: {err}"
            raise StoreClosed(self.fault) from err
        if self.fault is not None:
            _LOG.warning("store %s commits again after: %s", self.path, self.fault)
            self.fault = None

    # -- reading -------------------------------------------------------------------------------------

    async def latest(self, meter_id: str) -> StoredReading | None:
        """The meter's stored reading with the highest seq, or None."""
        return await self.read(lambda connection: _latest(connection, meter_id))

    async def meter_ids(self) -> list[str]:
        return await self.read(_meter_ids)

    async def summary(self) -> StoreSummary:
        return await self.read(_summary)

    # -- shipping (the sinks' durable buffer) ------------------------------------------------------------

    async def pending(self, limit: int) -> list[StoredReading]:
        """The oldest readings no sink has confirmed yet, in commit order."""
        return await self._run(self._pending, limit)

    def _pending(self, limit: int) -> list[StoredReading]:
        assert self._connection is not None
        rows = self._connection.execute(
            f"SELECT {_READING_COLUMNS} FROM readings WHERE ship_state = 0 ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [stored_reading(row) for row in rows]

    async def mark_shipped(self, reading_ids: Sequence[int], shipped_at: datetime) -> None:
        await self._run(self._mark_shipped, list(reading_ids), format_timestamp(shipped_at))

    def _mark_shipped(self, reading_ids: list[int], shipped_at: str) -> None:
        assert self._connection is not None
        with self._transaction() as connection:
            connection.executemany(
                "UPDATE readings SET ship_state = 1, shipped_at = ? WHERE id = ? AND ship_state = 0",
                [(shipped_at, reading_id) for reading_id in reading_ids],
            )

    async def dead_letter(self, letters: Sequence[DeadLetter], failed_at: datetime) -> None:
        await self._run(self._dead_letter, list(letters), format_timestamp(failed_at))

    def _dead_letter(self, letters: list[DeadLetter], failed_at: str) -> None:
        with self._transaction() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO dead_letters (reading_id, meter_id, seq, failed_at, status, reason,"
                " document) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(d.reading_id, d.meter_id, d.seq, failed_at, d.status, d.reason, d.document) for d in letters],
            )
            connection.executemany(
                "UPDATE readings SET ship_state = 2 WHERE id = ?", [(d.reading_id,) for d in letters]
            )

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self.read(lambda connection: _dead_letters(connection, limit))

    async def prune_shipped(self, shipped_before: datetime) -> int:
        """Delete readings shipped before the cutoff (the retention); return how many went."""
        return await self._run(self._prune_shipped, format_timestamp(shipped_before))

    def _prune_shipped(self, cutoff: str) -> int:
        with self._transaction() as connection:
            cursor = connection.execute("DELETE FROM readings WHERE ship_state = 1 AND shipped_at < ?", (cutoff,))
        return cursor.rowcount

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        connection = self._connection
        assert connection is not None
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")


def _insert_reading(
    connection: sqlite3.Connection, pending: _PendingReading, epoch: int, ts: str, received_at: str
) -> sqlite3.Cursor:
    reading, extra = pending.reading, pending.enrichment
    return connection.execute(
        "INSERT INTO readings (meter_id, epoch, seq, ts, received_at, pressure_bar, temperature_c, volume_l,"
        " moles, fill_pct, client_id, site_id, meter_known, compressibility_z, real_moles, mass_kg,"
        " standard_volume_m3, liquid_state, authenticated)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            reading.meter_id,
            epoch,
            reading.seq,
            ts,
            received_at,
            reading.pressure_bar,
            reading.temperature_c,
            reading.volume_l,
            pending.moles,
            extra.fill_pct,
            extra.client_id,
            extra.site_id,
            int(extra.known),
            extra.real.compressibility_z,
            extra.real.real_moles,
            extra.real.mass_kg,
            extra.real.standard_volume_m3,
            extra.real.liquid_state,
            int(extra.authenticated),
        ),
    )


def _taken(connection: sqlite3.Connection, reading: Reading, meter: sqlite3.Row) -> bool:
    """Whether the meter's current epoch already holds a reading with this seq."""
    row = connection.execute(
        "SELECT 1 FROM readings WHERE meter_id = ? AND epoch = ? AND seq = ?",
        (reading.meter_id, meter["epoch"], reading.seq),
    ).fetchone()
    return row is not None


def _insert_late(
    connection: sqlite3.Connection, pending: _PendingReading, ts: str, received_at: str, epoch: int
) -> CommitResult:
    """Store a reading that arrived after later ones, in its place; the meter's latest stays the latest."""
    _insert_reading(connection, pending, epoch, ts, received_at)
    connection.execute(
        "UPDATE meters SET last_seen = ?, readings = readings + 1, gaps = max(gaps - 1, 0) WHERE meter_id = ?",
        (received_at, pending.reading.meter_id),
    )
    return CommitResult(SequenceOutcome.LATE, pending.moles, epoch, real=pending.enrichment.real)


def _allowed_jump(last_seen: str, received_at: datetime) -> int:
    """How far a meter's seq may run ahead of its last stored one, given the time since that arrived."""
    try:
        elapsed_s = (received_at - parse_timestamp(last_seen)).total_seconds()
    except ValueError:
        elapsed_s = 0.0
    return SEQ_JUMP_SLACK + math.floor(max(0.0, elapsed_s) / MIN_READING_PERIOD_S)


def _latest(connection: sqlite3.Connection, meter_id: str) -> StoredReading | None:
    row = connection.execute(
        f"SELECT {_READING_COLUMNS} FROM readings WHERE meter_id = ? ORDER BY epoch DESC, seq DESC LIMIT 1",
        (meter_id,),
    ).fetchone()
    return stored_reading(row) if row is not None else None


def _meter_ids(connection: sqlite3.Connection) -> list[str]:
    return [row["meter_id"] for row in connection.execute("SELECT meter_id FROM meters ORDER BY meter_id")]


def _summary(connection: sqlite3.Connection) -> StoreSummary:
    """Counts and ages for the status timer (every ``status_interval_s``, while readings arrive).

    The counts walk an index (count(*) has no shortcut in SQLite); the newest and oldest pending readings
    are found by ``id``, the commit order, in one step each: ``max(received_at)`` and the pending
    readings' ``min(received_at)`` read every row of the table (measured: 53 ms every interval at 72,000
    readings, 17 ms this way; ``test_store.py`` counts SQLite's steps). Received times follow the commit
    order unless the consumer's clock is stepped back.
    """
    (readings,) = connection.execute("SELECT count(*) FROM readings").fetchone()
    newest = connection.execute("SELECT received_at FROM readings ORDER BY id DESC LIMIT 1").fetchone()
    (meters,) = connection.execute("SELECT count(*) FROM meters").fetchone()
    (pending,) = connection.execute("SELECT count(*) FROM readings WHERE ship_state = 0").fetchone()
    oldest = connection.execute("SELECT received_at FROM readings WHERE ship_state = 0 ORDER BY id LIMIT 1").fetchone()
    (dead,) = connection.execute("SELECT count(*) FROM dead_letters").fetchone()
    return StoreSummary(
        readings,
        meters,
        newest[0] if newest is not None else None,
        pending,
        oldest[0] if oldest is not None else None,
        dead,
    )


def _dead_letters(connection: sqlite3.Connection, limit: int) -> list[DeadLetter]:
    rows = connection.execute(
        "SELECT reading_id, meter_id, seq, status, reason, document FROM dead_letters ORDER BY reading_id LIMIT ?",
        (limit,),
    ).fetchall()
    return [DeadLetter(**dict(row)) for row in rows]
