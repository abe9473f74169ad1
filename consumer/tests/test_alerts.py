"""The alert rules, pure: hand-built stored events fed through a meter's track, as the engine feeds them."""

from __future__ import annotations

import dataclasses
import gc
import random
import tracemalloc
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from smartgas_common.gas import BUILTIN_GASES, Storage
from smartgas_consumer import physics
from smartgas_consumer.alert_rules import (
    LEAK_MIN_READINGS,
    LEAK_MIN_STEP_PERIODS,
    SENSOR_CLEAR_STEPS,
    Check,
    Fit,
    Kind,
    MeterTrack,
    Sample,
    Step,
    Verdict,
    classify_step,
    fit_points,
    judge,
)
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.fleet import Fleet, FleetMeter, full_moles, ideal_fill_pct, parse_fleet
from smartgas_consumer.intake import StoredEvent
from smartgas_consumer.reading import Reading
from smartgas_consumer.store import CommitResult, Enrichment, SequenceOutcome

CONFIG = ConsumerConfig()  # the documented default thresholds
DAY = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)  # the site works 06:00-17:00 UTC
NIGHT = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)
VOLUME_L = 50.0


def fleet(meter_ids: tuple[str, ...] = ("m1",)) -> Fleet:
    """A one-site fleet of argon bottles, ``m1`` unless other ids are given."""
    return parse_fleet(
        {
            "version": 1,
            "clients": [{"id": "acme", "name": "ACME"}],
            "sites": [
                {
                    "id": "lyon",
                    "client": "acme",
                    "name": "Lyon",
                    "latitude": 45.7,
                    "longitude": 4.8,
                    "working_hours_utc": [6, 17],
                }
            ],
            "meters": [
                {
                    "id": meter_id,
                    "site": "lyon",
                    "gas": "argon",
                    "volume_l": VOLUME_L,
                    "nominal_pressure_bar": 200,
                    "draw_mol_per_h": 3.0,
                }
                for meter_id in meter_ids
            ],
        }
    )


KNOWN = fleet().meters["m1"]


def stored_event(
    meter: FleetMeter | None,
    seq: int,
    ts: datetime,
    pressure_bar: float,
    temperature_c: float = 20.0,
    *,
    epoch: int = 0,
    meter_id: str = "m1",
) -> StoredEvent:
    """A StoredEvent as the intake makes it, from the real classes."""
    reading = Reading(meter_id, seq, ts, pressure_bar, temperature_c, VOLUME_L)
    moles = physics.moles(pressure_bar, temperature_c, VOLUME_L)
    enrichment = (
        Enrichment(meter.client_id, meter.site.site_id, ideal_fill_pct(meter, moles), True)
        if meter is not None
        else Enrichment()
    )
    outcome = SequenceOutcome.FIRST if seq == 0 else SequenceOutcome.NEXT
    return StoredEvent(reading, moles, ts, CommitResult(outcome, moles, epoch), enrichment, meter)


def pressure_for(moles: float, temperature_c: float = 20.0) -> float:
    """The pressure a bottle of VOLUME_L shows for ``moles`` at ``temperature_c`` (inverse of physics.moles)."""
    return moles / physics.moles(1.0, temperature_c, VOLUME_L)


@dataclass
class Bench:
    """One meter's readings, one every ``period`` seconds, judged by the rules as the engine judges them."""

    meter: FleetMeter | None = KNOWN
    start: datetime = DAY
    config: ConsumerConfig = CONFIG
    seq: int = 0
    epoch: int = 0
    ts: datetime | None = None
    track: MeterTrack = field(default_factory=lambda: MeterTrack("m1"))

    def read(self, pressure_bar: float, temperature_c: float = 20.0, *, after_s: float = 10.0) -> dict[Kind, Check]:
        self.ts = self.start if self.ts is None else self.ts + timedelta(seconds=after_s)
        event = stored_event(self.meter, self.seq, self.ts, pressure_bar, temperature_c, epoch=self.epoch)
        self.seq += 1
        observation = self.track.observe(Sample.of(event), self.meter, self.config)
        assert observation is not None
        return judge(observation)

    def read_moles(self, moles: float, temperature_c: float = 20.0, **kwargs: Any) -> dict[Kind, Check]:
        return self.read(pressure_for(moles, temperature_c), temperature_c, **kwargs)

    def reboot(self) -> None:
        self.epoch += 1
        self.seq = 0


