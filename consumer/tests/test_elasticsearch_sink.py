"""The Elasticsearch sink's retry policy against a stand-in that fails on demand (fake_elasticsearch.py).

Per-item 429/503, whole-request failures, outages, slow answers, a server that is not Elasticsearch or is
8.x: faults a real node cannot be made to produce on demand. What Elasticsearch itself decides (bulk
results, mapping errors, data streams, 409s, template upgrades) is tested on a real node in
test_elasticsearch_real.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fake_elasticsearch import FakeElasticsearch

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elastic import make_client
from smartgas_consumer.elasticsearch_sink import Backoff, ElasticsearchSink, ReadingSource, document_id
from smartgas_consumer.reading import Reading
from smartgas_consumer.store import ReadingStore

pytestmark = pytest.mark.integration

INDEX = "smartgas-readings"
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    """Poll ``condition`` until true, failing the test after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def fake_es() -> AsyncIterator[FakeElasticsearch]:
    server = FakeElasticsearch()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ReadingStore]:
    opened = ReadingStore(tmp_path / "store.db")
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def add_readings(store: ReadingStore, count: int, meter_id: str = "m1", first_seq: int = 0) -> None:
    for seq in range(first_seq, first_seq + count):
        reading = Reading(meter_id, seq, T0 + timedelta(seconds=10 * seq), 200.0 - seq, 20.0, 50.0)
        await store.add(reading, 410.0 - seq, T0 + timedelta(seconds=10 * seq, milliseconds=5))


class ClosingSink(ElasticsearchSink):
    """The sink as the consumer runs it: the caller closes the shared client after stopping the sink."""

    async def stop(self) -> None:
        await super().stop()
        await self.client.close()


def make_sink(
    store: ReadingStore, url: str, timeout_s: float = 5.0, retention: timedelta = timedelta(days=7), **kwargs: Any
) -> ElasticsearchSink:
    client = make_client(ConsumerConfig(elasticsearch_url=url), request_timeout_s=timeout_s)
    options: dict[str, Any] = {"backoff": Backoff(base_s=0.01, cap_s=0.05), "idle_poll_s": 0.05, "batch_size": 50}
    options.update(kwargs)
    return ClosingSink(ReadingSource(store, index=INDEX, retention=retention), client, **options)


async def all_settled(store: ReadingStore) -> bool:
    return (await store.summary()).pending == 0


async def test_new_readings_are_shipped_on_wake(store: ReadingStore, fake_es: FakeElasticsearch) -> None:
    sink = make_sink(store, fake_es.url, idle_poll_s=30.0)  # only a wake can make it ship in time
    await sink.start()
    try:
        await asyncio.sleep(0.1)
        await add_readings(store, 3)
        sink.wake()
        await wait_until(lambda: all_settled(store), timeout_s=5)
    finally:
        await sink.stop()
    assert len(fake_es.indexed(INDEX)) == 3


async def test_a_409_from_a_replay_counts_as_shipped(store: ReadingStore, fake_es: FakeElasticsearch) -> None:
    """The stand-in answers a second ``create`` of an ``_id`` 409, as a data stream does (real: see
    test_elasticsearch_real.py); here the first confirmation is lost on the way (a 503 for the whole
    request after the items were indexed is not something a real node does on demand)."""
    await add_readings(store, 3)
    fake_es.documents[INDEX] = {"m1:0:1": {"seq": 1}}  # indexed before, its confirmation lost
    sink = make_sink(store, fake_es.url)
    await sink.start()
    try:
        await wait_until(lambda: all_settled(store))
    finally:
        await sink.stop()
    assert sink.counters.shipped == 3 and sink.counters.dead_lettered == 0
    assert fake_es.indexed(INDEX)["m1:0:1"] == {"seq": 1}  # not overwritten
    assert (await store.summary()).dead_letters == 0


async def test_item_429_and_503_are_retried_until_delivered(store: ReadingStore, fake_es: FakeElasticsearch) -> None:
    def plan(doc_id: str, _source: dict[str, Any], attempt: int) -> int:
        if doc_id == "m1:0:1":
            return 429 if attempt < 2 else 201
        if doc_id == "m1:0:2":
            return 503 if attempt < 1 else 201
        return 201

    fake_es.item_plan = plan
    await add_readings(store, 5)
    sink = make_sink(store, fake_es.url)
    await sink.start()
    try:
        await wait_until(lambda: all_settled(store))
    finally:
        await sink.stop()
    assert fake_es.sent["m1:0:1"] == 3 and fake_es.sent["m1:0:2"] == 2 and fake_es.sent["m1:0:0"] == 1
    assert len(fake_es.indexed(INDEX)) == 5
    assert not await store.dead_letters()


async def test_nothing_marked_shipped_that_was_not_confirmed(
    store: ReadingStore, fake_es: FakeElasticsearch, tmp_path: Path
) -> None:
    fake_es.item_plan = lambda doc_id, _s, _a: 503 if doc_id in {"m1:0:0", "m1:0:4"} else 201
    await add_readings(store, 6)
    sink = make_sink(store, fake_es.url)
    await sink.start()
    try:
        await wait_until(lambda: _sent_at_least(fake_es, "m1:0:4", 3))
    finally:
        await sink.stop()
    with sqlite3.connect(tmp_path / "store.db") as connection:
        states = dict(connection.execute("SELECT seq, ship_state FROM readings"))
    assert states == {0: 0, 1: 1, 2: 1, 3: 1, 4: 0, 5: 1}
    assert set(fake_es.indexed(INDEX)) == {"m1:0:1", "m1:0:2", "m1:0:3", "m1:0:5"}


async def _sent_at_least(fake_es: FakeElasticsearch, doc_id: str, times: int) -> bool:
    return fake_es.sent.get(doc_id, 0) >= times


