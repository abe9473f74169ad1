"""The fleet file as the consumer uses it: the shared parser, and the bottle's ideal-gas reference amount.

The file is read once at start-up (``--fleet PATH``, YAML, format in ``docs/fleet.md``) by the parser both
services share (``smartgas_common.fleet``), so the publisher and the consumer accept the same files and
resolve each meter's gas alike. The consumer uses it to enrich every reading (client, site, location,
fill %) and to judge alerts against each meter's bottle and consumption profile. A meter missing from the
file is still accepted and registered, flagged unknown.
"""

from smartgas_common.fleet import Fleet, FleetFileError, FleetMeter, Site, load_fleet, parse_fleet
from smartgas_consumer import physics

__all__ = [
    "REFERENCE_TEMPERATURE_C",
    "Fleet",
    "FleetFileError",
    "FleetMeter",
    "Site",
    "full_moles",
    "ideal_fill_pct",
    "load_fleet",
    "parse_fleet",
]

#: Fill % is measured against the bottle's nominal filling pressure at this temperature.
REFERENCE_TEMPERATURE_C = 15.0


def full_moles(meter: FleetMeter) -> float:
    """Ideal-gas moles in the bottle when filled to its nominal pressure at 15 °C (the ``moles`` scale)."""
    return physics.moles(meter.nominal_pressure_bar, REFERENCE_TEMPERATURE_C, meter.volume_l)


def ideal_fill_pct(meter: FleetMeter, moles: float) -> float:
    """Ideal-gas moles as a percentage of ``full_moles``: the rough fill, for when the real one is unknown."""
    return 100.0 * moles / full_moles(meter)
