"""Assembly and lifecycle of the consumer: the store, the intake and the CoAP site, started and stopped.

The whole resource tree is built in one place (``build_site``). ``Consumer.start`` takes the store's lock
file (one consumer per store) and opens the store before the socket, so no reading can arrive that cannot
be stored; the CoAP socket is bound without SO_REUSEPORT unless ``--coap-reuse-port`` asks for it, so a
second consumer on the same port fails to start instead of silently taking half the traffic. Every
start-up refusal is a ``StartupError`` (or the store's ``StoreUnusable``) with a one-line message naming
the setting or path and the fix. ``Consumer.stop`` closes the socket first,
then lets the store commit what it holds. Acknowledgements are only sent after commit, so a reading that
was acknowledged is on disk whatever the moment of the stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import socket
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiocoap
from aiocoap import resource
from elasticsearch import AsyncElasticsearch

from smartgas_consumer.admission import FORGET_UNKNOWN_AFTER, UnknownMeters
from smartgas_consumer.alert_records import ALERT_SCHEMA
from smartgas_consumer.alert_rules import Kind
from smartgas_consumer.alert_shipping import AlertSource
from smartgas_consumer.alerts import AlertEngine
from smartgas_consumer.api import HttpServer, build_app
from smartgas_consumer.auth import ApiKeys, FailedKeyThrottle
from smartgas_consumer.config import BrokerAddress, ConsumerConfig
from smartgas_consumer.dashboard import build_dashboard_router
from smartgas_consumer.dedup import DedupLimits, bounded_dedup_context
from smartgas_consumer.device_auth import GuardedOscoreSite, MeterContexts
from smartgas_consumer.edgelog import COAP_LOGGER, PeerNoiseFilter, datagram_error_handler
from smartgas_consumer.elastic import make_client
from smartgas_consumer.elasticsearch_sink import Backoff, ElasticsearchSink, ReadingSource, ShipSource
from smartgas_consumer.fleet import Fleet, FleetFileError, load_fleet
from smartgas_consumer.forecaster import Forecaster
from smartgas_consumer.health import StoreHealth
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.metrics import Metrics
from smartgas_consumer.mqtt import CredentialsFileError, MqttIngest, MqttSettings, load_credentials
from smartgas_consumer.provision import prepare_data_stream
from smartgas_consumer.queries import FleetQueries
from smartgas_consumer.realgas import RealGasPhysics
from smartgas_consumer.resource import Health, MeterReading, ReadingSite
from smartgas_consumer.status import build_report, describe_lag, snapshot_path, write_snapshot
from smartgas_consumer.store import ReadingStore, StoreLock, StoreSummary, format_timestamp
from smartgas_consumer.webhook import WEBHOOK_SCHEMA, WebhookDispatcher
from smartgas_consumer.workers import WorkerPool

_LOG = logging.getLogger(__name__)
#: Linux's SO_RCVBUFFORCE (not exported by Python's socket module).
SO_RCVBUFFORCE = 33
#: aiocoap's documented switch for SO_REUSEPORT on the sockets it binds (aiocoap.defaults.has_reuse_port).
AIOCOAP_REUSE_PORT = "AIOCOAP_REUSE_PORT"


#: Garbage-collector thresholds while serving (Python's defaults: 700, 10, 10). Measured in
#: docs/benchmarks.md: with the start-up heap frozen, collector time per 5,000 readings fell ~60 %.
SERVING_GC_THRESHOLDS = (10_000, 10, 10)


class StartupError(Exception):
    """The consumer cannot start as configured; the one-line message names the setting or path and the fix."""


def build_site(
    intake: ReadingIntake,
    *,
    store_fault: Callable[[], Awaitable[str | None]],
    reading_get: bool = False,
    meter_contexts: MeterContexts | None = None,
    fast_path: bool = True,
) -> resource.Site | GuardedOscoreSite:
    """The CoAP resource tree: /.well-known/core, /health, /meters/{meter_id}/reading (PUT; GET if enabled).

    ``GET /meters`` (the list of meters) is not served: it would tell anyone on the network the fleet.
    With ``meter_contexts`` (``--device-auth oscore``) the tree sits behind aiocoap's OSCORE wrapper,
    which verifies and decrypts protected requests; the meters resource then requires its own meter's
    context, while /health and /.well-known/core stay plain CoAP. ``fast_path``: readings' plain PUTs are
    answered from the message layer (``fastpath.py``); never with OSCORE, whose wrapper must see every request.
    """
    meters = MeterReading(intake, reading_get=reading_get, require_oscore=meter_contexts is not None)
    root = ReadingSite(meters, fast_path=fast_path and meter_contexts is None)
    root.add_resource([".well-known", "core"], resource.WKCResource(root.get_resources_as_linkheader, impl_info=None))
    root.add_resource(["health"], Health(store_fault))
    if meter_contexts is None:
        return root
    return GuardedOscoreSite(root, meter_contexts)


def udp_socket(context: aiocoap.Context) -> socket.socket:
    """The UDP socket under aiocoap's udp6 transport (the only transport the consumer starts)."""
    (interface,) = context.request_interfaces
    sock: socket.socket = interface.token_interface.message_interface.transport.get_extra_info("socket")
    return sock


