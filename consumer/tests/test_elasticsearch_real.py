"""The contract Elasticsearch itself decides, against a real Elasticsearch 9 node (elasticsearch_node.py).

Bulk item results, mapping errors, templates, data streams and their lifecycle, 409s for a replay, a
template upgrade on a data stream that already exists, and the node killed mid-shipping. The node is
shared by the session and has no ``_data_stream`` API to delete with, so every test writes to data
streams of its own (``smartgas-readings-<random>``, which the templates cover).
Without Java 21+ or the zip these tests skip, saying which is missing.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from elasticsearch import AsyncElasticsearch
from elasticsearch_node import ElasticsearchNode
from test_elasticsearch_sink import T0, add_readings, all_settled, make_sink, wait_until

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elastic import make_client
from smartgas_consumer.elasticsearch_sink import ElasticsearchSink, ReadingSource, Shipment
from smartgas_consumer.fleet import load_fleet
from smartgas_consumer.forecaster import Forecaster
from smartgas_consumer.provision import (
    INDEX_TEMPLATES,
    evolve_data_stream,
    install_templates,
    prepare_data_stream,
    provision,
    template_body,
)
from smartgas_consumer.server import Consumer
from smartgas_consumer.store import ReadingStore

pytestmark = [pytest.mark.integration, pytest.mark.elasticsearch]

READINGS_TEMPLATE = INDEX_TEMPLATES[0]
FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
#: What readings template version 5 added, and their types.
FORECAST_FIELDS = {
    "days_to_empty": "float",
    "consumption_mol_per_day": "double",
    "forecast_basis": "keyword",
    "forecast_reserve_fill_pct": "float",
}


def fresh_stream(kind: str = "readings") -> str:
    return f"smartgas-{kind}-test-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def es(elasticsearch_url: str) -> AsyncIterator[AsyncElasticsearch]:
    client = make_client(ConsumerConfig(elasticsearch_url=elasticsearch_url), request_timeout_s=30)
    try:
        await install_templates(client, retention_days=7)
        yield client
    finally:
        await client.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ReadingStore]:
    opened = ReadingStore(tmp_path / "store.db")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def sink_for(store: ReadingStore, url: str, data_stream: str, **kwargs: Any) -> ElasticsearchSink:
    sink = make_sink(store, url, timeout_s=30.0, **kwargs)
    assert isinstance(sink.source, ReadingSource)
    sink.source.index = data_stream
    return sink


async def ship_all(sink: ElasticsearchSink, store: ReadingStore, timeout_s: float = 120.0, *, counted: int = 0) -> None:
    """Run ``sink`` until the store has nothing pending and, if ``counted``, until the sink's counters hold
    that many readings: it marks a batch in the store before it counts it, so a stop right after the store
    is settled could otherwise cancel it between the two (the counters are read after the stop)."""

    async def counted_all() -> bool:
        return sink.counters.shipped + sink.counters.dead_lettered >= counted

    await sink.start()
    try:
        await wait_until(lambda: all_settled(store), timeout_s=timeout_s)
        await wait_until(counted_all, timeout_s=timeout_s)
    finally:
        await sink.stop()


async def documents(es: AsyncElasticsearch, data_stream: str) -> dict[str, dict[str, Any]]:
    await es.indices.refresh(index=data_stream)
    found = await es.search(index=data_stream, size=10_000, query={"match_all": {}})
    hits = found["hits"]["hits"]
    by_id = {hit["_id"]: hit["_source"] for hit in hits}
    assert len(by_id) == len(hits), "the same _id indexed twice"
    return by_id


async def data_stream_metadata(es: AsyncElasticsearch, data_stream: str) -> dict[str, Any]:
    """The data stream as the cluster state holds it (the zip has no ``GET _data_stream``)."""
    state = await es.cluster.state(metric="metadata", filter_path="metadata.data_stream")
    streams: dict[str, Any] = state["metadata"]["data_stream"]["data_stream"]
    return dict(streams[data_stream])


async def test_readings_become_a_data_stream_with_natural_ids(
    store: ReadingStore, es: AsyncElasticsearch, elasticsearch_url: str
) -> None:
    stream = fresh_stream()
    await add_readings(store, 120)
    sink = sink_for(store, elasticsearch_url, stream)
    await ship_all(sink, store)
    indexed = await documents(es, stream)
    assert len(indexed) == 120 and sink.counters.shipped == 120
    assert indexed["m1:0:7"] == {
        "@timestamp": "2026-11-23T08:01:10.000000Z",
        "received_at": "2026-11-23T08:01:10.005000Z",
        "meter_id": "m1",
        "epoch": 0,
        "seq": 7,
        "meter_known": False,
        "pressure_bar": 193.0,
        "temperature_c": 20.0,
        "volume_l": 50.0,
        "moles": 403.0,
    }
    resolved = await es.indices.resolve_index(name=stream)
    assert [entry["name"] for entry in resolved["data_streams"]] == [stream]
    backing = resolved["data_streams"][0]["backing_indices"][0]
    mapping = (await es.indices.get_mapping(index=backing))[backing]["mappings"]
    assert mapping["dynamic"] == "strict"
    assert mapping["properties"]["moles"]["type"] == "double"
    assert mapping["properties"]["meter_id"]["type"] == "keyword"
    # auto_expand_replicas 0-1: a single node holds no replica, so the data stream is green, not yellow.
    assert (await es.cluster.health(index=stream))["status"] == "green"


async def test_data_stream_lifecycle_keeps_the_configured_retention(
    es: AsyncElasticsearch, elasticsearch_url: str
) -> None:
    stream = fresh_stream()
    await es.index(index=stream, op_type="create", document={"@timestamp": "2026-11-23T08:00:00Z", "meter_id": "m"})
    assert (await data_stream_metadata(es, stream))["lifecycle"] == {"enabled": True, "data_retention": "7d"}
    await install_templates(es, retention_days=0)  # 0 keeps everything
    forever = fresh_stream()
    await es.index(index=forever, op_type="create", document={"@timestamp": "2026-11-23T08:00:00Z", "meter_id": "m"})
    assert (await data_stream_metadata(es, forever))["lifecycle"] == {"enabled": True}
    await install_templates(es, retention_days=7)


class OneBadDocument(ReadingSource):
    """Readings with one document Elasticsearch must refuse (a text where the mapping has a double)."""

    async def pending(self, limit: int) -> list[Shipment]:
        shipments = await super().pending(limit)
        return [
            dataclasses.replace(shipment, document={**shipment.document, "pressure_bar": "high"})
            if shipment.doc_id == "m1:0:3"
            else shipment
            for shipment in shipments
        ]


async def test_mapping_error_is_dead_lettered_with_elasticsearchs_reason(
    store: ReadingStore, es: AsyncElasticsearch, elasticsearch_url: str
) -> None:
    stream = fresh_stream()
    await add_readings(store, 10)
    sink = make_sink(store, elasticsearch_url, timeout_s=30.0)
    sink.source = OneBadDocument(store, index=stream)
    await ship_all(sink, store)
    letters = await store.dead_letters()
    assert [(d.meter_id, d.seq, d.status) for d in letters] == [("m1", 3, 400)]
    assert "document_parsing_exception" in letters[0].reason and "pressure_bar" in letters[0].reason
    assert sorted(await documents(es, stream)) == sorted(f"m1:0:{seq}" for seq in range(10) if seq != 3)
    assert sink.counters.dead_lettered == 1 and sink.counters.shipped == 9


async def test_replay_is_answered_409_and_counted_as_shipped(
    store: ReadingStore, es: AsyncElasticsearch, elasticsearch_url: str, tmp_path: Path
) -> None:
    stream = fresh_stream()
    await add_readings(store, 10)
    await ship_all(sink_for(store, elasticsearch_url, stream), store)
    # A crash between Elasticsearch's confirmation and our marking: everything looks unshipped again.
    # Through the store's own writer: it holds the file exclusively (no second connection may write).
    await store.write(lambda connection: connection.execute("UPDATE readings SET ship_state = 0, shipped_at = NULL"))
    assert (await store.summary()).pending == 10
    replay = sink_for(store, elasticsearch_url, stream)
    await ship_all(replay, store, counted=10)
    assert replay.counters.shipped == 10 and replay.counters.dead_lettered == 0
    assert (await store.summary()).dead_letters == 0
    assert len(await documents(es, stream)) == 10


def old_readings_template(epoch_type: str | None) -> dict[str, Any]:
    """The readings template as an older stack had it: no ``epoch`` field, or ``epoch`` of another type."""
    body = copy.deepcopy(template_body(READINGS_TEMPLATE))
    properties = body["template"]["mappings"]["properties"]
    if epoch_type is None:
        del properties["epoch"]
    else:
        properties["epoch"] = {"type": epoch_type}
    body["version"] = 1
    return body


async def create_with_old_template(es: AsyncElasticsearch, stream: str, epoch_type: str | None) -> None:
    """Make ``stream`` with the old template (installed under a higher priority, then removed)."""
    body = old_readings_template(epoch_type)
    body["index_patterns"] = [stream]
    body["priority"] = 500
    name = f"old-{stream}"
    await es.indices.put_index_template(name=name, body=body)
    old_document = {"@timestamp": "2026-11-22T08:00:00Z", "meter_id": "m0", "seq": 0, "meter_known": False}
    await es.index(index=stream, op_type="create", id="m0:old", document=old_document)
    await es.indices.delete_index_template(name=name)


async def test_without_the_upgrade_step_an_old_data_stream_refuses_every_reading(
    store: ReadingStore, es: AsyncElasticsearch, elasticsearch_url: str
) -> None:
    """What the upgrade step prevents: the new template alone never reaches the existing backing index."""
    stream = fresh_stream()
    await create_with_old_template(es, stream, epoch_type=None)
    await add_readings(store, 3)
    await ship_all(sink_for(store, elasticsearch_url, stream), store)
    letters = await store.dead_letters()
    assert len(letters) == 3 and all("strict_dynamic_mapping_exception" in d.reason for d in letters)


@pytest.mark.parametrize(
    ("epoch_type", "first", "again"),
    [
        (None, "mappings updated in place", "mappings updated in place"),
        ("keyword", "rolled over to a backing index from the new template", "write index mappings updated"),
    ],
)
async def test_template_upgrade_on_an_existing_data_stream_keeps_shipping(
    store: ReadingStore,
    es: AsyncElasticsearch,
    elasticsearch_url: str,
    epoch_type: str | None,
    first: str,
    again: str,
) -> None:
    """Create with the old template, upgrade (the shipper's start-up step), ship: nothing dead-lettered."""
    stream = fresh_stream()
    await create_with_old_template(es, stream, epoch_type)
    done: list[str] = []

    async def prepare(client: AsyncElasticsearch) -> None:
        done.append(await prepare_data_stream(client, stream, retention_days=7))
        done.append(await evolve_data_stream(client, stream))  # a second start changes nothing more

    await add_readings(store, 20)
    sink = sink_for(store, elasticsearch_url, stream, prepare=prepare)
    await ship_all(sink, store)
    assert (await store.summary()).dead_letters == 0
    indexed = await documents(es, stream)
    assert len(indexed) == 21 and "m0:old" in indexed
    assert indexed["m1:0:5"]["epoch"] == 0
    backing = [index["index_name"] for index in (await data_stream_metadata(es, stream))["indices"]]
    write_index_mapping = (await es.indices.get_mapping(index=backing[-1]))[backing[-1]]["mappings"]
    assert write_index_mapping["properties"]["epoch"]["type"] == "integer"
    assert len(backing) == (1 if epoch_type is None else 2)
    assert done == [first, again]
    if epoch_type is not None:
        # The old backing index keeps its own type for its old data.
        old_mapping = (await es.indices.get_mapping(index=backing[0]))[backing[0]]["mappings"]
        assert old_mapping["properties"]["epoch"]["type"] == epoch_type


async def test_killed_node_mid_shipping_loses_and_duplicates_nothing(
    restartable_elasticsearch: ElasticsearchNode, consumer_config: ConsumerConfig
) -> None:
    """Readings acknowledged over CoAP while the node is killed (SIGKILL) and restarted: each indexed once."""
    node = restartable_elasticsearch
    stream = fresh_stream()
    config = dataclasses.replace(
        consumer_config, elasticsearch_url=node.url, elasticsearch_index=stream, ship_batch_size=20
    )
    consumer = Consumer(config)
    await consumer.start()
    for sink in consumer.sinks:
        sink.backoff = dataclasses.replace(sink.backoff, base_s=0.05, cap_s=0.5)
    client = make_client(config, request_timeout_s=30)
    coap = await aiocoap.Context.create_client_context(transports=["udp6"])
    acknowledged: list[str] = []

    async def send(seq: int) -> None:
        body = {
            "seq": seq,
            "ts": (T0 + timedelta(seconds=10 * seq)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "pressure_bar": 200.0,
            "temperature_c": 20.0,
            "volume_l": 50.0,
        }
        request = aiocoap.Message(
            code=Code.PUT,
            uri=f"coap://127.0.0.1:{consumer.port}/meters/crash-meter/reading",
            payload=json.dumps(body).encode(),
            content_format=50,
        )
        response = await asyncio.wait_for(coap.request(request).response, 30)
        if response.code == Code.CHANGED:
            acknowledged.append(f"crash-meter:0:{seq}")

    try:
        for seq in range(60):
            await send(seq)
        readings_sink = consumer.sinks[0]
        await wait_until(lambda: _shipped_at_least(readings_sink, 20), timeout_s=120)
        node.kill()
        for seq in range(60, 120):  # accepted and acknowledged while Elasticsearch is gone
            await send(seq)
        node.start()  # same port, same data
        await wait_until(lambda: all_settled(consumer.store), timeout_s=180)
        assert len(acknowledged) == 120
        await client.indices.refresh(index=stream)
        found = await client.search(index=stream, size=1000, query={"match_all": {}})
        ids = [hit["_id"] for hit in found["hits"]["hits"]]
        assert sorted(ids) == sorted(acknowledged)  # every acknowledged reading, each exactly once
        assert (await consumer.store.summary()).dead_letters == 0
    finally:
        await coap.shutdown()
        await consumer.stop()
        await client.close()


async def _shipped_at_least(sink: ElasticsearchSink, count: int) -> bool:
    return sink.counters.shipped >= count


async def test_setup_installs_the_templates_and_upgrades_existing_data_streams(
    es: AsyncElasticsearch, elasticsearch_url: str
) -> None:
    """`smartgas-consumer setup` (its Elasticsearch part) on a real node: templates with the configured
    retention, and a data stream made by an older template brought up to the new one."""
    stream = fresh_stream()
    await create_with_old_template(es, stream, epoch_type=None)
    config = ConsumerConfig(
        elasticsearch_url=elasticsearch_url, elasticsearch_index=stream, elasticsearch_retention_days=9
    )
    try:
        await provision(config, kibana_system_password=None, wait_timeout_s=60)
        templates = await es.indices.get_index_template(name="smartgas-*")
        by_name = {entry["name"]: entry["index_template"] for entry in templates["index_templates"]}
        assert set(by_name) >= {"smartgas-readings", "smartgas-alerts"}
        for template in by_name.values():
            assert template["template"]["lifecycle"]["data_retention"] == "9d"
            assert template["data_stream"] == {"hidden": False, "allow_custom_routing": False}
        backing = (await data_stream_metadata(es, stream))["indices"][-1]["index_name"]
        assert (await es.indices.get_mapping(index=backing))[backing]["mappings"]["properties"]["epoch"] == {
            "type": "integer"
        }
    finally:
        await install_templates(es, retention_days=7)


async def test_a_version_4_data_stream_takes_the_forecast_fields_and_ships_them(
    store: ReadingStore, es: AsyncElasticsearch, elasticsearch_url: str
) -> None:
    """Template version 5 added the forecast fields: a stream made by version 4 is brought up to it by the
    shipper's start-up step, and readings of a fleet meter ship with days to empty."""
    stream = fresh_stream()
    old = copy.deepcopy(template_body(READINGS_TEMPLATE))
    for name in FORECAST_FIELDS:
        del old["template"]["mappings"]["properties"][name]
    old.update(version=4, index_patterns=[stream], priority=500)
    await es.indices.put_index_template(name=f"old-{stream}", body=old)
    old_document = {"@timestamp": "2026-11-22T08:00:00Z", "meter_id": "m0", "seq": 0, "meter_known": False}
    await es.index(index=stream, op_type="create", id="m0:old", document=old_document)
    await es.indices.delete_index_template(name=f"old-{stream}")

    async def prepare(client: AsyncElasticsearch) -> None:
        await prepare_data_stream(client, stream, retention_days=7)

    fleet = load_fleet(FLEET_FILE)
    await add_readings(store, 5, meter_id="bottle-0001")
    sink = sink_for(store, elasticsearch_url, stream, prepare=prepare)
    assert isinstance(sink.source, ReadingSource)
    sink.source.fleet = fleet
    sink.source.forecaster = Forecaster(store, ConsumerConfig(), fleet)
    await ship_all(sink, store)
    assert (await store.summary()).dead_letters == 0
    indexed = await documents(es, stream)
    shipped = indexed["bottle-0001:0:4"]
    assert shipped["forecast_basis"] == "declared" and shipped["days_to_empty"] > 0
    assert shipped["consumption_mol_per_day"] > 0 and shipped["forecast_reserve_fill_pct"] == 10.0
    backing = [index["index_name"] for index in (await data_stream_metadata(es, stream))["indices"]]
    mapping = (await es.indices.get_mapping(index=backing[-1]))[backing[-1]]["mappings"]["properties"]
    assert {name: mapping[name]["type"] for name in FORECAST_FIELDS} == FORECAST_FIELDS
