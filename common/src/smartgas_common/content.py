"""Real-gas content of a bottle, and the state of a liquefied one: the physics each reading gets.

Compressed gases: n = p·V / (Z·R·T), with Z from the gas's tabulated reference equation (``table.py``)
and R the gas constant that equation was fitted with; mass = n·M; standard volume = n·Z₀·R·T₀ / p₀ at the
ISO 13443 reference conditions (15 °C, 1.01325 bar; Z₀ is the gas's own compressibility there, 0.9980-1.0007
for the built-in compressed gases); fill % = real moles now / real moles at the nominal pressure and 15 °C,
so a sealed bottle keeps its fill % as the temperature moves.

Liquefied gases: the pressure is the vapour pressure of the liquid whatever is left, so pressure gives
no content, only the state (``LiquidState``); once the liquid is gone, the content of the remaining gas.

A ``GasModel`` is built once per gas and process (``build_models``) and then only read, from one thread
(it holds CoolProp state objects for the liquefied path).
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from smartgas_common.const import (
    CUBIC_METRE_PER_LITRE,
    ENVELOPE_MAX_PRESSURE_BAR,
    ENVELOPE_MAX_TEMPERATURE_C,
    ENVELOPE_MIN_TEMPERATURE_C,
    FILLING_TEMPERATURE_C,
    STANDARD_PRESSURE_BAR,
    STANDARD_TEMPERATURE_C,
    bar_to_pascal,
    celsius_to_kelvin,
)
from smartgas_common.eos import EquationOfState
from smartgas_common.gas import Gas, Storage
from smartgas_common.table import CompressibilityTable, OutsideEnvelopeError

#: A liquefied bottle's pressure may stray this far (relative) from the vapour pressure at the measured
#: temperature before its state changes: 10 % is about 4 K of disagreement between the outside
#: temperature sensor and the liquid (CO2's and propane's vapour pressures rise 2.4 and 2.7 %/K at 15 °C).
VAPOUR_PRESSURE_MARGIN = 0.10
#: Below this a gas is ideal to better than 1e-4 (Z - 1 ≈ B·p), and CoolProp's density solver may fail
#: on vanishing pressures (1e-140 bar), so the vapour of an exhausted bottle counts as ideal there.
IDEAL_BELOW_PRESSURE_BAR = 1e-3
_PRESSURE_SOLVER_ITERATIONS = 50
_PRESSURE_SOLVER_TOLERANCE = 1e-10


class LiquidState(StrEnum):
    """The state of a liquefied-gas bottle, judged from pressure against the vapour pressure."""

    #: Pressure within the margin of the vapour pressure: liquid is left (how much, pressure cannot say).
    LIQUID_PRESENT = "liquid_present"
    #: Pressure below the vapour pressure by more than the margin: the liquid has boiled off.
    LIQUID_EXHAUSTED = "liquid_exhausted"
    #: Pressure above the vapour pressure by more than the margin: liquid-full (overfilled) or foreign gas.
    OVER_PRESSURE = "over_pressure"
    #: At or above the critical temperature there is no liquid and no vapour pressure to judge against.
    SUPERCRITICAL = "supercritical"


@dataclass(frozen=True)
class RealContent:
    """What a bottle holds by the real-gas equation of state."""

    compressibility: float
    real_moles: float
    mass_kg: float
    standard_volume_m3: float


@dataclass(frozen=True)
class LiquefiedStatus:
    """A liquefied bottle's state; the vapour pressure below the critical temperature, the content once exhausted."""

    state: LiquidState
    vapour_pressure_bar: float | None
    content: RealContent | None


def _check_envelope(gas: Gas, pressure_bar: float, temperature_c: float) -> None:
    if not (math.isfinite(pressure_bar) and 0.0 <= pressure_bar <= ENVELOPE_MAX_PRESSURE_BAR):
        raise OutsideEnvelopeError(
            f"pressure {pressure_bar:g} bar is outside 0-{ENVELOPE_MAX_PRESSURE_BAR:g} bar, "
            f"where the physics of {gas.name!r} is computed"
        )
    if not (math.isfinite(temperature_c) and ENVELOPE_MIN_TEMPERATURE_C <= temperature_c <= ENVELOPE_MAX_TEMPERATURE_C):
        raise OutsideEnvelopeError(
            f"temperature {temperature_c:g} °C is outside {ENVELOPE_MIN_TEMPERATURE_C:g}-"
            f"{ENVELOPE_MAX_TEMPERATURE_C:g} °C, where the physics of {gas.name!r} is computed"
        )