def verdict(checks: dict[Kind, Check], kind: Kind) -> Verdict | None:
    check = checks.get(kind)
    return check.verdict if check is not None else None


def first_trip(results: list[dict[Kind, Check]], kind: Kind) -> int | None:
    """Index of the first reading whose verdict for ``kind`` was a trip."""
    return next((i for i, checks in enumerate(results) if verdict(checks, kind) is Verdict.TRIP), None)


# -- value thresholds, with hysteresis -----------------------------------------------------------------------


def test_over_pressure_of_a_known_meter_is_judged_against_its_nominal_pressure() -> None:
    bench = Bench()
    assert verdict(bench.read(200.0), Kind.OVER_PRESSURE) is Verdict.CLEAR
    tripped = bench.read(221.0)  # 110 % of 200 bar is 220 bar
    assert verdict(tripped, Kind.OVER_PRESSURE) is Verdict.TRIP
    assert tripped[Kind.OVER_PRESSURE].value == 221.0
    assert "220.0 bar" in tripped[Kind.OVER_PRESSURE].message
    assert verdict(bench.read(217.0), Kind.OVER_PRESSURE) is None  # inside the 5 bar hysteresis: no change
    assert verdict(bench.read(215.0), Kind.OVER_PRESSURE) is Verdict.CLEAR


def test_over_pressure_of_an_unknown_meter_uses_the_absolute_limit() -> None:
    bench = Bench(meter=None)
    assert verdict(bench.read(300.0), Kind.OVER_PRESSURE) is Verdict.CLEAR  # over 110 % of 200, under 330
    assert verdict(bench.read(331.0), Kind.OVER_PRESSURE) is Verdict.TRIP


def test_over_temperature_with_hysteresis() -> None:
    bench = Bench()
    assert verdict(bench.read(150.0, 56.0), Kind.OVER_TEMPERATURE) is Verdict.TRIP
    assert verdict(bench.read(150.0, 54.0), Kind.OVER_TEMPERATURE) is None
    assert verdict(bench.read(150.0, 53.0), Kind.OVER_TEMPERATURE) is Verdict.CLEAR


def test_low_content_with_hysteresis_and_only_for_known_meters() -> None:
    bench = Bench()
    full = full_moles(KNOWN)
    assert verdict(bench.read_moles(0.09 * full), Kind.LOW_CONTENT) is Verdict.TRIP
    assert verdict(bench.read_moles(0.11 * full), Kind.LOW_CONTENT) is None  # above 10 %, under 12 %
    assert verdict(bench.read_moles(0.125 * full), Kind.LOW_CONTENT) is Verdict.CLEAR
    unknown = Bench(meter=None)
    assert Kind.LOW_CONTENT not in unknown.read(1.0)  # no fill % without a fleet entry


# -- leak ------------------------------------------------------------------------------------------------------


def drain(bench: Bench, moles: float, rate_mol_per_h: float, readings: int, **kwargs: Any) -> list[dict[Kind, Check]]:
    """``readings`` readings 10 s apart while the bottle loses ``rate_mol_per_h``."""
    results = []
    for _ in range(readings):
        results.append(bench.read_moles(moles, **kwargs))
        moles -= rate_mol_per_h * 10 / 3600
    return results


def fit_loss_rate(samples: list[Sample]) -> Fit | None:
    return fit_points([s.ts.timestamp() for s in samples], [s.moles for s in samples])


def test_fit_of_a_straight_loss_is_exact() -> None:
    samples = [
        Sample(0, i, DAY + timedelta(seconds=10 * i), 0.0, 20.0, 300.0 - 36.0 * i / 360, None) for i in range(10)
    ]
    fit = fit_loss_rate(samples)
    assert fit is not None
    assert fit.rate_mol_per_h == pytest.approx(36.0)
    assert fit.standard_error == pytest.approx(0.0, abs=1e-6)
    assert fit.span_h == pytest.approx(90 / 3600)
    assert fit_loss_rate(samples[:2]) is None


