"""Helpers for tests that run the consumer as a separate process (make run, the README's commands).

A running consumer holds its store alone (store.py: the WAL index lives in its memory), so such a test
learns how many readings it stored from its ``/metrics``, and opens the store file only once it stopped.
"""

from __future__ import annotations

import contextlib
import sqlite3
import urllib.request
from pathlib import Path


def stored_per_metrics(http_port: int) -> int:
    """Readings the consumer on ``http_port`` stored since it started (0 until it answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("smartgas_readings_stored_total "):
            return int(float(line.split()[1]))
    return 0


def stored_in_file(db: Path) -> int:
    """Readings in the store file of a consumer that has stopped (0 if there is none yet)."""
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as connection:
        count: int = connection.execute("SELECT count(*) FROM readings").fetchone()[0]
    return count
