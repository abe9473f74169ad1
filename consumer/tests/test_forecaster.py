"""The forecaster on a real SQLite store, fed by the real intake with the real-gas physics: refills, restart."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_alerts import VOLUME_L, fleet

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.fleet import Fleet
from smartgas_consumer.forecast import Basis
from smartgas_consumer.forecaster import Forecaster
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.realgas import RealGasPhysics
from smartgas_consumer.store import ReadingStore

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)  # the site works 06:00-17:00 UTC
CONFIG = ConsumerConfig(expected_period_s=60.0)


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Rig:
    """A store, the intake and the forecaster, wired as the consumer wires them."""

    path: Path
    fleet: Fleet = field(default_factory=fleet)
    clock: Clock = field(default_factory=Clock)
    seq: int = -1
    store: ReadingStore | None = None
    intake: ReadingIntake | None = None
    forecaster: Forecaster | None = None

    async def open(self) -> Forecaster:
        self.store = ReadingStore(self.path)
        await self.store.open()
        physics = RealGasPhysics.build(self.fleet)
        self.intake = ReadingIntake(self.store, fleet=self.fleet, gas_physics=physics, clock=self.clock)
        self.forecaster = Forecaster(self.store, CONFIG, self.fleet, clock=self.clock)
        self.intake.on_stored.append(self.forecaster.on_stored)
        await self.forecaster.start()
        return self.forecaster

    async def close(self) -> None:
        assert self.forecaster is not None and self.store is not None
        await self.forecaster.stop()
        await self.store.close()

    async def send(self, pressure_bar: float, *, seq: int | None = None) -> None:
        """One reading a minute after the previous one (or again the one of ``seq``: a replay)."""
        assert self.intake is not None and self.forecaster is not None
        if seq is None:
            self.seq += 1
            seq = self.seq
        ts = T0 + timedelta(minutes=seq)
        self.clock.now = max(self.clock.now, ts + timedelta(milliseconds=50))
        body = {
            "seq": seq,
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "pressure_bar": pressure_bar,
            "temperature_c": 15.0,
            "volume_l": VOLUME_L,
        }
        await self.intake.accept("m1", json.dumps(body).encode(), 50)
        await self.forecaster.flush()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    running = Rig(tmp_path / "store.db")
    await running.open()
    try:
        yield running
    finally:
        await running.close()


def refill_rows(path: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT meter_id, seq FROM refills").fetchall()


async def test_a_refill_is_recorded_once_across_replays_and_restarts(rig: Rig) -> None:
    for step in range(20):  # a bottle drawn down from 60 to 50 bar
        await rig.send(60.0 - 0.5 * step)
    await rig.send(200.0)  # seq 20: a full bottle
    swap_seq = rig.seq
    await rig.send(200.0, seq=swap_seq)  # the same reading again: a replay, acknowledged, not stored
    for step in range(15):
        await rig.send(199.5 - 0.3 * step)
    assert rig.forecaster is not None
    (refill,) = await rig.forecaster.refills("m1")
    assert refill["seq"] == swap_seq and refill["ts"] == "2026-11-23T08:20:00.000000Z"
    assert refill["fill_before_pct"] < 30 < 90 < refill["fill_after_pct"]
    assert refill["content_after_mol"] > 3 * refill["content_before_mol"]
    before = rig.forecaster.forecast("m1", ts=rig.clock.now, content_mol=400.0, fill_pct=90.0, liquid_state=None)
    assert before.measured_points == 16  # the series restarted at the swap: the new bottle's readings only

    await rig.close()
    await rig.open()  # a restart: the series is rebuilt from the store, since the last refill
    for step in range(15, 20):
        await rig.send(199.5 - 0.3 * step)
    await rig.close()
    assert refill_rows(rig.path) == [("m1", swap_seq)]
    await rig.open()
    assert rig.forecaster is not None
    assert rig.forecaster.last_refill("m1") == T0 + timedelta(minutes=swap_seq)


async def test_a_steady_draw_is_measured_after_a_restart_too(rig: Rig) -> None:
    # 0.3 bar a minute from 180 bar: about 3.9 mol a minute of argon in 50 L, 234 mol per working hour.
    for _ in range(30):
        await rig.send(180.0 - 0.3 * (rig.seq + 1))
    assert rig.forecaster is not None
    measured = rig.forecaster.forecast("m1", ts=rig.clock.now, content_mol=300.0, fill_pct=70.0, liquid_state=None)
    assert measured.basis is Basis.MEASURED, measured.note
    await rig.close()
    await rig.open()
    assert rig.forecaster is not None
    again = rig.forecaster.forecast("m1", ts=rig.clock.now, content_mol=300.0, fill_pct=70.0, liquid_state=None)
    assert again.basis is Basis.MEASURED, again.note
    assert measured.consumption_mol_per_day is not None and again.consumption_mol_per_day is not None
    assert again.consumption_mol_per_day == pytest.approx(measured.consumption_mol_per_day, rel=0.10)


async def test_a_see_sawing_meter_records_at_most_one_refill_per_ten_minutes(rig: Rig) -> None:
    """A faulty (or hostile) meter jumping between 60 and 200 bar every minute: each jump up looks like a
    swap, but the table takes one per REFILL_MIN_INTERVAL, not one per reading."""
    for step in range(30):
        await rig.send(200.0 if step % 2 else 60.0)
    assert rig.forecaster is not None
    refills = await rig.forecaster.refills("m1")
    assert [refill["seq"] for refill in refills] == [1, 11, 21]
