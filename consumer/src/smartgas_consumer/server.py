"""Assembly and lifecycle of the consumer: the store, the intake and the CoAP site, started and stopped.

The whole resource tree is built in one place (``build_site``). ``Consumer.start`` opens the store before
the socket, so no reading can arrive that cannot be stored; ``Consumer.stop`` closes the socket first,
then lets the store commit what it holds. Acknowledgements are only sent after commit, so a reading that
was acknowledged is on disk whatever the moment of the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from datetime import UTC, datetime, timedelta

import aiocoap
from aiocoap import resource
from elasticsearch import AsyncElasticsearch

from smartgas_consumer.alerts import ALERT_SCHEMA, AlertEngine, AlertSource, Kind
from smartgas_consumer.api import HttpServer, build_app
from smartgas_consumer.auth import ApiKeys
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.dashboard import build_dashboard_router
from smartgas_consumer.edgelog import COAP_LOGGER, PeerNoiseFilter, datagram_error_handler
from smartgas_consumer.elastic import make_client
from smartgas_consumer.elasticsearch_sink import Backoff, ElasticsearchSink, ReadingSource
from smartgas_consumer.fleet import Fleet, load_fleet
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.metrics import Metrics
from smartgas_consumer.provision import install_templates
from smartgas_consumer.queries import FleetQueries
from smartgas_consumer.resource import MeterList, MeterReading
from smartgas_consumer.store import ReadingStore, StoreSummary, format_timestamp
from smartgas_consumer.webhook import WEBHOOK_SCHEMA, WebhookDispatcher

_LOG = logging.getLogger(__name__)
#: Linux's SO_RCVBUFFORCE (not exported by Python's socket module).
SO_RCVBUFFORCE = 33


def build_site(intake: ReadingIntake) -> resource.Site:
    """The CoAP resource tree: /.well-known/core, /meters and /meters/{meter_id}/reading."""
    root = resource.Site()
    root.add_resource([".well-known", "core"], resource.WKCResource(root.get_resources_as_linkheader, impl_info=None))
    root.add_resource(["meters"], MeterList(intake))
    root.add_resource(["meters"], MeterReading(intake))
    return root


def udp_socket(context: aiocoap.Context) -> socket.socket:
    """The UDP socket under aiocoap's udp6 transport (the only transport the consumer starts)."""
    (interface,) = context.request_interfaces
    sock: socket.socket = interface.token_interface.message_interface.transport.get_extra_info("socket")
    return sock


def describe_lag(summary: StoreSummary, now: datetime) -> str:
    """Shipping lag for a person: how many readings wait, and how old the oldest is."""
    age = "-"
    if summary.oldest_pending_received_at is not None:
        oldest = datetime.fromisoformat(summary.oldest_pending_received_at)
        age = f"{max(0.0, (now - oldest).total_seconds()):.1f}s"
    return f"pending={summary.pending} oldest_pending_age={age} dead_letters={summary.dead_letters}"


