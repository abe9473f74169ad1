"""The consumer's Prometheus metrics: what arrived, what was stored, how fast, what waits to be shipped.

One ``Metrics`` object owns its own ``CollectorRegistry`` (never the library's global one), so two
consumers in one process, or two tests, never share a number. It is created once, at assembly, and
handed to the stages that count: the intake and the CoAP resource (readings, acknowledgement latency),
the store (group commits), the sinks (shipping), the timers (meters online, open alerts, shipping lag).
``render()`` gives the exposition for the HTTP API's ``/metrics`` route. Every metric is described in
``docs/metrics.md``; names follow Prometheus conventions: a ``smartgas_`` prefix, the unit in the name
(``_seconds``, ``_bytes``), ``_total`` on counters.

Shipping lag and the meter and alert gauges describe state that lives in the store; they are set, not
counted: ``refresh(summary, now)`` takes a ``StoreSummary`` the caller has already read, and
``set_meters`` / ``set_open_alerts`` take counts the caller computed. They are as fresh as the last
call (the status timer, every ``status_interval_s``), so a scrape never waits on SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from smartgas_consumer import __version__
from smartgas_consumer.store import CommitResult, SequenceOutcome, StoreSummary

#: Why a reading is refused: ``intake.rejection_reason`` of each domain error a PUT can raise.
REJECTION_REASONS = (
    "invalid_reading",
    "implausible_reading",
    "invalid_meter_id",
    "payload_too_large",
    "unsupported_format",
    "store_unavailable",
    "unknown_meter_refused",
    "new_meter_rate_limited",
)
#: Counted instead of a reason not in ``REJECTION_REASONS`` (keeps the label's values bounded).
OTHER_REASON = "other"
#: How readings arrive (the CoAP resource, the MQTT ingest).
TRANSPORTS = ("coap", "mqtt")
#: What the sinks ship (``ShipSource.name``).
SINKS = ("readings", "alerts")

#: From 1 ms (an answer with no wait) to 1 s. The group window (2 ms) plus one fsync lands in the first
#: buckets; 0.1 s is aiocoap's empty-ACK delay, past which the answer no longer rides on the ACK.
ACK_LATENCY_BUCKETS_S = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
#: One transaction and its fsync: sub-millisecond on tmpfs, milliseconds on SSD, more on a slow disk.
COMMIT_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Readings per group commit, up to the store's ``max_group_size`` (1024).
COMMIT_READINGS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """Every metric of one consumer, in a registry of its own. Create once; inject where counted."""

    def __init__(
        self,
        *,
        sinks: Iterable[str] = SINKS,
        alert_kinds: Iterable[str] = (),
        process: bool = True,
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry

        # -- ingest ------------------------------------------------------------------------------
        self._received = Counter(
            "smartgas_readings_received",
            "Readings PUT to /meters/{id}/reading that reached the intake, whatever became of them.",
            registry=registry,
        )
        self._stored = Counter(
            "smartgas_readings_stored",
            "Readings newly stored (committed to disk, then acknowledged 2.04 with stored: true).",
            registry=registry,
        )
        self._duplicates = Counter(
            "smartgas_readings_duplicate",
            "Readings acknowledged again but not stored: re-sends and replays of a reading already stored.",
            registry=registry,
        )
        self._rejected = Counter(
            "smartgas_readings_rejected",
            "Readings refused with a 4.xx or 5.03 answer, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in (*REJECTION_REASONS, OTHER_REASON):
            self._rejected.labels(reason)
        self._transport_received = Counter(
            "smartgas_transport_readings_received",
            "Readings that reached the intake, by transport (coap, mqtt).",
            ["transport"],
            registry=registry,
        )
        self._transport_accepted = Counter(
            "smartgas_transport_readings_accepted",
            "Readings answered 2.04 (stored, or a duplicate of a stored one), by transport.",
            ["transport"],
            registry=registry,
        )
        self._transport_refused = Counter(
            "smartgas_transport_readings_refused",
            "Readings refused with a 4.xx or 5.03, by transport.",
            ["transport"],
            registry=registry,
        )
        for transport in TRANSPORTS:
            for metric in (self._transport_received, self._transport_accepted, self._transport_refused):
                metric.labels(transport)
        self._mqtt_connected = Gauge(
            "smartgas_mqtt_connected",
            "1 while the consumer is connected and subscribed to its MQTT broker, else 0 (MQTT on only).",
            registry=registry,
        )
        self._mqtt_connects = Counter(
            "smartgas_mqtt_connects",
            "Connections to the MQTT broker made (CONNACK and SUBACK received): more than one means reconnects.",
            registry=registry,
        )
        self._missing = Counter(
            "smartgas_readings_missing",
            "Readings never received: the gaps between a meter's stored sequence numbers.",
            registry=registry,
        )
        self._reboots = Counter(
            "smartgas_meter_reboots",
            "Meters that restarted their sequence counter (a new epoch began).",
            registry=registry,
        )
        self._ack_latency = Histogram(
            "smartgas_ack_latency_seconds",
            "From a reading PUT reaching the CoAP resource to its 2.04 answer handed back to aiocoap.",
            buckets=ACK_LATENCY_BUCKETS_S,
            registry=registry,
        )

        # -- durable store -------------------------------------------------------------------------
        self._commit_latency = Histogram(
            "smartgas_store_commit_duration_seconds",
            "One group commit: the SQLite transaction and its fsync, after the group window closed.",
            buckets=COMMIT_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._commit_readings = Histogram(
            "smartgas_store_commit_readings",
            "Readings written per group commit (stored and duplicates alike).",
            buckets=COMMIT_READINGS_BUCKETS,
            registry=registry,
        )
        self._store_readings = Gauge(
            "smartgas_store_readings",
            "Readings held in the local store (shipped ones stay until the retention prunes them).",
            registry=registry,
        )
        self._store_dead_letters = Gauge(
            "smartgas_store_dead_letters",
            "Readings a sink refused for good, kept in the store's dead_letters table.",
            registry=registry,
        )

        # -- sinks -----------------------------------------------------------------------------------
        self._shipped = Counter(
            "smartgas_sink_shipped_records",
            "Records the sink's target confirmed item by item (then marked shipped in the store).",
            ["sink"],
            registry=registry,
        )
        self._dead_lettered = Counter(
            "smartgas_sink_dead_lettered_records",
            "Records refused for good (a 4xx for that item) and dead-lettered.",
            ["sink"],
            registry=registry,
        )
        self._retried = Counter(
            "smartgas_sink_retried_records",
            "Records refused for now (429 or 5xx for that item), left pending and sent again later.",
            ["sink"],
            registry=registry,
        )
        self._request_failures = Counter(
            "smartgas_sink_request_failures",
            "Bulk requests that failed as a whole (no connection, timeout, 429/5xx, bad credentials).",
            ["sink"],
            registry=registry,
        )
        self._pending = Gauge(
            "smartgas_sink_pending_records",
            "Records in the store that no sink has confirmed yet.",
            ["sink"],
            registry=registry,
        )
        self._oldest_pending_age = Gauge(
            "smartgas_sink_oldest_pending_age_seconds",
            "Age of the oldest pending record (by receive time); 0 when nothing waits.",
            ["sink"],
            registry=registry,
        )
        for sink in sinks:
            for metric in (self._shipped, self._dead_lettered, self._retried, self._request_failures):
                metric.labels(sink)
            self._pending.labels(sink)
            self._oldest_pending_age.labels(sink)

        # -- fleet -----------------------------------------------------------------------------------
        self._meters_online = Gauge(
            "smartgas_meters_online",
            "Meters whose last reading arrived within the offline window (expected period x periods).",
            registry=registry,
        )
        self._meters_known = Gauge(
            "smartgas_meters_known",
            "Meters listed in the fleet file.",
            registry=registry,
        )
        self._meters_registered = Gauge(
            "smartgas_meters_registered",
            "Meters in the store's registry: every meter that ever had a reading stored, listed or not.",
            registry=registry,
        )
        self._meters_unknown_held = Gauge(
            "smartgas_meters_unknown_held",
            "Meters missing from the fleet file that the consumer holds now (capped by --max-unknown-meters).",
            registry=registry,
        )
        self._alerts_open = Gauge(
            "smartgas_alerts_open",
            "Alerts open now, by kind.",
            ["kind"],
            registry=registry,
        )
        self._alert_kinds: set[str] = set()
        self.set_open_alerts(dict.fromkeys(alert_kinds, 0))

        # -- the process -----------------------------------------------------------------------------
        Info("smartgas_consumer", "The consumer's version.", registry=registry).info({"version": __version__})
        if process:
            # process_cpu_seconds_total, process_resident_memory_bytes, ... read from /proc (Linux only:
            # elsewhere the collector yields nothing). python_info and python_gc_* beside them.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    # -- ingest --------------------------------------------------------------------------------------

    def reading_received(self, transport: str = "coap") -> None:
        self._received.inc()
        self._transport_received.labels(transport).inc()

    def reading_accepted(self, transport: str = "coap") -> None:
        self._transport_accepted.labels(transport).inc()

    def reading_stored(self, result: CommitResult) -> None:
        """A reading's commit result: stored (maybe after a gap or a reboot) or a duplicate."""
        if not result.stored:
            self._duplicates.inc()
            return
        self._stored.inc()
        if result.missing:
            self._missing.inc(result.missing)
        if result.outcome is SequenceOutcome.REBOOT:
            self._reboots.inc()

    def reading_rejected(self, reason: str, transport: str = "coap") -> None:
        self._rejected.labels(reason if reason in REJECTION_REASONS else OTHER_REASON).inc()
        self._transport_refused.labels(transport).inc()

    def mqtt_state(self, connected: bool) -> None:
        """The MQTT link came up (counted as a connect) or went down."""
        self._mqtt_connected.set(1 if connected else 0)
        if connected:
            self._mqtt_connects.inc()

    def ack_latency(self, seconds: float) -> None:
        self._ack_latency.observe(seconds)

    # -- durable store -------------------------------------------------------------------------------

    def commit(self, rows: int, seconds: float) -> None:
        """One group commit; the signature of ``ReadingStore(on_commit=...)``."""
        self._commit_readings.observe(rows)
        self._commit_latency.observe(seconds)

    # -- sinks ---------------------------------------------------------------------------------------

    def shipped(self, sink: str, n: int) -> None:
        self._shipped.labels(sink).inc(n)

    def dead_lettered(self, sink: str, n: int) -> None:
        self._dead_lettered.labels(sink).inc(n)

    def retried(self, sink: str, n: int) -> None:
        self._retried.labels(sink).inc(n)

    def ship_failure(self, sink: str) -> None:
        self._request_failures.labels(sink).inc()

    def set_shipping_lag(self, pending: int, oldest_age_s: float, sink: str = "readings") -> None:
        self._pending.labels(sink).set(pending)
        self._oldest_pending_age.labels(sink).set(max(0.0, oldest_age_s))

    def refresh(self, summary: StoreSummary, now: datetime, *, shipping: bool = True) -> None:
        """Set the store gauges, and the readings sink's lag when there is a sink, from a summary read already.

        Without Elasticsearch nothing waits to be shipped: no lag is reported (a pending count there would
        read as a growing backlog).
        """
        self._store_readings.set(summary.readings)
        self._store_dead_letters.set(summary.dead_letters)
        if not shipping:
            return
        age = 0.0
        if summary.oldest_pending_received_at is not None:
            age = (now - datetime.fromisoformat(summary.oldest_pending_received_at)).total_seconds()
        self.set_shipping_lag(summary.pending, age, sink="readings")

    # -- fleet ---------------------------------------------------------------------------------------

    def set_meters(self, online: int, known: int, total: int) -> None:
        """Meters online now, listed in the fleet file (known), and in the store's registry (total)."""
        self._meters_online.set(online)
        self._meters_known.set(known)
        self._meters_registered.set(total)

    def set_unknown_meters_held(self, held: int) -> None:
        self._meters_unknown_held.set(held)

    def set_open_alerts(self, by_kind: Mapping[str, int]) -> None:
        """Open alerts per kind; a kind seen before and missing now is set to 0, not left stale."""
        self._alert_kinds.update(by_kind)
        for kind in self._alert_kinds:
            self._alerts_open.labels(kind).set(by_kind.get(kind, 0))

    # -- exposition ----------------------------------------------------------------------------------

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition and its Content-Type, negotiated from the scraper's Accept header.

        No header (or one asking for text) gives the Prometheus text format 0.0.4; a scraper that
        asks for OpenMetrics (Prometheus itself does) gets OpenMetrics.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
