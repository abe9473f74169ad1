"""The store against real storage faults: damaged, foreign, read-only, immutable files and a full disk.

Faults are real: bytes overwritten on disk, ``chattr +i`` (root only: it binds root too, where a chmod does
not), a directory without write permission. Tests that need ``chattr`` skip by name when it is unavailable.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from chattr import chattr, chattr_works, immutable  # noqa: F401 (chattr is a fixture)
from test_store import reading

from smartgas_consumer.store import ReadingStore, StoreClosed, StoreInUse, StoreLock, StoreUnusable

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


async def filled_store(path: Path, readings: int = 200) -> None:
    store = ReadingStore(path)
    await store.open()
    for seq in range(readings):
        await store.add(reading(seq=seq), 1.0, NOW)
    await store.close()


async def open_fails(path: Path) -> str:
    store = ReadingStore(path)
    try:
        with pytest.raises(StoreUnusable) as raised:
            await store.open()
    finally:
        await store.close()
    message = str(raised.value)
    assert "\n" not in message and str(path) in message
    return message


async def test_a_damaged_page_is_refused_at_open_naming_the_file(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    await filled_store(db)
    with sqlite3.connect(db) as connection:
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
        (root_page,) = connection.execute("SELECT rootpage FROM sqlite_master WHERE name = 'readings'").fetchone()
    with db.open("r+b") as file:  # scribble over the readings table's root page, as a bad sector would
        file.seek((root_page - 1) * page_size)
        file.write(b"\xa5" * page_size)
    message = await open_fails(db)
    assert "integrity check" in message and "restore it from a backup" in message


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    db.write_bytes(b"fleet:\n  clients: []\n" * 300)
    assert "not a SQLite store" in await open_fails(db)


async def test_a_read_only_store_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    await filled_store(db, readings=3)
    if os.geteuid() == 0:
        if not chattr_works(tmp_path):
            pytest.skip("root ignores file modes; chattr +i is unavailable here")
        with immutable(db):
            message = await open_fails(db)
    else:
        db.chmod(0o444)
        message = await open_fails(db)
    assert "writable" in message


async def test_a_directory_that_cannot_hold_the_store_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() == 0:
        if not chattr_works(tmp_path):
            pytest.skip("root ignores directory modes; chattr +i is unavailable here")
        with immutable(directory):
            message = await open_fails(directory / "s.db")
    else:
        directory.chmod(0o555)
        message = await open_fails(directory / "s.db")
    assert "directory" in message


async def test_no_memory_mapped_wal_index_is_created(tmp_path: Path) -> None:
    # A mapped -shm made immutable (or otherwise unwritable) under the process kills it with SIGBUS on the
    # next write to the mapping. The store keeps its WAL index in heap memory: no -shm file, ever.
    store = ReadingStore(tmp_path / "s.db")
    await store.open()
    try:
        await store.add(reading(seq=1), 1.0, NOW)
        assert await store.summary()
        assert not (tmp_path / "s.db-shm").exists()
    finally:
        await store.close()


@pytest.mark.usefixtures("chattr")
async def test_an_immutable_store_while_running_refuses_then_recovers(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = ReadingStore(db)
    await store.open()
    try:
        await store.add(reading(seq=0), 1.0, NOW)
        await store.probe(NOW)
        with immutable(db, db.with_name("s.db-wal")):  # every file the store has (no -shm)
            with pytest.raises(StoreClosed, match="could not commit"):
                await store.add(reading(seq=1), 1.0, NOW)
            with pytest.raises(StoreClosed):
                await store.probe(NOW)
            assert store.fault is not None and "could not commit" in store.fault
        await store.probe(NOW)  # the fault went away: commits again
        assert store.fault is None
        assert (await store.add(reading(seq=1), 1.0, NOW)).stored
    finally:
        await store.close()
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT seq FROM readings ORDER BY seq").fetchall() == [(0,), (1,)]


def test_lock_names_the_holder_and_is_released(tmp_path: Path) -> None:
    first, second = StoreLock(tmp_path / "s.db"), StoreLock(tmp_path / "s.db")
    first.acquire()
    try:
        assert second.holder() == str(os.getpid())
        with pytest.raises(StoreInUse, match=f"PID {os.getpid()}"):
            second.acquire()
    finally:
        first.release()
    assert second.holder() is None
    second.acquire()
    second.release()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs) to fill up; skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


async def test_a_full_disk_refuses_then_recovers_when_space_returns(small_disk: Path) -> None:
    db = small_disk / "s.db"
    store = ReadingStore(db)
    await store.open()
    try:
        await store.add(reading(seq=0), 1.0, NOW)
        filler = small_disk / "filler"
        with filler.open("wb", buffering=0) as file, contextlib.suppress(OSError):
            while True:  # take every byte left: ends with ENOSPC
                file.write(b"\0" * 4096)
        refused = 0
        for seq in range(1, 200):  # a few commits may still fit in pages already allocated
            try:
                await store.add(reading(seq=seq), 1.0, NOW)
            except StoreClosed as err:
                assert "full" in str(err)
                refused = seq
                break
        assert refused, "the disk never filled"
        with pytest.raises(StoreClosed):
            await store.probe(NOW)
        filler.unlink()
        await store.probe(NOW)
        assert (await store.add(reading(seq=refused), 1.0, NOW)).stored
    finally:
        await store.close()
    with sqlite3.connect(db) as connection:
        seqs = [seq for (seq,) in connection.execute("SELECT seq FROM readings ORDER BY seq")]
    assert seqs == list(range(refused + 1))  # nothing acknowledged was lost, nothing refused was kept