def receive_buffer_bytes(sock: socket.socket) -> int:
    """The receive buffer the kernel keeps for ``sock`` (Linux reports double, counting its overhead)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


@contextlib.contextmanager
def garbage_collector_tuned_for_serving() -> Iterator[None]:
    """Freeze the start-up heap (libraries, fleet, config: never garbage) and collect the young less often.

    A full collection otherwise walks every object the libraries made at import, several times a second
    under load. Frozen objects are never collected, so this is done once, after start-up; both changes
    are undone when serving ends, as the collector's settings belong to the whole process.
    """
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


class Consumer:
    """One running consumer. ``await start()``, then ``await stop()`` (idempotent, safe after a failed start)."""

    def __init__(self, config: ConsumerConfig, *, coap_fast_path: bool = True) -> None:
        self.config = config
        # False: every CoAP request takes aiocoap's full path (the tests compare the two; fastpath.py).
        self.coap_fast_path = coap_fast_path
        self.store_lock = StoreLock(config.db)
        # The fleet and keys files are read here, before any socket opens: a broken file stops the start.
        self.fleet = load_fleet(config.fleet) if config.fleet is not None else Fleet()
        # The real-gas models of the fleet's gases, built once (CoolProp's import and a table per gas).
        try:
            self.gas_physics = RealGasPhysics.build(self.fleet)
        except ValueError as err:  # EquationOfStateError: CoolProp cannot model a gas the file defines
            raise FleetFileError(f"{config.fleet}: {err}") from err
        self.api_keys = ApiKeys.load(config.api_keys, FailedKeyThrottle.per_minute(config.wrong_keys_per_minute))
        self.api_keys = self.api_keys.with_admin_key(config.admin_key)
        self.metrics = Metrics(alert_kinds=[str(kind) for kind in Kind])
        self.store = ReadingStore(
            config.db,
            group_window_s=config.group_window_ms / 1000,
            extra_schema=[ALERT_SCHEMA, WEBHOOK_SCHEMA],
            on_commit=self.metrics.commit,
            shared_memory=config.store_shared_memory,
        )
        self.unknown_meters = UnknownMeters(
            max_unknown=config.max_unknown_meters,
            per_minute=config.unknown_meters_per_minute,
            forget_after=FORGET_UNKNOWN_AFTER,
        )
        self.intake = ReadingIntake(
            self.store,
            fleet=self.fleet,
            gas_physics=self.gas_physics,
            log_readings=config.log_readings,
            metrics=self.metrics,
            unknown_meters=self.unknown_meters,
            max_reading_age_s=config.max_reading_age_s,
            max_clock_skew_s=config.max_clock_skew_s,
            max_pending=config.max_pending_readings,
        )
        self.store_health = StoreHealth(self.store)
        self.alerts = AlertEngine(self.store, config, fleet=self.fleet)
        self.unknown_meters.on_forget.append(self.alerts.forget)
        self.intake.on_stored.append(self.alerts.on_stored)
        self.forecaster = Forecaster(self.store, config, self.fleet)
        self.intake.on_stored.append(self.forecaster.on_stored)
        self.webhooks: WebhookDispatcher | None = None
        if config.webhook_urls:
            self.webhooks = webhooks = WebhookDispatcher(self.store, config.webhook_urls)
            self.alerts.recorders.append(webhooks.record)  # outbox rows commit in the alert's own transaction
            self.alerts.on_change.append(lambda _change: webhooks.wake())
        self.elasticsearch: AsyncElasticsearch | None = None
        self.sinks: list[ElasticsearchSink] = []
        if config.elasticsearch_url is not None:
            self._add_sinks(config)
        self.mqtt: MqttIngest | None = None
        if config.mqtt_broker is not None:
            self.mqtt = MqttIngest(self.intake, self._mqtt_settings(config), self.metrics)
        self.queries = FleetQueries(
            self.store,
            self.fleet,
            offline_after=timedelta(seconds=config.expected_period_s * config.offline_after_periods),
            open_alerts_by_meter=self.alerts.open_by_meter,
            forecaster=self.forecaster,
        )
        dashboard = build_dashboard_router(self.queries, self.api_keys, expected_period_s=config.expected_period_s)
        self.http = HttpServer(
            build_app(
                self.queries,
                self.api_keys,
                alerts=self.alerts,
                metrics=self.metrics.render,
                dashboard=dashboard,
                store_fault=self.store_health.fault,
                mqtt_fault=self.mqtt.link.fault if self.mqtt is not None else None,
            ),
            config.http_host,
            config.http_port,
        )
        self._context: aiocoap.Context | None = None
        # --workers above 1: worker processes take the CoAP traffic and commit through this one (workers.py).
        self.workers = WorkerPool(config, self.intake, self.store_health.fault) if config.workers > 1 else None
        self.meter_contexts: MeterContexts | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        # What peers can make aiocoap log, bounded (edgelog.py); installed while the socket is open.
        self._coap_log = logging.getLogger(COAP_LOGGER)
        self._noise_filter = PeerNoiseFilter()
        self._status_task: asyncio.Task[None] | None = None
        self._snapshot_failing = False
        self.port: int | None = None
        self._started = False  # a start that failed says so once, not with a "stopped" summary too

    @staticmethod
    def _mqtt_settings(config: ConsumerConfig) -> MqttSettings:
        """The MQTT ingest's settings; the credentials file is read now, so a bad one stops the start."""
        assert config.mqtt_broker is not None
        try:
            credentials = load_credentials(config.mqtt_credentials) if config.mqtt_credentials is not None else None
        except CredentialsFileError as err:
            raise StartupError(str(err)) from err
        return MqttSettings(
            address=BrokerAddress.parse(config.mqtt_broker),
            client_id=config.mqtt_client_id,
            shared_group=config.mqtt_shared_group,
            credentials=credentials,
            receive_maximum=config.mqtt_receive_maximum,
        )

    def _add_sinks(self, config: ConsumerConfig) -> None:
        """One Elasticsearch client, shared by the readings sink and the alerts sink."""
        self.elasticsearch = make_client(config)
        readings = ReadingSource(
            self.store,
            index=config.elasticsearch_index,
            fleet=self.fleet,
            retention=timedelta(hours=config.retention_hours),
            forecaster=self.forecaster,
        )
        alerts = AlertSource(self.store, index=config.elasticsearch_alerts_index)
        sources: tuple[tuple[ShipSource, list[Any]], ...] = (
            (readings, self.intake.on_stored),
            (alerts, self.alerts.on_change),
        )
        for source, new_data in sources:
            sink = ElasticsearchSink(
                source,
                self.elasticsearch,
                batch_size=config.ship_batch_size,
                backoff=Backoff(cap_s=config.ship_backoff_max_s),
                prepare=functools.partial(
                    prepare_data_stream,
                    data_stream=source.index,
                    retention_days=config.elasticsearch_retention_days,
                ),
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
        self.store_lock.acquire()
        await self.store.open()
        self.unknown_meters.load(await self.store.read(self._recent_unknown_meters))
        # Alerts load their open alerts and recent readings before any new reading can arrive.
        await self.alerts.start()
        await self.forecaster.start()
        if self.webhooks is not None:
            await self.webhooks.start()
        if self.config.coap_enabled:
            await self._start_coap()
        # Both ports are bound before anything says "listening": a port in use fails the start first.
        try:
            await self.http.start()
        except OSError as err:
            raise StartupError(
                f"--http-port {self.config.http_port} on --http-host {self.config.http_host!r}: "
                f"{err.strerror or err}; stop what holds it or choose another port"
            ) from err
        summary = await self.store.summary()
        await self._write_status_snapshot(summary, datetime.now(UTC))
        _LOG.info(
            "consumer listening on %s, store %s: %d readings from %d meters",
            f"coap://[{self.config.coap_host}]:{self.port} (UDP)" if self.config.coap_enabled else "MQTT only",
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
        _LOG.info(
            "HTTP API on http://%s:%d/api (dashboard /dashboard/, metrics /metrics), %d API key(s)",
            self.config.http_host,
            self.http.port,
            len(self.api_keys.principals),
        )
        if self.mqtt is not None:
            # Connects in the background: a broker that is away is retried, and CoAP serves meanwhile.
            _LOG.info(
                "MQTT: taking readings from %s as %r (%s)",
                self.config.mqtt_broker,
                self.config.mqtt_client_id,
                "with the consumer's broker credentials" if self.mqtt.authenticated else "anonymously",
            )
            self.mqtt.start()
        self._status_task = asyncio.create_task(self._log_status(), name="status-log")
        if self.config.device_auth == "none" and self.config.coap_enabled:
            _LOG.warning(
                "--device-auth none: readings are taken from anyone on the network, unauthenticated and in"
                " clear (the original lab's plain CoAP); use --device-auth oscore outside a lab"
            )
        if self.meter_contexts is not None:
            self._refresh_task = asyncio.create_task(self._refresh_meter_contexts(), name="device-credentials")
        self._started = True

    async def _start_coap(self) -> None:
        """The CoAP server: OSCORE contexts loaded, then the UDP socket bound (fails the start if taken)."""
        self._load_meter_contexts()
        self._coap_log.addFilter(self._noise_filter)
        asyncio.get_running_loop().set_exception_handler(datagram_error_handler(self._coap_log))
        if self.workers is not None:
            # Worker processes own the CoAP socket (workers.py); this process commits what they take.
            try:
                self.port = await self.workers.start()
            except OSError as err:
                raise StartupError(
                    f"--workers {self.config.workers} on --coap-port {self.config.coap_port}: {err}; "
                    "check the port and the workers' error above"
                ) from err
            return
        # udp6 only: aiocoap would otherwise also open TCP, TLS and WebSocket listeners.
        os.environ[AIOCOAP_REUSE_PORT] = "1" if self.config.coap_reuse_port else "0"
        try:
            # aiocoap's Context with duplicate detection bounded in entries and time (dedup.py).
            limits = DedupLimits(self.config.coap_dedup_entries, self.config.coap_dedup_lifetime_s)
            self._context = await bounded_dedup_context(limits).create_server_context(
                build_site(
                    self.intake,
                    store_fault=self.store_health.fault,
                    reading_get=self.config.coap_reading_get,
                    meter_contexts=self.meter_contexts,
                    fast_path=self.coap_fast_path,
                ),
                bind=(self.config.coap_host, self.config.coap_port),
                transports=["udp6"],
                loggername=COAP_LOGGER,
            )
        except OSError as err:
            raise StartupError(
                f"--coap-port {self.config.coap_port} on --coap-host {self.config.coap_host!r}: {err.strerror or err}"
                " (another consumer or program holds it?); stop it or choose another port"
            ) from err
        sock = udp_socket(self._context)
        if bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)) != self.config.coap_reuse_port:
            raise StartupError("the CoAP socket's SO_REUSEPORT differs from --coap-reuse-port (aiocoap changed?)")
        self._raise_receive_buffer(sock)
        self.port = sock.getsockname()[1]

    def _load_meter_contexts(self) -> None:
        """``--device-auth oscore``: load every meter's context before the socket opens; else warn."""
        credentials = self.config.device_credentials
        if self.config.device_auth == "none":
            return  # warned about once the start succeeded (a refused start says one line only)
        if not credentials.is_dir():
            raise StartupError(
                f"--device-credentials {credentials}: no such directory; provision the meters first"
                " (smartgas-consumer provision-meters --fleet FILE) or run with --device-auth none"
            )
        self.meter_contexts = MeterContexts(credentials)
        loaded, _ = self.meter_contexts.refresh()
        _LOG.info("device auth: OSCORE, %d meter context(s) from %s", loaded, credentials)

    async def _refresh_meter_contexts(self) -> None:
        assert self.meter_contexts is not None
        while True:
            await asyncio.sleep(self.config.device_credentials_refresh_s)
            try:
                # On the loop, not a thread: requests use the contexts meanwhile (a few ms for 1,000 meters).
                loaded, dropped = self.meter_contexts.refresh()
            except OSError as err:  # the directory vanished or became unreadable: keep what is loaded
                _LOG.warning("device credentials: cannot re-read %s: %s", self.config.device_credentials, err)
                continue
            if loaded or dropped:
                _LOG.info("device credentials: %d context(s) loaded, %d let go", loaded, dropped)

    def _recent_unknown_meters(self, connection: sqlite3.Connection) -> list[str]:
        """Meters of the store missing from the fleet file and heard within FORGET_UNKNOWN_AFTER."""
        since = format_timestamp(datetime.now(UTC) - FORGET_UNKNOWN_AFTER)
        rows = connection.execute("SELECT meter_id FROM meters WHERE last_seen >= ? ORDER BY last_seen", (since,))
        return [meter_id for (meter_id,) in rows if self.fleet.meter(meter_id) is None]

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
            if self.mqtt is not None:
                _LOG.info("mqtt: %s", self.mqtt.describe())
            self.unknown_meters.forget_silent()
            now = datetime.now(UTC)
            summary = await self.store.summary()
            await self.refresh_metrics(summary, now)
            await self._write_status_snapshot(summary, now)
            if self.sink is not None:
                _LOG.info("shipping: %s", describe_lag(summary, now))

    async def _write_status_snapshot(self, summary: StoreSummary, now: datetime) -> None:
        """The report ``smartgas-consumer status`` prints, beside the store: this process alone can open it."""
        letters = await self.store.dead_letters(limit=20)
        report = build_report(self.config.db, summary, letters, shipping=self.sink is not None, now=now)
        try:
            await asyncio.to_thread(write_snapshot, self.config.db, report, now=now)
        except OSError as err:
            if not self._snapshot_failing:  # once per fault, not every interval
                _LOG.warning("status snapshot %s not written: %s", snapshot_path(self.config.db), err)
            self._snapshot_failing = True
        else:
            self._snapshot_failing = False

    async def refresh_metrics(self, summary: StoreSummary, now: datetime) -> None:
        """The gauges read from state: shipping lag and store sizes, meters online, open alerts."""
        self.metrics.refresh(summary, now, shipping=self.sink is not None)
        cutoff = format_timestamp(now - self.queries.offline_after)
        online: int = await self.store.read(
            lambda connection: connection.execute(
                "SELECT count(*) FROM meters WHERE last_seen >= ?", (cutoff,)
            ).fetchone()[0]
        )
        self.metrics.set_meters(online, len(self.fleet.meters), summary.meters)
        self.metrics.set_open_alerts(self.alerts.open_counts())
        self.metrics.set_unknown_meters_held(self.unknown_meters.held)

    async def stop(self) -> None:
        for task in (self._status_task, self._refresh_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._status_task = self._refresh_task = None
        await self.http.stop()
        if self.workers is not None:
            await self.workers.stop()  # each answers what it holds: the store is still open
        if self._context is not None:
            await self._context.shutdown()
            self._context = None
            asyncio.get_running_loop().set_exception_handler(None)
        if self.mqtt is not None:
            await self.mqtt.stop()  # what is committed is acknowledged; the rest stays with the broker
        if self.meter_contexts is not None:
            self.meter_contexts.close()  # sequence numbers and replay windows persisted: no Echo round next start
            self.meter_contexts = None
        self._coap_log.removeFilter(self._noise_filter)
        await self.alerts.stop()  # judges what is still queued
        await self.forecaster.stop()  # records the refills still queued
        if self.webhooks is not None:
            await self.webhooks.stop()
        for sink in self.sinks:
            await sink.stop()  # what is unshipped stays pending in the store for the next start
        if self.elasticsearch is not None:
            await self.elasticsearch.close()
            self.elasticsearch = None
        await self.store.close()
        self.store_lock.release()
        if self._started:
            _LOG.info("consumer stopped: %s", self.intake.counters.describe())
            self._started = False

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (by SIGTERM/SIGINT in the CLI), then stop cleanly; the collector tuned."""
        await self.start()
        try:
            with garbage_collector_tuned_for_serving():
                await stop.wait()
        finally:
            await self.stop()
