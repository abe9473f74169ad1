"""The store's file: the lock naming the one consumer serving it, and what opening it may refuse.

``StoreLock`` (``<db>.lock``, ``flock``) keeps one consumer per store; ``describe_open_failure`` turns what
SQLite or the OS said into one line naming the file and the fix; ``check_existing_store`` refuses a path
that is not a SmartGas store without creating anything there (for commands that only read one). The
connections themselves are ``store.py``'s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
from pathlib import Path

from smartgas_consumer.schema import SCHEMA_VERSION

#: SQLite's VFS that keeps the WAL index in heap memory, not in a memory-mapped ``-shm`` file (no SIGBUS).
SQLITE_VFS = "unix-excl"


class StoreUnusable(Exception):
    """The store cannot be opened as it is; the one-line message names the file and the fix."""


def describe_open_failure(path: Path, err: BaseException) -> str:
    """One line for an operator: which file, what SQLite or the OS said, and what to do about it."""
    text = str(err)
    lowered = text.lower()
    if "readonly" in lowered or "read-only" in lowered or getattr(err, "errno", None) in (errno.EROFS, errno.EPERM):
        fix = "make the file and its directory writable by this user (chmod/chown, chattr -i, remount rw)"
    elif "not a database" in lowered:
        fix = "it is not a SQLite store: point --db at the consumer's store, or move this file away"
    elif "malformed" in lowered or "corrupt" in lowered:
        fix = "the file is damaged: restore it from a backup, or move it away (`sqlite3 FILE .recover` saves rows)"
    elif "locked" in lowered or "busy" in lowered:
        fix = "another process holds it: stop that process, or give this consumer its own --db"
    elif "unable to open" in lowered or isinstance(err, PermissionError):
        fix = "check that the file and its directory exist (or can be created) and are readable and writable"
    else:
        fix = "check the file, its directory and the disk"
    return f"--db {path}: {text}; {fix}"


class StoreInUse(StoreUnusable):
    """Another consumer serves this store (it holds the lock file)."""


class StoreLock:
    """``<db>.lock``: held (``flock``) by the one consumer serving the store, and holding that consumer's PID.

    SQLite's own locks cannot name the holder; this file lets a second consumer say who is in the way. The
    kernel drops the lock when the holder exits, however it exits, so a stale file never blocks a start.
    """

    def __init__(self, db: Path) -> None:
        self.db = db
        self.path = db.with_name(db.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StoreInUse naming the holder's PID (StoreUnusable if the file cannot be made)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreUnusable(
                f"--db: cannot create the lock file {self.path} ({err.strerror}): make its directory writable"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreInUse(
                f"--db {self.db}: in use by another consumer (PID {holder}); stop it, or give this one its own --db"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> str | None:
        """The PID written by the consumer holding the lock, or None if nobody holds it."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        return None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class NotAStoreError(Exception):
    """A path given as an existing store is missing or holds something else; the message names the path."""


#: The tables every SmartGas store has; a file without them is someone else's (or empty).
_STORE_TABLES = frozenset({"readings", "meters", "dead_letters"})


def check_existing_store(path: Path) -> None:
    """Refuse ``path`` unless it is a SmartGas store, without creating or changing anything there.

    For commands that only read a store (``status``): a typo in ``--db`` must not leave a new empty store
    behind and report it as if it were the consumer's.
    """
    if not path.is_file():
        raise NotAStoreError(f"{path}: no SmartGas store there (no such file)")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise NotAStoreError(f"{path}: not a SmartGas store ({err})") from err
    if version < 1 or not _STORE_TABLES <= tables:
        raise NotAStoreError(f"{path}: not a SmartGas store (no SmartGas tables in it)")
    if version > SCHEMA_VERSION:
        raise NotAStoreError(f"{path} has schema version {version}, newer than this consumer's {SCHEMA_VERSION}")
