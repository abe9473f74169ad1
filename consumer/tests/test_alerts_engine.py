"""The alert engine on a real SQLite store, fed by the real intake: lifecycle, restart, offline, shipping."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fake_elasticsearch import FakeElasticsearch
from test_alerts import VOLUME_L, fleet, pressure_for, stored_event
from test_store import sqlite_steps

from smartgas_consumer.alert_records import ALERT_SCHEMA, AlertNotOpen
from smartgas_consumer.alert_rules import LEAK_MIN_READINGS
from smartgas_consumer.alert_shipping import AlertSource, to_alert_document
from smartgas_consumer.alerts import READINGS_PER_TURN, AlertEngine
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elastic import make_client
from smartgas_consumer.elasticsearch_sink import Backoff, ElasticsearchSink
from smartgas_consumer.fleet import Fleet
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.provision import INDEX_TEMPLATES, prepare_data_stream, template_body
from smartgas_consumer.store import ReadingStore, format_timestamp

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
CONFIG = ConsumerConfig(expected_period_s=10.0, offline_after_periods=3.0)


@dataclass
class Clock:
    """The consumer's clock, moved by the test."""

    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Rig:
    """A store, the intake and the alert engine, wired as the consumer wires them."""

    path: Path
    fleet: Fleet = field(default_factory=fleet)
    clock: Clock = field(default_factory=Clock)
    changes: list[dict[str, Any]] = field(default_factory=list)
    seq: dict[str, int] = field(default_factory=dict)
    store: ReadingStore | None = None
    engine: AlertEngine | None = None
    intake: ReadingIntake | None = None

    async def open(self) -> AlertEngine:
        self.store = ReadingStore(self.path, extra_schema=[ALERT_SCHEMA])
        await self.store.open()
        self.intake = ReadingIntake(self.store, fleet=self.fleet, clock=self.clock)
        self.engine = AlertEngine(self.store, CONFIG, fleet=self.fleet, clock=self.clock, offline_check_s=3600)
        self.engine.on_change.append(self.changes.append)
        self.intake.on_stored.append(self.engine.on_stored)
        await self.engine.start()
        return self.engine

    async def close(self) -> None:
        assert self.engine is not None and self.store is not None
        await self.engine.stop()
        await self.store.close()

    async def send(
        self, pressure_bar: float, temperature_c: float = 20.0, *, meter_id: str = "m1", after_s: float = 10.0
    ) -> None:
        """One reading, ``after_s`` after the previous one, received 50 ms after it was taken."""
        assert self.intake is not None and self.engine is not None
        seq = self.seq.get(meter_id, -1) + 1
        self.seq[meter_id] = seq
        ts = T0 + timedelta(seconds=after_s * seq)
        self.clock.now = max(self.clock.now, ts + timedelta(milliseconds=50))
        body = {
            "seq": seq,
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "pressure_bar": pressure_bar,
            "temperature_c": temperature_c,
            "volume_l": VOLUME_L,
        }
        await self.intake.accept(meter_id, json.dumps(body).encode(), 50)
        await self.engine.flush()

    def events(self) -> list[tuple[str, str, str]]:
        return [(c["event"], c["alert"]["kind"], c["alert"]["state"]) for c in self.changes]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    running = Rig(tmp_path / "store.db")
    await running.open()
    try:
        yield running
    finally:
        await running.close()


# -- lifecycle ---------------------------------------------------------------------------------------------


