"""Unit tests of the fleet-file simulation and of every fault, judged by the consumer's alert rules.

The rules are re-implemented here from the readings alone, as the consumer sees them (pressure,
temperature, volume, meter timestamps), with the consumer's default thresholds; the gas content is the
real-gas content the consumer computes, from the shared physics (``smartgas_common``), not the model's.
"""

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conftest import FLEET_FILE
from smartgas_common.content import build_models
from smartgas_common.gas import BUILTIN_GASES, Storage
from smartgas_publisher.fault import FAULT_BY_KIND, FAULTS, NO_FAULT, Fault, parse_injection
from smartgas_publisher.fleetfile import FleetMeter, Site, load_fleet_file
from smartgas_publisher.model import Bottle, BottleModel

FLEET = load_fleet_file(FLEET_FILE)
MONDAY = datetime(2026, 11, 23, tzinfo=UTC)

# The consumer's defaults (consumer/src/smartgas_consumer/config.py).
OVERPRESSURE_PCT = 110.0
MAX_PRESSURE_BAR = 330.0
MAX_TEMPERATURE_C = 55.0
LOW_FILL_PCT = 10.0
LEAK_FACTOR = 3.0
IDLE_DRAW_MOL_PER_H = 0.5
JUMP_BAR = 50.0
JUMP_C = 25.0

#: The bottles whose content pressure gives (the liquefied ones have tests of their own below).
COMPRESSED_METERS = [meter for meter in FLEET.meters.values() if meter.gas.storage is Storage.COMPRESSED]
LIQUEFIED_METERS = [meter for meter in FLEET.meters.values() if meter.gas.storage is Storage.LIQUEFIED]
#: The physics of every gas these tests simulate, built once.
MODELS = build_models([*FLEET.gases_in_use(), BUILTIN_GASES["nitrogen"], BUILTIN_GASES["argon"]])


def moles(reading: dict[str, Any], meter: FleetMeter) -> float:
    """The real content of the reading's bottle, as the consumer computes it."""
    model = MODELS[meter.gas.name]
    return model.content(reading["pressure_bar"], reading["temperature_c"], reading["volume_l"]).real_moles


def full_moles(meter: FleetMeter) -> float:
    return MODELS[meter.gas.name].content(meter.nominal_pressure_bar, 15.0, meter.volume_l).real_moles


def fill_pct(reading: dict[str, Any], meter: FleetMeter) -> float:
    return 100.0 * moles(reading, meter) / full_moles(meter)


def bottle(meter: FleetMeter) -> Bottle:
    return Bottle.of(meter, MODELS[meter.gas.name])


