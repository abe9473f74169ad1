"""The forecast, pure: simulated consumption with a known answer, noise, idle hours, swaps, liquefied gases."""

from __future__ import annotations

import dataclasses
import random
import tracemalloc
from datetime import UTC, datetime, timedelta

import pytest

from smartgas_common.content import LiquidState
from smartgas_consumer.fleet import Fleet, FleetMeter, parse_fleet
from smartgas_consumer.forecast import (
    MAX_POINTS,
    Basis,
    ContentSeries,
    forecast,
    working_hours_between,
    working_hours_per_day,
)

START = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)  # a Monday, midnight UTC; the site works 06:00-17:00
FULL_MOL = 450.0
RESERVE_PCT = 10.0


def fleet() -> Fleet:
    return parse_fleet(
        {
            "version": 1,
            "clients": [{"id": "c1", "name": "C1"}],
            "sites": [
                {
                    "id": "s1",
                    "client": "c1",
                    "name": "S1",
                    "latitude": 45.0,
                    "longitude": 4.0,
                    "working_hours_utc": [6, 17],
                }
            ],
            "meters": [
                {
                    "id": "m1",
                    "site": "s1",
                    "gas": "argon",
                    "volume_l": 50,
                    "nominal_pressure_bar": 200,
                    "draw_mol_per_h": 3.0,
                },
                {
                    "id": "co2",
                    "site": "s1",
                    "gas": "co2",
                    "volume_l": 13.4,
                    "nominal_pressure_bar": 150,
                    "draw_mol_per_h": 1.5,
                },
            ],
        }
    )


METER: FleetMeter = fleet().meters["m1"]


def simulate(
    rate_mol_per_working_h: float,
    *,
    days: float = 3.0,
    period: timedelta = timedelta(minutes=5),
    noise_mol: float = 0.0,
    outlier_fraction: float = 0.0,
    start_mol: float = 420.0,
    seed: int = 7,
) -> tuple[ContentSeries, datetime, float]:
    """A bottle drawn at a steady rate in the site's working hours and not at all outside them, read every
    ``period`` day and night, with Gaussian sensor noise and some wild readings: the series, the last
    reading's time and its true content."""
    rng = random.Random(seed)
    series = ContentSeries()
    site = METER.site
    content = start_mol
    ts = START
    end = START + timedelta(days=days)
    previous = ts
    while ts <= end:
        content -= rate_mol_per_working_h * working_hours_between(site, previous, ts)
        measured = content + rng.gauss(0.0, noise_mol)
        if rng.random() < outlier_fraction:
            measured += rng.choice((-1, 1)) * rng.uniform(5.0, 30.0)
        series.add(site, ts, measured)
        previous, ts = ts, ts + period
    return series, previous, content


def days_left(series: ContentSeries, ts: datetime, content_mol: float) -> float:
    result = forecast(
        METER,
        series,
        ts=ts,
        content_mol=content_mol,
        fill_pct=100.0 * content_mol / FULL_MOL,
        liquid_state=None,
        reserve_fill_pct=RESERVE_PCT,
    )
    assert result.basis is Basis.MEASURED, result.note
    assert result.days_to_empty is not None
    return result.days_to_empty


def known_days(content_mol: float, rate_mol_per_working_h: float) -> float:
    """The answer: what is left above the reserve over the daily draw (11 working hours a day)."""
    return (content_mol - FULL_MOL * RESERVE_PCT / 100.0) / (rate_mol_per_working_h * 11)


def test_working_clock_counts_only_the_sites_hours() -> None:
    site = METER.site
    assert working_hours_per_day(site) == 11
    assert working_hours_between(site, START, START + timedelta(days=1)) == pytest.approx(11.0)
    assert working_hours_between(site, START + timedelta(hours=16, minutes=30), START + timedelta(hours=18)) == (
        pytest.approx(0.5)
    )
    # A long silence counts whole days, then the rest hour by hour.
    assert working_hours_between(site, START, START + timedelta(days=10, hours=7)) == pytest.approx(111.0)


