"""Unit tests of the bottle model: reproducibility, gas drawn, swaps, temperature, physics, wire format."""

import itertools
import json
import math
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import WIRE_FORMAT_DIR
from smartgas_publisher import model
from smartgas_publisher.model import BottleModel, amount_mol, draw_weight_hours, pressure_bar

START = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)


def readings(meter_id: str, seed: int, steps: int, step: timedelta, start: datetime = START) -> list[dict]:
    bottle = BottleModel(meter_id, seed)
    return [bottle.next_reading(start + i * step).to_dict() for i in range(steps)]


# ---- reproducibility


def test_same_seed_same_readings() -> None:
    first = readings("bottle-0001", 7, 200, timedelta(minutes=17))
    again = readings("bottle-0001", 7, 200, timedelta(minutes=17))
    assert first == again


def test_different_seed_or_meter_gives_different_readings() -> None:
    base = readings("bottle-0001", 7, 50, timedelta(minutes=10))
    assert readings("bottle-0001", 8, 50, timedelta(minutes=10)) != base
    assert readings("bottle-0002", 7, 50, timedelta(minutes=10)) != base


def test_seq_counts_from_zero_and_volume_is_a_real_bottle_size() -> None:
    produced = readings("site3.b12", 0, 30, timedelta(hours=1))
    assert [r["seq"] for r in produced] == list(range(30))
    volumes = {r["volume_l"] for r in produced}
    assert len(volumes) == 1
    assert volumes <= set(model.BOTTLE_VOLUMES_L)


def test_fleet_of_bottles_uses_several_sizes_and_fill_pressures() -> None:
    bottles = [BottleModel(f"bottle-{i:04d}", 0) for i in range(1, 101)]
    assert {b.volume_l for b in bottles} == set(model.BOTTLE_VOLUMES_L)
    assert {b.fill_pressure_bar for b in bottles} == set(model.FILL_PRESSURES_BAR)


# ---- gas drawn, bottle swapped


def test_gas_is_drawn_in_the_day_and_not_at_night() -> None:
    bottle = BottleModel("bottle-0001", 3)
    bottle.next_reading(START)  # 00:00
    night_start = bottle.amount_mol
    bottle.next_reading(START + timedelta(hours=5))  # 05:00: the profile is idle until then
    assert bottle.amount_mol == night_start
    bottle.next_reading(START + timedelta(hours=9))  # the morning peak
    assert bottle.amount_mol < night_start


def test_pressure_falls_as_gas_is_drawn() -> None:
    # Same time of day, so the same temperature (up to noise); a day's draw is 16 % to 43 % of a bottle.
    bottle = BottleModel("bottle-0005", 11)
    first = bottle.next_reading(START + timedelta(hours=4))
    amount_before = bottle.amount_mol
    second = bottle.next_reading(START + timedelta(days=1, hours=4))
    assert bottle.swaps == 0
    assert bottle.amount_mol < amount_before
    assert second.pressure_bar < first.pressure_bar * 0.9


def test_nearly_empty_bottle_is_swapped_for_a_full_one() -> None:
    bottle = BottleModel("bottle-0001", 0)
    produced = [bottle.next_reading(START + timedelta(hours=h)) for h in range(24 * 30)]
    assert bottle.swaps >= 3  # 30 days at 2 to 6 days a bottle
    fills = [amount_mol(r.pressure_bar, r.temperature_c, r.volume_l) / bottle.full_amount_mol for r in produced]
    assert min(fills) >= model.SWAP_BELOW_FILL_FRACTION * (1 - 1e-6)
    assert min(fills) < model.SWAP_BELOW_FILL_FRACTION + 0.05  # nearly empty before the swap, not earlier
    pressures = [r.pressure_bar for r in produced]
    jumps = [(a, b) for a, b in itertools.pairwise(pressures) if b - a > 50]
    assert len(jumps) == bottle.swaps
    for _, after in jumps:
        # a fresh bottle: its nominal fill pressure, give or take the temperature's effect
        assert after == pytest.approx(bottle.fill_pressure_bar, rel=0.12)


def test_draw_profile_integrates_to_its_daily_total() -> None:
    daily_total = sum(model.HOURLY_DRAW_WEIGHTS)
    assert draw_weight_hours(START, START + timedelta(days=1)) == pytest.approx(daily_total)
    assert draw_weight_hours(START, START + timedelta(days=3, hours=7)) == pytest.approx(
        3 * sum(model.HOURLY_DRAW_WEIGHTS) + sum(model.HOURLY_DRAW_WEIGHTS[:7])
    )
    assert draw_weight_hours(START + timedelta(hours=1), START) == 0.0


@given(
    a=st.integers(min_value=0, max_value=10 * 86400),
    b=st.integers(min_value=0, max_value=10 * 86400),
)
def test_draw_profile_is_additive(a: int, b: int) -> None:
    first, second = sorted((a, b))
    t0, t1, t2 = START, START + timedelta(seconds=first), START + timedelta(seconds=second)
    assert draw_weight_hours(t0, t2) == pytest.approx(draw_weight_hours(t0, t1) + draw_weight_hours(t1, t2))


# ---- temperature


