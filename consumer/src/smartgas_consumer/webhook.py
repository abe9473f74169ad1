"""Webhooks: every alert opened, acknowledged, resolved or closed is POSTed as JSON to each URL, never lost.

An outbox in the store's file: when the alert engine records a change, ``WebhookDispatcher.record`` adds
one delivery per URL *in the same transaction*, so a change is never stored without its deliveries (or
the reverse), and deliveries survive restarts. One task per URL sends them, oldest first, with one
``aiohttp`` session for the dispatcher's life:

- 2xx: delivered (``delivered_at`` set; delivered rows are pruned after ``DELIVERED_RETENTION``);
- no answer (connection refused, timeout), 408, 429 or 5xx: the receiver is away or overloaded; the
  delivery stays pending and the URL waits a capped exponential backoff (or the ``Retry-After`` it was
  given, within the cap) before trying again from its oldest pending delivery;
- any other status (a 4xx, or a redirect, which is not followed): the receiver refused this delivery.
  It is logged as an error and tried again after the longest backoff, since an operator may fix the
  receiver; it is never dropped. The URL's other alerts keep flowing meanwhile.

Deliveries of one alert reach a URL in the order they were recorded (opened before resolved): a delivery
waits while an earlier one for the same alert and URL is pending. Delivery is at least once: a POST that
reached the receiver but whose answer was lost is sent again, with the same ``X-SmartGas-Delivery`` id,
so a receiver can drop the copy. aiohttp's errors are translated in ``_post`` and nowhere else.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from smartgas_consumer.elasticsearch_sink import Backoff
from smartgas_consumer.store import ReadingStore, format_timestamp

_LOG = logging.getLogger(__name__)

WEBHOOK_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              INTEGER PRIMARY KEY,      -- the order deliveries were recorded in
    delivery_id     TEXT    NOT NULL UNIQUE,  -- sent as X-SmartGas-Delivery: the receiver's idempotency key
    url             TEXT    NOT NULL,
    alert_id        TEXT    NOT NULL,
    event           TEXT    NOT NULL,         -- alert.opened, .acknowledged, .resolved or .closed
    body            TEXT    NOT NULL,         -- the JSON sent, fixed when recorded
    created_at      TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT    NOT NULL,
    last_status     INTEGER,                  -- HTTP status of the last attempt; NULL: no answer
    last_error      TEXT,
    delivered_at    TEXT                      -- NULL while pending
);
CREATE INDEX IF NOT EXISTS webhook_pending ON webhook_deliveries (url, id) WHERE delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS webhook_pending_alert ON webhook_deliveries (url, alert_id, id)
    WHERE delivered_at IS NULL;
CREATE INDEX IF NOT EXISTS webhook_delivered ON webhook_deliveries (delivered_at) WHERE delivered_at IS NOT NULL;
"""

#: Alert changes that become deliveries: each happens once per alert. Updates of an open alert are not sent
#: (they come every reading), so after its acknowledgement an alert is heard of again only when it ends.
DELIVERED_EVENTS = frozenset({"alert.opened", "alert.acknowledged", "alert.resolved", "alert.closed"})
DELIVERY_HEADER = "X-SmartGas-Delivery"
EVENT_HEADER = "X-SmartGas-Event"
#: How long delivered rows stay in the outbox (for inspection) before they are pruned.
DELIVERED_RETENTION = timedelta(days=7)
_PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One POST to make: an alert change for one URL."""

    id: int
    delivery_id: str
    url: str
    alert_id: str
    event: str
    body: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to: the receiver's status, or no answer at all (``error`` says why)."""

    status: int | None
    error: str | None = None
    retry_after_s: float | None = None


class Outcome(enum.Enum):
    """How an attempt settles a delivery."""

    DELIVERED = "delivered"
    UNAVAILABLE = "unavailable"  # the receiver is away or overloaded: the whole URL backs off
    REFUSED = "refused"  # the receiver refused this delivery: retried after the longest backoff


def classify(status: int | None) -> Outcome:
    if status is not None and 200 <= status < 300:
        return Outcome.DELIVERED
    if status is None or status in (408, 429) or status >= 500:
        return Outcome.UNAVAILABLE
    return Outcome.REFUSED


@dataclass(slots=True)
class WebhookCounters:
    """Totals since start, for the status log and metrics."""

    delivered: int = 0
    failed_attempts: int = 0
    refused: int = 0


