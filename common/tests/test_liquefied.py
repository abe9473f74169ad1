"""Liquefied gases: the state judged from pressure against the vapour pressure, content only once exhausted."""

from collections.abc import Mapping

import CoolProp.CoolProp as coolprop
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartgas_common.content import VAPOUR_PRESSURE_MARGIN, GasModel, LiquidState
from smartgas_common.table import OutsideEnvelopeError


def test_co2_at_15_c_by_pressure(models: Mapping[str, GasModel]) -> None:
    co2 = models["co2"]
    vapour_pressure_bar = co2.liquefied_status(50.9, 15.0, 50.0).vapour_pressure_bar
    assert vapour_pressure_bar is not None
    assert vapour_pressure_bar == pytest.approx(50.87, abs=0.01)
    below = vapour_pressure_bar * (1.0 - VAPOUR_PRESSURE_MARGIN)
    above = vapour_pressure_bar * (1.0 + VAPOUR_PRESSURE_MARGIN)
    # On the plateau, whatever the fill: a state, never a content.
    for pressure_bar in (below, 50.9, above):
        status = co2.liquefied_status(pressure_bar, 15.0, 50.0)
        assert status.state is LiquidState.LIQUID_PRESENT
        assert status.content is None
    assert co2.liquefied_status(below - 0.01, 15.0, 50.0).state is LiquidState.LIQUID_EXHAUSTED
    over = co2.liquefied_status(above + 0.01, 15.0, 50.0)
    assert over.state is LiquidState.OVER_PRESSURE
    assert over.content is None


def test_exhausted_bottle_reports_the_real_content_of_its_vapour(models: Mapping[str, GasModel]) -> None:
    status = models["co2"].liquefied_status(30.0, 15.0, 50.0)
    assert status.state is LiquidState.LIQUID_EXHAUSTED
    assert status.content is not None
    density = coolprop.PropsSI("Dmolar", "P", 30e5, "T", 288.15, "CO2")
    assert status.content.real_moles == pytest.approx(density * 0.050, rel=1e-9)
    assert status.content.mass_kg == pytest.approx(density * 0.050 * 0.0440098, rel=1e-6)
    assert status.content.compressibility == pytest.approx(0.805, abs=0.001)


def test_propane_plateau_and_exhaustion(models: Mapping[str, GasModel]) -> None:
    propane = models["propane"]
    assert propane.liquefied_status(7.3, 15.0, 47.0).state is LiquidState.LIQUID_PRESENT
    assert propane.liquefied_status(7.3, 15.0, 47.0).vapour_pressure_bar == pytest.approx(7.3, abs=0.05)
    assert propane.liquefied_status(3.0, 15.0, 47.0).state is LiquidState.LIQUID_EXHAUSTED
    # A reading of a compressed-gas bottle's pressure against a propane meter: not a plateau.
    assert propane.liquefied_status(200.0, 15.0, 47.0).state is LiquidState.OVER_PRESSURE


def test_above_the_critical_temperature_there_is_no_liquid(models: Mapping[str, GasModel]) -> None:
    for temperature_c in (30.98, 35.0, 45.0):
        status = models["co2"].liquefied_status(80.0, temperature_c, 50.0)
        assert status.state is LiquidState.SUPERCRITICAL
        assert status.vapour_pressure_bar is None
        assert status.content is None
    assert models["co2"].liquefied_status(70.0, 30.9, 50.0).state is LiquidState.LIQUID_PRESENT