def when(reading: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(reading["ts"])


def falling_mol_per_h(before: dict[str, Any], after: dict[str, Any], meter: FleetMeter) -> float:
    """How fast the gas content fell between two readings (negative: it rose), mol/h."""
    hours = (when(after) - when(before)) / timedelta(hours=1)
    return (moles(before, meter) - moles(after, meter)) / hours


def pairs(readings: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return list(itertools.pairwise(readings))


def alerts(readings: list[dict[str, Any]], meter: FleetMeter) -> set[str]:
    """The alerts the consumer's rules raise on these consecutive readings of ``meter``, by its names."""
    raised = set()
    if any(r["pressure_bar"] > meter.nominal_pressure_bar * OVERPRESSURE_PCT / 100 for r in readings):
        raised.add("over_pressure")
    if any(r["temperature_c"] > MAX_TEMPERATURE_C for r in readings):
        raised.add("over_temperature")
    if any(fill_pct(r, meter) < LOW_FILL_PCT for r in readings):
        raised.add("low_content")
    for before, after in pairs(readings):
        rate = falling_mol_per_h(before, after, meter)
        idle = not meter.site.is_working(when(after).hour)
        if rate > LEAK_FACTOR * meter.draw_mol_per_h or (idle and rate > IDLE_DRAW_MOL_PER_H):
            raised.add("leak")
        pressure_jump = abs(after["pressure_bar"] - before["pressure_bar"])
        if pressure_jump > JUMP_BAR or abs(after["temperature_c"] - before["temperature_c"]) > JUMP_C:
            raised.add("sensor_fault")
    return raised


def simulate(
    meter: FleetMeter, fault: Fault, start: datetime, step: timedelta, count: int, seed: int = 0
) -> list[dict[str, Any]]:
    model = BottleModel(meter.meter_id, seed, bottle(meter), fault)
    return [model.next_reading(start + i * step).to_dict() for i in range(count)]


# ---- the fleet file's meters, healthy


def test_meters_report_the_bottles_of_the_file() -> None:
    for meter in COMPRESSED_METERS:
        readings = simulate(meter, NO_FAULT, MONDAY, timedelta(hours=1), 30)
        assert {r["volume_l"] for r in readings} == {meter.volume_l}
        fills = [fill_pct(r, meter) for r in readings]
        assert max(fills) <= 100.0 + 1e-6


def test_bottles_start_at_a_spread_of_fills() -> None:
    starts = [fill_pct(simulate(m, NO_FAULT, MONDAY, timedelta(hours=1), 1)[0], m) for m in COMPRESSED_METERS]
    assert all(30.0 - 1e-6 <= fill <= 100.0 + 1e-6 for fill in starts)
    assert min(starts) < 45 and max(starts) > 85
    assert len({round(fill) for fill in starts}) > 25


@pytest.mark.parametrize("start_hour", [2, 10, 19])
def test_healthy_meters_raise_no_alert_at_10_s(start_hour: int) -> None:
    # The negative control for every fault below: 3 minutes at the consumer's expected period.
    for meter in COMPRESSED_METERS:
        readings = simulate(meter, NO_FAULT, MONDAY + timedelta(hours=start_hour), timedelta(seconds=10), 18)
        assert alerts(readings, meter) == set(), meter.meter_id


def test_no_gas_is_drawn_outside_the_working_hours() -> None:
    for meter in COMPRESSED_METERS:
        readings = simulate(meter, NO_FAULT, MONDAY, timedelta(minutes=20), 3 * 72)  # three days
        drawn_idle, drawn_working = 0.0, 0.0
        for before, after in pairs(readings):
            hours = {when(before).hour, (when(after) - timedelta(microseconds=1)).hour}
            fallen = moles(before, meter) - moles(after, meter)
            if fallen < -1.0:
                continue  # the bottle was swapped
            if not any(meter.site.is_working(h) for h in hours):
                assert abs(falling_mol_per_h(before, after, meter)) < 1e-3, (meter.meter_id, before["ts"])
                drawn_idle += fallen
            elif all(meter.site.is_working(h) for h in hours):
                drawn_working += fallen
        assert abs(drawn_idle) < 1e-3
        assert drawn_working > 0


def test_a_working_day_draws_about_draw_mol_per_h() -> None:
    for meter in COMPRESSED_METERS:
        start, end = meter.site.working_hours_utc
        working_hours = end - start if start <= end else 24 - start + end
        model = BottleModel(meter.meter_id, 0, bottle(meter))
        model.next_reading(MONDAY)
        drawn = 0.0
        for day in range(1, 11):
            before = model.amount_mol
            model.next_reading(MONDAY + timedelta(days=day))
            drawn += before - model.amount_mol if model.amount_mol < before else 0.0
        swapped_days = model.swaps
        daily = drawn / (10 - swapped_days)
        assert daily == pytest.approx(meter.draw_mol_per_h * working_hours, rel=0.35), meter.meter_id


def test_a_site_working_over_midnight_draws_only_at_night() -> None:
    night_shift = Site("bakery", "acme", "Bakery", 45.0, 4.0, (22, 6))
    meter = FleetMeter("oven-1", night_shift, BUILTIN_GASES["nitrogen"], 50.0, 200.0, 3.0)
    readings = simulate(meter, NO_FAULT, MONDAY, timedelta(hours=1), 49)
    for before, after in pairs(readings):
        fallen = moles(before, meter) - moles(after, meter)
        if night_shift.is_working(when(before).hour):
            assert fallen > 0, before["ts"]
        else:
            assert abs(fallen) < 1e-4, before["ts"]


def test_a_nearly_empty_bottle_is_swapped_below_5_percent() -> None:
    workshop = next(iter(FLEET.sites.values()))
    meter = FleetMeter("greedy-1", workshop, BUILTIN_GASES["argon"], 10.0, 200.0, 2.0)  # a bottle lasts about 4 days
    model = BottleModel(meter.meter_id, 0, bottle(meter))
    fills = [fill_pct(model.next_reading(MONDAY + timedelta(hours=h)).to_dict(), meter) for h in range(24 * 40)]
    assert model.swaps >= 3
    assert min(fills) >= 5.0 - 1e-6
    assert any(f < 10 for f in fills)  # it does run low before the swap
    rises = [(a, b) for a, b in itertools.pairwise(fills) if b > a + 1]
    assert len(rises) == model.swaps and all(b == pytest.approx(100.0, abs=1e-4) for _, b in rises)


# ---- faults: each raises its own alert, and only that one, at the start of a run


@pytest.mark.parametrize("kind", [f.kind for f in FAULTS if f.kind != "offline"])
@pytest.mark.parametrize("start_hour", [2, 10])
def test_each_fault_raises_its_alert_and_no_other(kind: str, start_hour: int) -> None:
    fault = FAULT_BY_KIND[kind]
    for meter in COMPRESSED_METERS:
        readings = simulate(meter, fault, MONDAY + timedelta(hours=start_hour), timedelta(seconds=10), 6)
        assert alerts(readings, meter) == {fault.alert}, meter.meter_id
        assert alerts(readings[:3], meter) == {fault.alert}, meter.meter_id  # within 3 readings


def test_over_pressure_lasts_and_also_crosses_the_absolute_limit() -> None:
    for meter in COMPRESSED_METERS:
        readings = simulate(meter, FAULT_BY_KIND["over-pressure"], MONDAY, timedelta(hours=1), 24 * 3)
        assert min(r["pressure_bar"] for r in readings) > meter.nominal_pressure_bar * OVERPRESSURE_PCT / 100
        assert min(r["pressure_bar"] for r in readings) > MAX_PRESSURE_BAR  # for a consumer without the file
        assert min(fill_pct(r, meter) for r in readings) >= 110.0  # 113.5 % for a 300 bar nitrogen bottle


def test_over_temperature_holds_the_gas_at_65_c_and_pressure_follows() -> None:
    for meter in COMPRESSED_METERS:
        model = BottleModel(meter.meter_id, 0, bottle(meter), FAULT_BY_KIND["over-temperature"])
        for hour in range(0, 72, 3):
            reading = model.next_reading(MONDAY + timedelta(hours=hour)).to_dict()
            assert reading["temperature_c"] > MAX_TEMPERATURE_C
            assert reading["temperature_c"] == pytest.approx(65.0, abs=1.5)
            assert moles(reading, meter) == pytest.approx(model.amount_mol, rel=1e-7)


def test_low_content_stays_low_and_is_never_swapped() -> None:
    for meter in COMPRESSED_METERS:
        model = BottleModel(meter.meter_id, 0, bottle(meter), FAULT_BY_KIND["low-content"])
        readings = [model.next_reading(MONDAY + timedelta(hours=h)).to_dict() for h in range(24 * 14)]
        fills = [fill_pct(r, meter) for r in readings]
        assert 6.9 <= fills[0] <= 9.1
        assert max(fills) < LOW_FILL_PCT
        assert all(b <= a + 1e-6 for a, b in itertools.pairwise(fills))  # only ever falls
        assert model.swaps == 0


@pytest.mark.parametrize("period_s", [0.05, 1.0, 10.0, 300.0, 3600.0])
@pytest.mark.parametrize("start_hour", [3, 11, 20])
def test_a_leak_shows_in_every_pair_of_readings_at_any_period(period_s: float, start_hour: int) -> None:
    for meter in COMPRESSED_METERS:
        start = MONDAY + timedelta(hours=start_hour)
        readings = simulate(meter, FAULT_BY_KIND["leak"], start, timedelta(seconds=period_s), 3)
        for before, after in pairs(readings):
            rate = falling_mol_per_h(before, after, meter)
            if rate < -1.0:
                continue  # swapped for a full bottle (the leak goes on with the new one)
            assert rate > LEAK_FACTOR * meter.draw_mol_per_h, (meter.meter_id, rate)
            assert rate > 9 * IDLE_DRAW_MOL_PER_H  # 5 mol/h at least, idle or not, even if draw_mol_per_h is 0


def test_a_leak_loses_ten_times_the_draw_at_least_5_mol_per_h() -> None:
    leak = FAULT_BY_KIND["leak"]
    assert leak.extra_loss_mol_per_h(3.17) == pytest.approx(31.7)
    assert leak.extra_loss_mol_per_h(0.22) == pytest.approx(5.0)
    assert leak.extra_loss_mol_per_h(0.0) == pytest.approx(5.0)
    assert NO_FAULT.extra_loss_mol_per_h(3.17) == 0.0


def test_sensor_fault_is_one_jump_at_the_third_reading_and_back() -> None:
    for meter in COMPRESSED_METERS:
        readings = simulate(meter, FAULT_BY_KIND["sensor-fault"], MONDAY, timedelta(seconds=10), 8)
        jumps = [abs(b["temperature_c"] - a["temperature_c"]) for a, b in pairs(readings)]
        assert [j > JUMP_C for j in jumps] == [False, True, True, False, False, False, False]
        assert readings[2]["temperature_c"] < readings[1]["temperature_c"]
        assert max(abs(b["pressure_bar"] - a["pressure_bar"]) for a, b in pairs(readings)) < JUMP_BAR
        # The gas content is right throughout: the glitch does not look like a leak or a refill.
        assert (
            max(abs(falling_mol_per_h(a, b, meter)) for a, b in pairs(readings))
            < LEAK_FACTOR * meter.draw_mol_per_h + 1
        )


def test_offline_meters_fall_silent_after_two_readings() -> None:
    meter = list(COMPRESSED_METERS)[2]
    assert BottleModel(meter.meter_id, 0, bottle(meter), FAULT_BY_KIND["offline"]).silent_after == 2
    assert BottleModel(meter.meter_id, 0, bottle(meter)).silent_after is None


def test_faults_also_work_on_anonymous_meters() -> None:
    for number in range(1, 21):
        model = BottleModel(f"bottle-{number:04d}", 0, fault=FAULT_BY_KIND["over-pressure"])
        reading = model.next_reading(MONDAY + timedelta(hours=5))
        assert reading.pressure_bar > max(MAX_PRESSURE_BAR, model.fill_pressure_bar * OVERPRESSURE_PCT / 100)


# ---- reproducibility


def test_same_seed_same_fleet_readings_with_faults() -> None:
    for meter, fault in zip(COMPRESSED_METERS, (NO_FAULT, *FAULTS), strict=False):
        first = simulate(meter, fault, MONDAY, timedelta(minutes=7), 100, seed=42)
        assert simulate(meter, fault, MONDAY, timedelta(minutes=7), 100, seed=42) == first
        assert simulate(meter, fault, MONDAY, timedelta(minutes=7), 100, seed=43) != first


def test_meters_of_one_site_share_its_temperature_offset() -> None:
    same_site = [m for m in COMPRESSED_METERS if m.site.site_id == "lyon-gerland"]
    other_site = next(m for m in COMPRESSED_METERS if m.site.site_id == "annecy")

    def mean_temperature(meter: FleetMeter) -> float:
        readings = simulate(meter, NO_FAULT, MONDAY, timedelta(hours=1), 48)
        return sum(r["temperature_c"] for r in readings) / len(readings)

    means = [mean_temperature(m) for m in same_site]
    assert max(means) - min(means) < 0.2  # the same site: only the 0.2 °C noise differs
    assert abs(mean_temperature(other_site) - means[0]) > 0.2


# ---- injections


def test_injection_names_a_known_fault_and_a_meter() -> None:
    injection = parse_injection(" leak : bottle-0007 ")
    assert (injection.fault.kind, injection.meter_id, str(injection)) == ("leak", "bottle-0007", "leak:bottle-0007")
    with pytest.raises(ValueError, match=r"unknown fault 'overheat'.*known: over-pressure, over-temperature"):
        parse_injection("overheat:bottle-0007")
    for bad in ("leak", "leak:", ":bottle-0007", ""):
        with pytest.raises(ValueError, match="must be KIND:METER_ID"):
            parse_injection(bad)


def test_every_fault_kind_is_its_own_alert() -> None:
    kinds = [fault.kind for fault in FAULTS]
    assert kinds == ["over-pressure", "over-temperature", "low-content", "leak", "offline", "sensor-fault"]
    assert [fault.alert for fault in FAULTS] == [kind.replace("-", "_") for kind in kinds]  # the consumer's names


def test_a_sealed_bottle_keeps_its_real_content_while_its_pressure_follows_the_temperature() -> None:
    """Each gas of the file, not drawn from for two days: the pressure swings with the daily cycle, the real
    content the consumer computes does not, and the rules see nothing (the ideal gas moles do move)."""
    sealed = Fault(kind="sealed", alert="", effect="not drawn from", draws=False)
    first_of_each_gas = {meter.gas.name: meter for meter in reversed(COMPRESSED_METERS)}
    assert len(first_of_each_gas) == 7
    for meter in first_of_each_gas.values():
        readings = simulate(meter, sealed, MONDAY, timedelta(minutes=30), 96)
        contents = [moles(r, meter) for r in readings]
        pressures = [r["pressure_bar"] for r in readings]
        assert (max(contents) - min(contents)) / max(contents) < 1e-6, meter.gas.name
        assert max(pressures) / min(pressures) > 1.03, meter.gas.name
        assert alerts(readings, meter) == set(), meter.gas.name


def test_liquefied_bottles_hold_their_vapour_pressure_then_decline_when_the_liquid_is_gone() -> None:
    """The breweries' CO₂ and the pilot plant's propane, drawn hour by hour until swapped: while liquid is left
    the pressure is the vapour pressure at the temperature (the state the consumer judges is
    liquid_present), then, for CO₂, it falls below it (liquid_exhausted) until the bottle is swapped."""
    assert {meter.gas.name for meter in LIQUEFIED_METERS} == {"co2", "propane"}
    for meter in LIQUEFIED_METERS:
        model = MODELS[meter.gas.name]
        bottle_model = BottleModel(meter.meter_id, 0, bottle(meter))
        states = []
        for hour in range(24 * 60):
            reading = bottle_model.next_reading(MONDAY + timedelta(hours=hour))
            status = model.liquefied_status(reading.pressure_bar, reading.temperature_c, reading.volume_l)
            states.append(status.state.value)
            if hour < 24:  # a day into a full bottle: plenty of liquid, the pressure is the vapour pressure
                assert status.vapour_pressure_bar is not None
                assert reading.pressure_bar == pytest.approx(status.vapour_pressure_bar, rel=1e-3)
            if bottle_model.swaps:
                break
        assert bottle_model.swaps == 1, meter.meter_id
        assert states[-1] == "liquid_present"  # the full bottle that replaced it
        if meter.gas.name == "propane":
            # Propane's vapour is 7 kg of the tank's 189 kg (3.8 %): the 5 % swap comes first.
            assert set(states) == {"liquid_present"}, meter.meter_id
            continue
        # CO₂'s saturated vapour is 21 % of a full bottle: the liquid runs out well before the swap.
        assert "liquid_exhausted" in states, meter.meter_id
        first_exhausted = states.index("liquid_exhausted")
        assert set(states[:first_exhausted]) == {"liquid_present"}, meter.meter_id
