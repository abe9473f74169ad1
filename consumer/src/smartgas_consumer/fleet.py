"""The fleet file: which client and site each meter belongs to, where it is, and what bottle it watches.

Read once at start-up (``--fleet PATH``, YAML, format in ``docs/fleet.md``) into frozen objects. The
consumer uses it to enrich every reading (client, site, location, fill %) and to judge alerts against
each meter's bottle and consumption profile. A meter missing from the file is still accepted and
registered, flagged unknown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from smartgas_consumer import physics

#: Fill % is measured against the bottle's nominal filling pressure at this temperature.
REFERENCE_TEMPERATURE_C = 15.0
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class FleetFileError(ValueError):
    """The fleet file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class Site:
    """A place where a client keeps bottles."""

    site_id: str
    client_id: str
    name: str
    latitude: float
    longitude: float
    working_hours_utc: tuple[int, int]

    def is_working(self, hour_utc: int) -> bool:
        """Whether gas is normally drawn at this hour (start inclusive, end exclusive, may wrap midnight)."""
        start, end = self.working_hours_utc
        if start <= end:
            return start <= hour_utc < end
        return hour_utc >= start or hour_utc < end


@dataclass(frozen=True, slots=True)
class FleetMeter:
    """A known meter: its site and the bottle it watches."""

    meter_id: str
    site: Site
    gas: str
    volume_l: float
    nominal_pressure_bar: float
    draw_mol_per_h: float

    @property
    def client_id(self) -> str:
        return self.site.client_id

    @property
    def full_moles(self) -> float:
        """Moles in the bottle when filled to its nominal pressure at 15 °C."""
        return physics.moles(self.nominal_pressure_bar, REFERENCE_TEMPERATURE_C, self.volume_l)

    def fill_pct(self, moles: float) -> float:
        return 100.0 * moles / self.full_moles


@dataclass(frozen=True, slots=True)
class Fleet:
    """Clients, sites and meters from the fleet file; empty when no file is configured."""

    clients: dict[str, str] = field(default_factory=dict)  # client id → display name
    sites: dict[str, Site] = field(default_factory=dict)
    meters: dict[str, FleetMeter] = field(default_factory=dict)

    def meter(self, meter_id: str) -> FleetMeter | None:
        return self.meters.get(meter_id)


def load_fleet(path: Path) -> Fleet:
    """Read and check a fleet file; every problem is a FleetFileError naming the entry."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise FleetFileError(f"{path}: {err}") from err
    return parse_fleet(document, source=str(path))


def parse_fleet(document: Any, *, source: str = "fleet file") -> Fleet:
    if not isinstance(document, dict) or document.get("version") != 1:
        raise FleetFileError(f"{source}: expected a mapping with 'version: 1'")
    clients: dict[str, str] = {}
    for index, entry in enumerate(_list(document, "clients", source)):
        where = f"{source}: clients[{index}]"
        client_id = _identifier(entry, "id", where)
        if client_id in clients:
            raise FleetFileError(f"{where}: duplicate client id {client_id!r}")
        clients[client_id] = str(_required(entry, "name", where))
    sites: dict[str, Site] = {}
    for index, entry in enumerate(_list(document, "sites", source)):
        where = f"{source}: sites[{index}]"
        site_id = _identifier(entry, "id", where)
        client_id = str(_required(entry, "client", where))
        if client_id not in clients:
            raise FleetFileError(f"{where}: client {client_id!r} is not in clients")
        if site_id in sites:
            raise FleetFileError(f"{where}: duplicate site id {site_id!r}")
        hours = _required(entry, "working_hours_utc", where)
        if not (
            isinstance(hours, list) and len(hours) == 2 and all(isinstance(h, int) and 0 <= h <= 24 for h in hours)
        ):
            raise FleetFileError(f"{where}: working_hours_utc must be [start, end], hours 0 to 24")
        sites[site_id] = Site(
            site_id=site_id,
            client_id=client_id,
            name=str(_required(entry, "name", where)),
            latitude=_number(entry, "latitude", where, -90, 90),
            longitude=_number(entry, "longitude", where, -180, 180),
            working_hours_utc=(hours[0], hours[1]),
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
            volume_l=_number(entry, "volume_l", where, 0, None, exclusive_low=True),
            nominal_pressure_bar=_number(entry, "nominal_pressure_bar", where, 0, None, exclusive_low=True),
            draw_mol_per_h=_number(entry, "draw_mol_per_h", where, 0, None),
        )
    return Fleet(clients, sites, meters)


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
    if not _ID.fullmatch(value):
        raise FleetFileError(f"{where}: {key} {value!r} must be 1-64 of A-Z a-z 0-9 _ . - (letter or digit first)")
    return value


def _number(
    entry: dict[str, Any],
    key: str,
    where: str,
    low: float,
    high: float | None,
    *,
    exclusive_low: bool = False,
) -> float:
    value = _required(entry, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FleetFileError(f"{where}: {key} must be a number, got {value!r}")
    too_low = value <= low if exclusive_low else value < low
    if too_low or (high is not None and value > high):
        bound = f"above {low}" if exclusive_low else f"at least {low}"
        raise FleetFileError(f"{where}: {key} = {value} must be {bound}" + (f" and at most {high}" if high else ""))
    return float(value)
