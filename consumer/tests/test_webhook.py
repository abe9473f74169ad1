"""Webhook deliveries to a real aiohttp receiver on loopback: headers, retries, outages, restarts, order."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from webhook_receiver import Receiver

from smartgas_consumer.alert_records import ALERT_SCHEMA
from smartgas_consumer.elasticsearch_sink import Backoff
from smartgas_consumer.store import ReadingStore
from smartgas_consumer.webhook import (
    WEBHOOK_SCHEMA,
    Outcome,
    WebhookDispatcher,
    classify,
)

pytestmark = pytest.mark.integration

FAST = Backoff(base_s=0.01, cap_s=0.2)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ReadingStore]:
    opened = ReadingStore(tmp_path / "store.db", extra_schema=[ALERT_SCHEMA, WEBHOOK_SCHEMA])
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def change(event: str, alert_id: str = "m1:leak:2026-11-23T08:00:00.000000Z") -> dict[str, Any]:
    state = "resolved" if event == "alert.resolved" else "open"
    meter_id, kind, _ = alert_id.split(":", 2)
    return {"event": event, "alert": {"alert_id": alert_id, "meter_id": meter_id, "kind": kind, "state": state}}


async def record(store: ReadingStore, dispatcher: WebhookDispatcher, *changes: dict[str, Any]) -> None:
    """What the alert engine does: record the change in a transaction, then wake the dispatcher."""

    def write(connection: sqlite3.Connection) -> None:
        for one in changes:
            dispatcher.record(connection, one)

    await store.write(write)
    dispatcher.wake()


async def wait_until(condition: Callable[[], Awaitable[bool] | bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        outcome = condition()
        if await outcome if isinstance(outcome, Awaitable) else outcome:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def outbox(store: ReadingStore) -> list[dict[str, Any]]:
    def select(connection: sqlite3.Connection) -> list[dict[str, Any]]:
        rows = connection.execute("SELECT * FROM webhook_deliveries ORDER BY id").fetchall()
        return [dict(row) for row in rows]

    return await store.read(select)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (None, Outcome.UNAVAILABLE),
        (408, Outcome.UNAVAILABLE),
        (429, Outcome.UNAVAILABLE),
        (500, Outcome.UNAVAILABLE),
        (503, Outcome.UNAVAILABLE),
        (301, Outcome.REFUSED),
        (400, Outcome.REFUSED),
        (404, Outcome.REFUSED),
        (410, Outcome.REFUSED),
    ],
)
def test_classify(status: int | None, outcome: Outcome) -> None:
    assert classify(status) is outcome


async def test_opened_and_resolved_are_posted_as_json_with_a_delivery_id(
    store: ReadingStore, receiver: Receiver
) -> None:
    dispatcher = WebhookDispatcher(store, [receiver.url], backoff=FAST, poll_s=0.05)
    await dispatcher.start()
    try:
        await record(store, dispatcher, change("alert.opened"), change("alert.updated"), change("alert.resolved"))
        await wait_until(lambda: len(receiver.accepted()) == 2)
        await asyncio.sleep(0.1)  # room for a wrong extra delivery
    finally:
        await dispatcher.stop()
    opened, resolved = receiver.received
    assert opened.body == change("alert.opened")
    assert resolved.body == change("alert.resolved")
    assert (opened.event_header, resolved.event_header) == ("alert.opened", "alert.resolved")
    assert opened.content_type == "application/json"
    rows = await outbox(store)
    assert [r["delivery_id"] for r in rows] == [opened.delivery_id, resolved.delivery_id]
    assert all(r["delivered_at"] is not None and r["attempts"] == 1 and r["last_status"] == 200 for r in rows)
    assert await dispatcher.pending_count() == 0
    assert dispatcher.counters.delivered == 2


async def test_each_url_gets_its_own_delivery(store: ReadingStore, receiver: Receiver) -> None:
    second = Receiver()
    await second.start()
    dispatcher = WebhookDispatcher(store, [receiver.url, second.url, receiver.url], backoff=FAST, poll_s=0.05)
    await dispatcher.start()
    try:
        await record(store, dispatcher, change("alert.opened"))
        await wait_until(lambda: len(receiver.accepted()) == 1 and len(second.accepted()) == 1)
    finally:
        await dispatcher.stop()
        await second.stop()
    assert receiver.received[0].delivery_id != second.received[0].delivery_id
    assert receiver.received[0].body == second.received[0].body


async def test_while_the_receiver_is_down_deliveries_wait_then_arrive_once_each_in_order(
    store: ReadingStore, receiver: Receiver
) -> None:
    await receiver.stop()
    dispatcher = WebhookDispatcher(store, [receiver.url], backoff=FAST, poll_s=0.05)
    await dispatcher.start()
    try:
        alert_a, alert_b = "m1:leak:2026-11-23T08:00:00.000000Z", "m2:offline:2026-11-23T08:00:05.000000Z"
        await record(store, dispatcher, change("alert.opened", alert_a))
        await record(store, dispatcher, change("alert.opened", alert_b), change("alert.resolved", alert_a))
        await record(store, dispatcher, change("alert.resolved", alert_b))
        # Retried, not given up (judged on the stored attempts: the counter moves before that row commits).
        await wait_until(lambda: _oldest_attempts_at_least(store, 3))
        assert await dispatcher.pending_count() == 4
        oldest = (await outbox(store))[0]
        assert oldest["attempts"] >= 3 and oldest["last_status"] is None
        assert "Connect" in oldest["last_error"]
        assert dispatcher.last_error[receiver.url] is not None
        await receiver.start()  # back, on the same port
        await wait_until(lambda: len(receiver.accepted()) == 4)
        await asyncio.sleep(0.1)
    finally:
        await dispatcher.stop()
    ids = [r.delivery_id for r in receiver.received]
    assert len(ids) == len(set(ids)) == 4  # exactly once per delivery id
    assert sorted(ids) == sorted(r["delivery_id"] for r in await outbox(store))
    for alert_id in (alert_a, alert_b):
        events = [r.body["event"] for r in receiver.received if r.body["alert"]["alert_id"] == alert_id]
        assert events == ["alert.opened", "alert.resolved"]
    assert await dispatcher.pending_count() == 0
    assert dispatcher.failures_in_a_row[receiver.url] == 0


async def test_503_429_and_timeouts_are_retried_with_the_same_delivery_id(
    store: ReadingStore, receiver: Receiver
) -> None:
    receiver.statuses = [503, 429]
    receiver.delay_s = 5.0
    dispatcher = WebhookDispatcher(store, [receiver.url], backoff=FAST, poll_s=0.05, timeout_s=1.0)
    await dispatcher.start()
    try:
        await record(store, dispatcher, change("alert.opened"))
        # 503, 429 and a timeout have each failed an attempt, judged by the dispatcher: the receiver records
        # a request before it reads its delay, so its count alone let a third attempt succeed.
        await wait_until(lambda: dispatcher.counters.failed_attempts >= 3 and len(receiver.received) >= 3)
        receiver.delay_s = 0.0

        async def delivered_durably() -> bool:
            # The outbox row, not the counter: the counter moves before the row's write, and stopping the
            # dispatcher in between once left a row read with one attempt fewer (a loaded machine).
            return [row["delivered_at"] is not None for row in await outbox(store)] == [True]

        await wait_until(delivered_durably)
    finally:
        await dispatcher.stop()
    assert dispatcher.counters.delivered == 1
    assert [r.status for r in receiver.received[:2]] == [503, 429]
    assert len({r.delivery_id for r in receiver.received}) == 1  # at least once, always under one id
    (row,) = await outbox(store)
    assert row["attempts"] >= 4 and row["delivered_at"] is not None


async def test_a_refused_delivery_is_kept_and_retried_without_holding_up_other_alerts(
    store: ReadingStore, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    bad, good = "m1:leak:2026-11-23T08:00:00.000000Z", "m2:leak:2026-11-23T08:00:00.000000Z"
    receiver.plan = lambda body: 422 if body["alert"]["alert_id"] == bad else 200
    dispatcher = WebhookDispatcher(store, [receiver.url], backoff=FAST, poll_s=0.05)
    await dispatcher.start()
    try:
        with caplog.at_level(logging.ERROR, logger="smartgas_consumer.webhook"):
            await record(store, dispatcher, change("alert.opened", bad), change("alert.resolved", bad))
            await record(store, dispatcher, change("alert.opened", good), change("alert.resolved", good))
            await wait_until(lambda: len(receiver.accepted()) == 2)
            await wait_until(lambda: dispatcher.counters.refused >= 2)  # tried again after the longest backoff
        assert "refused delivery" in caplog.text and "HTTP 422" in caplog.text
        bad_events = [r.body["event"] for r in receiver.received if r.body["alert"]["alert_id"] == bad]
        assert set(bad_events) == {"alert.opened"}  # its resolution waits behind it
        assert await dispatcher.pending_count() == 2
        receiver.plan = lambda _body: 200  # the operator fixed the receiver
        await wait_until(lambda: len(receiver.accepted()) == 4)
    finally:
        await dispatcher.stop()
    delivered = [r.body["event"] for r in receiver.accepted() if r.body["alert"]["alert_id"] == bad]
    assert delivered == ["alert.opened", "alert.resolved"]


async def test_the_outbox_survives_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    await receiver.stop()
    path = tmp_path / "store.db"
    store = ReadingStore(path, extra_schema=[ALERT_SCHEMA, WEBHOOK_SCHEMA])
    await store.open()
    dispatcher = WebhookDispatcher(store, [receiver.url], backoff=FAST, poll_s=0.05)
    await dispatcher.start()
    await record(store, dispatcher, change("alert.opened"), change("alert.resolved"))
    await wait_until(lambda: dispatcher.counters.failed_attempts >= 1)
    recorded = [row["delivery_id"] for row in await outbox(store)]
    await dispatcher.stop()
    await store.close()

    await receiver.start()
    store = ReadingStore(path, extra_schema=[ALERT_SCHEMA, WEBHOOK_SCHEMA])
    await store.open()
    dispatcher = WebhookDispatcher(store, [receiver.url], backoff=FAST, poll_s=0.05)
    await dispatcher.start()
    try:
        await wait_until(lambda: len(receiver.accepted()) == 2)
    finally:
        await dispatcher.stop()
        await store.close()
    assert [r.delivery_id for r in receiver.received] == recorded
    assert [r.body["event"] for r in receiver.received] == ["alert.opened", "alert.resolved"]


async def test_deliveries_for_a_url_no_longer_configured_are_kept_and_reported(
    store: ReadingStore, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    old = WebhookDispatcher(store, ["http://127.0.0.1:9/gone"], backoff=FAST)
    await record(store, old, change("alert.opened"))
    dispatcher = WebhookDispatcher(store, [receiver.url], backoff=FAST, poll_s=0.05)
    with caplog.at_level(logging.WARNING, logger="smartgas_consumer.webhook"):
        await dispatcher.start()
    try:
        await record(store, dispatcher, change("alert.resolved"))
        await wait_until(lambda: len(receiver.accepted()) == 1)
    finally:
        await dispatcher.stop()
    assert "1 delivery(ies) kept for http://127.0.0.1:9/gone" in caplog.text
    assert await dispatcher.pending_count() == 1


async def test_no_urls_records_nothing(store: ReadingStore) -> None:
    dispatcher = WebhookDispatcher(store, [])
    await record(store, dispatcher, change("alert.opened"))
    assert await outbox(store) == []


async def _oldest_attempts_at_least(store: ReadingStore, attempts: int) -> bool:
    rows = await outbox(store)
    return bool(rows) and rows[0]["attempts"] >= attempts