async def test_open_update_resolve_is_persisted_and_survives_reopening(rig: Rig) -> None:
    assert rig.engine is not None
    await rig.send(200.0)
    await rig.send(225.0)
    await rig.send(230.0)
    assert rig.engine.open_counts() == {
        "over_pressure": 1,
        "over_temperature": 0,
        "low_content": 0,
        "leak": 0,
        "sensor_fault": 0,
        "offline": 0,
        "liquid_exhausted": 0,
    }
    (opened,) = await rig.engine.list_alerts()
    assert opened["state"] == "open"
    assert (opened["occurrences"], opened["value"]) == (2, 230.0)
    assert opened["alert_id"] == "m1:over_pressure:2026-11-23T08:00:10.000000Z"
    assert opened["opened_at"] == "2026-11-23T08:00:10.000000Z"
    assert opened["updated_at"] == "2026-11-23T08:00:20.000000Z"
    assert (opened["client_id"], opened["site_id"], opened["severity"]) == ("acme", "lyon", "critical")
    await rig.send(217.0)  # inside the hysteresis: still open, unchanged
    assert (await rig.engine.list_alerts())[0]["state"] == "open"
    await rig.send(200.0)
    assert rig.events() == [
        ("alert.opened", "over_pressure", "open"),
        ("alert.updated", "over_pressure", "open"),
        ("alert.resolved", "over_pressure", "resolved"),
    ]
    assert rig.engine.open_counts()["over_pressure"] == 0
    await rig.close()

    await rig.open()
    (resolved,) = await rig.engine.list_alerts()
    assert resolved == {
        "alert_id": "m1:over_pressure:2026-11-23T08:00:10.000000Z",
        "meter_id": "m1",
        "client_id": "acme",
        "site_id": "lyon",
        "kind": "over_pressure",
        "severity": "critical",
        "state": "resolved",
        "message": "pressure back to 200.0 bar (limit 220.0)",
        "value": 200.0,
        "opened_at": "2026-11-23T08:00:10.000000Z",
        "updated_at": "2026-11-23T08:00:40.000000Z",
        "resolved_at": "2026-11-23T08:00:40.000000Z",
        "occurrences": 2,
        "acknowledged_at": None,
        "acknowledged_by": None,
        "closed_by": None,
    }


async def test_one_open_alert_per_meter_and_kind_and_a_new_one_after_resolving(rig: Rig) -> None:
    assert rig.engine is not None
    for pressure in (230.0, 231.0, 200.0, 240.0):
        await rig.send(pressure)
    await rig.send(150.0, 60.0, meter_id="x9")  # unknown meter: over-temperature only
    alerts = await rig.engine.list_alerts()
    assert [(a["meter_id"], a["kind"], a["state"], a["opened_at"]) for a in alerts] == [
        ("m1", "over_pressure", "open", "2026-11-23T08:00:30.000000Z"),
        ("m1", "over_pressure", "resolved", "2026-11-23T08:00:00.000000Z"),
        ("x9", "over_temperature", "open", "2026-11-23T08:00:00.000000Z"),
    ]
    unknown = (await rig.engine.list_alerts(meter_id="x9"))[0]
    assert (unknown["client_id"], unknown["site_id"], unknown["severity"]) == (None, None, "warning")
    assert [a["meter_id"] for a in await rig.engine.list_alerts(client_id="acme")] == ["m1", "m1"]
    assert len(await rig.engine.list_alerts(state="open")) == 2
    assert len(await rig.engine.list_alerts(state="resolved", meter_id="m1")) == 1
    assert len(await rig.engine.list_alerts(limit=1)) == 1
    assert rig.engine.open_counts()["over_pressure"] == 1


async def test_an_open_alert_survives_a_restart_and_resolves_afterwards(rig: Rig) -> None:
    assert rig.engine is not None
    await rig.send(150.0, 56.0)
    await rig.close()
    engine = await rig.open()
    assert engine.open_counts()["over_temperature"] == 1
    await rig.send(150.0, 52.0)
    (alert,) = await engine.list_alerts()
    assert alert["state"] == "resolved"
    assert alert["alert_id"] == "m1:over_temperature:2026-11-23T08:00:00.000000Z"


