"""Unit tests of the shared fleet file parser: the repository's file, every rejection, gases, working hours."""

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from smartgas_common.fleet import Fleet, FleetFileError, Site, load_fleet, parse_fleet
from smartgas_common.gas import BUILTIN_GASES

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"

MINIMAL: dict[str, Any] = {
    "version": 1,
    "clients": [{"id": "acme", "name": "ACME"}],
    "sites": [
        {
            "id": "works",
            "client": "acme",
            "name": "Works",
            "latitude": 45.7,
            "longitude": 4.8,
            "working_hours_utc": [6, 17],
        }
    ],
    "meters": [
        {
            "id": "bottle-0001",
            "site": "works",
            "gas": "argon",
            "volume_l": 50,
            "nominal_pressure_bar": 200,
            "draw_mol_per_h": 3.5,
        }
    ],
}


def changed(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """MINIMAL with the item at ``path`` set to ``value`` (or deleted when value is ...)."""
    document = copy.deepcopy(MINIMAL)
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


def test_the_repository_fleet_file_is_read_entry_by_entry() -> None:
    raw = yaml.safe_load(FLEET_FILE.read_text())
    fleet = load_fleet(FLEET_FILE)
    assert fleet.meter_ids() == [entry["id"] for entry in raw["meters"]]
    assert len(fleet.meters) == 54 and len(set(fleet.meter_ids())) == 54
    for entry, meter in zip(raw["meters"], fleet.meters.values(), strict=True):
        assert (meter.site.site_id, meter.gas.name) == (entry["site"], entry["gas"])
        assert (meter.volume_l, meter.nominal_pressure_bar, meter.draw_mol_per_h) == (
            entry["volume_l"],
            entry["nominal_pressure_bar"],
            entry["draw_mol_per_h"],
        )
    assert [site.site_id for site in fleet.sites.values()] == [entry["id"] for entry in raw["sites"]]
    assert list(fleet.clients) == [entry["id"] for entry in raw["clients"]]
    assert fleet.meter("bottle-0038") is not None and fleet.meter("bottle-0099") is None


def test_minimal_file_is_accepted() -> None:
    fleet = parse_fleet(MINIMAL)
    (meter,) = fleet.meters.values()
    assert meter.gas is BUILTIN_GASES["argon"]
    assert meter.site.working_hours_utc == (6, 17)
    assert meter.site.client_id == "acme"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (None, "expected a mapping with 'version: 1'"),
        (changed(("version",), 2), "expected a mapping with 'version: 1'"),
        (changed(("meters",), {"id": "x"}), "'meters' must be a list of mappings"),
        (changed(("clients", 0, "id"), "-acme"), "clients[0]: id '-acme' must be"),
        (changed(("sites", 0, "client"), "nobody"), "sites[0]: client 'nobody' is not in clients"),
        (changed(("sites", 0, "latitude"), 91), "sites[0]: latitude = 91 must be at least -90 and at most 90"),
        (changed(("sites", 0, "working_hours_utc"), [6]), "sites[0]: working_hours_utc must be [start, end]"),
        (changed(("sites", 0, "working_hours_utc"), [6, 25]), "sites[0]: working_hours_utc must be"),
        (changed(("sites", 0, "working_hours_utc"), ["6", 17]), "sites[0]: working_hours_utc must be"),
        (changed(("sites", 0, "name"), ...), "sites[0]: 'name' is missing"),
        (changed(("meters", 0, "site"), "elsewhere"), "meters[0]: site 'elsewhere' is not in sites"),
        (changed(("meters", 0, "id"), "bottle/1"), "meters[0]: id 'bottle/1' must be"),
        (changed(("meters", 0, "volume_l"), 0), "meters[0]: volume_l = 0 must be above 0"),
        (changed(("meters", 0, "volume_l"), "fifty"), "meters[0]: volume_l must be a finite number, got 'fifty'"),
        (changed(("meters", 0, "volume_l"), True), "meters[0]: volume_l must be a finite number, got True"),
        (changed(("meters", 0, "nominal_pressure_bar"), float("inf")), "nominal_pressure_bar must be a finite"),
        (changed(("meters", 0, "draw_mol_per_h"), -1), "meters[0]: draw_mol_per_h = -1 must be at least 0"),
        (changed(("meters", 0, "gas"), ...), "meters[0]: 'gas' is missing"),
        (changed(("meters", 0, "gas"), "argn"), "meters[0].gas: gas 'argn' is not known; known gases: argon, "),
        (changed(("meters", 0, "gas"), 7), "meters[0].gas: gas 7 is not known"),
        (changed(("gases",), {"name": "x"}), "gases: must be a list of gas definitions"),
        (
            changed(("gases",), [{"name": "m", "components": {"xenon": 1}, "storage": "compressed"}]),
            "gases[0].components: fluid 'xenon' is not known",
        ),
    ],
)
def test_bad_entries_are_refused_naming_the_entry(document: Any, message: str) -> None:
    with pytest.raises(FleetFileError) as caught:
        parse_fleet(document, source="fleet.yaml")
    assert str(caught.value).startswith("fleet.yaml: ")
    assert message in str(caught.value)


@pytest.mark.parametrize("section", ["clients", "sites", "meters"])
def test_duplicate_ids_are_refused(section: str) -> None:
    document = copy.deepcopy(MINIMAL)
    document[section].append(copy.deepcopy(document[section][0]))
    with pytest.raises(FleetFileError, match=rf"{section}\[1\]: duplicate"):
        parse_fleet(document)


def test_unreadable_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FleetFileError, match=r"missing\.yaml"):
        load_fleet(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nmeters: [unclosed\n")
    with pytest.raises(FleetFileError, match=r"broken\.yaml"):
        load_fleet(broken)


@pytest.mark.parametrize(
    ("hours", "working"),
    [
        ((6, 17), set(range(6, 17))),
        ((0, 24), set(range(24))),
        ((22, 6), {22, 23, 0, 1, 2, 3, 4, 5}),
        ((15, 23), set(range(15, 23))),
        ((8, 8), set()),
    ],
)
def test_working_hours_are_start_inclusive_end_exclusive_and_wrap(hours: tuple[int, int], working: set[int]) -> None:
    site = Site("s", "c", "S", 0.0, 0.0, hours)
    assert {h for h in range(24) if site.is_working(h)} == working


def test_a_meter_may_name_a_gas_the_file_defines() -> None:
    definition = {"name": "argon-co2-92-8", "components": {"argon": 0.92, "co2": 0.08}, "storage": "compressed"}
    document = changed(("gases",), [definition])
    document["meters"][0]["gas"] = "argon-co2-92-8"
    fleet = parse_fleet(document)
    meter = fleet.meter("bottle-0001")
    assert meter is not None and meter.gas.describe() == "argon 92 % + co2 8 %, compressed"
    assert fleet.gases_in_use() == [meter.gas]
    assert set(BUILTIN_GASES) < set(fleet.gases)


def test_the_empty_fleet_knows_the_builtin_gases_and_no_meter() -> None:
    fleet = Fleet()
    assert (dict(fleet.meters), dict(fleet.sites), dict(fleet.clients)) == ({}, {}, {})
    assert fleet.gases is BUILTIN_GASES and fleet.meter("bottle-0001") is None