def _check_volume(volume_l: float) -> None:
    if not (math.isfinite(volume_l) and volume_l > 0.0):
        raise ValueError(f"volume must be a finite number of litres above 0, got {volume_l!r}")


class GasModel:
    """The real-gas physics of one gas: content of compressed bottles, state of liquefied ones."""

    def __init__(self, gas: Gas, eos: EquationOfState, table: CompressibilityTable | None) -> None:
        self.gas = gas
        self._eos = eos
        self._table = table
        self.molar_mass_kg_per_mol = eos.molar_mass_kg_per_mol
        #: Z at the ISO 13443 reference conditions, for the standard volume.
        self.standard_compressibility = eos.compressibility(STANDARD_PRESSURE_BAR, STANDARD_TEMPERATURE_C)

    @classmethod
    def build(cls, gas: Gas) -> "GasModel":
        """Evaluate the gas's equation of state (and tabulate it if compressed): 0.1-2 s for a mixture."""
        eos = EquationOfState(gas)
        table = CompressibilityTable.build(eos) if gas.storage is Storage.COMPRESSED else None
        return cls(gas, eos, table)

    def compressibility(self, pressure_bar: float, temperature_c: float) -> float:
        """Z of the gas phase: tabulated for compressed gases, CoolProp's for a liquefied gas's vapour."""
        if self._table is not None:
            return self._table.compressibility(pressure_bar, temperature_c)
        _check_envelope(self.gas, pressure_bar, temperature_c)
        if pressure_bar < IDEAL_BELOW_PRESSURE_BAR:
            return 1.0
        return self._eos.compressibility(pressure_bar, temperature_c)

    def _content_at(
        self, compressibility: float, pressure_bar: float, temperature_c: float, volume_l: float
    ) -> RealContent:
        real_moles = (
            bar_to_pascal(pressure_bar)
            * volume_l
            * CUBIC_METRE_PER_LITRE
            / (compressibility * self._eos.gas_constant_j_per_mol_k * celsius_to_kelvin(temperature_c))
        )
        standard_volume_m3 = (
            real_moles
            * self.standard_compressibility
            * self._eos.gas_constant_j_per_mol_k
            * celsius_to_kelvin(STANDARD_TEMPERATURE_C)
            / bar_to_pascal(STANDARD_PRESSURE_BAR)
        )
        return RealContent(compressibility, real_moles, real_moles * self.molar_mass_kg_per_mol, standard_volume_m3)

    def content(self, pressure_bar: float, temperature_c: float, volume_l: float) -> RealContent:
        """Real content of a compressed-gas bottle; ValueError for a liquefied gas (use ``liquefied_status``)."""
        if self.gas.storage is not Storage.COMPRESSED:
            raise ValueError(f"gas {self.gas.name!r} is liquefied: pressure gives its state, not its content")
        _check_volume(volume_l)
        compressibility = self.compressibility(pressure_bar, temperature_c)
        return self._content_at(compressibility, pressure_bar, temperature_c, volume_l)

    def fill_percent(self, pressure_bar: float, temperature_c: float, nominal_pressure_bar: float) -> float:
        """Real moles now as a percentage of real moles at the nominal pressure and 15 °C (same bottle)."""
        now = pressure_bar / (self.compressibility(pressure_bar, temperature_c) * celsius_to_kelvin(temperature_c))
        full = nominal_pressure_bar / (
            self.compressibility(nominal_pressure_bar, FILLING_TEMPERATURE_C) * celsius_to_kelvin(FILLING_TEMPERATURE_C)
        )
        return 100.0 * now / full

    def pressure_bar(self, real_moles: float, volume_l: float, temperature_c: float) -> float:
        """The pressure of ``real_moles`` in ``volume_l`` at ``temperature_c`` (the simulator's inverse).

        Compressed gases: solves p = Z(p, T)·n·R·T / V by the secant method on the same table ``content``
        reads, so that ``content(pressure_bar(n, V, T), T, V).real_moles`` gives n back to 1e-9.
        Liquefied gases: CoolProp's equation at that density, two-phase while liquid is left (the vapour
        pressure, whatever the amount), then gas: the plateau and the decline of a draining bottle.
        """
        _check_volume(volume_l)
        if not (math.isfinite(real_moles) and real_moles >= 0.0):
            raise ValueError(f"amount must be a finite number of moles, at least 0, got {real_moles!r}")
        if self.gas.storage is Storage.LIQUEFIED:
            _check_envelope(self.gas, 0.0, temperature_c)
            if real_moles == 0.0:
                return 0.0
            return self._eos.pressure_bar(real_moles / (volume_l * CUBIC_METRE_PER_LITRE), temperature_c)
        ideal_bar = (
            real_moles
            * self._eos.gas_constant_j_per_mol_k
            * celsius_to_kelvin(temperature_c)
            / (volume_l * CUBIC_METRE_PER_LITRE)
            / bar_to_pascal(1.0)
        )

        def residual(pressure_bar: float) -> float:
            bounded_bar = min(pressure_bar, ENVELOPE_MAX_PRESSURE_BAR)
            return pressure_bar - ideal_bar * self.compressibility(max(bounded_bar, 0.0), temperature_c)

        previous, current = (
            ideal_bar,
            ideal_bar * self.compressibility(min(ideal_bar, ENVELOPE_MAX_PRESSURE_BAR), temperature_c),
        )
        previous_residual = residual(previous)
        for _ in range(_PRESSURE_SOLVER_ITERATIONS):
            current_residual = residual(current)
            if (
                abs(current_residual) <= _PRESSURE_SOLVER_TOLERANCE * max(1.0, current)
                or current_residual == previous_residual
            ):
                break
            previous, current = (
                current,
                current - current_residual * (current - previous) / (current_residual - previous_residual),
            )
            previous_residual = current_residual
        self.compressibility(current, temperature_c)  # raises OutsideEnvelopeError for a pressure beyond it
        return current

    def vapour_pressure_bar(self, temperature_c: float) -> float:
        """A liquefied gas's vapour pressure; ValueError at or above its critical temperature or if compressed."""
        if self.gas.storage is not Storage.LIQUEFIED:
            raise ValueError(f"gas {self.gas.name!r} is compressed: it has no vapour pressure")
        _check_envelope(self.gas, 0.0, temperature_c)
        return self._eos.vapour_pressure_bar(temperature_c)

    def liquefied_status(self, pressure_bar: float, temperature_c: float, volume_l: float) -> LiquefiedStatus:
        """The state of a liquefied-gas bottle; its real content only once the liquid is exhausted."""
        if self.gas.storage is not Storage.LIQUEFIED:
            raise ValueError(f"gas {self.gas.name!r} is compressed: it has no liquid state")
        _check_volume(volume_l)
        _check_envelope(self.gas, pressure_bar, temperature_c)
        if temperature_c >= self._eos.critical_temperature_c:
            return LiquefiedStatus(LiquidState.SUPERCRITICAL, None, None)
        vapour_pressure_bar = self._eos.vapour_pressure_bar(temperature_c)
        if pressure_bar > vapour_pressure_bar * (1.0 + VAPOUR_PRESSURE_MARGIN):
            return LiquefiedStatus(LiquidState.OVER_PRESSURE, vapour_pressure_bar, None)
        if pressure_bar >= vapour_pressure_bar * (1.0 - VAPOUR_PRESSURE_MARGIN):
            return LiquefiedStatus(LiquidState.LIQUID_PRESENT, vapour_pressure_bar, None)
        compressibility = self.compressibility(pressure_bar, temperature_c)
        content = self._content_at(compressibility, pressure_bar, temperature_c, volume_l)
        return LiquefiedStatus(LiquidState.LIQUID_EXHAUSTED, vapour_pressure_bar, content)


def build_models(gases: Iterable[Gas]) -> Mapping[str, GasModel]:
    """One model per distinct gas (by name), built once at start.

    EquationOfStateError names a gas CoolProp cannot model.
    """
    models: dict[str, GasModel] = {}
    for gas in gases:
        if gas.name not in models:
            models[gas.name] = GasModel.build(gas)
    return MappingProxyType(models)