def test_outside_the_envelope_is_refused(models: Mapping[str, GasModel]) -> None:
    with pytest.raises(
        OutsideEnvelopeError, match=r"^temperature -50 °C is outside -40-70 °C, where the physics of 'co2'"
    ):
        models["co2"].liquefied_status(10.0, -50.0, 50.0)
    with pytest.raises(OutsideEnvelopeError, match=r"^pressure 1000 bar is outside 0-400 bar"):
        models["propane"].liquefied_status(1000.0, 15.0, 47.0)


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(["co2", "propane"]),
    temperature_c=st.floats(-40.0, 30.0),
    offset=st.floats(-VAPOUR_PRESSURE_MARGIN * 0.99, VAPOUR_PRESSURE_MARGIN * 0.99),
)
def test_near_the_vapour_pressure_liquid_is_present_at_any_temperature(
    models: Mapping[str, GasModel], name: str, temperature_c: float, offset: float
) -> None:
    fluid = {"co2": "CO2", "propane": "Propane"}[name]
    vapour_pressure_bar = coolprop.PropsSI("P", "T", temperature_c + 273.15, "Q", 0, fluid)
    pressure_bar = vapour_pressure_bar / 1e5 * (1.0 + offset)
    assert models[name].liquefied_status(pressure_bar, temperature_c, 50.0).state is LiquidState.LIQUID_PRESENT


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(["co2", "propane"]),
    temperature_c=st.floats(-40.0, 30.0),
    fraction=st.floats(0.0, (1.0 - VAPOUR_PRESSURE_MARGIN) * 0.99),
)
def test_well_below_the_vapour_pressure_the_liquid_is_exhausted(
    models: Mapping[str, GasModel], name: str, temperature_c: float, fraction: float
) -> None:
    vapour_pressure_bar = models[name].vapour_pressure_bar(temperature_c)
    status = models[name].liquefied_status(vapour_pressure_bar * fraction, temperature_c, 50.0)
    assert status.state is LiquidState.LIQUID_EXHAUSTED
    assert status.content is not None
    assert status.content.real_moles >= 0.0


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["co2", "propane"]),
    pressure_bar=st.floats(0.0, 400.0),
    temperature_c=st.floats(-40.0, 70.0),
)
def test_every_point_of_the_envelope_gets_a_state(
    models: Mapping[str, GasModel], name: str, pressure_bar: float, temperature_c: float
) -> None:
    status = models[name].liquefied_status(pressure_bar, temperature_c, 50.0)
    assert (status.content is not None) == (status.state is LiquidState.LIQUID_EXHAUSTED)


def test_a_draining_co2_bottle_holds_its_plateau_then_declines(models: Mapping[str, GasModel]) -> None:
    # The simulator's physics: 30 kg of CO2 in a 50 L bottle (fill ratio 0.6 kg/L) at 15 °C, drawn down.
    co2 = models["co2"]
    molar_mass = co2.molar_mass_kg_per_mol
    plateau_bar = co2.vapour_pressure_bar(15.0)
    states = []
    for mass_kg in (30.0, 20.0, 10.0, 5.0, 4.0, 3.0, 1.0):
        pressure_bar = co2.pressure_bar(mass_kg / molar_mass, 50.0, 15.0)
        status = co2.liquefied_status(pressure_bar, 15.0, 50.0)
        states.append(status.state)
        if status.state is LiquidState.LIQUID_PRESENT:
            assert pressure_bar == pytest.approx(plateau_bar, rel=1e-6)
        else:
            assert status.content is not None
            assert status.content.mass_kg == pytest.approx(mass_kg, rel=1e-6)
    # Saturated vapour at 15 °C holds 160 kg/m³, 8.0 kg in 50 L: with less the liquid is gone.
    assert states == [LiquidState.LIQUID_PRESENT] * 3 + [LiquidState.LIQUID_EXHAUSTED] * 4
    assert co2.pressure_bar(0.0, 50.0, 15.0) == 0.0


def test_vapour_pressure_is_refused_where_there_is_none(models: Mapping[str, GasModel]) -> None:
    with pytest.raises(ValueError, match=r"^gas 'oxygen' is compressed: it has no vapour pressure$"):
        models["oxygen"].vapour_pressure_bar(15.0)
    with pytest.raises(ValueError, match=r"^gas 'co2': no vapour pressure at 35 °C: "):
        models["co2"].vapour_pressure_bar(35.0)
