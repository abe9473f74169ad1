"""The fleet file: the clients, their sites and the meters on them, which the publisher then simulates.

The same YAML file (``fleet/fleet.yaml``) is read by the consumer, which enriches readings with it and
judges alerts against each meter's bottle and consumption. This module reads it for the publisher with
the consumer's rules (``consumer/src/smartgas_consumer/fleet.py``), so a file one side accepts the other
accepts too, into frozen objects; every problem is a ``FleetFileError`` naming the file and the entry.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: The wire format's rule for an id (docs/wire-format.md); clients and sites follow it too.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HOURS_PER_DAY = 24


class FleetFileError(ValueError):
    """The fleet file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Client:
    """A customer who owns sites."""

    client_id: str
    name: str


@dataclass(frozen=True)
class Site:
    """A place where a client keeps bottles, and the UTC hours in which it draws gas."""

    site_id: str
    client_id: str
    name: str
    latitude: float
    longitude: float
    #: [start, end) in whole UTC hours; end may be 24, and start > end wraps midnight.
    working_hours_utc: tuple[int, int]

    def is_working(self, hour_utc: int) -> bool:
        """Whether gas is drawn in this UTC hour (the consumer's rule: start inclusive, end exclusive)."""
        start, end = self.working_hours_utc
        if start <= end:
            return start <= hour_utc < end
        return hour_utc >= start or hour_utc < end


@dataclass(frozen=True)
class FleetMeter:
    """A meter of the fleet: its site and the bottle it watches."""

    meter_id: str
    site: Site
    gas: str
    #: Internal (water) volume of the bottle, litres.
    volume_l: float
    #: Filling pressure at 15 °C, bar; a full bottle.
    nominal_pressure_bar: float
    #: Typical consumption while the site works, mol/h.
    draw_mol_per_h: float


@dataclass(frozen=True)
class FleetFile:
    """Everything in the file, in the file's order."""

    clients: tuple[Client, ...]
    sites: tuple[Site, ...]
    meters: tuple[FleetMeter, ...]

    def meter_ids(self) -> list[str]:
        return [meter.meter_id for meter in self.meters]

    def meter(self, meter_id: str) -> FleetMeter | None:
        return next((meter for meter in self.meters if meter.meter_id == meter_id), None)


def load_fleet_file(path: Path) -> FleetFile:
    """Read and check a fleet file; a missing or unreadable file, bad YAML or a bad entry is a FleetFileError."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise FleetFileError(f"{path}: {err}") from err
    return parse_fleet_file(document, source=str(path))


def parse_fleet_file(document: Any, *, source: str = "fleet file") -> FleetFile:
    """Check a parsed YAML document entry by entry; the publisher also needs at least one meter."""
    if not isinstance(document, dict) or document.get("version") != 1:
        raise FleetFileError(f"{source}: expected a mapping with 'version: 1'")
    clients: dict[str, Client] = {}
    for index, entry in enumerate(_list(document, "clients", source)):
        where = f"{source}: clients[{index}]"
        client_id = _identifier(entry, "id", where)
        if client_id in clients:
            raise FleetFileError(f"{where}: duplicate client id {client_id!r}")
        clients[client_id] = Client(client_id, str(_required(entry, "name", where)))
    sites: dict[str, Site] = {}
    for index, entry in enumerate(_list(document, "sites", source)):
        where = f"{source}: sites[{index}]"
        site_id = _identifier(entry, "id", where)
        client_id = str(_required(entry, "client", where))
        if client_id not in clients:
            raise FleetFileError(f"{where}: client {client_id!r} is not in clients")
        if site_id in sites:
            raise FleetFileError(f"{where}: duplicate site id {site_id!r}")
        sites[site_id] = Site(
            site_id=site_id,
            client_id=client_id,
            name=str(_required(entry, "name", where)),
            latitude=_number(entry, "latitude", where, low=-90, high=90),
            longitude=_number(entry, "longitude", where, low=-180, high=180),
            working_hours_utc=_working_hours(entry, where),
        )
    meters: dict[str, FleetMeter] = {}
    for index, entry in enumerate(_list(document, "meters", source)):
        where = f"{source}: meters[{index}]"
        meter_id = _identifier(entry, "id", where)
        site_id = str(_required(entry, "site", where))
        if site_id not in sites:
            raise FleetFileError(f"{where}: site {site_id!r} is not in sites")
        if meter_id in meters:
            raise FleetFileError(f"{where}: duplicate meter id {meter_id!r}")
        meters[meter_id] = FleetMeter(
            meter_id=meter_id,
            site=sites[site_id],
            gas=str(_required(entry, "gas", where)),
            volume_l=_number(entry, "volume_l", where, low=0, exclusive_low=True),
            nominal_pressure_bar=_number(entry, "nominal_pressure_bar", where, low=0, exclusive_low=True),
            draw_mol_per_h=_number(entry, "draw_mol_per_h", where, low=0),
        )
    if not meters:
        raise FleetFileError(f"{source}: 'meters' is empty; the publisher has nothing to simulate")
    return FleetFile(tuple(clients.values()), tuple(sites.values()), tuple(meters.values()))


def _list(document: dict[str, Any], key: str, source: str) -> list[dict[str, Any]]:
    value = document.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise FleetFileError(f"{source}: '{key}' must be a list of mappings")
    return value


def _required(entry: dict[str, Any], key: str, where: str) -> Any:
    if key not in entry:
        raise FleetFileError(f"{where}: '{key}' is missing")
    return entry[key]


def _identifier(entry: dict[str, Any], key: str, where: str) -> str:
    value = str(_required(entry, key, where))
    if ID_PATTERN.fullmatch(value) is None:
        raise FleetFileError(f"{where}: {key} {value!r} must be 1-64 of A-Z a-z 0-9 _ . - (letter or digit first)")
    return value


def _working_hours(entry: dict[str, Any], where: str) -> tuple[int, int]:
    hours = _required(entry, "working_hours_utc", where)
    if not (
        isinstance(hours, list)
        and len(hours) == 2
        and all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h <= HOURS_PER_DAY for h in hours)
    ):
        raise FleetFileError(f"{where}: working_hours_utc must be [start, end], whole hours 0 to 24, got {hours!r}")
    return hours[0], hours[1]


def _number(
    entry: dict[str, Any],
    key: str,
    where: str,
    *,
    low: float,
    high: float | None = None,
    exclusive_low: bool = False,
) -> float:
    value = _required(entry, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FleetFileError(f"{where}: {key} must be a finite number, got {value!r}")
    too_low = value <= low if exclusive_low else value < low
    if too_low or (high is not None and value > high):
        bound = f"above {low:g}" if exclusive_low else f"at least {low:g}"
        limit = f" and at most {high:g}" if high is not None else ""
        raise FleetFileError(f"{where}: {key} = {value} must be {bound}{limit}")
    return float(value)
