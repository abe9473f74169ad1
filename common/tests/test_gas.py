"""The gas definitions: built-in gases, and the fleet file's ``gases`` form refused with a precise line."""

import pytest
import yaml

from smartgas_common.gas import (
    BUILTIN_GASES,
    FLUIDS,
    GasDefinitionError,
    Storage,
    check_gas,
    parse_gases,
    resolve_gas,
)

FLEET_GASES = """
gases:
  - name: argon-co2-92-8
    components: {argon: 0.92, co2: 0.08}
    storage: compressed
  - name: air-synthetic-22
    components: {oxygen: 0.22, nitrogen: 0.78}
    storage: compressed
  - name: butane
    components: {n-butane: 1}
    storage: liquefied
"""


def test_builtin_gases_are_valid_and_cover_the_sample_fleet() -> None:
    for name, gas in BUILTIN_GASES.items():
        assert gas.name == name
        assert check_gas(gas, name) is gas
    for name in ("nitrogen", "oxygen", "argon", "argon-co2", "medical-air", "helium", "hydrogen"):
        assert BUILTIN_GASES[name].storage is Storage.COMPRESSED
    assert BUILTIN_GASES["co2"].storage is Storage.LIQUEFIED
    assert BUILTIN_GASES["propane"].storage is Storage.LIQUEFIED
    argon_co2 = BUILTIN_GASES["argon-co2"]
    assert [(fluid.name, x) for fluid, x in argon_co2.components] == [("argon", 0.82), ("co2", 0.18)]
    assert argon_co2.describe() == "argon 82 % + co2 18 %, compressed"


def test_fleet_file_gases_section_adds_to_the_builtins() -> None:
    gases = parse_gases(yaml.safe_load(FLEET_GASES)["gases"])
    assert set(BUILTIN_GASES) < set(gases)
    mix = gases["argon-co2-92-8"]
    assert [(fluid.name, x) for fluid, x in mix.components] == [("argon", 0.92), ("co2", 0.08)]
    assert gases["butane"].storage is Storage.LIQUEFIED
    assert resolve_gas("argon-co2-92-8", gases, "meters[0]") is mix


def test_no_gases_section_means_the_builtins() -> None:
    assert parse_gases(None) is BUILTIN_GASES


def test_unknown_gas_is_refused_naming_it_and_the_known_ones() -> None:
    with pytest.raises(GasDefinitionError) as caught:
        resolve_gas("argn", BUILTIN_GASES, "meters[12]")
    message = str(caught.value)
    assert message.startswith("meters[12]: gas 'argn' is not known; known gases: argon, argon-co2, co2,")
    assert "medical-air" in message


def test_unknown_fluid_is_refused_naming_it_and_the_known_ones() -> None:
    entry = {"name": "x", "components": {"argon": 0.5, "xenon": 0.5}, "storage": "compressed"}
    with pytest.raises(GasDefinitionError) as caught:
        parse_gases([entry])
    assert str(caught.value) == (
        "gases[0].components: fluid 'xenon' is not known; known fluids: " + ", ".join(sorted(FLUIDS))
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "m", "components": {"argon": 0.8, "co2": 0.18}, "storage": "compressed"},
            "gases[0]: mole fractions of 'm' sum to 0.98, not 1",
        ),
        (
            {"name": "m", "components": {"argon": 0.82, "co2": 0.28}, "storage": "compressed"},
            "gases[0]: mole fractions of 'm' sum to 1.1, not 1",
        ),
        (
            {"name": "m", "components": {"argon": 0, "co2": 1}, "storage": "compressed"},
            "gases[0].components.argon: must be above 0 and at most 1, got 0",
        ),
        (
            {"name": "m", "components": {"argon": True}, "storage": "compressed"},
            "gases[0].components.argon: must be a number between 0 and 1, got True",
        ),
        (
            {"name": "m", "components": {"argon": "82%"}, "storage": "compressed"},
            "gases[0].components.argon: must be a number between 0 and 1, got '82%'",
        ),
        (
            {"name": "m", "components": {"argon": float("nan")}, "storage": "compressed"},
            "gases[0].components.argon: must be above 0 and at most 1, got nan",
        ),
        (
            {"name": "m", "components": {}, "storage": "compressed"},
            "gases[0].components: must map fluid names to mole fractions, e.g. {argon: 1}",
        ),
        (
            {"name": "m", "components": {"argon": 1}, "storage": "gaseous"},
            "gases[0].storage: must be one of compressed, liquefied, got 'gaseous'",
        ),
        (
            {"name": "m", "components": {"argon": 1}},
            "gases[0].storage: must be one of compressed, liquefied, got None",
        ),
        (
            {"name": "argon", "components": {"argon": 1}, "storage": "compressed"},
            "gases[0].name: 'argon' is a built-in gas; give the definition another name",
        ),
        (
            {"name": "-bad", "components": {"argon": 1}, "storage": "compressed"},
            "gases[0].name: 1-64 of A-Z a-z 0-9 _ . -, letter or digit first, got '-bad'",
        ),
        (
            {"name": "m", "components": {"argon": 1}, "storage": "compressed", "colour": "blue"},
            "gases[0]: unknown field(s) colour",
        ),
        ("argon", "gases[0]: must be a mapping with name, components and storage"),
    ],
)
def test_bad_definitions_are_refused_with_the_entry_and_the_problem(entry: object, message: str) -> None:
    with pytest.raises(GasDefinitionError) as caught:
        parse_gases([entry])
    assert str(caught.value) == message


def test_storage_must_be_possible_at_ambient_temperatures() -> None:
    liquefied_mixture = {"name": "lpg", "components": {"propane": 0.7, "n-butane": 0.3}, "storage": "liquefied"}
    with pytest.raises(GasDefinitionError, match=r"'lpg' is a mixture and cannot be stored liquefied"):
        parse_gases([liquefied_mixture])
    liquefied_nitrogen = {"name": "ln2", "components": {"nitrogen": 1}, "storage": "liquefied"}
    with pytest.raises(GasDefinitionError, match=r"nitrogen cannot be liquid at 15 °C \(critical temperature -146"):
        parse_gases([liquefied_nitrogen])
    compressed_co2 = {"name": "co2-gas", "components": {"co2": 1}, "storage": "compressed"}
    with pytest.raises(GasDefinitionError, match=r"'co2-gas' would liquefy in service \(critical temperature 31.0 °C"):
        parse_gases([compressed_co2])


def test_duplicate_definitions_and_a_non_list_are_refused() -> None:
    entry = {"name": "m", "components": {"argon": 1}, "storage": "compressed"}
    with pytest.raises(GasDefinitionError, match=r"^gases\[1\].name: 'm' is defined twice$"):
        parse_gases([entry, entry])
    with pytest.raises(GasDefinitionError, match=r"^gases: must be a list of gas definitions$"):
        parse_gases({"m": entry})


def test_fractions_may_round_within_the_tolerance() -> None:
    entry = {"name": "thirds", "components": {"argon": 0.333333, "nitrogen": 0.333333, "oxygen": 0.333334}}
    gases = parse_gases([{**entry, "storage": "compressed"}])
    assert gases["thirds"].is_pure is False
