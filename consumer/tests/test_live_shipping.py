"""The consumer shipping to a real Elasticsearch: a reading PUT over CoAP is searched back with its moles.

Runs only when ``ELASTICSEARCH_URL`` is set (``make test-live``, ``make e2e`` under docker-compose);
credentials as in test_provision_live.py (``ELASTICSEARCH_USERNAME``/``ELASTIC_PASSWORD`` or
``ELASTICSEARCH_API_KEY``). Uses a throwaway data stream covered by the readings template, deleted afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import uuid

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from conftest import wire_example
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elastic import make_client
from smartgas_consumer.server import Consumer

ES_URL = os.environ.get("ELASTICSEARCH_URL")

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(not ES_URL, reason="live: set ELASTICSEARCH_URL (and ELASTIC_PASSWORD) to use a real cluster"),
]


def live_settings() -> dict[str, object]:
    api_key = os.environ.get("ELASTICSEARCH_API_KEY")
    if api_key:
        return {"elasticsearch_url": (ES_URL or "").rstrip("/"), "elasticsearch_api_key": api_key}
    return {
        "elasticsearch_url": (ES_URL or "").rstrip("/"),
        "elasticsearch_username": os.environ.get("ELASTICSEARCH_USERNAME", "elastic"),
        "elasticsearch_password": os.environ.get("ELASTIC_PASSWORD", ""),
    }


async def test_reading_is_searchable_with_its_moles(consumer_config: ConsumerConfig) -> None:
    index = f"smartgas-readings-live-{uuid.uuid4().hex[:8]}"
    config = dataclasses.replace(consumer_config, elasticsearch_index=index, **live_settings())  # type: ignore[arg-type]
    consumer = Consumer(config)
    await consumer.start()
    client = make_client(config)
    coap = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        body = wire_example("reading-250bar.json")
        request = aiocoap.Message(
            code=Code.PUT,
            uri=f"coap://127.0.0.1:{consumer.port}/meters/live-meter/reading",
            payload=json.dumps(body).encode(),
            content_format=50,
        )
        response = await asyncio.wait_for(coap.request(request).response, 10)
        assert response.code == Code.CHANGED
        document = None
        for _ in range(150):  # up to ~30 s for the sink to ship and the data stream to refresh
            if await client.indices.exists(index=index):
                found = await client.search(index=index, query={"ids": {"values": ["live-meter:0:0"]}})
                if found["hits"]["hits"]:
                    document = found["hits"]["hits"][0]["_source"]
                    break
            await asyncio.sleep(0.2)
        assert document is not None, "the reading never reached Elasticsearch"
        assert document["moles"] == pytest.approx(504.2443, abs=1e-3)
        assert document["@timestamp"].startswith("2026-11-23T08:00:00")
        backing = next(iter((await client.indices.get_mapping(index=index)).body))
        assert backing.startswith(f".ds-{index}-")  # a data stream
        mapping = (await client.indices.get_mapping(index=index)).body[backing]["mappings"]["properties"]
        assert mapping["@timestamp"]["type"] == "date" and mapping["meter_id"]["type"] == "keyword"
        assert (await consumer.store.summary()).pending == 0
    finally:
        await coap.shutdown()
        await consumer.stop()
        # 400 "no handler": a node without the data-streams module (the integ-test zip) cannot delete it.
        await client.options(ignore_status=(400, 404)).indices.delete_data_stream(name=index)
        await client.close()
