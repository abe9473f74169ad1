"""The one boundary to CoolProp: a gas's reference equation of state, in the meters' units.

CoolProp's HEOS backend evaluates the Helmholtz-energy reference equation of each pure fluid (Span 2000
for nitrogen, Tegeler 1999 for argon, Schmidt & Wagner 1985 for oxygen, Ortiz-Vega 2019 for helium,
Leachman 2009 for hydrogen, Span & Wagner 1996 for CO2, Lemmon 2009 for propane) and, for mixtures,
the Kunz-Wagner (GERG-2008) multi-fluid model with its binary parameters. Every CoolProp error is
translated here into EquationOfStateError naming the gas and the point; nothing else imports CoolProp.

Evaluating a point costs 10-25 µs for a pure fluid and 60-600 µs for a mixture, too slow for the
per-reading path of a mixture: ``table.py`` tabulates compressed gases from this module once per process.
"""

import CoolProp.CoolProp as coolprop

from smartgas_common.const import PASCAL_PER_BAR, ZERO_CELSIUS_K, bar_to_pascal, celsius_to_kelvin
from smartgas_common.gas import Gas, Storage


class EquationOfStateError(ValueError):
    """CoolProp could not evaluate the gas at a point (or could not model the gas at all)."""


class EquationOfState:
    """One gas's equation of state; holds CoolProp state objects, so one instance per gas and thread."""

    def __init__(self, gas: Gas) -> None:
        self.gas = gas
        fluids = "&".join(fluid.coolprop_name for fluid, _ in gas.components)
        try:
            # Two states: one phase-imposed (fast, no stability analysis: the gas is known to be a
            # single gas-like phase where it is asked), one free (saturation, and the checks of tests).
            self._gas_phase = coolprop.AbstractState("HEOS", fluids)
            self._free = coolprop.AbstractState("HEOS", fluids)
            if not gas.is_pure:
                fractions = [fraction for _, fraction in gas.components]
                self._gas_phase.set_mole_fractions(fractions)
                self._free.set_mole_fractions(fractions)
            self.molar_mass_kg_per_mol = float(self._free.molar_mass())
            # The gas constant the equation was fitted with (8.31434 for oxygen's 1985 equation): Z is
            # p/(ρ·R·T) with this R, so content computed with it gives CoolProp's density exactly.
            self.gas_constant_j_per_mol_k = float(self._free.gas_constant())
        except ValueError as err:
            raise EquationOfStateError(f"gas {gas.name!r} ({gas.describe()}): CoolProp cannot model it: {err}") from err
        self.critical_temperature_c = gas.pseudo_critical_temperature_c
        if gas.is_pure:
            self.critical_temperature_c = float(self._free.T_critical()) - ZERO_CELSIUS_K
        # A liquefied gas's vapour is a gas below its critical point; a compressed gas is above its (pseudo-)
        # critical temperature, where CoolProp's density guess for "supercritical gas" also holds for the
        # dense mixtures at the cold edge of the envelope (its "gas" guess fails there).
        self._gas_phase.specify_phase(
            coolprop.iphase_gas if gas.storage is Storage.LIQUEFIED else coolprop.iphase_supercritical_gas
        )

    def _fail(self, what: str, err: Exception) -> EquationOfStateError:
        return EquationOfStateError(f"gas {self.gas.name!r}: {what}: {err}")

    def compressibility(self, pressure_bar: float, temperature_c: float) -> float:
        """Z = p / (ρ·R·T) of the gas phase at ``pressure_bar`` and ``temperature_c``.

        The phase-imposed solve first; where its density guess fails (dense mixtures near the cold edge of
        the envelope), CoolProp's full flash.
        """
        try:
            self._gas_phase.update(coolprop.PT_INPUTS, bar_to_pascal(pressure_bar), celsius_to_kelvin(temperature_c))
            return float(self._gas_phase.compressibility_factor())
        except ValueError:
            return self.compressibility_free(pressure_bar, temperature_c)

    def compressibility_free(self, pressure_bar: float, temperature_c: float) -> float:
        """Z from CoolProp's full flash, with its phase-stability analysis (slow for mixtures: tests only)."""
        try:
            self._free.unspecify_phase()
            self._free.update(coolprop.PT_INPUTS, bar_to_pascal(pressure_bar), celsius_to_kelvin(temperature_c))
            return float(self._free.compressibility_factor())
        except ValueError as err:
            raise self._fail(f"no Z at {pressure_bar:g} bar, {temperature_c:g} °C", err) from err

    def pressure_bar(self, molar_density_mol_per_m3: float, temperature_c: float) -> float:
        """Pressure of the gas at a density and temperature (explicit in the Helmholtz equation)."""
        try:
            self._free.unspecify_phase()
            self._free.update(coolprop.DmolarT_INPUTS, molar_density_mol_per_m3, celsius_to_kelvin(temperature_c))
            return float(self._free.p()) / PASCAL_PER_BAR
        except ValueError as err:
            raise self._fail(f"no pressure at {molar_density_mol_per_m3:g} mol/m³, {temperature_c:g} °C", err) from err

    def vapour_pressure_bar(self, temperature_c: float) -> float:
        """Saturation pressure of a liquefied (pure) gas at ``temperature_c``, below its critical temperature."""
        if self.gas.storage is not Storage.LIQUEFIED:
            raise EquationOfStateError(f"gas {self.gas.name!r} is stored compressed: it has no vapour pressure")
        try:
            self._free.unspecify_phase()
            self._free.update(coolprop.QT_INPUTS, 0.0, celsius_to_kelvin(temperature_c))
            return float(self._free.p()) / PASCAL_PER_BAR
        except ValueError as err:
            raise self._fail(f"no vapour pressure at {temperature_c:g} °C", err) from err
