"""Unit tests of the fleet file reader: the repository's file, every rejection, working hours."""

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import FLEET_FILE
from smartgas_publisher.fleetfile import FleetFileError, Site, load_fleet_file, parse_fleet_file
from smartgas_publisher.model import working_hours_weights

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
    fleet = load_fleet_file(FLEET_FILE)
    assert fleet.meter_ids() == [entry["id"] for entry in raw["meters"]]
    assert len(fleet.meters) == 50 and len(set(fleet.meter_ids())) == 50
    for entry, meter in zip(raw["meters"], fleet.meters, strict=True):
        assert (meter.site.site_id, meter.gas) == (entry["site"], entry["gas"])
        assert (meter.volume_l, meter.nominal_pressure_bar, meter.draw_mol_per_h) == (
            entry["volume_l"],
            entry["nominal_pressure_bar"],
            entry["draw_mol_per_h"],
        )
    assert [site.site_id for site in fleet.sites] == [entry["id"] for entry in raw["sites"]]
    assert [client.client_id for client in fleet.clients] == [entry["id"] for entry in raw["clients"]]
    assert fleet.meter("bottle-0038") is not None and fleet.meter("bottle-0051") is None


def test_minimal_file_is_accepted() -> None:
    fleet = parse_fleet_file(MINIMAL)
    (meter,) = fleet.meters
    assert meter.site.working_hours_utc == (6, 17)
    assert meter.site.client_id == "acme"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (None, "expected a mapping with 'version: 1'"),
        (changed(("version",), 2), "expected a mapping with 'version: 1'"),
        (changed(("meters",), []), "'meters' is empty"),
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
    ],
)
def test_bad_entries_are_refused_naming_the_entry(document: Any, message: str) -> None:
    with pytest.raises(FleetFileError) as caught:
        parse_fleet_file(document, source="fleet.yaml")
    assert str(caught.value).startswith("fleet.yaml: ")
    assert message in str(caught.value)


@pytest.mark.parametrize("section", ["clients", "sites", "meters"])
def test_duplicate_ids_are_refused(section: str) -> None:
    document = copy.deepcopy(MINIMAL)
    document[section].append(copy.deepcopy(document[section][0]))
    with pytest.raises(FleetFileError, match=rf"{section}\[1\]: duplicate"):
        parse_fleet_file(document)


def test_unreadable_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(FleetFileError, match=r"missing\.yaml"):
        load_fleet_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("version: 1\nmeters: [unclosed\n")
    with pytest.raises(FleetFileError, match=r"broken\.yaml"):
        load_fleet_file(broken)


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


def test_draw_profile_draws_exactly_in_the_working_hours_averaging_one() -> None:
    for start in range(25):
        for end in range(25):
            weights = working_hours_weights(start, end)
            site = Site("s", "c", "S", 0.0, 0.0, (start, end))
            assert len(weights) == 24
            assert [w > 0 for w in weights] == [site.is_working(h) for h in range(24)], (start, end)
            working = [w for w in weights if w > 0]
            if working:
                assert sum(working) / len(working) == pytest.approx(1.0)
                assert max(working) < 1.25  # a gentle shape: far from the 3 × draw leak threshold
