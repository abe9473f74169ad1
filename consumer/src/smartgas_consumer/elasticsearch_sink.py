"""The Elasticsearch sink: ships every committed record from the durable store, and never loses one.

The store is the buffer; a ``ShipSource`` says what to ship from it (readings here, alerts in
``alert_shipping.py``). The sink takes the oldest pending records, sends them with the bulk helper and reads the
result item by item:

- 2xx: the record is marked shipped (only now, when Elasticsearch confirmed that very item);
- 409 for an item: a document with that ``_id`` is already there (a replay of a batch whose answer was
  lost), so the record counts as shipped, never as dead;
- 429 or 5xx for an item: left pending, sent again after a backoff;
- any other 4xx for an item (a mapping error, say): it can never succeed, so the source dead-letters it
  with Elasticsearch's reason; it is neither retried forever nor dropped silently.

A failure of the whole request (connection refused, timeout, 429/5xx, or a 4xx such as bad credentials or
a client/server version mismatch) leaves every record pending and retries with capped exponential
backoff; the consumer keeps accepting readings meanwhile. Records go to data streams, which take only
``op_type: create``; each document has a natural ``_id`` (a reading's is ``{meter_id}:{epoch}:{seq}``), so
a replay after a crash is answered 409 and indexes nothing twice.
Third-party errors are translated here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from elastic_transport import TransportError
from elasticsearch import ApiError, AsyncElasticsearch, UnsupportedProductError
from elasticsearch.helpers import async_streaming_bulk

from smartgas_consumer.fleet import Fleet
from smartgas_consumer.metrics import Metrics
from smartgas_consumer.store import DeadLetter, ReadingStore, StoredReading, parse_timestamp

if TYPE_CHECKING:  # the forecaster's module reaches the intake, which needs nothing from here at run time
    from smartgas_consumer.forecaster import Forecaster

_LOG = logging.getLogger(__name__)
#: A bulk item's status when a ``create`` meets a document with the same ``_id``: it is already indexed.
CONFLICT = 409


@dataclass(frozen=True, slots=True)
class Shipment:
    """One record to index: its key in the store, its document ``_id`` and body."""

    key: int
    doc_id: str
    document: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A shipment Elasticsearch refused for good, with the item's status and reason."""

    shipment: Shipment
    status: int | None
    reason: str


class ShipSource(Protocol):
    """What a sink ships: pending records of one kind from the store, and how to settle them."""

    name: str
    index: str

    async def pending(self, limit: int) -> list[Shipment]: ...
    async def mark_shipped(self, shipments: list[Shipment], at: datetime) -> None: ...
    async def dead_letter(self, refusals: list[Refusal], at: datetime) -> None: ...
    async def prune(self, now: datetime) -> int: ...


def document_id(reading: StoredReading) -> str:
    """The natural id of a reading in Elasticsearch: a replay overwrites instead of duplicating."""
    return f"{reading.meter_id}:{reading.epoch}:{reading.seq}"


def to_document(
    reading: StoredReading, fleet: Fleet | None = None, forecaster: Forecaster | None = None
) -> dict[str, Any]:
    """The Elasticsearch document for a stored reading (fields as in the readings index template).

    With a forecaster, a compressed bottle's document carries days to empty from this reading's content at
    the draw the forecaster knows now (when the reading is shipped, seconds after it was stored).
    """
    document: dict[str, Any] = {
        "@timestamp": reading.ts,
        "received_at": reading.received_at,
        "meter_id": reading.meter_id,
        "epoch": reading.epoch,
        "seq": reading.seq,
        "pressure_bar": reading.pressure_bar,
        "temperature_c": reading.temperature_c,
        "volume_l": reading.volume_l,
        "moles": reading.moles,
        "meter_known": reading.meter_known,
    }
    if reading.client_id is not None:
        document["client_id"] = reading.client_id
    if reading.site_id is not None:
        document["site"] = reading.site_id
    if reading.fill_pct is not None:
        document["fill_pct"] = reading.fill_pct
    # Real-gas fields, only where computed (a missing field, not a null, as for fill_pct).
    real_gas = {
        "compressibility_z": reading.compressibility_z,
        "real_moles": reading.real_moles,
        "mass_kg": reading.mass_kg,
        "standard_volume_m3": reading.standard_volume_m3,
        "liquid_state": reading.liquid_state,
    }
    document.update({name: value for name, value in real_gas.items() if value is not None})
    meter = fleet.meter(reading.meter_id) if fleet is not None else None
    if meter is not None:
        document["gas"] = meter.gas.name
        document["gas_storage"] = meter.gas.storage.value
        document["location"] = {"lat": meter.site.latitude, "lon": meter.site.longitude}
    if forecaster is not None and meter is not None:
        try:
            moment = parse_timestamp(reading.ts)
        except ValueError:  # a damaged row still ships, without a forecast
            return document
        forecast = forecaster.forecast(
            reading.meter_id,
            ts=moment,
            content_mol=reading.real_moles if reading.real_moles is not None else reading.moles,
            fill_pct=reading.fill_pct,
            liquid_state=reading.liquid_state,
        )
        if forecast.days_to_empty is not None and forecast.basis is not None:
            document["days_to_empty"] = forecast.days_to_empty
            document["consumption_mol_per_day"] = forecast.consumption_mol_per_day
            document["forecast_basis"] = str(forecast.basis)
            document["forecast_reserve_fill_pct"] = forecast.reserve_fill_pct
    return document


