"""The fleet file: clients, their sites, the gases, and the meters with the bottle each one watches.

One parser for both services (``fleet/fleet.yaml``, format in ``docs/fleet.md``): the consumer enriches
readings with it and judges alerts against each meter's bottle, the publisher simulates its meters. So a
file one side accepts the other accepts too, and a meter's ``gas`` is resolved here, once, against the
built-in gases and the file's own ``gases`` list (``gas.py``). Every problem is a ``FleetFileError``
naming the file and the entry, e.g. ``fleet/fleet.yaml: meters[12].gas: gas 'argn' is not known; …``.
"""

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from smartgas_common.gas import BUILTIN_GASES, Gas, GasDefinitionError, parse_gases, resolve_gas

#: The wire format's rule for an id (docs/wire-format.md); clients and sites follow it too.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HOURS_PER_DAY = 24


class FleetFileError(ValueError):
    """The fleet file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
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
        """Whether gas is drawn in this UTC hour (start inclusive, end exclusive, may wrap midnight)."""
        start, end = self.working_hours_utc
        if start <= end:
            return start <= hour_utc < end
        return hour_utc >= start or hour_utc < end


@dataclass(frozen=True, slots=True)
class FleetMeter:
    """A meter of the fleet: its site and the bottle it watches."""

    meter_id: str
    site: Site
    gas: Gas
    #: Internal (water) volume of the bottle, litres.
    volume_l: float
    #: Filling pressure at 15 °C, bar: a full bottle.
    nominal_pressure_bar: float
    #: Typical consumption while the site works, mol/h.
    draw_mol_per_h: float

    @property
    def client_id(self) -> str:
        return self.site.client_id


@dataclass(frozen=True, slots=True)
class Fleet:
    """Everything in the file, in the file's order; empty when no file is configured."""

    #: Client id → display name.
    clients: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    sites: Mapping[str, Site] = field(default_factory=lambda: MappingProxyType({}))
    meters: Mapping[str, FleetMeter] = field(default_factory=lambda: MappingProxyType({}))
    #: The gases meters may name: the built-in ones and the file's own.
    gases: Mapping[str, Gas] = field(default_factory=lambda: BUILTIN_GASES)

    def meter(self, meter_id: str) -> FleetMeter | None:
        return self.meters.get(meter_id)

    def meter_ids(self) -> list[str]:
        return list(self.meters)

    def gases_in_use(self) -> list[Gas]:
        """The distinct gases the meters hold, in the order they first appear (what needs a model)."""
        return list({meter.gas.name: meter.gas for meter in self.meters.values()}.values())


def load_fleet(path: Path) -> Fleet:
    """Read and check a fleet file; a missing or unreadable file, bad YAML or a bad entry is a FleetFileError."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise FleetFileError(f"{path}: {err}") from err
    return parse_fleet(document, source=str(path))


def parse_fleet(document: Any, *, source: str = "fleet file") -> Fleet:
    """Check a parsed YAML document entry by entry into a Fleet."""
    if not isinstance(document, dict) or document.get("version") != 1:
        raise FleetFileError(f"{source}: expected a mapping with 'version: 1'")
    try:
        gases = parse_gases(document.get("gases"))
    except GasDefinitionError as err:
        raise FleetFileError(f"{source}: {err}") from err
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
        try:
            gas = resolve_gas(_required(entry, "gas", where), gases, f"{where}.gas")
        except GasDefinitionError as err:
            raise FleetFileError(str(err)) from err
        meters[meter_id] = FleetMeter(
            meter_id=meter_id,
            site=sites[site_id],
            gas=gas,
            volume_l=_number(entry, "volume_l", where, low=0, exclusive_low=True),
            nominal_pressure_bar=_number(entry, "nominal_pressure_bar", where, low=0, exclusive_low=True),
            draw_mol_per_h=_number(entry, "draw_mol_per_h", where, low=0),
        )
    return Fleet(MappingProxyType(clients), MappingProxyType(sites), MappingProxyType(meters), gases)


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
