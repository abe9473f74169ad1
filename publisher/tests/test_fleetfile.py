"""The publisher's side of the fleet file: the shared parser (common/tests/test_fleet.py tests it entry by
entry) plus the publisher's own rule, at least one meter; and the draw profile of working hours."""

import copy

import pytest
import yaml

from conftest import FLEET_FILE
from smartgas_publisher.fleetfile import FleetFileError, Site, load_fleet_file, parse_fleet_file
from smartgas_publisher.model import working_hours_weights


def test_the_repository_fleet_file_gives_the_publisher_its_meters_in_order() -> None:
    raw = yaml.safe_load(FLEET_FILE.read_text())
    fleet = load_fleet_file(FLEET_FILE)
    assert fleet.meter_ids() == [entry["id"] for entry in raw["meters"]]
    assert [meter.gas.name for meter in fleet.meters.values()] == [entry["gas"] for entry in raw["meters"]]


def test_a_file_without_meters_is_refused() -> None:
    document = copy.deepcopy(yaml.safe_load(FLEET_FILE.read_text()))
    document["meters"] = []
    with pytest.raises(FleetFileError, match=r"^fleet\.yaml: 'meters' is empty; the publisher has nothing"):
        parse_fleet_file(document, source="fleet.yaml")


def test_an_unknown_gas_is_refused_naming_the_meter() -> None:
    document = copy.deepcopy(yaml.safe_load(FLEET_FILE.read_text()))
    document["meters"][3]["gas"] = "argn"
    with pytest.raises(FleetFileError, match=r"^fleet\.yaml: meters\[3\]\.gas: gas 'argn' is not known; known gases"):
        parse_fleet_file(document, source="fleet.yaml")


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
