"""Real-gas content of compressed bottles: against CoolProp's density, and a sealed bottle over a day and night."""

from collections.abc import Mapping

import CoolProp.CoolProp as coolprop
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smartgas_common.const import STANDARD_PRESSURE_BAR, STANDARD_TEMPERATURE_C
from smartgas_common.content import GasModel
from smartgas_common.eos import EquationOfState
from smartgas_common.gas import BUILTIN_GASES, Storage
from smartgas_common.table import OutsideEnvelopeError

COMPRESSED = sorted(name for name, gas in BUILTIN_GASES.items() if gas.storage is Storage.COMPRESSED)
# The original lab's ideal-gas law, as the consumer computes `moles` (physics.py there).
IDEAL_GAS_CONSTANT_J_PER_MOL_K = 8.314462618


def ideal_moles(pressure_bar: float, temperature_c: float, volume_l: float) -> float:
    return pressure_bar * 1e5 * volume_l * 1e-3 / (IDEAL_GAS_CONSTANT_J_PER_MOL_K * (temperature_c + 273.15))


def coolprop_molar_density(name: str, pressure_bar: float, temperature_c: float) -> float:
    state = coolprop.AbstractState("HEOS", "&".join(f.coolprop_name for f, _ in BUILTIN_GASES[name].components))
    if not BUILTIN_GASES[name].is_pure:
        state.set_mole_fractions([x for _, x in BUILTIN_GASES[name].components])
    state.update(coolprop.PT_INPUTS, pressure_bar * 1e5, temperature_c + 273.15)
    return float(state.rhomolar())


@pytest.mark.parametrize("name", COMPRESSED)
def test_content_agrees_with_coolprop_density(name: str, models: Mapping[str, GasModel]) -> None:
    content = models[name].content(200.0, 15.0, 50.0)
    assert content.real_moles == pytest.approx(coolprop_molar_density(name, 200.0, 15.0) * 0.050, rel=1e-3)
    assert content.mass_kg == pytest.approx(content.real_moles * models[name].molar_mass_kg_per_mol, rel=1e-12)
    standard_density = coolprop_molar_density(name, STANDARD_PRESSURE_BAR, STANDARD_TEMPERATURE_C)
    assert content.standard_volume_m3 == pytest.approx(content.real_moles / standard_density, rel=1e-3)


def test_a_50_litre_oxygen_bottle_at_200_bar() -> None:
    # The example of docs/physics.md: 448 mol real, 418 mol ideal; 14.3 kg; 10.6 m³ at 15 °C and 1.01325 bar.
    model = GasModel.build(BUILTIN_GASES["oxygen"])
    content = model.content(200.0, 15.0, 50.0)
    assert content.compressibility == pytest.approx(0.931, rel=1e-3)
    assert round(content.real_moles) == 448
    assert round(ideal_moles(200.0, 15.0, 50.0)) == 417
    assert round(content.mass_kg, 1) == 14.3
    assert round(content.standard_volume_m3, 1) == 10.6
    assert model.fill_percent(200.0, 15.0, 200.0) == pytest.approx(100.0, rel=1e-12)
    assert model.fill_percent(100.0, 15.0, 200.0) == pytest.approx(
        100.0 * model.content(100.0, 15.0, 50.0).real_moles / content.real_moles, rel=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(COMPRESSED),
    filling_bar=st.floats(20.0, 300.0),
    volume_l=st.floats(1.0, 80.0),
    temperature_c=st.floats(-20.0, 45.0),
)
def test_sealed_bottle_keeps_its_real_content_across_minus_20_to_45_c(
    models: Mapping[str, GasModel], name: str, filling_bar: float, volume_l: float, temperature_c: float
) -> None:
    model = models[name]
    filled = model.content(filling_bar, 15.0, volume_l)
    # The bottle's pressure at another temperature, from CoolProp's equation at the same density
    # (not from the table under test).
    molar_density = filled.real_moles / (volume_l * 1e-3)
    pressure_bar = EquationOfState(BUILTIN_GASES[name]).pressure_bar(molar_density, temperature_c)
    assert model.content(pressure_bar, temperature_c, volume_l).real_moles == pytest.approx(filled.real_moles, rel=5e-3)
    assert model.fill_percent(pressure_bar, temperature_c, filling_bar) == pytest.approx(100.0, rel=5e-3)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["oxygen", "argon"]), filling_bar=st.floats(200.0, 300.0), volume_l=st.floats(1.0, 80.0))