class ReadingSource:
    """Readings from the store, shipped to the readings data stream; shipped ones pruned after the retention."""

    name = "readings"

    def __init__(
        self,
        store: ReadingStore,
        *,
        index: str,
        fleet: Fleet | None = None,
        retention: timedelta = timedelta(days=7),
        forecaster: Forecaster | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.fleet = fleet
        self.forecaster = forecaster
        self.retention = retention

    async def pending(self, limit: int) -> list[Shipment]:
        return [
            Shipment(reading.id, document_id(reading), to_document(reading, self.fleet, self.forecaster))
            for reading in await self.store.pending(limit)
        ]

    async def mark_shipped(self, shipments: list[Shipment], at: datetime) -> None:
        await self.store.mark_shipped([shipment.key for shipment in shipments], at)

    async def dead_letter(self, refusals: list[Refusal], at: datetime) -> None:
        letters = [
            DeadLetter(
                refusal.shipment.key,
                refusal.shipment.document["meter_id"],
                refusal.shipment.document["seq"],
                refusal.status,
                refusal.reason,
                json.dumps(refusal.shipment.document),
            )
            for refusal in refusals
        ]
        await self.store.dead_letter(letters, at)

    async def prune(self, now: datetime) -> int:
        return await self.store.prune_shipped(now - self.retention)


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
    """Ships a source's records to its index: ``start()``, ``wake()`` on new data, ``stop()``.

    The client is shared and owned by the caller, who closes it after stopping every sink.
    """

    def __init__(
        self,
        source: ShipSource,
        client: AsyncElasticsearch,
        *,
        batch_size: int = 500,
        backoff: Backoff | None = None,
        prepare: Callable[[AsyncElasticsearch], Awaitable[object]] | None = None,
        idle_poll_s: float = 1.0,
        prune_every_s: float = 60.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.source = source
        self.client = client
        self.batch_size = batch_size
        self.backoff = backoff or Backoff()
        # Run once before the first bulk (installs the index template); retried like a bulk.
        self._prepare = prepare
        self._idle_poll_s = idle_poll_s
        self._prune_every_s = prune_every_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.counters = ShipCounters()
        self._metrics = metrics if metrics is not None else Metrics(process=False)
        self.failures_in_a_row = 0
        self.last_error: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"elasticsearch-sink-{self.source.name}")

    def wake(self) -> None:
        """New readings were committed: ship them now rather than at the next poll."""
        self._wakeup.set()

    async def stop(self) -> None:
        """Stop shipping; what is pending stays pending, for the next start."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

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
                batch = await self.source.pending(self.batch_size)
                if not batch:
                    await self._idle()
                    continue
                outcome = await self._call(self.ship(batch))
            except ShipFailed as err:
                self.counters.request_failures += 1
                self._metrics.ship_failure(self.source.name)
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
        _LOG.info("Elasticsearch ready: index templates installed")

    async def _prune(self) -> None:
        pruned = await self.source.prune(self._clock())
        if pruned:
            _LOG.info("pruned %d shipped %s older than the retention", pruned, self.source.name)

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

    async def ship(self, batch: list[Shipment]) -> BatchOutcome:
        """Send one batch with the bulk helper and settle every item by its own status."""
        by_id = {shipment.doc_id: shipment for shipment in batch}
        shipped: list[Shipment] = []
        refused: list[Refusal] = []
        to_retry = 0
        async for _ok, result in async_streaming_bulk(
            self.client,
            self._actions(batch),
            chunk_size=self.batch_size,
            raise_on_error=False,  # per-item failures come back as results, read one by one
            raise_on_exception=True,  # a failed request raises, and _call turns it into ShipFailed
            max_retries=0,  # retries are this sink's policy, not the helper's
            yield_ok=True,
        ):
            item = next(iter(result.values()))
            shipment = by_id[item["_id"]]
            status = item.get("status")
            if status is not None and (200 <= status < 300 or status == CONFLICT):
                shipped.append(shipment)
            elif is_retryable(status):
                to_retry += 1
            else:
                refused.append(Refusal(shipment, status, _short(item.get("error"))))
        now = self._clock()
        if shipped:
            await self.source.mark_shipped(shipped, now)
        if refused:
            await self.source.dead_letter(refused, now)
            for refusal in refused:
                _LOG.error(
                    "%s %s dead-lettered: HTTP %s %s",
                    self.source.name,
                    refusal.shipment.doc_id,
                    refusal.status,
                    refusal.reason,
                )
        self.counters.shipped += len(shipped)
        self.counters.dead_lettered += len(refused)
        self.counters.item_retries += to_retry
        self._metrics.shipped(self.source.name, len(shipped))
        self._metrics.dead_lettered(self.source.name, len(refused))
        self._metrics.retried(self.source.name, to_retry)
        return BatchOutcome(len(shipped), len(refused), to_retry)

    def _actions(self, batch: list[Shipment]) -> Iterator[dict[str, Any]]:
        for shipment in batch:
            yield {
                "_op_type": "create",
                "_index": self.source.index,
                "_id": shipment.doc_id,
                "_source": shipment.document,
            }


def _short(detail: object, limit: int = 500) -> str:
    """Elasticsearch's error detail as one bounded line (reasons can hold whole documents)."""
    text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    return text if len(text) <= limit else text[:limit] + "…"