class WebhookDispatcher:
    """Sends the outbox to the URLs: ``record`` (from the alert engine), ``start()``, ``wake()``, ``stop()``."""

    def __init__(
        self,
        store: ReadingStore,
        urls: Sequence[str],
        *,
        timeout_s: float = 10.0,
        backoff: Backoff | None = None,
        batch_size: int = 100,
        poll_s: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.urls = tuple(dict.fromkeys(urls))  # a URL given twice is one receiver
        self.timeout_s = timeout_s
        self.backoff = backoff or Backoff(base_s=1.0, cap_s=60.0)
        self.batch_size = batch_size
        self._poll_s = poll_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._wakeups = {url: asyncio.Event() for url in self.urls}
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.counters = WebhookCounters()
        self.failures_in_a_row = dict.fromkeys(self.urls, 0)
        self.last_error: dict[str, str | None] = dict.fromkeys(self.urls)

    # -- the outbox ----------------------------------------------------------------------------------

    def record(self, connection: sqlite3.Connection, change: dict[str, Any]) -> None:
        """Add one delivery per URL for an alert change; runs inside the change's own transaction."""
        if change["event"] not in DELIVERED_EVENTS or not self.urls:
            return
        body = json.dumps(change, separators=(",", ":"), ensure_ascii=False)
        now = format_timestamp(self._clock())
        connection.executemany(
            "INSERT INTO webhook_deliveries (delivery_id, url, alert_id, event, body, created_at, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (uuid.uuid4().hex, url, change["alert"]["alert_id"], change["event"], body, now, now)
                for url in self.urls
            ],
        )

    def wake(self) -> None:
        """New deliveries were recorded: send them now rather than at the next poll."""
        for event in self._wakeups.values():
            event.set()

    async def pending_count(self) -> int:
        """Deliveries not yet delivered, every URL together (those of URLs no longer configured too)."""

        def count(connection: sqlite3.Connection) -> int:
            (pending,) = connection.execute(
                "SELECT count(*) FROM webhook_deliveries WHERE delivered_at IS NULL"
            ).fetchone()
            return int(pending)

        return await self.store.read(count)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._warn_about_orphans()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            headers={"User-Agent": "smartgas-consumer"},
        )
        self._tasks = [asyncio.create_task(self._serve(url), name=f"webhook-{url}") for url in self.urls]

    async def stop(self) -> None:
        """Stop sending; what is not delivered stays in the outbox for the next start."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _warn_about_orphans(self) -> None:
        def orphans(connection: sqlite3.Connection) -> list[tuple[str, int]]:
            rows = connection.execute(
                "SELECT url, count(*) FROM webhook_deliveries WHERE delivered_at IS NULL GROUP BY url"
            ).fetchall()
            return [(row[0], row[1]) for row in rows if row[0] not in self.urls]

        for url, count in await self.store.read(orphans):
            _LOG.warning("webhook: %d delivery(ies) kept for %s, which is no longer configured (not sent)", count, url)

    # -- one URL -------------------------------------------------------------------------------------

    async def _serve(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        next_prune = 0.0
        while True:
            try:
                if loop.time() >= next_prune:
                    await self._prune(url)
                    next_prune = loop.time() + _PRUNE_EVERY_S
                if not await self._send_due(url):
                    await self._idle(url)
            except Exception:  # the store failed (disk, closing): nothing was lost; try again after a poll
                _LOG.exception("webhook: outbox of %s unavailable", url)
                await asyncio.sleep(self._poll_s)

    async def _send_due(self, url: str) -> bool:
        """Send the URL's due deliveries in order; False if there were none."""
        batch = await self.store.read(lambda connection: self._due(connection, url))
        for delivery in batch:
            attempt = await self._post(delivery)
            outcome = classify(attempt.status)
            await self._settle(delivery, attempt, outcome)
            if outcome is Outcome.UNAVAILABLE:
                await self._back_off(url, attempt)
                break  # start again from the oldest pending delivery
        return bool(batch)

    def _due(self, connection: sqlite3.Connection, url: str) -> list[Delivery]:
        rows = connection.execute(
            "SELECT id, delivery_id, url, alert_id, event, body, attempts FROM webhook_deliveries AS d"
            " WHERE url = ? AND delivered_at IS NULL AND next_attempt_at <= ?"
            " AND NOT EXISTS (SELECT 1 FROM webhook_deliveries AS e WHERE e.url = d.url"
            " AND e.alert_id = d.alert_id AND e.delivered_at IS NULL AND e.id < d.id)"
            " ORDER BY id LIMIT ?",
            (url, format_timestamp(self._clock()), self.batch_size),
        ).fetchall()
        return [Delivery(*row) for row in rows]

    async def _idle(self, url: str) -> None:
        wakeup = self._wakeups[url]
        wakeup.clear()
        try:
            await asyncio.wait_for(wakeup.wait(), timeout=self._poll_s)
        except TimeoutError:
            pass

    async def _post(self, delivery: Delivery) -> Attempt:
        """POST one delivery: the one boundary where aiohttp's exceptions become an Attempt."""
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: delivery.delivery_id,
            EVENT_HEADER: delivery.event,
        }
        try:
            async with self._session.post(
                delivery.url, data=delivery.body.encode("utf-8"), headers=headers, allow_redirects=False
            ) as response:
                text = await response.text(errors="replace")
                if 200 <= response.status < 300:
                    return Attempt(response.status)
                return Attempt(
                    response.status,
                    f"HTTP {response.status} {response.reason}: {text[:200]}",
                    _retry_after_s(response.headers.get("Retry-After")),
                )
        except TimeoutError:
            return Attempt(None, f"no answer within {self.timeout_s:g} s")
        except aiohttp.ClientError as err:  # refused connection, reset, DNS, TLS
            return Attempt(None, f"{type(err).__name__}: {err}")

    async def _settle(self, delivery: Delivery, attempt: Attempt, outcome: Outcome) -> None:
        now = self._clock()
        if outcome is Outcome.DELIVERED:
            next_attempt_at = now
            self.failures_in_a_row[delivery.url] = 0
            self.last_error[delivery.url] = None
        elif outcome is Outcome.REFUSED:
            next_attempt_at = now + timedelta(seconds=self.backoff.cap_s)
            _LOG.error(
                "webhook %s refused delivery %s (%s of %s), attempt %d; retrying in %.0f s: %s",
                delivery.url,
                delivery.delivery_id,
                delivery.event,
                delivery.alert_id,
                delivery.attempts + 1,
                self.backoff.cap_s,
                attempt.error,
            )
        else:
            next_attempt_at = now  # due again as soon as the URL's backoff is over

        def update(connection: sqlite3.Connection) -> None:
            connection.execute(
                "UPDATE webhook_deliveries SET attempts = attempts + 1, last_status = ?, last_error = ?,"
                " next_attempt_at = ?, delivered_at = ? WHERE id = ?",
                (
                    attempt.status,
                    attempt.error,
                    format_timestamp(next_attempt_at),
                    format_timestamp(now) if outcome is Outcome.DELIVERED else None,
                    delivery.id,
                ),
            )

        await self.store.write(update)
        # Counted once the outbox row says so: a reader of the counters then finds the row agreeing.
        if outcome is Outcome.DELIVERED:
            self.counters.delivered += 1
        elif outcome is Outcome.REFUSED:
            self.counters.refused += 1
        else:
            self.counters.failed_attempts += 1

    async def _back_off(self, url: str, attempt: Attempt) -> None:
        failures = self.failures_in_a_row[url]
        delay = self.backoff.delay(failures, self._rng)
        if attempt.retry_after_s is not None:
            delay = min(self.backoff.cap_s, max(delay, attempt.retry_after_s))
        self.failures_in_a_row[url] = failures + 1
        self.last_error[url] = attempt.error
        log = _LOG.warning if failures < 3 or (failures + 1) % 10 == 0 else _LOG.debug
        log("webhook %s unavailable (%d in a row), retrying in %.1f s: %s", url, failures + 1, delay, attempt.error)
        await asyncio.sleep(delay)

    async def _prune(self, url: str) -> None:
        cutoff = format_timestamp(self._clock() - DELIVERED_RETENTION)

        def delete(connection: sqlite3.Connection) -> int:
            cursor = connection.execute(
                "DELETE FROM webhook_deliveries WHERE url = ? AND delivered_at IS NOT NULL AND delivered_at < ?",
                (url, cutoff),
            )
            return cursor.rowcount

        pruned = await self.store.write(delete)
        if pruned:
            _LOG.info("webhook: pruned %d delivered delivery(ies) of %s", pruned, url)


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is not used by webhook receivers we know; ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
