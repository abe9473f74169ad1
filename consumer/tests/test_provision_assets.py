"""The shipped provisioning assets: index templates and Kibana saved objects, checked against each other.

No Kibana runs here, so these tests hold the saved objects to what an import needs: every line an object,
every reference resolvable inside the file, every field a panel, search or map layer uses mapped in the
index template that the data view's pattern selects, with a type that fits its use.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elasticsearch_sink import to_document
from smartgas_consumer.fleet import load_fleet
from smartgas_consumer.forecaster import Forecaster
from smartgas_consumer.provision import INDEX_TEMPLATES, saved_objects_ndjson, template_body
from smartgas_consumer.store import ReadingStore, StoredReading

NUMERIC = {"long", "integer", "short", "byte", "double", "float", "half_float", "scaled_float"}
DATE = {"date", "date_nanos"}

READINGS_FIELDS = {
    "@timestamp": "date",
    "received_at": "date",
    "meter_id": "keyword",
    "epoch": "integer",
    "seq": "long",
    "pressure_bar": "double",
    "temperature_c": "double",
    "volume_l": "double",
    "moles": "double",
    "compressibility_z": "double",
    "real_moles": "double",
    "mass_kg": "double",
    "standard_volume_m3": "double",
    "liquid_state": "keyword",
    "client_id": "keyword",
    "site": "keyword",
    "gas": "keyword",
    "gas_storage": "keyword",
    "location": "geo_point",
    "fill_pct": "float",
    "meter_known": "boolean",
    "days_to_empty": "float",
    "consumption_mol_per_day": "double",
    "forecast_basis": "keyword",
    "forecast_reserve_fill_pct": "float",
}
ALERTS_FIELDS = {
    "@timestamp": "date",
    "alert_id": "keyword",
    "meter_id": "keyword",
    "client_id": "keyword",
    "site": "keyword",
    "kind": "keyword",
    "state": "keyword",
    "severity": "keyword",
    "message": "text",
    "value": "double",
    "opened_at": "date",
    "updated_at": "date",
    "resolved_at": "date",
    "occurrences": "integer",
    "acknowledged_at": "date",
    "acknowledged_by": "keyword",
    "closed_by": "keyword",
}


def templates() -> dict[str, dict[str, Any]]:
    return {template.name: template_body(template) for template in INDEX_TEMPLATES}


def field_types(template: dict[str, Any]) -> dict[str, str]:
    """Field name → mapped type, with multi-fields as ``name.sub``."""
    types: dict[str, str] = {}
    for name, mapping in template["template"]["mappings"]["properties"].items():
        types[name] = mapping["type"]
        for sub, sub_mapping in mapping.get("fields", {}).items():
            types[f"{name}.{sub}"] = sub_mapping["type"]
    return types


def saved_objects() -> list[dict[str, Any]]:
    lines = saved_objects_ndjson().decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def by_key(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(obj["type"], obj["id"]): obj for obj in objects}


def mapping_for_pattern(pattern: str) -> dict[str, str]:
    """The mapping an index matching the data view's pattern gets: the template whose patterns cover it."""
    probe = pattern.replace("*", "x")
    matching = [body for body in templates().values() if any(fnmatch.fnmatch(probe, p) for p in body["index_patterns"])]
    assert len(matching) == 1, f"{pattern}: expected one index template, found {len(matching)}"
    return field_types(matching[0])


def data_view_fields(objects: list[dict[str, Any]], data_view_id: str) -> dict[str, str]:
    data_view = by_key(objects)[("index-pattern", data_view_id)]
    return mapping_for_pattern(data_view["attributes"]["title"])


def lens_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in json.loads(dashboard["attributes"]["panelsJSON"]) if p["type"] == "lens"]


def dashboard() -> dict[str, Any]:
    return by_key(saved_objects())[("dashboard", "smartgas-fleet")]


def map_layers(map_object: dict[str, Any]) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = json.loads(map_object["attributes"]["layerListJSON"])
    return layers


#: Layer types as Kibana 7.14 wrote them; its 8.1 migration renames them (VECTOR → GEOJSON_VECTOR, ...).
MAP_LAYER_TYPES_7_14 = {"VECTOR", "VECTOR_TILE", "TILE", "TILED_VECTOR", "HEATMAP", "BLENDED_VECTOR"}


