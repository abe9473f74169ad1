"""Gas physics, pure and unit-explicit: the amount of gas in a bottle by the ideal gas law.

n = P·V / (R·T), with P in pascal, V in cubic metres and T in kelvin. Callers speak in the units the meters
use (bar, litres, degrees Celsius); the conversions to SI happen here and nowhere else.
"""

import math

#: Molar gas constant, J/(mol·K) (CODATA 2018, exact since the 2019 SI redefinition).
GAS_CONSTANT_J_PER_MOL_K = 8.314462618
#: 0 °C in kelvin.
ZERO_CELSIUS_K = 273.15
PASCAL_PER_BAR = 1e5
CUBIC_METRE_PER_LITRE = 1e-3

# Plausibility bounds: the widest values a real bottle and its sensor can report. Anything outside is a
# broken sensor or a forged reading, refused at the edge (reading.py) so nothing past it sees it.
#: Highest pressure, bar: the highest-rated commercial cylinders (type IV hydrogen, 700 bar nominal,
#: tested to 1.5x) stay below 1050 bar (ISO 11119-3, EC 79/2009).
MAX_PRESSURE_BAR = 1100.0
#: Coldest gas temperature, °C: cryogenic service aside, a bottle's rated range starts at -50 °C
#: (ISO 11114-1); sensors read a little beyond.
MIN_TEMPERATURE_C = -100.0
#: Hottest gas temperature, °C: bottles are rated to +65 °C; a fire drives them well past that and the
#: over-temperature alert must still see it, so the bound is where the cylinder would already have burst.
MAX_TEMPERATURE_C = 500.0
#: Largest internal volume, litres: a tube trailer's single tube holds about 3000 L of water capacity.
MAX_VOLUME_L = 5000.0
#: Smallest internal volume, litres: a 0.1 L lecture bottle is the smallest gas cylinder sold.
MIN_VOLUME_L = 0.01
#: Most gas in one bottle, moles: the bound every derived amount is checked against. The largest bounds
#: above give 1100e5 Pa x 5 m³ / (8.314 x 173.15 K) = 3.8e5 mol.
MAX_MOLES = 1e6


def bar_to_pascal(pressure_bar: float) -> float:
    return pressure_bar * PASCAL_PER_BAR


def litre_to_cubic_metre(volume_l: float) -> float:
    return volume_l * CUBIC_METRE_PER_LITRE


def celsius_to_kelvin(temperature_c: float) -> float:
    return temperature_c + ZERO_CELSIUS_K


def moles(pressure_bar: float, temperature_c: float, volume_l: float) -> float:
    """Amount of gas, in moles, in a bottle of ``volume_l`` at ``pressure_bar`` and ``temperature_c``.

    Raises ValueError for inputs no bottle can have (the ingest stage rejects them before this is
    reached; the check here keeps the function honest on its own).
    """
    temperature_k = celsius_to_kelvin(temperature_c)
    if not all(math.isfinite(x) for x in (pressure_bar, temperature_c, volume_l)):
        raise ValueError("pressure, temperature and volume must be finite")
    if temperature_k <= 0:
        raise ValueError("temperature must be above absolute zero")
    if pressure_bar < 0 or volume_l <= 0:
        raise ValueError("pressure must be >= 0 and volume > 0")
    return bar_to_pascal(pressure_bar) * litre_to_cubic_metre(volume_l) / (GAS_CONSTANT_J_PER_MOL_K * temperature_k)


def plausible_moles(amount_mol: float) -> bool:
    """Whether a computed amount of gas is one a bottle can hold: finite, 0 or more, at most MAX_MOLES."""
    return math.isfinite(amount_mol) and 0 <= amount_mol <= MAX_MOLES