def test_normal_working_draw_never_looks_like_a_leak() -> None:
    """A day's draw at up to 1.2 × draw_mol_per_h with ±25 % noise per interval (as the publisher draws)."""
    rng = random.Random(7)
    bench = Bench()
    moles = 0.9 * full_moles(KNOWN)
    for _ in range(6 * 60 * 3):  # three hours
        checks = bench.read_moles(moles)
        assert verdict(checks, Kind.LEAK) is not Verdict.TRIP
        moles -= 1.2 * KNOWN.draw_mol_per_h * max(0.0, rng.gauss(1.0, 0.25)) * 10 / 3600


def test_a_leak_while_working_trips_within_a_minute_and_clears_after_it_stops() -> None:
    bench = Bench()
    moles = 0.9 * full_moles(KNOWN)
    leak = 10 * KNOWN.draw_mol_per_h  # what the publisher's leak fault adds
    results = drain(bench, moles, KNOWN.draw_mol_per_h + leak, 12)
    tripped = first_trip(results, Kind.LEAK)
    assert tripped is not None and tripped <= LEAK_MIN_READINGS  # as soon as the fit has enough readings
    check = results[-1][Kind.LEAK]
    assert check.value == pytest.approx(33.0, rel=0.01)
    assert "limit 9.00 mol/h (site working)" in check.message
    moles -= (KNOWN.draw_mol_per_h + leak) * 120 / 3600
    after = drain(bench, moles, KNOWN.draw_mol_per_h, 6 * 16)  # the leak is fixed: normal draw for 16 min
    cleared = next(i for i, checks in enumerate(after) if verdict(checks, Kind.LEAK) is Verdict.CLEAR)
    assert cleared <= 6 * 15
    assert all(verdict(checks, Kind.LEAK) is not Verdict.TRIP for checks in after[cleared:])


def test_an_idle_site_leaks_above_the_idle_limit() -> None:
    bench = Bench(start=NIGHT)
    results = drain(bench, 300.0, 1.0, 30)  # 1 mol/h at 01:00: under 3 × draw, over the 0.5 mol/h idle limit
    assert first_trip(results, Kind.LEAK) is not None
    assert "(site idle)" in results[-1][Kind.LEAK].message
    day = Bench(start=DAY)
    assert first_trip(drain(day, 300.0, 1.0, 30), Kind.LEAK) is None  # the same loss while working is use


def test_an_idle_bottle_with_sensor_noise_raises_no_leak() -> None:
    """Pressure noise of 0.02 bar makes a 10 s pair look like ±20 mol/h; the fit's margin absorbs it."""
    rng = random.Random(3)
    bench = Bench(start=NIGHT)
    for _ in range(6 * 60 * 3):
        checks = bench.read(round(150.0 + rng.gauss(0.0, 0.02), 2), round(15.0 + rng.gauss(0.0, 0.2), 2))
        assert verdict(checks, Kind.LEAK) is not Verdict.TRIP


def test_the_end_of_the_working_day_is_not_an_idle_leak() -> None:
    """At 17:00 the site stops drawing; the fit after 17:00 uses idle readings only."""
    bench = Bench(start=datetime(2026, 11, 23, 16, 40, tzinfo=UTC))
    moles = 300.0
    results = []
    for _ in range(6 * 40):
        results.append(bench.read_moles(moles))
        assert bench.ts is not None
        if bench.ts.hour < 17:
            moles -= 2.5 * KNOWN.draw_mol_per_h * 10 / 3600
    assert first_trip(results, Kind.LEAK) is None
    assert verdict(results[-1], Kind.LEAK) is Verdict.CLEAR