async def test_the_leak_window_is_reloaded_from_the_store_after_a_restart(rig: Rig) -> None:
    """A leak seen over readings before and after a restart trips on the first reading after it."""
    moles = 300.0
    rate = 33.0  # mol/h: 11 × the meter's draw
    for _ in range(LEAK_MIN_READINGS - 1):
        await rig.send(pressure_for(moles))
        moles -= rate * 10 / 3600
    await rig.close()
    engine = await rig.open()
    await rig.send(pressure_for(moles))
    (leak,) = await engine.list_alerts()
    assert (leak["kind"], leak["state"]) == ("leak", "open")
    assert leak["value"] == pytest.approx(rate, rel=0.01)


async def test_a_failing_recorder_rolls_the_change_back(rig: Rig) -> None:
    assert rig.engine is not None

    def broken(connection: sqlite3.Connection, change: dict[str, Any]) -> None:
        connection.execute("INSERT INTO no_such_table VALUES (1)")

    rig.engine.recorders.append(broken)
    await rig.send(230.0)  # the worker logs the failure and goes on
    assert await rig.engine.list_alerts() == []
    assert rig.engine.open_counts()["over_pressure"] == 0
    assert rig.changes == []
    rig.engine.recorders.remove(broken)
    await rig.send(231.0)
    assert [a["state"] for a in await rig.engine.list_alerts()] == ["open"]


# -- offline ---------------------------------------------------------------------------------------------------


async def test_a_meter_missing_from_the_fleet_file_never_goes_offline_and_is_forgotten(rig: Rig) -> None:
    # Nobody expects a meter the fleet file does not list: its silence opens no alert (a peer minting
    # ids must not open one alert each), and forgetting it releases the engine's memory of it.
    assert rig.engine is not None
    await rig.send(150.0)  # m1, listed
    await rig.send(150.0, meter_id="stranger-1")
    await rig.engine.evaluate_offline(rig.clock.now + timedelta(hours=2))
    assert [(a["meter_id"], a["kind"]) for a in await rig.engine.list_alerts()] == [("m1", "offline")]
    assert rig.engine.tracked == 2
    rig.engine.forget(["stranger-1"])
    assert rig.engine.tracked == 1


async def test_offline_after_the_window_and_resolved_by_the_next_reading(rig: Rig) -> None:
    assert rig.engine is not None
    await rig.send(150.0)
    last = rig.clock.now
    await rig.engine.evaluate_offline(last + timedelta(seconds=30))  # exactly 3 periods: not yet
    assert await rig.engine.list_alerts() == []
    await rig.engine.evaluate_offline(last + timedelta(seconds=31))
    (offline,) = await rig.engine.list_alerts()
    assert (offline["kind"], offline["severity"], offline["value"]) == ("offline", "warning", 31.0)
    assert offline["opened_at"] == "2026-11-23T08:00:31.050000Z"
    # The text names the moment the silence began, so it stays true however long the alert stays open.
    assert offline["message"].startswith("no reading since 2026-11-23T08:00:00.050000Z (expected every 10 s")
    await rig.engine.evaluate_offline(last + timedelta(seconds=60))  # still silent: nothing new
    assert len(await rig.engine.list_alerts()) == 1
    await rig.send(150.0, after_s=65.0)
    (resolved,) = await rig.engine.list_alerts()
    assert (resolved["state"], resolved["value"]) == ("resolved", 65.0)
    assert resolved["resolved_at"] == "2026-11-23T08:01:05.050000Z"
    assert "after 65 s of silence" in resolved["message"]
    assert [e[0] for e in rig.events()] == ["alert.opened", "alert.resolved"]


@pytest.fixture
async def rig3(tmp_path: Path) -> AsyncIterator[Rig]:
    """A rig whose fleet file lists m1, m2 and m3 (only listed meters can go offline)."""
    running = Rig(tmp_path / "store.db", fleet=fleet(("m1", "m2", "m3")))
    await running.open()
    try:
        yield running
    finally:
        await running.close()