def test_temperature_follows_a_daily_cycle() -> None:
    bottle = BottleModel("bottle-0001", 0)
    cold, warm = [], []
    for day in range(10):
        cold.append(bottle.next_reading(START + timedelta(days=day, hours=4)).temperature_c)
        warm.append(bottle.next_reading(START + timedelta(days=day, hours=16)).temperature_c)
    swing = sum(warm) / len(warm) - sum(cold) / len(cold)
    assert swing == pytest.approx(2 * model.DAILY_AMPLITUDE_C, abs=1.0)
    mean = (sum(warm) + sum(cold)) / (len(warm) + len(cold))
    assert abs(mean - model.MEAN_TEMPERATURE_C) <= model.SITE_OFFSET_C + 0.5


def test_reported_pressure_is_the_gas_law_at_the_reported_temperature() -> None:
    bottle = BottleModel("bottle-0042", 5)
    for hour in range(0, 48, 5):
        reading = bottle.next_reading(START + timedelta(hours=hour))
        expected = pressure_bar(bottle.amount_mol, reading.temperature_c, reading.volume_l)
        assert reading.pressure_bar == pytest.approx(expected, abs=0.15)  # rounding and sensor noise


# ---- time stamps


def test_timestamp_is_utc_with_z_to_the_millisecond() -> None:
    bottle = BottleModel("bottle-0001", 0)
    local = datetime(2026, 11, 23, 9, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    assert bottle.next_reading(local).ts == "2026-11-23T07:30:15.123Z"


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        BottleModel("bottle-0001", 0).next_reading(datetime(2026, 11, 23, 8, 0))


def test_clock_stepping_back_draws_nothing() -> None:
    bottle = BottleModel("bottle-0001", 0)
    bottle.next_reading(START + timedelta(hours=9))
    amount = bottle.amount_mol
    bottle.next_reading(START + timedelta(hours=8))
    assert bottle.amount_mol == amount


# ---- the wire format


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(min_value=-(2**63), max_value=2**63),
    number=st.integers(min_value=1, max_value=99999),
    start=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
    steps_s=st.lists(st.floats(min_value=0.001, max_value=3 * 86400), min_size=1, max_size=40),
)
def test_every_reading_matches_the_wire_schema(
    reading_validator, seed: int, number: int, start: datetime, steps_s: list[float]
) -> None:
    bottle = BottleModel(f"bottle-{number:04d}", seed)
    moment = start
    for step_s in steps_s:
        moment += timedelta(seconds=step_s)
        body = json.loads(json.dumps(bottle.next_reading(moment).to_dict()))
        reading_validator.validate(body)


def test_schema_validator_checks_what_the_consumer_checks(reading_validator) -> None:
    # The validator used above must be able to fail: the date-time format is checked, not just the pattern.
    good = {
        "seq": 0,
        "ts": "2026-11-23T08:00:00Z",
        "pressure_bar": 1.0,
        "temperature_c": 1.0,
        "volume_l": 1.0,
    }
    assert reading_validator.is_valid(good)
    assert not reading_validator.is_valid({**good, "ts": "2026-02-30T08:00:00Z"})
    assert not reading_validator.is_valid({**good, "presure_bar": 1.0})
    assert not reading_validator.is_valid({**good, "volume_l": 0})


# ---- physics


def test_physics_agrees_with_the_wire_format_example() -> None:
    reading = json.loads((WIRE_FORMAT_DIR / "examples" / "reading-250bar.json").read_text())
    response = json.loads((WIRE_FORMAT_DIR / "examples" / "response-250bar.json").read_text())
    n = amount_mol(reading["pressure_bar"], reading["temperature_c"], reading["volume_l"])
    assert n == pytest.approx(response["moles"], abs=1e-4)
    assert pressure_bar(response["moles"], reading["temperature_c"], reading["volume_l"]) == pytest.approx(
        reading["pressure_bar"], abs=1e-3
    )


amounts = st.floats(min_value=0.0, max_value=1e5)
temperatures = st.floats(min_value=-270.0, max_value=1000.0)
volumes = st.floats(min_value=0.01, max_value=1e4)


@given(n=amounts, t=temperatures, v=volumes)
def test_amount_and_pressure_are_inverse(n: float, t: float, v: float) -> None:
    assert amount_mol(pressure_bar(n, t, v), t, v) == pytest.approx(n, rel=1e-9, abs=1e-9)


@given(n=amounts, t=temperatures, v=volumes, factor=st.floats(min_value=0.01, max_value=100))
def test_pressure_is_proportional_to_amount_and_inverse_to_volume(n: float, t: float, v: float, factor: float) -> None:
    p = pressure_bar(n, t, v)
    assert pressure_bar(n * factor, t, v) == pytest.approx(p * factor, rel=1e-9, abs=1e-12)
    assert pressure_bar(n, t, v * factor) == pytest.approx(p / factor, rel=1e-9, abs=1e-12)


@given(n=st.floats(min_value=0.1, max_value=1e5), t=temperatures, v=volumes, warmer=st.floats(0.1, 100))
def test_pressure_rises_with_temperature_in_proportion_to_kelvin(n: float, t: float, v: float, warmer: float) -> None:
    p_cold, p_warm = pressure_bar(n, t, v), pressure_bar(n, t + warmer, v)
    assert p_warm > p_cold
    assert p_warm / p_cold == pytest.approx((t + warmer + 273.15) / (t + 273.15), rel=1e-9)
    assert math.isfinite(p_warm)