def test_a_swap_is_neither_a_leak_nor_a_fault_and_restarts_the_leak_window() -> None:
    bench = Bench()
    moles = 0.06 * full_moles(KNOWN)
    drain(bench, moles, KNOWN.draw_mol_per_h, 10)
    swap = bench.read_moles(full_moles(KNOWN))  # ~12 bar to ~200 bar in one reading
    assert verdict(swap, Kind.SENSOR_FAULT) is not Verdict.TRIP
    assert Kind.LEAK not in swap  # the window starts again from the new bottle
    after = drain(bench, full_moles(KNOWN), KNOWN.draw_mol_per_h, LEAK_MIN_READINGS + 2)
    assert all(Kind.LEAK not in checks for checks in after[: LEAK_MIN_READINGS - 2])
    assert verdict(after[-1], Kind.LEAK) is Verdict.CLEAR
    assert verdict(after[-1], Kind.LOW_CONTENT) is Verdict.CLEAR


def test_a_reading_closer_than_half_a_period_is_left_out_of_the_fit() -> None:
    bench = Bench()
    results = drain(bench, 300.0, KNOWN.draw_mol_per_h, 10)
    assert verdict(results[-1], Kind.LEAK) is Verdict.CLEAR
    assert Kind.LEAK not in bench.read_moles(300.0 - 91 * KNOWN.draw_mol_per_h / 3600, after_s=2.0)


# -- sensor fault ------------------------------------------------------------------------------------------------


def test_a_temperature_glitch_trips_twice_then_clears_after_steady_readings() -> None:
    """The publisher's sensor-fault: one reading 30 °C colder (the pressure follows), then normal again."""
    bench = Bench()
    moles = 300.0
    bench.read_moles(moles, 20.0)
    bench.read_moles(moles, 20.0)
    glitch = bench.read_moles(moles, -10.0)
    assert verdict(glitch, Kind.SENSOR_FAULT) is Verdict.TRIP
    assert glitch[Kind.SENSOR_FAULT].value == pytest.approx(30.0)
    assert "temperature jumped -30.0 °C in 10 s" in glitch[Kind.SENSOR_FAULT].message
    assert verdict(bench.read_moles(moles, 20.0), Kind.SENSOR_FAULT) is Verdict.TRIP  # and back
    steady = [bench.read_moles(moles, 20.0) for _ in range(SENSOR_CLEAR_STEPS)]
    assert [verdict(c, Kind.SENSOR_FAULT) for c in steady] == [None] * (SENSOR_CLEAR_STEPS - 1) + [Verdict.CLEAR]


def test_a_pressure_spike_and_drop_back_are_faults() -> None:
    bench = Bench()
    bench.read(150.0)
    spike = bench.read(260.0)  # 130 % fill: no new bottle holds that, so not a swap
    assert verdict(spike, Kind.SENSOR_FAULT) is Verdict.TRIP
    assert spike[Kind.SENSOR_FAULT].value == pytest.approx(110.0)
    assert verdict(bench.read(150.0), Kind.SENSOR_FAULT) is Verdict.TRIP


def test_a_spike_that_looks_like_a_swap_is_caught_on_the_drop_back() -> None:
    bench = Bench()
    bench.read(100.0)
    assert verdict(bench.read(180.0), Kind.SENSOR_FAULT) is None  # ~90 % full: could be a new bottle
    assert verdict(bench.read(100.0), Kind.SENSOR_FAULT) is Verdict.TRIP  # but bottles do not empty in 10 s


def test_jumps_across_a_gap_or_a_reboot_are_not_judged() -> None:
    bench = Bench()
    bench.read(150.0)
    assert verdict(bench.read(90.0, after_s=31.0), Kind.SENSOR_FAULT) is None  # more than 3 periods apart
    bench.reboot()
    assert verdict(bench.read(150.0), Kind.SENSOR_FAULT) is None  # a new epoch starts a new history