# -- index templates ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("smartgas-readings", "smartgas-readings*", READINGS_FIELDS),
        ("smartgas-alerts", "smartgas-alerts*", ALERTS_FIELDS),
    ],
)
def test_template_maps_exactly_the_agreed_fields(name: str, pattern: str, expected: dict[str, str]) -> None:
    body = templates()[name]
    assert body["index_patterns"] == [pattern]
    mappings = body["template"]["mappings"]
    assert mappings["dynamic"] == "strict"  # an unexpected field is refused, never guessed
    assert {field: mapping["type"] for field, mapping in mappings["properties"].items()} == expected
    # One node: no replica (health green); two nodes or more (docker-compose.cluster.yaml): one replica.
    assert body["template"]["settings"]["index"] == {"number_of_shards": 1, "auto_expand_replicas": "0-1"}
    assert isinstance(body["priority"], int) and body["priority"] > 100  # above the built-in templates


def test_templates_explain_their_choices() -> None:
    readings = templates()["smartgas-readings"]
    assert "double" in readings["_meta"]["numbers"]
    assert readings["_meta"]["managed_by"].startswith("smartgas-consumer")


def test_alert_message_is_searchable_and_aggregatable() -> None:
    message = templates()["smartgas-alerts"]["template"]["mappings"]["properties"]["message"]
    assert message["type"] == "text"
    assert message["fields"]["keyword"]["type"] == "keyword"