async def test_people_acknowledge_and_close_alerts_and_retire_meters_and_a_restart_keeps_it(rig3: Rig) -> None:
    rig = rig3
    assert rig.engine is not None
    await rig.send(150.0, meter_id="m1")
    await rig.send(150.0, meter_id="m2")
    await rig.send(150.0, meter_id="m3")
    rig.clock.now += timedelta(minutes=5)
    await rig.engine.evaluate_offline(rig.clock.now)
    alerts = {a["meter_id"]: a for a in await rig.engine.list_alerts(state="open")}
    assert sorted(alerts) == ["m1", "m2", "m3"]
    seen = await rig.engine.acknowledge(alerts["m1"]["alert_id"], client_id=None, by="admin")
    assert seen is not None and seen["state"] == "open" and seen["acknowledged_by"] == "admin"
    assert await rig.engine.acknowledge(alerts["m1"]["alert_id"], client_id="someone-else", by="x") is None
    closed = await rig.engine.close(alerts["m2"]["alert_id"], client_id=None, by="admin")
    assert closed is not None and (closed["state"], closed["closed_by"]) == ("resolved", "admin")
    with pytest.raises(AlertNotOpen):
        await rig.engine.close(alerts["m2"]["alert_id"], client_id=None, by="admin")
    await rig.engine.retire("m3", by="admin")
    assert [a["meter_id"] for a in await rig.engine.list_alerts(state="open")] == ["m1"]
    await rig.close()

    rig.clock.now += timedelta(hours=1)
    engine = await rig.open()
    (still,) = await engine.list_alerts(state="open")
    assert (still["meter_id"], still["acknowledged_by"]) == ("m1", "admin")
    await engine.evaluate_offline(rig.clock.now + timedelta(hours=1))
    # Neither the closed silence (m2) nor the retired meter (m3) opens a new offline alert ...
    assert [a["meter_id"] for a in await engine.list_alerts(state="open")] == ["m1"]
    # ... until they send again and fall silent again.
    await rig.send(150.0, meter_id="m3", after_s=7200.0)
    await engine.evaluate_offline(rig.clock.now + timedelta(minutes=5))
    assert sorted(a["meter_id"] for a in await engine.list_alerts(state="open")) == ["m1", "m3"]
    assert [e[0] for e in rig.events() if e[0] not in ("alert.opened",)] == [
        "alert.acknowledged",
        "alert.closed",
        "alert.closed",
    ]


async def test_after_a_restart_meters_get_a_whole_window_before_counting_as_offline(rig: Rig) -> None:
    await rig.send(150.0)
    await rig.close()
    rig.clock.now = T0 + timedelta(hours=1)  # the consumer was down for an hour
    engine = await rig.open()
    await engine.evaluate_offline(rig.clock.now + timedelta(seconds=29))
    assert await engine.list_alerts() == []
    await engine.evaluate_offline(rig.clock.now + timedelta(seconds=31))
    (offline,) = await engine.list_alerts()
    assert offline["value"] == pytest.approx(3631.0, abs=0.1)  # silent since its last reading


async def test_the_offline_timer_runs_on_its_own(tmp_path: Path) -> None:
    store = ReadingStore(tmp_path / "store.db", extra_schema=[ALERT_SCHEMA])
    await store.open()
    clock = Clock()
    intake = ReadingIntake(store, clock=clock)
    engine = AlertEngine(store, CONFIG, clock=clock, offline_check_s=0.02)
    intake.on_stored.append(engine.on_stored)
    await engine.start()
    try:
        body = {"seq": 0, "ts": "2026-11-23T08:00:00Z", "pressure_bar": 150, "temperature_c": 20, "volume_l": 50}
        await intake.accept("m1", json.dumps(body).encode(), 50)
        clock.now = T0 + timedelta(minutes=5)
        await wait_until(lambda: has_alerts(engine, 1))
    finally:
        await engine.stop()
        await store.close()