def receive_buffer_bytes(sock: socket.socket) -> int:
    """The receive buffer the kernel keeps for ``sock`` (Linux reports double, counting its overhead)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


class Consumer:
    """One running consumer. ``await start()``, then ``await stop()`` (idempotent, safe after a failed start)."""

    def __init__(self, config: ConsumerConfig) -> None:
        self.config = config
        # The fleet and keys files are read here, before any socket opens: a broken file stops the start.
        self.fleet = load_fleet(config.fleet) if config.fleet is not None else Fleet()
        self.api_keys = ApiKeys.load(config.api_keys).with_admin_key(config.admin_key)
        self.metrics = Metrics(alert_kinds=[str(kind) for kind in Kind])
        self.store = ReadingStore(
            config.db,
            group_window_s=config.group_window_ms / 1000,
            extra_schema=[ALERT_SCHEMA, WEBHOOK_SCHEMA],
            on_commit=self.metrics.commit,
        )
        self.intake = ReadingIntake(
            self.store,
            fleet=self.fleet,
            log_readings=config.log_readings,
            metrics=self.metrics,
            max_reading_age_s=config.max_reading_age_s,
            max_clock_skew_s=config.max_clock_skew_s,
        )
        self.alerts = AlertEngine(self.store, config, fleet=self.fleet)
        self.intake.on_stored.append(self.alerts.on_stored)
        self.webhooks: WebhookDispatcher | None = None
        if config.webhook_urls:
            self.webhooks = webhooks = WebhookDispatcher(self.store, config.webhook_urls)
            self.alerts.recorders.append(webhooks.record)  # outbox rows commit in the alert's own transaction
            self.alerts.on_change.append(lambda _change: webhooks.wake())
        self.elasticsearch: AsyncElasticsearch | None = None
        self.sinks: list[ElasticsearchSink] = []
        if config.elasticsearch_url is not None:
            self._add_sinks(config)
        self.queries = FleetQueries(
            self.store,
            self.fleet,
            offline_after=timedelta(seconds=config.expected_period_s * config.offline_after_periods),
            open_alerts_by_meter=self.alerts.open_by_meter,
        )
        dashboard = build_dashboard_router(self.queries, self.api_keys)
        self.http = HttpServer(
            build_app(
                self.queries, self.api_keys, alerts=self.alerts, metrics=self.metrics.render, dashboard=dashboard
            ),
            config.http_host,
            config.http_port,
        )
        self._context: aiocoap.Context | None = None
        # What peers can make aiocoap log, bounded (edgelog.py); installed while the socket is open.
        self._coap_log = logging.getLogger(COAP_LOGGER)
        self._noise_filter = PeerNoiseFilter()
        self._status_task: asyncio.Task[None] | None = None
        self.port: int | None = None

    def _add_sinks(self, config: ConsumerConfig) -> None:
        """One Elasticsearch client, shared by the readings sink and the alerts sink."""
        self.elasticsearch = make_client(config)
        readings = ReadingSource(
            self.store,
            index=config.elasticsearch_index,
            fleet=self.fleet,
            retention=timedelta(hours=config.retention_hours),
        )
        for source, new_data in ((readings, self.intake.on_stored), (AlertSource(self.store), self.alerts.on_change)):
            sink = ElasticsearchSink(
                source,
                self.elasticsearch,
                batch_size=config.ship_batch_size,
                backoff=Backoff(cap_s=config.ship_backoff_max_s),
                prepare=install_templates,
                metrics=self.metrics,
            )
            new_data.append(lambda _news, sink=sink: sink.wake())  # type: ignore[misc]
            self.sinks.append(sink)

    @property
    def sink(self) -> ElasticsearchSink | None:
        """The readings sink, if Elasticsearch is configured."""
        return self.sinks[0] if self.sinks else None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        await self.store.open()
        # Alerts load their open alerts and recent readings before any new reading can arrive.
        await self.alerts.start()
        if self.webhooks is not None:
            await self.webhooks.start()
        self._coap_log.addFilter(self._noise_filter)
        asyncio.get_running_loop().set_exception_handler(datagram_error_handler(self._coap_log))
        # udp6 only: aiocoap would otherwise also open TCP, TLS and WebSocket listeners.
        self._context = await aiocoap.Context.create_server_context(
            build_site(self.intake),
            bind=(self.config.coap_host, self.config.coap_port),
            transports=["udp6"],
            loggername=COAP_LOGGER,
        )
        sock = udp_socket(self._context)
        self._raise_receive_buffer(sock)
        self.port = sock.getsockname()[1]
        summary = await self.store.summary()
        _LOG.info(
            "consumer listening on coap://[%s]:%d (UDP), store %s: %d readings from %d meters",
            self.config.coap_host,
            self.port,
            self.config.db,
            summary.readings,
            summary.meters,
        )
        for sink in self.sinks:
            await sink.start()
        if self.sinks:
            _LOG.info(
                "shipping readings and alerts to Elasticsearch at %s, index %s",
                self.config.elasticsearch_url,
                self.config.elasticsearch_index,
            )
        else:
            _LOG.info("no Elasticsearch configured: readings stay in the local store")
        await self.http.start()
        _LOG.info(
            "HTTP API on http://%s:%d/api (dashboard /dashboard/, metrics /metrics), %d API key(s)",
            self.config.http_host,
            self.http.port,
            len(self.api_keys.principals),
        )
        self._status_task = asyncio.create_task(self._log_status(), name="status-log")

    def _raise_receive_buffer(self, sock: socket.socket) -> None:
        # The default buffer (~208 KiB) holds only ~190 readings; a pause longer than that (a slow
        # fsync, a GC) drops datagrams that a CON meter re-sends only seconds later.
        wanted = self.config.udp_receive_buffer_bytes
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
        if receive_buffer_bytes(sock) < wanted:
            # SO_RCVBUF is capped at net.core.rmem_max; SO_RCVBUFFORCE is not, for a privileged process.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, wanted)
        granted = receive_buffer_bytes(sock)
        if granted < wanted:
            _LOG.warning(
                "UDP receive buffer is %d bytes, less than the %d asked: raise net.core.rmem_max",
                granted,
                wanted,
            )

    async def _log_status(self) -> None:
        while True:
            await asyncio.sleep(self.config.status_interval_s)
            _LOG.info("status: %s", self.intake.counters.describe())
            now = datetime.now(UTC)
            summary = await self.store.summary()
            await self.refresh_metrics(summary, now)
            if self.sink is not None:
                _LOG.info("shipping: %s", describe_lag(summary, now))

    async def refresh_metrics(self, summary: StoreSummary, now: datetime) -> None:
        """The gauges read from state: shipping lag and store sizes, meters online, open alerts."""
        self.metrics.refresh(summary, now)
        cutoff = format_timestamp(now - self.queries.offline_after)
        online: int = await self.store.read(
            lambda connection: connection.execute(
                "SELECT count(*) FROM meters WHERE last_seen >= ?", (cutoff,)
            ).fetchone()[0]
        )
        self.metrics.set_meters(online, len(self.fleet.meters), summary.meters)
        self.metrics.set_open_alerts(self.alerts.open_counts())

    async def stop(self) -> None:
        if self._status_task is not None:
            self._status_task.cancel()
            await asyncio.gather(self._status_task, return_exceptions=True)
            self._status_task = None
        await self.http.stop()
        if self._context is not None:
            await self._context.shutdown()
            self._context = None
            asyncio.get_running_loop().set_exception_handler(None)
        self._coap_log.removeFilter(self._noise_filter)
        await self.alerts.stop()  # judges what is still queued
        if self.webhooks is not None:
            await self.webhooks.stop()
        for sink in self.sinks:
            await sink.stop()  # what is unshipped stays pending in the store for the next start
        if self.elasticsearch is not None:
            await self.elasticsearch.close()
            self.elasticsearch = None
        await self.store.close()
        _LOG.info("consumer stopped: %s", self.intake.counters.describe())

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (by SIGTERM/SIGINT in the CLI), then stop cleanly."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()
