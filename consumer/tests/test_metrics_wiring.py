"""The metrics as a real consumer counts them: CoAP PUTs on loopback, then GET /metrics over real HTTP.

Red until metrics.py is wired into intake.py, resource.py, elasticsearch_sink.py and server.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiocoap
import httpx
import pytest
from aiocoap.numbers.codes import Code
from prometheus_client.parser import text_string_to_metric_families

from conftest import EXAMPLES_MAX_AGE_S, reading_uri, wire_example
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.server import Consumer

pytestmark = pytest.mark.integration


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Consumer]:
    config = ConsumerConfig(
        coap_host="127.0.0.1",
        coap_port=0,
        http_port=0,
        db=tmp_path / "store.db",
        status_interval_s=3600,
        max_reading_age_s=EXAMPLES_MAX_AGE_S,
    )
    consumer = Consumer(config)
    await consumer.start()
    try:
        yield consumer
    finally:
        await consumer.stop()


async def put(context: aiocoap.Context, uri: str, payload: bytes) -> aiocoap.Message:
    message = aiocoap.Message(code=Code.PUT, uri=uri, payload=payload, content_format=50)
    return await asyncio.wait_for(context.request(message).response, timeout=10)


async def scrape(consumer: Consumer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{consumer.http.port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


async def test_a_consumer_counts_what_it_answers(running: Consumer, coap: aiocoap.Context) -> None:
    reading = json.dumps(wire_example("reading-250bar.json")).encode()
    assert (await put(coap, reading_uri(running), reading)).code == Code.CHANGED
    assert (await put(coap, reading_uri(running), reading)).code == Code.CHANGED  # a re-send
    assert (await put(coap, reading_uri(running), b"{}")).code == Code.BAD_REQUEST
    assert (await put(coap, reading_uri(running, "-bad id-"), reading)).code == Code.BAD_REQUEST
    await running.refresh_metrics(await running.store.summary(), datetime.now(UTC))

    metrics = await scrape(running)
    assert metrics[("smartgas_readings_received_total", ())] == 4
    assert metrics[("smartgas_readings_stored_total", ())] == 1
    assert metrics[("smartgas_readings_duplicate_total", ())] == 1
    assert metrics[("smartgas_readings_rejected_total", (("reason", "invalid_reading"),))] == 1
    assert metrics[("smartgas_readings_rejected_total", (("reason", "invalid_meter_id"),))] == 1
    assert metrics[("smartgas_ack_latency_seconds_count", ())] == 2  # the two 2.04 answers
    assert 0 < metrics[("smartgas_ack_latency_seconds_sum", ())] < 2
    assert metrics[("smartgas_store_commit_readings_sum", ())] == 2  # the reading and its re-send
    assert metrics[("smartgas_store_readings", ())] == 1
    # No Elasticsearch here: nothing is pending anywhere, so no shipping lag is reported (the series stays 0).
    assert metrics[("smartgas_sink_pending_records", (("sink", "readings"),))] == 0
    assert metrics[("smartgas_meters_online", ())] == 1
    assert metrics[("smartgas_meters_registered", ())] == 1
    assert metrics[("process_resident_memory_bytes", ())] > 0


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (None, "text/plain; version=0.0.4"),
        ("text/plain", "text/plain; version=0.0.4"),
        # What Prometheus 2.x and 3.x send when scraping.
        (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
            "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            "application/openmetrics-text",
        ),
    ],
    ids=["no-accept", "text", "prometheus"],
)
async def test_the_scraper_s_accept_header_chooses_the_format(
    running: Consumer, accept: str | None, content_type: str
) -> None:
    headers = {} if accept is None else {"Accept": accept}
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{running.http.port}/metrics", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    openmetrics = content_type.startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n") is openmetrics  # OpenMetrics' required terminator
    assert "smartgas_readings_received" in response.text