@pytest.mark.parametrize("hours", [(6, 17), (22, 6), (0, 24), (15, 23), (5, 5)])
def test_working_clock_agrees_with_the_sites_own_rule_minute_by_minute(hours: tuple[int, int]) -> None:
    site = dataclasses.replace(METER.site, working_hours_utc=hours)
    rng = random.Random(hash(hours))
    assert working_hours_per_day(site) == sum(site.is_working(hour) for hour in range(24))
    for _ in range(20):
        start = START + timedelta(minutes=rng.randrange(0, 3 * 24 * 60))
        end = start + timedelta(minutes=rng.randrange(0, 3 * 24 * 60))
        by_minute = sum(
            site.is_working((start + timedelta(minutes=m)).hour)
            for m in range(int((end - start).total_seconds() // 60))
        )
        assert working_hours_between(site, start, end) == pytest.approx(by_minute / 60.0), (start, end)


@pytest.mark.parametrize("rate", [1.0, 3.0, 6.0])
def test_days_to_empty_of_a_steady_draw_is_the_known_answer(rate: float) -> None:
    series, ts, content = simulate(rate)
    assert days_left(series, ts, content) == pytest.approx(known_days(content, rate), rel=0.02)


def test_sensor_noise_and_wild_readings_stay_within_ten_percent() -> None:
    # 0.5 mol of noise (a 0.3 °C temperature error at 200 bar) and one reading in ten off by 5-30 mol.
    for seed in range(5):
        series, ts, content = simulate(3.0, noise_mol=0.5, outlier_fraction=0.1, seed=seed)
        assert days_left(series, ts, content) == pytest.approx(known_days(content, 3.0), rel=0.10), seed


def test_idle_hours_do_not_dilute_the_rate() -> None:
    """Read every 5 minutes day and night, or only while the site works: the same forecast."""
    series, ts, content = simulate(3.0, noise_mol=0.3)
    only_working = ContentSeries()
    for working_h, content_mol in zip(series.working_h, series.content_mol, strict=True):
        only_working.working_h.append(working_h)
        only_working.content_mol.append(content_mol)
    assert len(series.working_h) < 3 * 24 * 12 * 0.5  # the idle readings added no point
    both = days_left(series, ts, content), days_left(only_working, ts, content)
    assert both[0] == pytest.approx(both[1], rel=0.01)
    assert both[0] == pytest.approx(known_days(content, 3.0), rel=0.10)
    # A least-squares line over calendar time, idle nights included, would say 11/24 of the rate.
    calendar_rate = (420.0 - content) / ((ts - START).total_seconds() / 3600.0)
    assert calendar_rate < 0.5 * 3.0


def test_a_long_life_is_thinned_and_still_right() -> None:
    series, ts, content = simulate(2.0, days=14.0, period=timedelta(minutes=1), noise_mol=0.5)
    assert len(series.working_h) <= MAX_POINTS
    assert days_left(series, ts, content) == pytest.approx(known_days(content, 2.0), rel=0.10)


def test_until_the_fit_is_confident_the_declared_draw_stands_in() -> None:
    series = ContentSeries()
    ts = START + timedelta(hours=8)
    for step in range(4):
        series.add(METER.site, ts + timedelta(seconds=2 * step), 400.0)
    result = forecast(
        METER, series, ts=ts, content_mol=400.0, fill_pct=88.9, liquid_state=None, reserve_fill_pct=RESERVE_PCT
    )
    assert result.basis is Basis.DECLARED and "learning" in result.note
    assert result.consumption_mol_per_day == pytest.approx(3.0 * 11)
    assert result.days_to_empty == pytest.approx((400.0 - 400.0 / 88.9 * 100 * 0.1) / 33.0)


def test_after_a_swap_the_series_starts_again() -> None:
    series, _ts, _content = simulate(3.0)
    series.restart()
    assert len(series.working_h) == 0 and series.fit() is None


def test_below_the_reserve_is_zero_days() -> None:
    series, ts, _content = simulate(3.0)
    result = forecast(
        METER, series, ts=ts, content_mol=30.0, fill_pct=30.0 / FULL_MOL * 100, liquid_state=None, reserve_fill_pct=10
    )
    assert result.days_to_empty == 0.0


def test_a_liquefied_bottle_gets_its_state_not_days() -> None:
    co2 = fleet().meters["co2"]
    result = forecast(
        co2, None, ts=START, content_mol=50.0, fill_pct=None, liquid_state="present", reserve_fill_pct=RESERVE_PCT
    )
    assert result.days_to_empty is None and result.basis is None
    assert "liquefied" in result.note and "present" in result.note


@pytest.mark.parametrize(
    ("state", "words"),
    [
        (LiquidState.LIQUID_PRESENT, "(liquid present)"),
        (LiquidState.LIQUID_EXHAUSTED, "(liquid exhausted)"),
        (LiquidState.OVER_PRESSURE, "(over pressure)"),
        (LiquidState.SUPERCRITICAL, "(supercritical)"),
    ],
)
def test_a_liquefied_bottles_note_names_its_state_in_words(state: LiquidState, words: str) -> None:
    """The note is the dashboard's tooltip: it read "(liquid liquid_present)" with the state's real values."""
    co2 = fleet().meters["co2"]
    result = forecast(co2, None, ts=START, content_mol=50.0, fill_pct=None, liquid_state=state, reserve_fill_pct=10)
    assert words in result.note, result.note
    assert "_" not in result.note and "liquid liquid" not in result.note


def test_an_unknown_meter_gets_no_figure() -> None:
    result = forecast(
        None, None, ts=START, content_mol=50.0, fill_pct=None, liquid_state=None, reserve_fill_pct=RESERVE_PCT
    )
    assert result.days_to_empty is None and "fleet file" in result.note


@pytest.mark.parametrize("seed", range(3))
def test_a_meter_read_every_2_s_is_measured_within_30_working_minutes(seed: int) -> None:
    """As make run's simulated fleet: 3 mol/h drawn, 0.3 mol of noise (0.2 °C at 200 bar), a reading every 2 s."""
    rng = random.Random(seed)
    series = ContentSeries()
    content = 400.0
    ts = START + timedelta(hours=8)
    for _ in range(30 * 30):
        content -= 3.0 * 2 / 3600
        series.add(METER.site, ts, content + rng.gauss(0.0, 0.3))
        result = forecast(
            METER,
            series,
            ts=ts,
            content_mol=content,
            fill_pct=100.0 * content / FULL_MOL,
            liquid_state=None,
            reserve_fill_pct=RESERVE_PCT,
        )
        if result.basis is Basis.MEASURED:
            break
        ts += timedelta(seconds=2)
    assert result.basis is Basis.MEASURED, result.note
    assert result.days_to_empty == pytest.approx(known_days(content, 3.0), rel=0.10)


def test_a_meter_s_series_holds_max_points_in_under_3_kb_however_long_it_runs() -> None:
    """A week of readings every 10 s in working hours: at most MAX_POINTS points, measured by tracemalloc
    under 3 KB (the points as Python floats in lists took ~8 KB a meter)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        series, _ts, _content = simulate(2.0, days=7.0, period=timedelta(seconds=10), noise_mol=0.5)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert MAX_POINTS // 2 <= len(series.working_h) <= MAX_POINTS
    assert held < 3_000
