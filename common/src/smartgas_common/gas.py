"""Gas definitions: the fluids SmartGas knows, the gases built from them, and the fleet file's ``gases`` form.

A *fluid* is a pure substance with a reference equation of state in CoolProp. A *gas* is what a bottle
holds: one fluid or a mixture of fluids in mole fractions, stored compressed (gas phase only) or
liquefied (liquid under its own vapour pressure). The built-in gases cover the sample fleet; the fleet
file may define more under ``gases`` (docs/fleet.md), and a meter's ``gas`` names one of either.

Everything here is checked when the fleet file is read, so that every problem is one line naming the
entry: an unknown gas or fluid (with the known ones), fractions that do not sum to 1, a mixture stored
liquefied, or a fluid stored the way it cannot be kept at ambient temperatures.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from smartgas_common.const import ENVELOPE_MIN_TEMPERATURE_C, FILLING_TEMPERATURE_C

#: How far the mole fractions of a gas may sum away from exactly 1 (rounding in hand-written YAML).
FRACTION_SUM_TOLERANCE = 1e-6
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class GasDefinitionError(ValueError):
    """A gas definition or reference that cannot be used; the message names the entry and the fix."""


class Storage(StrEnum):
    """How a bottle keeps its gas."""

    #: Gas phase only: pressure and temperature give the content through the equation of state.
    COMPRESSED = "compressed"
    #: Liquid under its vapour pressure: pressure gives the state (liquid left or not), not the content.
    LIQUEFIED = "liquefied"


@dataclass(frozen=True)
class Fluid:
    """A pure substance and its name in CoolProp."""

    name: str
    coolprop_name: str
    formula: str
    #: Critical temperature, °C (CoolProp's reference equation; a test checks each value against it).
    critical_temperature_c: float


@dataclass(frozen=True)
class Gas:
    """What a bottle holds: fluids with their mole fractions (summing to 1), and how it is stored."""

    name: str
    components: tuple[tuple[Fluid, float], ...]
    storage: Storage

    @property
    def is_pure(self) -> bool:
        return len(self.components) == 1

    @property
    def pseudo_critical_temperature_c(self) -> float:
        """Kay's rule: the mole-fraction-weighted critical temperature, a mixture's rough liquefaction mark."""
        return sum(fluid.critical_temperature_c * fraction for fluid, fraction in self.components)

    def describe(self) -> str:
        """E.g. ``argon 82 % + co2 18 %, compressed``."""
        parts = " + ".join(f"{fluid.name} {fraction * 100:g} %" for fluid, fraction in self.components)
        return f"{parts}, {self.storage.value}"


FLUIDS: Mapping[str, Fluid] = MappingProxyType(
    {
        fluid.name: fluid
        for fluid in (
            Fluid("nitrogen", "Nitrogen", "N2", -146.958),
            Fluid("oxygen", "Oxygen", "O2", -118.551),
            Fluid("argon", "Argon", "Ar", -122.463),
            Fluid("helium", "Helium", "He", -267.955),
            Fluid("hydrogen", "Hydrogen", "H2", -240.006),
            Fluid("methane", "Methane", "CH4", -82.586),
            Fluid("co2", "CO2", "CO2", 30.978),
            Fluid("propane", "Propane", "C3H8", 96.740),
            Fluid("n-butane", "n-Butane", "C4H10", 151.975),
        )
    }
)


def _builtin(name: str, storage: Storage, **fractions: float) -> Gas:
    return Gas(name, tuple((FLUIDS[fluid.replace("_", "-")], x) for fluid, x in fractions.items()), storage)


#: The gases a meter may name without defining them.
BUILTIN_GASES: Mapping[str, Gas] = MappingProxyType(
    {
        gas.name: gas
        for gas in (
            _builtin("nitrogen", Storage.COMPRESSED, nitrogen=1.0),
            _builtin("oxygen", Storage.COMPRESSED, oxygen=1.0),
            _builtin("argon", Storage.COMPRESSED, argon=1.0),
            _builtin("helium", Storage.COMPRESSED, helium=1.0),
            _builtin("hydrogen", Storage.COMPRESSED, hydrogen=1.0),
            _builtin("methane", Storage.COMPRESSED, methane=1.0),
            # Welding shielding gas EN ISO 14175 M21 (Ar + 15-25 % CO2), the common 82/18 blend.
            _builtin("argon-co2", Storage.COMPRESSED, argon=0.82, co2=0.18),
            # Medicinal air, synthetic (Ph. Eur. 1684 allows 21.0-22.5 % O2 in N2): the nominal 21/79.
            _builtin("medical-air", Storage.COMPRESSED, oxygen=0.21, nitrogen=0.79),
            # Beverage CO2 and propane: liquid under their own vapour pressure.
            _builtin("co2", Storage.LIQUEFIED, co2=1.0),
            _builtin("propane", Storage.LIQUEFIED, propane=1.0),
        )
    }
)


def check_gas(gas: Gas, where: str) -> Gas:
    """The gas itself, once its fractions and its storage are possible; GasDefinitionError otherwise."""
    total = sum(fraction for _, fraction in gas.components)
    if abs(total - 1.0) > FRACTION_SUM_TOLERANCE:
        raise GasDefinitionError(f"{where}: mole fractions of {gas.name!r} sum to {total:g}, not 1")
    if gas.storage is Storage.LIQUEFIED:
        if not gas.is_pure:
            raise GasDefinitionError(
                f"{where}: {gas.name!r} is a mixture and cannot be stored liquefied (its vapour pressure "
                "depends on what has boiled off); store it compressed or define one fluid"
            )
        fluid = gas.components[0][0]
        if fluid.critical_temperature_c <= FILLING_TEMPERATURE_C:
            raise GasDefinitionError(
                f"{where}: {fluid.name} cannot be liquid at {FILLING_TEMPERATURE_C:g} °C (critical temperature "
                f"{fluid.critical_temperature_c:g} °C); store it compressed"
            )
    elif gas.pseudo_critical_temperature_c >= ENVELOPE_MIN_TEMPERATURE_C:
        raise GasDefinitionError(
            f"{where}: {gas.name!r} would liquefy in service (critical temperature "
            f"{gas.pseudo_critical_temperature_c:.1f} °C, above {ENVELOPE_MIN_TEMPERATURE_C:g} °C); "
            "store it liquefied or lower its share of condensable fluids"
        )
    return gas


def _known(names: Mapping[str, object]) -> str:
    return ", ".join(sorted(names))


def _parse_fraction(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GasDefinitionError(f"{where}: must be a number between 0 and 1, got {value!r}")
    fraction = float(value)
    if not math.isfinite(fraction) or not 0.0 < fraction <= 1.0:
        raise GasDefinitionError(f"{where}: must be above 0 and at most 1, got {value!r}")
    return fraction


def parse_gas(entry: object, where: str) -> Gas:
    """One entry of the fleet file's ``gases`` list: ``{name, components: {fluid: fraction}, storage}``."""
    if not isinstance(entry, Mapping):
        raise GasDefinitionError(f"{where}: must be a mapping with name, components and storage")
    unknown_keys = sorted(str(key) for key in entry if key not in {"name", "components", "storage"})
    if unknown_keys:
        raise GasDefinitionError(f"{where}: unknown field(s) {', '.join(unknown_keys)}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise GasDefinitionError(f"{where}.name: 1-64 of A-Z a-z 0-9 _ . -, letter or digit first, got {name!r}")
    if name in BUILTIN_GASES:
        raise GasDefinitionError(f"{where}.name: {name!r} is a built-in gas; give the definition another name")
    components = entry.get("components")
    if not isinstance(components, Mapping) or not components:
        raise GasDefinitionError(f"{where}.components: must map fluid names to mole fractions, e.g. {{argon: 1}}")
    parsed: list[tuple[Fluid, float]] = []
    for fluid_name, value in components.items():
        fluid = FLUIDS.get(fluid_name) if isinstance(fluid_name, str) else None
        if fluid is None:
            raise GasDefinitionError(
                f"{where}.components: fluid {fluid_name!r} is not known; known fluids: {_known(FLUIDS)}"
            )
        parsed.append((fluid, _parse_fraction(value, f"{where}.components.{fluid_name}")))
    storage_value = entry.get("storage")
    storage = next((s for s in Storage if s.value == storage_value), None)
    if storage is None:
        raise GasDefinitionError(
            f"{where}.storage: must be one of {', '.join(s.value for s in Storage)}, got {storage_value!r}"
        )
    return check_gas(Gas(name, tuple(parsed), storage), where)


def parse_gases(entries: object, where: str = "gases") -> Mapping[str, Gas]:
    """The built-in gases plus the fleet file's ``gases`` list (``None`` when the file has none)."""
    if entries is None:
        return BUILTIN_GASES
    if not isinstance(entries, list):
        raise GasDefinitionError(f"{where}: must be a list of gas definitions")
    gases = dict(BUILTIN_GASES)
    for index, entry in enumerate(entries):
        gas = parse_gas(entry, f"{where}[{index}]")
        if gas.name in gases:
            raise GasDefinitionError(f"{where}[{index}].name: {gas.name!r} is defined twice")
        gases[gas.name] = gas
    return MappingProxyType(gases)


def resolve_gas(name: object, gases: Mapping[str, Gas], where: str) -> Gas:
    """The gas a meter names, or GasDefinitionError naming it and listing the known gases."""
    gas = gases.get(name) if isinstance(name, str) else None
    if gas is None:
        raise GasDefinitionError(f"{where}: gas {name!r} is not known; known gases: {_known(gases)}")
    return gas