def test_shipper_documents_fit_the_readings_mapping() -> None:
    """The document the shipper builds uses only mapped fields, each with a value its type accepts."""
    fleet = load_fleet(Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml")
    reading = StoredReading(
        id=1,
        meter_id="bottle-0001",
        epoch=0,
        seq=0,
        ts="2026-11-23T08:00:00.000000Z",
        received_at="2026-11-23T08:00:00.012345Z",
        pressure_bar=250.0,
        temperature_c=25.0,
        volume_l=50.0,
        moles=504.24431932308704,
        fill_pct=95.5,
        client_id="acme-welding",
        site_id="lyon-gerland",
        meter_known=True,
        compressibility_z=0.9617,
        real_moles=524.3,
        mass_kg=16.78,
        standard_volume_m3=12.39,
    )
    # A liquefied bottle after its liquid is gone: the liquid state beside the content of what is left.
    exhausted = dataclasses.replace(reading, meter_id="bottle-0051", liquid_state="liquid_exhausted")
    # With the forecaster (no readings followed yet: the fleet file's draw), the forecast fields join in.
    forecaster = Forecaster(ReadingStore(Path("never-opened.db")), ConsumerConfig(), fleet)
    documents = [to_document(reading, fleet, forecaster), to_document(exhausted, fleet, forecaster)]
    assert "days_to_empty" not in documents[1]  # liquefied: the liquid state, not a content forecast
    types = field_types(templates()["smartgas-readings"])
    used = set().union(*documents)
    assert used == set(types), f"unmapped: {used - set(types)}, unused: {set(types) - used}"
    for field, value in (item for document in documents for item in document.items()):
        kind = types[field]
        if kind in DATE:
            # strict_date_optional_time takes up to nine fraction digits; `date` keeps milliseconds.
            datetime.fromisoformat(value.replace("Z", "+00:00"))
            assert value.endswith("Z")
        elif kind in NUMERIC:
            assert isinstance(value, int | float) and not isinstance(value, bool)
        elif kind == "keyword":
            assert isinstance(value, str)
        elif kind == "boolean":
            assert isinstance(value, bool)
        elif kind == "geo_point":
            assert -90 <= value["lat"] <= 90 and -180 <= value["lon"] <= 180


# -- Kibana saved objects ----------------------------------------------------------------------------


def test_every_line_is_an_importable_saved_object() -> None:
    raw = saved_objects_ndjson().decode("utf-8")
    assert raw.endswith("\n")
    objects = saved_objects()
    assert [obj["type"] for obj in objects] == [
        "index-pattern",
        "index-pattern",
        "search",
        "search",
        "map",
        "dashboard",
    ]
    for obj in objects:
        assert {"id", "type", "attributes", "references"} <= set(obj)
        assert "exportedCount" not in obj  # no export summary line
        assert obj["coreMigrationVersion"] and obj["typeMigrationVersion"]  # migrations start from there
    assert len(by_key(objects)) == len(objects), "duplicate (type, id)"


def test_every_reference_resolves_inside_the_file() -> None:
    """Import with no missing_references error: each reference names an object in the same file."""
    objects = saved_objects()
    present = set(by_key(objects))
    for obj in objects:
        for reference in obj["references"]:
            assert (reference["type"], reference["id"]) in present, f"{obj['id']}: {reference}"


@pytest.mark.parametrize(
    ("data_view_id", "pattern"),
    [("smartgas-readings", "smartgas-readings*"), ("smartgas-alerts", "smartgas-alerts*")],
)
def test_data_views_have_fixed_ids_and_a_date_time_field(data_view_id: str, pattern: str) -> None:
    objects = saved_objects()
    attributes = by_key(objects)[("index-pattern", data_view_id)]["attributes"]
    assert attributes["title"] == pattern
    assert attributes["timeFieldName"] == "@timestamp"
    assert mapping_for_pattern(pattern)["@timestamp"] == "date"
    for field in json.loads(attributes["fieldFormatMap"]):
        assert field in mapping_for_pattern(pattern)


def test_dashboard_identity_time_and_refresh() -> None:
    attributes = dashboard()["attributes"]
    assert attributes["title"] == "SmartGas fleet"
    assert attributes["timeRestore"] is True
    assert (attributes["timeFrom"], attributes["timeTo"]) == ("now-15m", "now")
    assert attributes["refreshInterval"] == {"pause": False, "value": 10000}
    json.loads(attributes["optionsJSON"])
    json.loads(attributes["kibanaSavedObjectMeta"]["searchSourceJSON"])


def test_dashboard_panels_are_the_agreed_ones() -> None:
    panels = json.loads(dashboard()["attributes"]["panelsJSON"])
    lens = {p["title"]: p for p in panels if p["type"] == "lens"}
    assert set(lens) == {
        "Moles per meter",
        "Pressure per meter",
        "Temperature per meter",
        "Fill % per meter",
        "Days to empty per meter",
    }
    searches = {p["title"] for p in panels if p["type"] == "search"}
    assert searches == {"Latest readings", "Alerts"}
    maps = {p["title"] for p in panels if p["type"] == "map"}
    assert maps == {"Meters by location"}
    assert {p["type"] for p in panels} == {"lens", "search", "map"}
    for panel in panels:
        assert panel["gridData"]["i"] == panel["panelIndex"]
        assert 0 <= panel["gridData"]["x"] and panel["gridData"]["x"] + panel["gridData"]["w"] <= 48
    assert len({p["panelIndex"] for p in panels}) == len(panels)


def test_panel_references_follow_the_dashboard_convention() -> None:
    """By-reference panels (searches, the map): panelRefName ↔ "panelIndex:panelRefName"; by-value Lens: each
    inner reference is repeated on the dashboard as "panelIndex:name" (Kibana injects them back from there)."""
    board = dashboard()
    names = {ref["name"]: ref for ref in board["references"]}
    panels = json.loads(board["attributes"]["panelsJSON"])
    for panel in panels:
        if panel["type"] in ("search", "map"):
            reference = names[f"{panel['panelIndex']}:{panel['panelRefName']}"]
            assert reference["type"] == panel["type"]
            assert "attributes" not in panel["embeddableConfig"]  # by reference, not by value
        else:
            assert panel["type"] == "lens"
            inner = panel["embeddableConfig"]["attributes"]["references"]
            assert inner
            for ref in inner:
                outer = names[f"{panel['panelIndex']}:{ref['name']}"]
                assert (outer["type"], outer["id"]) == (ref["type"], ref["id"])
    expected = sum(1 if "panelRefName" in p else len(p["embeddableConfig"]["attributes"]["references"]) for p in panels)
    controls = json.loads(board["attributes"]["controlGroupInput"]["panelsJSON"])
    assert len(board["references"]) == expected + len(controls)  # one data view reference per control


def test_dashboard_controls_choose_client_site_gas_and_meter() -> None:
    """An options list per field, on the readings data view, referenced as Kibana extracts them:
    "controlGroup_{id}:optionsListDataView"; chained, so a chosen client narrows the sites and meters offered."""
    board = dashboard()
    group = board["attributes"]["controlGroupInput"]
    assert group["chainingSystem"] == "HIERARCHICAL"
    controls = sorted(json.loads(group["panelsJSON"]).items(), key=lambda item: item[1]["order"])
    assert [control["explicitInput"]["fieldName"] for _, control in controls] == [
        "client_id",
        "site",
        "gas",
        "meter_id",
    ]
    names = {ref["name"]: ref for ref in board["references"]}
    fields = data_view_fields(saved_objects(), "smartgas-readings")
    for control_id, control in controls:
        assert control["type"] == "optionsListControl"
        assert control["explicitInput"]["id"] == control_id
        assert fields[control["explicitInput"]["fieldName"]] == "keyword"
        reference = names[f"controlGroup_{control_id}:optionsListDataView"]
        assert (reference["type"], reference["id"]) == ("index-pattern", "smartgas-readings")


@pytest.mark.parametrize(
    "title",
    ["Moles per meter", "Pressure per meter", "Temperature per meter", "Fill % per meter", "Days to empty per meter"],
)
def test_charts_per_meter_show_every_meter_of_the_fleet(title: str) -> None:
    """Terms on meter_id of at least the fleet's size: the titles say "per meter", so no meter is left out."""
    meters = len(load_fleet(Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml").meters)
    (panel,) = [p for p in lens_panels(dashboard()) if p["title"] == title]
    layers = panel["embeddableConfig"]["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]
    (split,) = [
        column
        for layer in layers.values()
        for column in layer["columns"].values()
        if column["operationType"] == "terms" and column["sourceField"] == "meter_id"
    ]
    assert split["params"]["size"] >= meters >= 50
    assert split["params"]["otherBucket"] is False  # no "Other" line standing for meters not drawn


@pytest.mark.parametrize(
    "title",
    ["Moles per meter", "Pressure per meter", "Temperature per meter", "Fill % per meter", "Days to empty per meter"],
)
def test_lens_charts_plot_mapped_fields_per_meter(title: str) -> None:
    objects = saved_objects()
    (panel,) = [p for p in lens_panels(dashboard()) if p["title"] == title]
    attributes = panel["embeddableConfig"]["attributes"]
    assert attributes["visualizationType"] == "lnsXY"
    state = attributes["state"]
    layers = state["datasourceStates"]["formBased"]["layers"]
    layer_refs = {ref["name"]: ref["id"] for ref in attributes["references"]}
    for layer_id, layer in layers.items():
        data_view_id = layer_refs[f"indexpattern-datasource-layer-{layer_id}"]
        fields = data_view_fields(objects, data_view_id)
        assert set(layer["columnOrder"]) == set(layer["columns"])
        for column in layer["columns"].values():
            source = column["sourceField"]
            assert source in fields, f"{title}: {source} is not mapped"
            operation = column["operationType"]
            if operation == "date_histogram":
                assert fields[source] in DATE
            elif operation == "terms":
                assert fields[source] == "keyword"
            else:
                assert fields[source] in NUMERIC
    (xy_layer,) = state["visualization"]["layers"]
    columns = layers[xy_layer["layerId"]]["columns"]
    assert columns[xy_layer["xAccessor"]]["sourceField"] == "@timestamp"
    assert columns[xy_layer["splitAccessor"]]["sourceField"] == "meter_id"
    assert columns[xy_layer["splitAccessor"]]["params"]["size"] >= 5  # top N meters
    assert all(accessor in columns for accessor in xy_layer["accessors"])
    assert xy_layer["seriesType"] == "line"


@pytest.mark.parametrize(
    ("search_id", "columns"),
    [
        ("smartgas-latest-readings", ["meter_id", "pressure_bar", "temperature_c", "moles"]),
        ("smartgas-alerts-list", ["meter_id", "kind", "severity", "state", "message", "value"]),
    ],
)
def test_saved_searches_show_mapped_columns_newest_first(search_id: str, columns: list[str]) -> None:
    objects = saved_objects()
    search = by_key(objects)[("search", search_id)]
    attributes = search["attributes"]
    assert attributes["columns"] == columns
    assert attributes["sort"] == [["@timestamp", "desc"]]
    source = json.loads(attributes["kibanaSavedObjectMeta"]["searchSourceJSON"])
    (reference,) = [ref for ref in search["references"] if ref["name"] == source["indexRefName"]]
    fields = data_view_fields(objects, reference["id"])
    for column in [*columns, "@timestamp"]:
        assert column in fields, f"{search_id}: {column} is not mapped"


def test_dashboard_shows_fill_percent_per_meter() -> None:
    (panel,) = [p for p in lens_panels(dashboard()) if p["title"] == "Fill % per meter"]
    layers = panel["embeddableConfig"]["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]
    metrics = [c for layer in layers.values() for c in layer["columns"].values() if not c["isBucketed"]]
    assert [(c["sourceField"], c["operationType"]) for c in metrics] == [("fill_pct", "average")]


def test_dashboard_shows_days_to_empty_per_meter() -> None:
    (panel,) = [p for p in lens_panels(dashboard()) if p["title"] == "Days to empty per meter"]
    layers = panel["embeddableConfig"]["attributes"]["state"]["datasourceStates"]["formBased"]["layers"]
    metrics = [c for layer in layers.values() for c in layer["columns"].values() if not c["isBucketed"]]
    assert [(c["sourceField"], c["operationType"]) for c in metrics] == [("days_to_empty", "average")]


def test_dashboard_has_an_alerts_panel_on_the_alerts_data_view() -> None:
    objects = saved_objects()
    board = dashboard()
    names = {ref["name"]: ref for ref in board["references"]}
    (panel,) = [p for p in json.loads(board["attributes"]["panelsJSON"]) if p["title"] == "Alerts"]
    search = by_key(objects)[("search", names[f"{panel['panelIndex']}:{panel['panelRefName']}"]["id"])]
    (reference,) = search["references"]
    assert (reference["type"], reference["id"]) == ("index-pattern", "smartgas-alerts")
    assert panel["gridData"]["w"] == 48  # the full width: alerts are the first thing to read


# -- the map -----------------------------------------------------------------------------------------


def meters_map() -> dict[str, Any]:
    return by_key(saved_objects())[("map", "smartgas-meters-map")]


def test_map_is_a_7_14_map_object_kibana_migrates_forward() -> None:
    """Written like Kibana's own fixtures (kbn_archiver/maps.json): 7.14 layer types, typeMigrationVersion 7.14.0."""
    map_object = meters_map()
    assert map_object["typeMigrationVersion"] == "7.14.0"
    attributes = map_object["attributes"]
    assert attributes["title"] == "SmartGas meters map"
    layers = map_layers(map_object)
    assert {layer["type"] for layer in layers} <= MAP_LAYER_TYPES_7_14
    assert len({layer["id"] for layer in layers}) == len(layers)
    state = json.loads(attributes["mapStateJSON"])
    assert -90 <= state["center"]["lat"] <= 90 and -180 <= state["center"]["lon"] <= 180
    assert state["refreshConfig"] == {"isPaused": False, "interval": 10000}  # as the dashboard
    json.loads(attributes["uiStateJSON"])
    (basemap, *_) = layers
    assert basemap["sourceDescriptor"] == {"type": "EMS_TMS", "isAutoSelect": True}


def test_map_layer_references_follow_kibanas_naming() -> None:
    """Kibana extracts a layer's data view as reference "layer_{index}_source_index_pattern"."""
    map_object = meters_map()
    references = {ref["name"]: ref for ref in map_object["references"]}
    expected = set()
    for index, layer in enumerate(map_layers(map_object)):
        ref_name = layer["sourceDescriptor"].get("indexPatternRefName")
        if ref_name is None:
            continue
        assert ref_name == f"layer_{index}_source_index_pattern"
        assert "indexPatternId" not in layer["sourceDescriptor"]  # the id lives in the reference only
        assert references[ref_name]["type"] == "index-pattern"
        expected.add(ref_name)
    assert set(references) == expected


def test_map_shows_each_meter_at_its_location_with_mapped_fields() -> None:
    objects = saved_objects()
    map_object = meters_map()
    references = {ref["name"]: ref["id"] for ref in map_object["references"]}
    (layer,) = [layer for layer in map_layers(map_object) if layer["sourceDescriptor"]["type"] == "ES_SEARCH"]
    source = layer["sourceDescriptor"]
    fields = data_view_fields(objects, references[source["indexPatternRefName"]])
    assert references[source["indexPatternRefName"]] == "smartgas-readings"
    assert fields[source["geoField"]] == "geo_point"
    # One point per meter: its latest reading (top hit by time, split by meter).
    assert (source["scalingType"], source["topHitsSize"]) == ("TOP_HITS", 1)
    assert fields[source["topHitsSplitField"]] == "keyword" and source["topHitsSplitField"] == "meter_id"
    assert fields[source["sortField"]] in DATE and source["sortOrder"] == "desc"
    for name in source["tooltipProperties"]:
        assert name in fields, f"tooltip field {name} is not mapped"
    for name, style in layer["style"]["properties"].items():
        if style.get("type") != "DYNAMIC":
            continue
        field = style["options"]["field"]
        assert field["origin"] == "source"
        assert field["name"] in fields, f"{name}: {field['name']} is not mapped"
        if name in ("fillColor", "lineColor", "iconSize", "lineWidth"):
            assert fields[field["name"]] in NUMERIC, f"{name} scales with a number"
