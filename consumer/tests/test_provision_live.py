"""provision() against a real Elasticsearch and Kibana (the compose stack), then Kibana's API checked.

Runs only when ``ELASTICSEARCH_URL`` and ``KIBANA_URL`` are set, for example against the compose stack:

    ELASTICSEARCH_URL=http://127.0.0.1:9200 KIBANA_URL=http://127.0.0.1:5601 ELASTIC_PASSWORD=... \\
        python -m pytest -m live consumer/tests/test_provision_live.py

Credentials: ``ELASTICSEARCH_USERNAME`` (default ``elastic``) with ``ELASTIC_PASSWORD``, or
``ELASTICSEARCH_API_KEY``. It imports the saved objects as setup does (what is missing or older than ours).
How the templates take the shipper's documents is tested on a real node in test_elasticsearch_real.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.provision import kibana_session, provision

ES_URL = os.environ.get("ELASTICSEARCH_URL")
KIBANA_URL = os.environ.get("KIBANA_URL")

pytestmark = [
    pytest.mark.live,
    pytest.mark.skipif(
        not (ES_URL and KIBANA_URL),
        reason="live: set ELASTICSEARCH_URL and KIBANA_URL (and ELASTIC_PASSWORD) to use a real stack",
    ),
]


@pytest.fixture
def live_config() -> ConsumerConfig:
    api_key = os.environ.get("ELASTICSEARCH_API_KEY")
    if api_key:
        return ConsumerConfig(
            elasticsearch_url=(ES_URL or "").rstrip("/"),
            elasticsearch_api_key=api_key,
            kibana_url=(KIBANA_URL or "").rstrip("/"),
        )
    return ConsumerConfig(
        elasticsearch_url=(ES_URL or "").rstrip("/"),
        elasticsearch_username=os.environ.get("ELASTICSEARCH_USERNAME", "elastic"),
        elasticsearch_password=os.environ.get("ELASTIC_PASSWORD", ""),
        kibana_url=(KIBANA_URL or "").rstrip("/"),
    )


@pytest.fixture
async def kibana(live_config: ConsumerConfig) -> AsyncIterator[aiohttp.ClientSession]:
    async with kibana_session(live_config) as session:
        yield session


async def test_provision_creates_the_data_views_and_the_dashboard(
    live_config: ConsumerConfig, kibana: aiohttp.ClientSession
) -> None:
    await provision(live_config, kibana_system_password=None, wait_timeout_s=120)
    base = live_config.kibana_url
    for data_view_id, title in (
        ("smartgas-readings", "smartgas-readings*"),
        ("smartgas-alerts", "smartgas-alerts*"),
    ):
        async with kibana.get(f"{base}/api/data_views/data_view/{data_view_id}") as response:
            assert response.status == 200, await response.text()
            data_view = (await response.json())["data_view"]
        assert data_view["title"] == title
        assert data_view["timeFieldName"] == "@timestamp"
    async with kibana.post(
        f"{base}/api/saved_objects/_export",
        json={"objects": [{"type": "dashboard", "id": "smartgas-fleet"}], "includeReferencesDeep": True},
        headers={"kbn-xsrf": "true"},
    ) as response:
        assert response.status == 200, await response.text()
        exported = [json.loads(line) for line in (await response.text()).splitlines() if line.strip()]
    objects = {(obj.get("type"), obj.get("id")): obj for obj in exported if "type" in obj}
    assert objects[("dashboard", "smartgas-fleet")]["attributes"]["title"] == "SmartGas fleet"
    assert ("search", "smartgas-latest-readings") in objects
    summary = exported[-1]
    assert summary.get("missingRefCount", 0) == 0, summary