async def test_whole_request_failures_keep_everything_pending_then_deliver(
    store: ReadingStore, fake_es: FakeElasticsearch
) -> None:
    fake_es.request_failures = [429, 503, 502]
    await add_readings(store, 20)
    sink = make_sink(store, fake_es.url)
    await sink.start()
    try:
        await wait_until(lambda: all_settled(store))
    finally:
        await sink.stop()
    assert sink.counters.request_failures == 3
    assert len(fake_es.indexed(INDEX)) == 20
    assert not await store.dead_letters()


async def test_outage_then_recovery_delivers_everything(store: ReadingStore, fake_es: FakeElasticsearch) -> None:
    await fake_es.stop()  # connection refused from here on
    sink = make_sink(store, fake_es.url)
    await sink.start()
    try:
        await add_readings(store, 30)
        await wait_until(lambda: _failures(sink, 3))
        assert (await store.summary()).pending == 30  # accepted and kept while the cluster is away
        await add_readings(store, 30, first_seq=30)
        await fake_es.start()
        await wait_until(lambda: all_settled(store))
    finally:
        await sink.stop()
    assert len(fake_es.indexed(INDEX)) == 60
    assert sink.last_error is None


async def _failures(sink: ElasticsearchSink, count: int) -> bool:
    return sink.counters.request_failures >= count


async def test_slow_answers_time_out_and_are_retried(store: ReadingStore, fake_es: FakeElasticsearch) -> None:
    fake_es.delay_s = 1.0
    await add_readings(store, 5)
    sink = make_sink(store, fake_es.url, timeout_s=0.2)
    await sink.start()
    try:
        await wait_until(lambda: _failures(sink, 1))
        assert "Timeout" in (sink.last_error or "")
        assert (await store.summary()).pending == 5
        fake_es.delay_s = 0.0
        await wait_until(lambda: all_settled(store))
    finally:
        await sink.stop()
    assert len(fake_es.indexed(INDEX)) == 5


async def test_a_server_that_is_not_elasticsearch_gets_nothing(store: ReadingStore, fake_es: FakeElasticsearch) -> None:
    fake_es.send_product_header = False
    await add_readings(store, 4)
    sink = make_sink(store, fake_es.url)
    await sink.start()
    try:
        await wait_until(lambda: _failures(sink, 2))
    finally:
        await sink.stop()
    assert "not Elasticsearch" in (sink.last_error or "")
    summary = await store.summary()
    assert (summary.pending, summary.dead_letters) == (4, 0)


async def test_version_mismatch_is_a_request_failure_not_dead_letters(
    store: ReadingStore, fake_es: FakeElasticsearch
) -> None:
    fake_es.major_version = 8  # a 9.x client against an 8.x server
    await add_readings(store, 4)
    sink = make_sink(store, fake_es.url)
    await sink.start()
    try:
        await wait_until(lambda: _failures(sink, 2))
    finally:
        await sink.stop()
    assert "HTTP 400" in (sink.last_error or "") and "Accept version" in (sink.last_error or "")
    summary = await store.summary()
    assert (summary.pending, summary.dead_letters) == (4, 0)


async def test_prepare_runs_before_first_bulk_and_is_retried(store: ReadingStore, fake_es: FakeElasticsearch) -> None:
    calls: list[int] = []

    async def prepare(client: Any) -> None:
        calls.append(fake_es.bulk_requests)
        if len(calls) < 3:
            await client.perform_request("GET", "/nowhere-404")  # an ApiError, as a refused template would be
        await client.indices.put_index_template(name="smartgas-readings", index_patterns=["smartgas-readings*"])

    await add_readings(store, 2)
    sink = make_sink(store, fake_es.url, prepare=prepare)
    await sink.start()
    try:
        await wait_until(lambda: all_settled(store))
    finally:
        await sink.stop()
    assert calls == [0, 0, 0]
    assert "smartgas-readings" in fake_es.templates


async def test_retention_prunes_only_old_shipped_readings(
    store: ReadingStore, fake_es: FakeElasticsearch, tmp_path: Path
) -> None:
    fake_es.item_plan = lambda doc_id, _s, _a: 503 if doc_id == "m1:0:9" else 201
    await add_readings(store, 10)
    now = [datetime(2026, 11, 23, 9, 0, tzinfo=UTC)]
    sink = make_sink(store, fake_es.url, retention=timedelta(hours=1), prune_every_s=0.05, clock=lambda: now[0])
    await sink.start()
    try:
        await wait_until(lambda: _pending_is(store, 1))
        now[0] += timedelta(hours=2)  # the shipped ones are now older than the retention
        await wait_until(lambda: _readings_are(store, 1))
    finally:
        await sink.stop()
    with sqlite3.connect(tmp_path / "store.db") as connection:
        assert connection.execute("SELECT seq, ship_state FROM readings").fetchall() == [(9, 0)]


async def _pending_is(store: ReadingStore, count: int) -> bool:
    return (await store.summary()).pending == count


async def _readings_are(store: ReadingStore, count: int) -> bool:
    return (await store.summary()).readings == count


def test_document_id_is_meter_and_seq() -> None:
    from smartgas_consumer.store import StoredReading

    reading = StoredReading(1, "bottle-0001", 2, 42, "t", "r", 1.0, 2.0, 3.0, 4.0, None, None, None, False)
    assert document_id(reading) == "bottle-0001:2:42"


def test_backoff_is_capped_and_grows() -> None:
    import random

    backoff = Backoff(base_s=0.5, cap_s=60)
    rng = random.Random(1)
    delays = [backoff.delay(attempt, rng) for attempt in range(12)]
    assert all(0.25 <= d <= 60 for d in delays)
    assert delays[0] <= 0.5 and delays[-1] >= 30
