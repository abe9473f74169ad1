"""The equation of state through CoolProp: the issue's compressibility vectors and vapour pressures."""

from collections.abc import Mapping

import CoolProp.CoolProp as coolprop
import pytest

from smartgas_common.content import GasModel
from smartgas_common.eos import EquationOfState, EquationOfStateError
from smartgas_common.gas import BUILTIN_GASES, FLUIDS

# Issue 10: Z at 15 °C (NIST reference equations), to be met within 0.3 %.
Z_VECTORS = {
    "nitrogen": (1.048, 1.138),
    "oxygen": (0.931, 0.973),
    "argon": (0.937, 0.981),
    "helium": (1.097, 1.144),
    "hydrogen": (1.126, 1.193),
}
Z_TOLERANCE = 0.003


@pytest.mark.parametrize("name", sorted(Z_VECTORS))
def test_compressibility_vectors_at_200_and_300_bar(name: str, models: Mapping[str, GasModel]) -> None:
    eos = EquationOfState(BUILTIN_GASES[name])
    for pressure_bar, expected in zip((200.0, 300.0), Z_VECTORS[name], strict=True):
        # The equation itself, its full flash, and the table the per-reading path reads.
        assert eos.compressibility(pressure_bar, 15.0) == pytest.approx(expected, rel=Z_TOLERANCE)
        assert eos.compressibility_free(pressure_bar, 15.0) == pytest.approx(expected, rel=Z_TOLERANCE)
        assert models[name].compressibility(pressure_bar, 15.0) == pytest.approx(expected, rel=Z_TOLERANCE)


def test_vapour_pressures_at_15_c() -> None:
    # Issue 10: CO2 50.9 bar, propane 7.3 bar at 15 °C.
    assert EquationOfState(BUILTIN_GASES["co2"]).vapour_pressure_bar(15.0) == pytest.approx(50.9, abs=0.05)
    assert EquationOfState(BUILTIN_GASES["propane"]).vapour_pressure_bar(15.0) == pytest.approx(7.3, abs=0.05)


@pytest.mark.parametrize("name", sorted(FLUIDS))
def test_fluid_table_matches_coolprop(name: str) -> None:
    fluid = FLUIDS[name]
    critical_k = coolprop.PropsSI("Tcrit", fluid.coolprop_name)
    assert fluid.critical_temperature_c == pytest.approx(critical_k - 273.15, abs=0.01)


def test_molar_mass_of_a_mixture_is_the_fraction_weighted_sum() -> None:
    eos = EquationOfState(BUILTIN_GASES["argon-co2"])
    assert eos.molar_mass_kg_per_mol == pytest.approx(0.82 * 0.039948 + 0.18 * 0.0440098, rel=1e-6)


def test_pressure_from_density_inverts_compressibility() -> None:
    eos = EquationOfState(BUILTIN_GASES["oxygen"])
    z = eos.compressibility(200.0, 15.0)
    molar_density_mol_per_m3 = 200e5 / (z * eos.gas_constant_j_per_mol_k * 288.15)
    assert eos.pressure_bar(molar_density_mol_per_m3, 15.0) == pytest.approx(200.0, rel=1e-9)


def test_library_errors_are_translated_naming_the_gas_and_point() -> None:
    eos = EquationOfState(BUILTIN_GASES["nitrogen"])
    with pytest.raises(EquationOfStateError, match=r"^gas 'nitrogen': no pressure at -5 mol/m³, 15 °C: "):
        eos.pressure_bar(-5.0, 15.0)
    with pytest.raises(EquationOfStateError, match=r"^gas 'nitrogen' is stored compressed: it has no vapour pressure$"):
        eos.vapour_pressure_bar(15.0)
    with pytest.raises(EquationOfStateError, match=r"^gas 'co2': no vapour pressure at 40 °C: "):
        EquationOfState(BUILTIN_GASES["co2"]).vapour_pressure_bar(40.0)


def test_built_in_mixtures_at_200_bar(models: Mapping[str, GasModel]) -> None:
    # docs/physics.md: argon-CO2 82/18 Z = 0.8535, medical air 21/79 Z = 1.0233 at 200 bar and 15 °C.
    assert models["argon-co2"].compressibility(200.0, 15.0) == pytest.approx(0.8535, abs=5e-4)
    assert models["medical-air"].compressibility(200.0, 15.0) == pytest.approx(1.0233, abs=5e-4)