async def has_alerts(engine: AlertEngine, count: int) -> bool:
    return len(await engine.list_alerts()) == count


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


# -- shipping to Elasticsearch ----------------------------------------------------------------------------------


def test_alert_documents_fit_the_alerts_mapping() -> None:
    from smartgas_consumer.alert_records import Alert

    (template,) = [template_body(t) for t in INDEX_TEMPLATES if t.name == "smartgas-alerts"]
    types = {name: mapping["type"] for name, mapping in template["template"]["mappings"]["properties"].items()}
    alert = Alert(
        "m1:leak:2026-11-23T08:00:00.000000Z",
        "m1",
        "acme",
        "lyon",
        "leak",
        "critical",
        "resolved",
        "loss back to 1.00 mol/h",
        1.0,
        "2026-11-23T08:00:00.000000Z",
        "2026-11-23T08:10:00.000000Z",
        "2026-11-23T08:10:00.000000Z",
        7,
        acknowledged_at="2026-11-23T08:05:00.000000Z",
        acknowledged_by="acme",
        closed_by="admin",
    )
    document = to_alert_document(alert)
    assert set(document) == set(types)
    for name, value in document.items():
        if types[name] == "date":
            assert value.endswith("Z")
            datetime.fromisoformat(value)
        elif types[name] in ("double", "integer"):
            assert isinstance(value, int | float) and not isinstance(value, bool)
        else:
            assert isinstance(value, str)
    assert document["@timestamp"] == alert.updated_at
    assert document["site"] == "lyon"


@pytest.fixture
async def fake_es() -> AsyncIterator[FakeElasticsearch]:
    server = FakeElasticsearch()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def settled(store: ReadingStore) -> bool:
    def count(connection: sqlite3.Connection) -> int:
        return int(connection.execute("SELECT count(*) FROM alerts WHERE ship_state = 0").fetchone()[0])

    return await store.read(count) == 0


async def test_each_change_of_an_alert_is_shipped_as_a_document_of_its_own(
    rig: Rig, fake_es: FakeElasticsearch
) -> None:
    assert rig.store is not None
    client = make_client(ConsumerConfig(elasticsearch_url=fake_es.url), request_timeout_s=5)
    sink = ElasticsearchSink(AlertSource(rig.store), client, backoff=Backoff(base_s=0.01, cap_s=0.05), idle_poll_s=0.02)
    await sink.start()
    try:
        await rig.send(230.0)
        await wait_until(lambda: settled(rig.store))  # type: ignore[arg-type]
        alert_id = "m1:over_pressure:2026-11-23T08:00:00.000000Z"
        assert fake_es.indexed("smartgas-alerts")[f"{alert_id}:1"]["state"] == "open"
        await rig.send(200.0)
        await wait_until(lambda: settled(rig.store))  # type: ignore[arg-type]
    finally:
        await sink.stop()
        await client.close()
    indexed = fake_es.indexed("smartgas-alerts")
    assert list(indexed) == [f"{alert_id}:1", f"{alert_id}:2"]  # the alert's history: opened, then resolved
    assert indexed[f"{alert_id}:1"]["state"] == "open"
    assert indexed[f"{alert_id}:2"]["state"] == "resolved"
    assert indexed[f"{alert_id}:2"]["resolved_at"] == "2026-11-23T08:00:10.000000Z"
    assert fake_es.sent == {f"{alert_id}:1": 1, f"{alert_id}:2": 1}


