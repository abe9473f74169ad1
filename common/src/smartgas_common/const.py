"""Units, reference conditions and the physics envelope shared by every physics module.

Callers speak in the units the meters use (bar, litres, degrees Celsius); conversions to SI happen in
the physics modules, with these constants and no others.
"""

#: 0 °C in kelvin.
ZERO_CELSIUS_K = 273.15
PASCAL_PER_BAR = 1e5
CUBIC_METRE_PER_LITRE = 1e-3

#: ISO 13443 standard reference conditions (15 °C, 101.325 kPa): the "m³" gas suppliers bill in.
STANDARD_TEMPERATURE_C = 15.0
STANDARD_PRESSURE_BAR = 1.01325
#: Bottles are filled to their nominal pressure at this temperature (EN ISO 11114 / supplier practice).
FILLING_TEMPERATURE_C = 15.0

# The envelope: the conditions a bottle in service meets, over which compressibility is tabulated.
# Outside it the per-reading physics refuses (OutsideEnvelopeError) rather than extrapolate.
ENVELOPE_MIN_TEMPERATURE_C = -40.0
ENVELOPE_MAX_TEMPERATURE_C = 70.0
ENVELOPE_MAX_PRESSURE_BAR = 400.0


def celsius_to_kelvin(temperature_c: float) -> float:
    return temperature_c + ZERO_CELSIUS_K


def bar_to_pascal(pressure_bar: float) -> float:
    return pressure_bar * PASCAL_PER_BAR