@pytest.mark.parametrize(
    ("meter", "before_bar", "after_bar", "expected"),
    [
        (KNOWN, 10.0, 200.0, Step.SWAP),  # near empty to full
        (KNOWN, 150.0, 195.0, Step.SWAP),  # an early swap: 97 % full
        (KNOWN, 150.0, 260.0, Step.JUMP),  # 130 %: over-filled or a faulty sensor
        (KNOWN, 150.0, 90.0, Step.JUMP),  # gas does not go that fast
        (KNOWN, 150.0, 160.0, Step.STEADY),
        (None, 10.0, 300.0, Step.SWAP),  # unknown meter: a rise that stays under 330 bar
        (None, 10.0, 340.0, Step.JUMP),
    ],
)
def test_classify_step(meter: FleetMeter | None, before_bar: float, after_bar: float, expected: Step) -> None:
    before = Sample.of(stored_event(meter, 1, DAY, before_bar))
    after = Sample.of(stored_event(meter, 2, DAY + timedelta(seconds=10), after_bar))
    assert classify_step(before, after, meter, CONFIG) is expected


def test_an_older_reading_is_not_judged() -> None:
    track = MeterTrack("m1")
    assert track.observe(Sample.of(stored_event(KNOWN, 5, DAY, 150.0)), KNOWN, CONFIG) is not None
    assert track.observe(Sample.of(stored_event(KNOWN, 4, DAY, 150.0)), KNOWN, CONFIG) is None


# -- memory: what a meter's track holds is bounded by the rules' windows, whatever its rate or age ---------


def steady_track(meter: FleetMeter | None, readings: int, period_s: float) -> MeterTrack:
    """A meter's track after ``readings`` steady readings ``period_s`` apart, fed as the engine feeds it."""
    track = MeterTrack("m1")
    for seq in range(readings):
        event = stored_event(meter, seq, DAY + timedelta(seconds=period_s * seq), 150.0)
        track.observe(Sample.of(event), meter, CONFIG)
    return track


@pytest.mark.parametrize(("period_s", "most"), [(10.0, 91), (1.0, 181), (0.1, 181)])
def test_the_leak_window_holds_what_its_15_minutes_allow_however_fast_or_long_a_meter_sends(
    period_s: float, most: int
) -> None:
    """LEAK_WINDOW over LEAK_MIN_STEP_PERIODS × expected_period_s (5 s): 180 points at most, plus the one
    taken on the window's edge; 91 for a meter that sends every 10 s. Two hours of readings, not 15 minutes."""
    readings = int(2 * 3600 / period_s)
    track = steady_track(KNOWN, readings, period_s)
    assert most - 1 <= len(track.window) <= most
    assert len(track.recent) == SENSOR_CLEAR_STEPS + 1
    spacing_s = [later - earlier for earlier, later in zip(track.window.ts_s, track.window.ts_s[1:], strict=False)]
    assert min(spacing_s) >= LEAK_MIN_STEP_PERIODS * CONFIG.expected_period_s


def test_a_meter_without_a_leak_rule_keeps_no_leak_window() -> None:
    """An unknown meter (no draw, no site) and a liquefied gas are never judged for leaks: no points held."""
    assert len(steady_track(None, 2000, 10.0).window) == 0
    propane = dataclasses.replace(KNOWN, gas=BUILTIN_GASES["propane"])
    assert propane.gas.storage is Storage.LIQUEFIED
    assert len(steady_track(propane, 2000, 10.0).window) == 0


def test_a_meter_s_track_with_a_full_leak_window_takes_under_8_kb() -> None:
    """A meter that sends every second, measured by tracemalloc: 180 points in the window and the last
    four readings, under 8 KB (80 MB for 10,000 meters); a ``Sample`` per point took 46 KB a meter."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        track = steady_track(KNOWN, 3600, 1.0)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(track.window) >= 180
    assert held < 8_000


def test_a_meter_s_track_gives_the_garbage_collector_a_handful_of_objects_to_walk() -> None:
    """A full collection walks every tracked object: the flat window adds none per reading, where a
    ``Sample`` per point made 1,000 meters' windows 183,000 objects (a 25 ms full collection, 0.4 ms now)."""
    steady_track(KNOWN, 100, 1.0)  # anything made once, on first use, is made now
    gc.collect()
    before = len(gc.get_objects())
    track = steady_track(KNOWN, 3600, 1.0)
    gc.collect()
    assert len(track.window) >= 180
    assert len(gc.get_objects()) - before <= 12