@pytest.mark.elasticsearch
async def test_the_alerts_history_on_a_real_data_stream(rig: Rig, elasticsearch_url: str) -> None:
    """On a real Elasticsearch node: each change of an alert is a document of the alerts data stream that the
    template's strict mapping takes; a replay of every version is answered 409 and counted as shipped."""
    assert rig.store is not None
    stream = f"smartgas-alerts-test-{uuid.uuid4().hex[:10]}"
    client = make_client(ConsumerConfig(elasticsearch_url=elasticsearch_url), request_timeout_s=30)

    def sink() -> ElasticsearchSink:
        return ElasticsearchSink(
            AlertSource(rig.store, index=stream),  # type: ignore[arg-type]
            client,
            backoff=Backoff(base_s=0.01, cap_s=0.05),
            idle_poll_s=0.02,
            prepare=lambda es: prepare_data_stream(es, stream, retention_days=7),
        )

    first = sink()
    await first.start()
    try:
        await rig.send(230.0)
        await wait_until(lambda: settled(rig.store), timeout_s=60)  # type: ignore[arg-type]
        await rig.send(200.0)
        await wait_until(lambda: settled(rig.store), timeout_s=60)  # type: ignore[arg-type]
    finally:
        await first.stop()
    assert first.counters.shipped == 2 and first.counters.dead_lettered == 0

    def unship(connection: sqlite3.Connection) -> None:
        connection.execute("UPDATE alerts SET ship_state = 0, shipped_at = NULL")

    await rig.store.write(unship)
    replay = sink()
    await replay.start()
    try:
        await wait_until(lambda: settled(rig.store), timeout_s=60)  # type: ignore[arg-type]
    finally:
        await replay.stop()
    assert replay.counters.shipped == 1 and replay.counters.dead_lettered == 0  # the latest version, a 409
    await client.indices.refresh(index=stream)
    hits = (await client.search(index=stream, sort=[{"updated_at": "asc"}]))["hits"]["hits"]
    await client.close()
    alert_id = "m1:over_pressure:2026-11-23T08:00:00.000000Z"
    assert [(hit["_id"], hit["_source"]["state"]) for hit in hits] == [
        (f"{alert_id}:1", "open"),
        (f"{alert_id}:2", "resolved"),
    ]


async def test_a_change_while_a_batch_is_in_flight_is_shipped_again(rig: Rig) -> None:
    assert rig.store is not None
    source = AlertSource(rig.store)
    await rig.send(230.0)
    (in_flight,) = await source.pending(10)
    await rig.send(235.0)  # the alert changes before the sink confirms the first version
    await source.mark_shipped([in_flight], T0)
    (again,) = await source.pending(10)
    assert again.doc_id != in_flight.doc_id  # a version of its own in the alerts data stream
    assert again.doc_id.rpartition(":")[0] == in_flight.doc_id.rpartition(":")[0] == again.document["alert_id"]
    assert again.key > in_flight.key
    assert again.document["occurrences"] == 2
    await source.mark_shipped([again], T0)
    assert await source.pending(10) == []
    assert await source.prune(T0 + timedelta(days=365)) == 0


async def test_a_refused_alert_is_dead_lettered_with_the_reason(rig: Rig, fake_es: FakeElasticsearch) -> None:
    assert rig.store is not None
    fake_es.item_plan = lambda _id, _source, _attempt: 400
    client = make_client(ConsumerConfig(elasticsearch_url=fake_es.url), request_timeout_s=5)
    sink = ElasticsearchSink(AlertSource(rig.store), client, idle_poll_s=0.02)
    await sink.start()
    try:
        await rig.send(230.0)
        await wait_until(lambda: settled(rig.store))  # type: ignore[arg-type]
    finally:
        await sink.stop()
        await client.close()

    def letters(connection: sqlite3.Connection) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in connection.execute("SELECT ship_state, ship_status, ship_reason FROM alerts")]

    ((state, status, reason),) = await rig.store.read(letters)
    assert (state, status) == (2, 400)
    assert "document_parsing_exception" in reason
    assert sink.counters.dead_lettered == 1
    await rig.send(231.0)  # a later change is a new version: pending again
    assert len(await AlertSource(rig.store).pending(10)) == 1


