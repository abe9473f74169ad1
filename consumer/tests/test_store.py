"""The durable store on a real SQLite file: WAL, group commit, duplicates, registry, restart."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from smartgas_consumer.reading import Reading
from smartgas_consumer.realgas import RealGas
from smartgas_consumer.store import (
    CANONICAL_TIMESTAMP,
    MIGRATIONS,
    REAL_GAS_COLUMNS,
    SCHEMA_VERSION,
    SEQ_JUMP_SLACK,
    Enrichment,
    ReadingRefused,
    ReadingStore,
    SequenceOutcome,
    StoreClosed,
    StoreUnusable,
    format_timestamp,
    parse_timestamp,
)

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
_T = TypeVar("_T")


def reading(meter_id: str = "m1", seq: int = 0, pressure_bar: float = 200.0) -> Reading:
    return Reading(meter_id, seq, T0 + timedelta(seconds=10 * seq), pressure_bar, 20.0, 50.0)


async def open_store(path: Path, **kwargs: float) -> ReadingStore:
    store = ReadingStore(path, **kwargs)  # type: ignore[arg-type]
    await store.open()
    return store


async def test_wal_mode_and_full_sync(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6


async def test_add_then_read_back(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    try:
        result = await store.add(reading(seq=3), 410.5, T0)
        assert result.stored and result.moles == 410.5
        latest = await store.latest("m1")
        assert latest is not None
        assert (latest.seq, latest.moles, latest.ts) == (3, 410.5, "2026-11-23T08:00:30.000000Z")
        assert latest.received_at == "2026-11-23T08:00:00.000000Z"
        assert await store.latest("nobody") is None
    finally:
        await store.close()


async def test_resend_is_stored_once_and_answers_first_moles(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    try:
        first = await store.add(reading(seq=1), 100.0, T0)
        again = await store.add(reading(seq=1, pressure_bar=999.0), 999.0, T0)
        assert first.stored and not again.stored
        assert again.moles == 100.0
        summary = await store.summary()
        assert summary.readings == 1
    finally:
        await store.close()


async def test_concurrent_adds_share_commits_and_all_land(tmp_path: Path) -> None:
    commits: list[int] = []
    store = ReadingStore(tmp_path / "s.db", group_window_s=0.005, on_commit=lambda rows, _: commits.append(rows))
    await store.open()
    try:
        results = await asyncio.gather(*(store.add(reading(f"m{i % 7}", i), float(i), T0) for i in range(300)))
        assert all(r.stored for r in results)
        assert sum(commits) == 300
        assert len(commits) < 300  # readings were grouped, not one transaction each
        assert (await store.summary()).readings == 300
    finally:
        await store.close()


async def test_same_seq_twice_in_one_group(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", group_window_s=0.01)
    try:
        a, b = await asyncio.gather(store.add(reading(seq=5), 1.0, T0), store.add(reading(seq=5), 1.0, T0))
        assert sorted([a.stored, b.stored]) == [False, True]
    finally:
        await store.close()


async def test_registry_tracks_first_last_seq_and_gaps(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    try:
        results = [
            await store.add(reading(seq=0), 1.0, T0),
            await store.add(reading(seq=1), 1.0, T0 + timedelta(seconds=10)),
            await store.add(reading(seq=4), 1.0, T0 + timedelta(seconds=40)),  # 2 and 3 never came
            await store.add(reading("m2", 0), 1.0, T0),
        ]
        assert [r.outcome for r in results] == [
            SequenceOutcome.FIRST,
            SequenceOutcome.NEXT,
            SequenceOutcome.GAP,
            SequenceOutcome.FIRST,
        ]
        assert results[2].missing == 2
        assert await store.meter_ids() == ["m1", "m2"]
    finally:
        await store.close()
    assert meter_row(tmp_path, "m1") == {
        "first_seen": "2026-11-23T08:00:00.000000Z",
        "last_seen": "2026-11-23T08:00:40.000000Z",
        "epoch": 0,
        "last_seq": 4,
        "readings": 3,
        "gaps": 2,
        "replays": 0,
        "reboots": 0,
    }


def meter_row(tmp_path: Path, meter_id: str) -> dict[str, object]:
    with sqlite3.connect(tmp_path / "s.db") as connection:
        connection.row_factory = sqlite3.Row
        row = connection.execute(
            "SELECT first_seen, last_seen, epoch, last_seq, readings, gaps, replays, reboots FROM meters"
            " WHERE meter_id = ?",
            (meter_id,),
        ).fetchone()
    return dict(row)


async def test_replay_of_an_older_reading_is_acknowledged_not_stored(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    try:
        await store.add(reading(seq=2), 7.0, T0)
        await store.add(reading(seq=4), 1.0, T0)
        replay = await store.add(reading(seq=2), 9.0, T0)  # seq 2 again, with its original timestamp
        assert replay.outcome is SequenceOutcome.DUPLICATE and not replay.stored
        assert replay.moles == 7.0  # the stored copy's answer
        assert (await store.summary()).readings == 2
    finally:
        await store.close()
    assert meter_row(tmp_path, "m1")["replays"] == 1


async def test_reboot_starts_a_new_epoch(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    try:
        await store.add(reading(seq=10), 1.0, T0)  # ts = T0 + 100 s
        rebooted = Reading("m1", 0, T0 + timedelta(seconds=200), 150.0, 20.0, 50.0)  # seq back to 0, clock on
        after = Reading("m1", 1, T0 + timedelta(seconds=210), 149.0, 20.0, 50.0)
        first = await store.add(rebooted, 2.0, T0)
        second = await store.add(after, 3.0, T0)
        assert (first.outcome, first.epoch) == (SequenceOutcome.REBOOT, 1)
        assert (second.outcome, second.epoch, second.missing) == (SequenceOutcome.NEXT, 1, 0)
        old_resend = await store.add(reading(seq=10), 1.0, T0)  # the old epoch's last reading, again
        assert old_resend.outcome is SequenceOutcome.DUPLICATE
        latest = await store.latest("m1")
        assert latest is not None and (latest.epoch, latest.seq) == (1, 1)
        assert (await store.summary()).readings == 3
    finally:
        await store.close()
    assert meter_row(tmp_path, "m1")["reboots"] == 1


async def test_everything_acknowledged_survives_reopen(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await asyncio.gather(*(store.add(reading(seq=i), float(i), T0) for i in range(50)))
    await store.close()
    reopened = await open_store(tmp_path / "s.db")
    try:
        assert (await reopened.summary()).readings == 50
        latest = await reopened.latest("m1")
        assert latest is not None and latest.seq == 49
    finally:
        await reopened.close()


async def test_close_commits_what_is_queued_and_refuses_more(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db", group_window_s=0.02)
    pending = [asyncio.create_task(store.add(reading(seq=i), 1.0, T0)) for i in range(20)]
    await asyncio.sleep(0)  # let them queue
    await store.close()
    assert all(task.result().stored for task in pending)
    with pytest.raises(StoreClosed):
        await store.add(reading(seq=99), 1.0, T0)
    with sqlite3.connect(tmp_path / "s.db") as connection:
        assert connection.execute("SELECT count(*) FROM readings").fetchone()[0] == 20


async def test_failed_commit_acknowledges_nobody(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    try:
        # Another writer holds the database: our commit cannot happen, and must say so, not pretend.
        blocker = sqlite3.connect(tmp_path / "s.db", timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")
        await store._run(lambda: store._connection.execute("PRAGMA busy_timeout=50"))  # fail fast
        with pytest.raises(StoreClosed, match="could not commit"):
            await store.add(reading(seq=1), 1.0, T0)
        blocker.rollback()
        blocker.close()
        assert (await store.add(reading(seq=1), 1.0, T0)).stored  # and it recovers
    finally:
        await store.close()


async def test_refuses_a_newer_schema(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "s.db") as connection:
        connection.execute("PRAGMA user_version=99")
    store = ReadingStore(tmp_path / "s.db")
    with pytest.raises(StoreUnusable, match="schema version 99"):
        await store.open()
    await store.close()


async def test_a_slow_read_does_not_hold_back_commits(tmp_path: Path) -> None:
    # Statistics and status queries run on their own read-only connection and thread: while one is still
    # running (held here on purpose), readings keep being committed and acknowledged.
    import threading

    store = await open_store(tmp_path / "s.db")
    release = threading.Event()

    def slow_query(connection: sqlite3.Connection) -> tuple[str, int]:
        count = connection.execute("SELECT count(*) FROM readings").fetchone()[0]
        assert release.wait(timeout=10), "the commit never happened while the read was open"
        return threading.current_thread().name, count

    try:
        reading_task = asyncio.create_task(store.read(slow_query))
        result = await asyncio.wait_for(store.add(reading(seq=1), 1.0, T0), timeout=5)
        assert result.stored
        release.set()
        thread, count_seen = await reading_task
        assert thread.startswith("sqlite-reader")
        assert count_seen == 0  # the read saw the store as it was when it began
        assert (await store.summary()).readings == 1
    finally:
        release.set()
        await store.close()


# -- issue 7: isolation of commits, the sequence rule against forgeries, canonical timestamps ------------


async def test_a_reading_the_database_refuses_fails_alone(tmp_path: Path) -> None:
    """NaN moles: SQLite stores NaN as NULL, which the NOT NULL column refuses (the edge now stops NaN
    earlier; the store must still keep one bad row from failing its whole group)."""
    store = await open_store(tmp_path / "s.db", group_window_s=0.05)
    try:
        results = await asyncio.gather(
            store.add(reading("m1"), 1.0, T0),
            store.add(reading("m2"), float("nan"), T0),
            store.add(reading("m3"), 3.0, T0),
            return_exceptions=True,
        )
        assert isinstance(results[1], ReadingRefused) and "NOT NULL" in str(results[1])
        assert [r.stored for r in (results[0], results[2])] == [True, True]  # type: ignore[union-attr]
        assert await store.meter_ids() == ["m1", "m3"]
        assert (await store.add(reading("m1", seq=1), 1.0, T0)).stored  # and the store goes on
    finally:
        await store.close()


async def test_a_forged_reading_costs_an_epoch_never_a_genuine_reading(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    try:
        for seq in range(3):
            await store.add(reading(seq=seq), 1.0, T0)
        forged = Reading("m1", 2**53 - 1, T0 + timedelta(days=365), 150.0, 20.0, 50.0)
        assert (await store.add(forged, 1.0, T0)).outcome is SequenceOutcome.REBOOT  # not a gap of 2^53
        results = [await store.add(reading(seq=seq), 1.0, T0 + timedelta(seconds=seq)) for seq in (3, 4, 5)]
        assert all(result.stored for result in results)
    finally:
        await store.close()
    assert meter_row(tmp_path, "m1")["gaps"] == 0


async def test_a_seq_running_ahead_of_time_starts_an_epoch(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    try:
        await store.add(reading(seq=0), 1.0, T0)
        near = await store.add(reading(seq=SEQ_JUMP_SLACK), 1.0, T0)  # within the slack: a gap
        assert (near.outcome, near.missing) == (SequenceOutcome.GAP, SEQ_JUMP_SLACK - 1)
        far = await store.add(reading(seq=3 * SEQ_JUMP_SLACK), 1.0, T0)  # beyond it, no time passed
        assert far.outcome is SequenceOutcome.REBOOT
        later = T0 + timedelta(seconds=SEQ_JUMP_SLACK)  # a long silence allows a long jump
        after_silence = await store.add(reading(seq=10 * SEQ_JUMP_SLACK), 1.0, later)
        assert after_silence.outcome is SequenceOutcome.GAP
    finally:
        await store.close()


async def test_a_late_reading_fills_its_gap(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    try:
        await store.add(reading(seq=0), 1.0, T0)
        await store.add(reading(seq=2), 1.0, T0)
        late = await store.add(reading(seq=1), 1.0, T0)
        assert (late.outcome, late.epoch, late.stored) == (SequenceOutcome.LATE, 0, True)
        latest = await store.latest("m1")
        assert latest is not None and latest.seq == 2
    finally:
        await store.close()
    assert meter_row(tmp_path, "m1")["gaps"] == 0


def test_timestamps_are_zero_padded_and_sort_as_text() -> None:
    moments = [datetime(1, 1, 1, tzinfo=UTC), datetime(999, 6, 1, tzinfo=UTC), datetime(2026, 11, 23, tzinfo=UTC)]
    texts = [format_timestamp(moment) for moment in moments]
    assert texts[1] == "0999-06-01T00:00:00.000000Z"
    assert sorted(texts) == texts and all(CANONICAL_TIMESTAMP.fullmatch(text) for text in texts)
    assert [parse_timestamp(text) for text in texts] == moments


async def test_migration_repairs_unpadded_timestamps(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.add(Reading("m1", 0, datetime(999, 6, 1, tzinfo=UTC), 150.0, 20.0, 50.0), 1.0, T0)
    await store.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:  # as version 1 wrote it (strftime's %Y)
        connection.execute("UPDATE readings SET ts = '999-06-01T00:00:00.000000Z'")
        connection.execute("UPDATE meters SET last_ts = '999-06-01T00:00:00.000000Z'")
        connection.execute("PRAGMA user_version = 1")
    reopened = await open_store(tmp_path / "s.db")
    await reopened.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:
        assert connection.execute("SELECT ts FROM readings").fetchone()[0] == "0999-06-01T00:00:00.000000Z"
        assert connection.execute("SELECT last_ts FROM meters").fetchone()[0] == "0999-06-01T00:00:00.000000Z"
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_migration_adds_the_authenticated_column_to_a_version_2_store(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.add(reading(), 1.0, T0)
    await store.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:  # as version 2 wrote it: no such column
        connection.execute("ALTER TABLE readings DROP COLUMN authenticated")
        connection.execute("PRAGMA user_version = 2")
    reopened = await open_store(tmp_path / "s.db")
    await reopened.add(reading(seq=1), 1.0, T0, Enrichment(authenticated=True))
    await reopened.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:
        assert connection.execute("SELECT seq, authenticated FROM readings ORDER BY seq").fetchall() == [(0, 0), (1, 1)]
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_migration_adds_the_refills_table_to_a_version_4_store(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.add(reading(), 1.0, T0)
    await store.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:  # as version 4 wrote it: no refills
        connection.execute("DROP TABLE refills")
        connection.execute("PRAGMA user_version = 4")
    reopened = await open_store(tmp_path / "s.db")
    await reopened.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:
        assert connection.execute("SELECT count(*) FROM refills").fetchone()[0] == 0
        assert connection.execute("SELECT count(*) FROM readings").fetchone()[0] == 1
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_migration_drops_the_meter_seq_index_of_a_version_5_store(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.add(reading(seq=0), 1.0, T0)
    await store.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:  # as version 5 wrote it: with the index
        connection.execute("CREATE INDEX readings_meter_seq ON readings (meter_id, seq)")
        connection.execute("PRAGMA user_version = 5")
    reopened = await open_store(tmp_path / "s.db")
    try:
        assert (await reopened.add(reading(seq=0), 1.0, T0)).outcome is SequenceOutcome.DUPLICATE
        assert (await reopened.add(reading(seq=1), 1.0, T0)).stored
    finally:
        await reopened.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:
        indexes = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "readings_meter_seq" not in indexes
        assert "readings_meter_ts" in indexes
        assert connection.execute("SELECT count(*) FROM readings").fetchone()[0] == 2
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_migrations_are_ordered_and_end_at_the_schema_version() -> None:
    versions = [migration.version for migration in MIGRATIONS]
    assert versions == sorted(set(versions)) and versions[-1] == SCHEMA_VERSION


async def test_migration_adds_the_real_gas_columns_and_keeps_older_readings(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "s.db")
    await store.add(Reading("m1", 0, T0, 150.0, 20.0, 50.0), 307.7, T0)
    await store.close()
    with sqlite3.connect(tmp_path / "s.db") as connection:  # back to the version-2 table, as it was written
        for column, _ in REAL_GAS_COLUMNS:
            connection.execute(f"ALTER TABLE readings DROP COLUMN {column}")
        connection.execute("PRAGMA user_version = 2")
    reopened = await open_store(tmp_path / "s.db")
    real = RealGas(1.01, 300.0, 9.6, 7.1, None, 75.0)
    later = Reading("m1", 1, T0 + timedelta(seconds=10), 149.0, 20.0, 50.0)
    await reopened.add(later, 305.6, T0, Enrichment(real=real))
    query = "SELECT seq, moles, real_moles, liquid_state FROM readings ORDER BY seq"
    rows = await reopened.read(lambda c: [tuple(row) for row in c.execute(query)])
    await reopened.close()
    # The older reading keeps its ideal moles and has no real-gas fields (not computed then); the new has them.
    assert rows == [(0, 307.7, None, None), (1, 305.6, 300.0, None)]
    with sqlite3.connect(tmp_path / "s.db") as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def sqlite_steps(
    store: ReadingStore, action: Callable[[], Awaitable[_T]], *, writer: bool = False
) -> tuple[_T, int]:
    """What ``action()`` returns, and how many SQLite virtual-machine steps it took on the store's reading
    connection (``writer``: its writing one): a cost that does not depend on the machine's speed."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0  # go on

    connection_of = store.write if writer else store.read
    await connection_of(lambda connection: connection.set_progress_handler(count, 1))
    steps[0] = 0
    try:
        result = await action()
    finally:
        await connection_of(lambda connection: connection.set_progress_handler(None, 1))
    return result, steps[0]


