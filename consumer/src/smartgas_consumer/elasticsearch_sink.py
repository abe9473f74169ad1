"""The Elasticsearch sink: ships every committed reading from the durable store, and never loses one.

The store is the buffer. The sink reads the oldest pending readings, sends them with the bulk helper
and reads the result item by item:

- 2xx: the reading is marked shipped (only now, when Elasticsearch confirmed that very item);
- 429 or 5xx for an item: left pending, sent again after a backoff;
- any other 4xx for an item (a mapping error, say): it can never succeed, so it goes to the store's
  dead-letter table with Elasticsearch's reason, and is neither retried forever nor dropped silently.

A failure of the whole request (connection refused, timeout, 429/5xx, or a 4xx such as bad credentials or
a client/server version mismatch) leaves every reading pending and retries with capped exponential
backoff; the consumer keeps accepting readings meanwhile. Each document's ``_id`` is
``{meter_id}:{seq}``, so a replay after a crash overwrites rather than duplicates. Third-party errors are
translated here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from elastic_transport import TransportError
from elasticsearch import ApiError, AsyncElasticsearch, UnsupportedProductError
from elasticsearch.helpers import async_streaming_bulk

from smartgas_consumer.store import DeadLetter, ReadingStore, StoredReading

_LOG = logging.getLogger(__name__)


def document_id(reading: StoredReading) -> str:
    """The natural id of a reading in Elasticsearch: a replay overwrites instead of duplicating."""
    return f"{reading.meter_id}:{reading.seq}"


def to_document(reading: StoredReading) -> dict[str, Any]:
    """The Elasticsearch document for a stored reading (fields as in the index template)."""
    return {
        "@timestamp": reading.ts,
        "received_at": reading.received_at,
        "meter_id": reading.meter_id,
        "seq": reading.seq,
        "pressure_bar": reading.pressure_bar,
        "temperature_c": reading.temperature_c,
        "volume_l": reading.volume_l,
        "moles": reading.moles,
    }


def is_retryable(status: int | None) -> bool:
    """429 and 5xx may succeed later; no status means the request never got an answer."""
    return status is None or status == 429 or status >= 500


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with jitter: base·2^attempt, at most ``cap_s``, times 0.5 to 1."""

    base_s: float = 0.5
    cap_s: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling: float = min(self.cap_s, self.base_s * 2 ** min(attempt, 30))
        return ceiling * rng.uniform(0.5, 1.0)


@dataclass(slots=True)
class ShipCounters:
    """Totals since start, for the status log (and the metrics endpoint)."""

    shipped: int = 0
    dead_lettered: int = 0
    item_retries: int = 0
    request_failures: int = 0


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """How one batch settled: confirmed, dead-lettered, or to be sent again."""

    shipped: int
    dead_lettered: int
    to_retry: int


class ShipFailed(Exception):
    """The whole bulk request failed; every reading in it stays pending."""