def test_the_ideal_moles_of_the_same_sealed_bottle_move_over_10_percent(
    models: Mapping[str, GasModel], name: str, filling_bar: float, volume_l: float
) -> None:
    eos = EquationOfState(BUILTIN_GASES[name])
    molar_density = models[name].content(filling_bar, 15.0, volume_l).real_moles / (volume_l * 1e-3)
    cold, hot = (eos.pressure_bar(molar_density, t) for t in (-20.0, 45.0))
    ideal_cold, ideal_hot = ideal_moles(cold, -20.0, volume_l), ideal_moles(hot, 45.0, volume_l)
    # Ideal moles "fall" on the cold night (the false leak of issue 10) and rise in the afternoon.
    assert ideal_hot / ideal_cold - 1.0 > 0.10


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(COMPRESSED),
    real_moles=st.floats(0.0, 600.0),
    temperature_c=st.floats(-20.0, 45.0),
)
def test_pressure_of_an_amount_inverts_content(
    models: Mapping[str, GasModel], name: str, real_moles: float, temperature_c: float
) -> None:
    model = models[name]
    try:
        pressure_bar = model.pressure_bar(real_moles, 50.0, temperature_c)
    except OutsideEnvelopeError:
        # Only an amount that would need more than the envelope's 400 bar.
        assert model.content(400.0, temperature_c, 50.0).real_moles < real_moles
        return
    assert model.content(pressure_bar, temperature_c, 50.0).real_moles == pytest.approx(real_moles, rel=1e-9, abs=1e-9)


def test_misuse_is_refused(models: Mapping[str, GasModel]) -> None:
    with pytest.raises(ValueError, match=r"^gas 'co2' is liquefied: pressure gives its state, not its content$"):
        models["co2"].content(30.0, 15.0, 50.0)
    with pytest.raises(ValueError, match=r"^gas 'nitrogen' is compressed: it has no liquid state$"):
        models["nitrogen"].liquefied_status(30.0, 15.0, 50.0)
    with pytest.raises(ValueError, match=r"^volume must be a finite number of litres above 0, got 0.0$"):
        models["nitrogen"].content(30.0, 15.0, 0.0)
    with pytest.raises(ValueError, match=r"^amount must be a finite number of moles, at least 0, got -1.0$"):
        models["nitrogen"].pressure_bar(-1.0, 50.0, 15.0)


def test_standard_compressibility_of_the_built_in_gases(models: Mapping[str, GasModel]) -> None:
    # docs/physics.md: Z₀ at 15 °C and 1.01325 bar is 0.9980-1.0007 for the built-in compressed gases.
    for name in COMPRESSED:
        assert 0.9980 <= models[name].standard_compressibility <= 1.0007


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(sorted(BUILTIN_GASES)),
    # Half of the draws around the envelope's edges, half anywhere (NaN and infinities included).
    pressure_bar=st.one_of(st.floats(-1.0, 450.0), st.floats()),
    temperature_c=st.one_of(st.floats(-45.0, 75.0), st.floats()),
    volume_l=st.one_of(st.floats(-1.0, 100.0), st.floats()),
)
def test_any_numbers_give_a_result_or_a_value_error(
    models: Mapping[str, GasModel], name: str, pressure_bar: float, temperature_c: float, volume_l: float
) -> None:
    # Whatever a peer sends, the physics answers or raises ValueError (OutsideEnvelopeError and
    # EquationOfStateError are ValueErrors), which the ingest stage can turn into a 4.xx or an empty field.
    model = models[name]
    try:
        if model.gas.storage is Storage.COMPRESSED:
            content = model.content(pressure_bar, temperature_c, volume_l)
            assert content.real_moles >= 0.0
        else:
            model.liquefied_status(pressure_bar, temperature_c, volume_l)
    except ValueError:
        pass
