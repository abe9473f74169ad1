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
