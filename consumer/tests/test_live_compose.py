"""The compose stack's own data path, checked by `make e2e` (deploy/e2e.sh) once the stack is up.

The publisher's simulated meters (coapclient) → the consumer (coapserver) → documents in the readings data
stream, from many distinct meters; and Kibana has what kibana-setup imported: the "SmartGas fleet"
dashboard and both data views. Runs only under ``make e2e`` (``SMARTGAS_E2E=1`` with ``ELASTICSEARCH_URL``
and ``KIBANA_URL``); skipped by name otherwise.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest
from elasticsearch import AsyncElasticsearch

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elastic import make_client
from smartgas_consumer.provision import kibana_session

ES_URL = os.environ.get("ELASTICSEARCH_URL", "")
KIBANA_URL = os.environ.get("KIBANA_URL", "")
MIN_METERS = int(os.environ.get("E2E_MIN_METERS", "10"))
WAIT_S = float(os.environ.get("E2E_WAIT_S", "600"))

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not (os.environ.get("SMARTGAS_E2E") and ES_URL and KIBANA_URL),
        reason="e2e: runs under `make e2e` (SMARTGAS_E2E=1, ELASTICSEARCH_URL, KIBANA_URL) against the compose stack",
    ),
]


@pytest.fixture
def stack_config() -> ConsumerConfig:
    return ConsumerConfig(
        elasticsearch_url=ES_URL.rstrip("/"),
        elasticsearch_username="elastic",
        elasticsearch_password=os.environ.get("ELASTIC_PASSWORD", ""),
        kibana_url=KIBANA_URL.rstrip("/"),
    )


@pytest.fixture
async def es(stack_config: ConsumerConfig) -> AsyncIterator[AsyncElasticsearch]:
    client = make_client(stack_config)
    try:
        yield client
    finally:
        await client.close()


async def test_the_publishers_meters_reach_the_readings_data_stream(es: AsyncElasticsearch) -> None:
    stream = os.environ.get("READINGS_DATA_STREAM", "smartgas-readings")
    deadline = asyncio.get_running_loop().time() + WAIT_S
    meters = 0
    while asyncio.get_running_loop().time() < deadline:
        if await es.indices.exists(index=stream):
            answer = await es.search(index=stream, size=0, aggs={"meters": {"cardinality": {"field": "meter_id"}}})
            meters = answer["aggregations"]["meters"]["value"]
            if meters >= MIN_METERS:
                break
        await asyncio.sleep(5)
    assert meters >= MIN_METERS, f"documents from {meters} meters in {stream} after {WAIT_S:g} s"
    resolved = await es.indices.resolve_index(name=stream)
    assert [entry["name"] for entry in resolved["data_streams"]] == [stream]


async def test_kibana_has_the_dashboard_and_the_data_views(stack_config: ConsumerConfig) -> None:
    base = stack_config.kibana_url
    session: aiohttp.ClientSession
    async with kibana_session(stack_config) as session:
        async with session.get(f"{base}/api/saved_objects/dashboard/smartgas-fleet") as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["attributes"]["title"] == "SmartGas fleet"
        for data_view_id in ("smartgas-readings", "smartgas-alerts"):
            async with session.get(f"{base}/api/data_views/data_view/{data_view_id}") as response:
                assert response.status == 200, await response.text()
