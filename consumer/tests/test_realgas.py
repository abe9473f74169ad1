"""The real-gas transform of a reading (realgas.py) against the real CoolProp models of the shared package."""

from __future__ import annotations

import pytest

from smartgas_common.content import build_models
from smartgas_consumer import physics
from smartgas_consumer.fleet import Fleet, FleetMeter, parse_fleet
from smartgas_consumer.realgas import NO_REAL_GAS, RealGasPhysics

GASES = ("oxygen", "nitrogen", "argon-co2", "co2", "propane")


def fleet() -> Fleet:
    meters = [
        {"id": gas, "site": "s", "gas": gas, "volume_l": 50, "nominal_pressure_bar": 200, "draw_mol_per_h": 1}
        for gas in GASES
    ]
    site = {"id": "s", "client": "c", "name": "S", "latitude": 0, "longitude": 0, "working_hours_utc": [0, 24]}
    return parse_fleet({"version": 1, "clients": [{"id": "c", "name": "C"}], "sites": [site], "meters": meters})


FLEET = fleet()


@pytest.fixture(scope="module")
def gas_physics() -> RealGasPhysics:
    return RealGasPhysics.build(FLEET)


def meter(gas: str) -> FleetMeter:
    found = FLEET.meter(gas)
    assert found is not None
    return found


def test_oxygen_at_200_bar_matches_the_reference_compressibility(gas_physics: RealGasPhysics) -> None:
    real = gas_physics.evaluate(meter("oxygen"), 200.0, 15.0, 50.0)
    assert real.compressibility_z == pytest.approx(0.931, rel=3e-3)  # issue 10's NIST value
    ideal = physics.moles(200.0, 15.0, 50.0)
    assert real.real_moles is not None and real.real_moles == pytest.approx(ideal / 0.931, rel=3e-3)
    assert real.mass_kg == pytest.approx(real.real_moles * 0.0319988, rel=1e-4)
    # A full bottle at its nominal pressure and 15 °C is 100 % full.
    assert real.fill_pct == pytest.approx(100.0, abs=0.05)
    assert real.liquid_state is None


@pytest.mark.parametrize("gas", ["oxygen", "nitrogen", "argon-co2"])
def test_a_sealed_bottle_keeps_its_fill_across_the_day_while_ideal_moles_move(
    gas_physics: RealGasPhysics, gas: str
) -> None:
    """The same gas at −20 and +45 °C: fill % (real) constant within 0.5 %, ideal moles not."""
    full = gas_physics.evaluate(meter(gas), 200.0, 15.0, 50.0)
    assert full.real_moles is not None
    model = build_models([meter(gas).gas])[gas]  # the simulator's inverse, on the same tables
    fills, ideal = [], []
    for temperature_c in (-20.0, 0.0, 15.0, 30.0, 45.0):
        pressure_bar = model.pressure_bar(full.real_moles, 50.0, temperature_c)
        real = gas_physics.evaluate(meter(gas), pressure_bar, temperature_c, 50.0)
        assert real.fill_pct is not None
        fills.append(real.fill_pct)
        ideal.append(physics.moles(pressure_bar, temperature_c, 50.0))
    assert max(fills) - min(fills) < 0.5
    assert (max(ideal) - min(ideal)) / min(ideal) > 0.03


def test_liquefied_co2_reports_its_state_and_no_content_while_liquid_is_left(gas_physics: RealGasPhysics) -> None:
    present = gas_physics.evaluate(meter("co2"), 50.9, 15.0, 50.0)
    assert present.liquid_state == "liquid_present"
    assert (present.real_moles, present.mass_kg, present.fill_pct, present.compressibility_z) == (None,) * 4
    exhausted = gas_physics.evaluate(meter("co2"), 10.0, 15.0, 50.0)
    assert exhausted.liquid_state == "liquid_exhausted"
    assert exhausted.real_moles is not None and exhausted.real_moles > physics.moles(10.0, 15.0, 50.0)
    assert exhausted.fill_pct is None
    assert gas_physics.evaluate(meter("co2"), 80.0, 15.0, 50.0).liquid_state == "over_pressure"
    assert gas_physics.evaluate(meter("propane"), 7.3, 15.0, 50.0).liquid_state == "liquid_present"


@pytest.mark.parametrize(
    ("gas", "pressure_bar", "temperature_c"),
    [
        ("oxygen", 450.0, 15.0),  # above the tabulated 400 bar
        ("oxygen", 200.0, 90.0),  # a bottle in a fire
        ("nitrogen", 200.0, -60.0),
        ("co2", 50.0, 120.0),
        ("co2", 500.0, 15.0),
    ],
)
def test_outside_the_envelope_there_are_no_real_gas_fields(
    gas_physics: RealGasPhysics, gas: str, pressure_bar: float, temperature_c: float
) -> None:
    assert gas_physics.evaluate(meter(gas), pressure_bar, temperature_c, 50.0) == NO_REAL_GAS


def test_without_a_fleet_nothing_is_built_and_nothing_computed() -> None:
    assert RealGasPhysics.build(Fleet()).evaluate(meter("oxygen"), 200.0, 15.0, 50.0) == NO_REAL_GAS
