"""The fleet file as the publisher reads it: the shared parser, and at least one meter to simulate.

The same YAML file (``fleet/fleet.yaml``) is read by the consumer, which enriches readings with it and
judges alerts against each meter's bottle and consumption. Both parse it with ``smartgas_common.fleet``,
so a file one side accepts the other accepts too (``FleetFile`` here, not to be confused with the
running ``fleet.Fleet``); every problem is a ``FleetFileError`` naming the file
and the entry.
"""

from pathlib import Path
from typing import Any

from smartgas_common.fleet import Fleet as FleetFile
from smartgas_common.fleet import FleetFileError, FleetMeter, Site, load_fleet, parse_fleet

__all__ = ["FleetFile", "FleetFileError", "FleetMeter", "Site", "load_fleet_file", "parse_fleet_file"]


def _with_meters(fleet: FleetFile, source: str) -> FleetFile:
    if not fleet.meters:
        raise FleetFileError(f"{source}: 'meters' is empty; the publisher has nothing to simulate")
    return fleet


def load_fleet_file(path: Path) -> FleetFile:
    """Read and check a fleet file; a missing or unreadable file, bad YAML or a bad entry is a FleetFileError."""
    return _with_meters(load_fleet(path), str(path))


def parse_fleet_file(document: Any, *, source: str = "fleet file") -> FleetFile:
    """Check a parsed YAML document entry by entry; the publisher also needs at least one meter."""
    return _with_meters(parse_fleet(document, source=source), source)