class ElasticsearchSink:
    """Ships readings from ``store`` to ``index``: ``start()``, ``wake()`` on new data, ``stop()``."""

    def __init__(
        self,
        store: ReadingStore,
        client: AsyncElasticsearch,
        *,
        index: str,
        batch_size: int = 500,
        backoff: Backoff | None = None,
        retention: timedelta = timedelta(days=7),
        prepare: Callable[[AsyncElasticsearch], Awaitable[None]] | None = None,
        idle_poll_s: float = 1.0,
        prune_every_s: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.index = index
        self.batch_size = batch_size
        self.backoff = backoff or Backoff()
        self.retention = retention
        # Run once before the first bulk (installs the index template); retried like a bulk.
        self._prepare = prepare
        self._idle_poll_s = idle_poll_s
        self._prune_every_s = prune_every_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.counters = ShipCounters()
        self.failures_in_a_row = 0
        self.last_error: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="elasticsearch-sink")

    def wake(self) -> None:
        """New readings were committed: ship them now rather than at the next poll."""
        self._wakeup.set()

    async def stop(self) -> None:
        """Stop shipping (what is pending stays pending, for the next start) and close the client."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.client.close()

    # -- the loop ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        prepared = self._prepare is None
        next_prune = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if not prepared:
                    await self._call(self._prepare_cluster())
                    prepared = True
                if loop.time() >= next_prune:
                    await self._prune()
                    next_prune = loop.time() + self._prune_every_s
                batch = await self.store.pending(self.batch_size)
                if not batch:
                    await self._idle()
                    continue
                outcome = await self._call(self.ship(batch))
            except ShipFailed as err:
                self.counters.request_failures += 1
                await self._after_failure(str(err))
                continue
            if outcome.to_retry:
                # Some items were refused for now (429/5xx): slow down before sending them again.
                await self._after_failure(f"{outcome.to_retry} item(s) to retry")
            else:
                self.failures_in_a_row = 0
                self.last_error = None

    async def _idle(self) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=self._idle_poll_s)
        except TimeoutError:
            pass

    async def _after_failure(self, reason: str) -> None:
        delay = self.backoff.delay(self.failures_in_a_row, self._rng)
        self.failures_in_a_row += 1
        self.last_error = reason
        log = _LOG.warning if self.failures_in_a_row <= 3 or self.failures_in_a_row % 10 == 0 else _LOG.debug
        log(
            "shipping to Elasticsearch failed (%d in a row), retrying in %.1f s: %s",
            self.failures_in_a_row,
            delay,
            reason,
        )
        await asyncio.sleep(delay)

    async def _prepare_cluster(self) -> None:
        assert self._prepare is not None
        await self._prepare(self.client)
        _LOG.info("Elasticsearch ready: index template installed for %s", self.index)

    async def _prune(self) -> None:
        pruned = await self.store.prune_shipped(self._clock() - self.retention)
        if pruned:
            _LOG.info("pruned %d shipped reading(s) older than the retention (%s)", pruned, self.retention)

    @staticmethod
    async def _call(operation: Awaitable[Any]) -> Any:
        """The one boundary where the client's exceptions become ShipFailed."""
        try:
            return await operation
        except UnsupportedProductError as err:
            raise ShipFailed(f"the server at this URL is not Elasticsearch: {err}") from err
        except ApiError as err:
            raise ShipFailed(f"HTTP {err.status_code}: {err.message} {_short(err.body)}") from err
        except TransportError as err:  # refused connection, timeout, TLS failure
            raise ShipFailed(f"{type(err).__name__}: {err.message}") from err

    # -- one batch -----------------------------------------------------------------------------------

    async def ship(self, batch: list[StoredReading]) -> BatchOutcome:
        """Send one batch with the bulk helper and settle every item by its own status."""
        by_id = {document_id(reading): reading for reading in batch}
        shipped: list[int] = []
        dead: list[DeadLetter] = []
        to_retry = 0
        async for ok, result in async_streaming_bulk(
            self.client,
            self._actions(batch),
            chunk_size=self.batch_size,
            raise_on_error=False,  # per-item failures come back as results, read one by one
            raise_on_exception=True,  # a failed request raises, and _call turns it into ShipFailed
            max_retries=0,  # retries are this sink's policy, not the helper's
            yield_ok=True,
        ):
            item = next(iter(result.values()))
            reading = by_id[item["_id"]]
            status = item.get("status")
            if ok and status is not None and 200 <= status < 300:
                shipped.append(reading.id)
            elif is_retryable(status):
                to_retry += 1
            else:
                dead.append(
                    DeadLetter(
                        reading.id,
                        reading.meter_id,
                        reading.seq,
                        status,
                        _short(item.get("error")),
                        json.dumps(to_document(reading)),
                    )
                )
        now = self._clock()
        if shipped:
            await self.store.mark_shipped(shipped, now)
        if dead:
            await self.store.dead_letter(dead, now)
            for letter in dead:
                _LOG.error(
                    "reading %s:%d dead-lettered: HTTP %s %s",
                    letter.meter_id,
                    letter.seq,
                    letter.status,
                    letter.reason,
                )
        self.counters.shipped += len(shipped)
        self.counters.dead_lettered += len(dead)
        self.counters.item_retries += to_retry
        return BatchOutcome(len(shipped), len(dead), to_retry)

    def _actions(self, batch: list[StoredReading]) -> Iterator[dict[str, Any]]:
        for reading in batch:
            yield {
                "_op_type": "index",
                "_index": self.index,
                "_id": document_id(reading),
                "_source": to_document(reading),
            }


def _short(detail: object, limit: int = 500) -> str:
    """Elasticsearch's error detail as one bounded line (reasons can hold whole documents)."""
    text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    return text if len(text) <= limit else text[:limit] + "…"