async def test_a_backlog_is_judged_a_few_readings_per_turn_of_the_event_loop(rig: Rig) -> None:
    """Readings queued faster than they are judged (a burst) are judged READINGS_PER_TURN at a time, with a
    turn of the event loop between: the CoAP answers waiting behind them are not held up by the whole
    backlog. Counted by a task that runs once per turn while the engine judges 400 queued readings."""
    engine = await rig.open()
    readings = 400
    meter = rig.fleet.meters["m1"]
    for seq in range(readings):  # queued at once, as the intake's listener queues them after a group commit
        engine.on_stored(stored_event(meter, seq, T0 + timedelta(seconds=10 * seq), 150.0))
    turns = 0
    stop = asyncio.Event()

    async def count_turns() -> None:
        nonlocal turns
        while not stop.is_set():
            turns += 1
            await asyncio.sleep(0)

    assert engine.backlog == readings
    counter = asyncio.create_task(count_turns())
    await engine.flush()
    stop.set()
    await counter
    assert turns >= readings // READINGS_PER_TURN - 1


async def test_listing_alerts_costs_the_same_whatever_the_alert_history(rig: Rig) -> None:
    """The alert list (newest first, at most ``limit``) read and sorted every alert ever opened; for a client
    and a state, it walked the client's alerts until it found enough in that state (all of them, when the
    few open ones are old). Counted here at 300 and at 3,000 resolved alerts beside 5 old open ones:
    without the two indexes, 9,440 and 61,676 SQLite steps for the newest 20 of all, and 810 and 5,310 for
    a client's open ones; with them, the same count at both."""
    assert rig.store is not None and rig.engine is not None
    store, engine = rig.store, rig.engine

    def insert_open(connection: sqlite3.Connection) -> None:
        stamp = format_timestamp(T0 - timedelta(hours=10_000))  # older than every resolved one
        connection.executemany(
            "INSERT INTO alerts (alert_id, meter_id, client_id, kind, severity, state, message, opened_at,"
            " updated_at, revision) VALUES (?, ?, 'client-1', 'leak', 'warning', 'open', 'still open', ?, ?, ?)",
            [(f"o{n}:leak:0", f"o{n}", stamp, stamp, 2_000_000 + n) for n in range(5)],
        )

    await store.write(insert_open)

    async def add_resolved(first: int, count: int) -> None:
        def insert(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "INSERT INTO alerts (alert_id, meter_id, client_id, kind, severity, state, message, opened_at,"
                " updated_at, revision) VALUES (?, ?, ?, 'leak', 'warning', 'resolved', 'old', ?, ?, ?)",
                [
                    (f"h{n}:leak:{n}", f"h{n % 50}", f"client-{n % 3}", stamp, stamp, 1_000_000 + n)
                    for n in range(first, first + count)
                    for stamp in [format_timestamp(T0 - timedelta(hours=first + count - n))]
                ],
            )

        await store.write(insert)

    def listings() -> list[Callable[[], Awaitable[Any]]]:
        return [
            lambda: engine.list_alerts(limit=20),
            lambda: engine.list_alerts(client_id="client-1", state="resolved", limit=20),
            lambda: engine.list_alerts(client_id="client-1", state="open", limit=20),
        ]

    await add_resolved(0, 300)
    young = [(await sqlite_steps(store, listing))[1] for listing in listings()]
    await add_resolved(300, 2700)
    old = [(await sqlite_steps(store, listing))[1] for listing in listings()]
    assert len(await engine.list_alerts(limit=20)) == 20
    newest = await engine.list_alerts(client_id="client-1", state="resolved", limit=20)
    assert [alert["client_id"] for alert in newest] == ["client-1"] * 20
    assert newest[0]["opened_at"] >= newest[-1]["opened_at"]
    still_open = await engine.list_alerts(client_id="client-1", state="open", limit=20)
    assert sorted(alert["meter_id"] for alert in still_open) == [f"o{n}" for n in range(5)]
    for before, after in zip(young, old, strict=True):
        assert after <= before * 1.5, (young, old)