async def test_the_summary_is_right_and_walks_one_index_entry_per_reading(tmp_path: Path) -> None:
    """The status timer reads the summary every 10 s while readings arrive: its cost grows with the store,
    by ~3 SQLite steps a reading (two index walks for the counts). It took ~8 when the newest and oldest
    pending readings were found by max/min of ``received_at``, a walk of every row."""
    store = await open_store(tmp_path / "s.db")
    received = [T0 + timedelta(seconds=index) for index in range(2000)]
    try:
        for start in (0, 1000):
            await asyncio.gather(
                *(
                    store.add(reading(f"m{index % 50}", index // 50), 1.0, received[index])
                    for index in range(start, start + 1000)
                )
            )
            if start == 0:
                small, small_steps = await sqlite_steps(store, store.summary)
        await store.mark_shipped(range(1, 501), T0)  # ids are the commit order, from 1
        large, large_steps = await sqlite_steps(store, store.summary)
    finally:
        await store.close()
    assert (small.readings, small.pending, small.newest_received_at) == (1000, 1000, format_timestamp(received[999]))
    assert small.oldest_pending_received_at == format_timestamp(received[0])
    assert (large.readings, large.pending, large.newest_received_at) == (2000, 1500, format_timestamp(received[-1]))
    assert large.oldest_pending_received_at == format_timestamp(received[500])
    assert (large_steps - small_steps) / 1000 <= 4


async def test_storing_a_reading_costs_the_same_whatever_the_meters_history(tmp_path: Path) -> None:
    """Every reading is checked for being a re-send of one stored (same meter, seq and timestamp). That
    check walked every reading the meter had ever sent (SQLite served its ORDER BY from the (meter_id,
    epoch, seq) index): at a reading every 10 s, 8,640 more a day, each insert slower than the last. The
    cost of one more reading is counted in SQLite virtual-machine steps, after 20 and after 2,000."""
    store = await open_store(tmp_path / "s.db")

    async def steps_of_one_more(seq: int) -> int:
        result, steps = await sqlite_steps(
            store, lambda: store.add(reading("long-lived", seq), 1.0, T0 + timedelta(seconds=10 * seq)), writer=True
        )
        assert result.stored
        return steps

    try:
        await asyncio.gather(*(store.add(reading("long-lived", seq), 1.0, T0) for seq in range(20)))
        young = await steps_of_one_more(20)
        for start in range(21, 2021, 500):
            await asyncio.gather(
                *(store.add(reading("long-lived", seq), 1.0, T0) for seq in range(start, min(start + 500, 2021)))
            )
        old = await steps_of_one_more(2021)
        resent = await store.add(reading("long-lived", 1500), 1.0, T0)
    finally:
        await store.close()
    assert resent.outcome is SequenceOutcome.DUPLICATE  # the check still finds a copy deep in the history
    assert old <= young * 1.5, (young, old)
