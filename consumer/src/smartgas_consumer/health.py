"""Health probe of a running consumer: a real CoAP GET of ``/health``, as a meter would reach it.

The container's healthcheck (``smartgas-consumer healthcheck``) runs this inside the consumer's own
container. It passes only when the CoAP server answers ``2.05 Content``, which ``/health`` does only after
a real write to the store committed (5.03 with the reason otherwise: a read-only or immutable file, a disk
error). So it proves the UDP socket is bound, the event loop serves requests and the store commits, not
merely that the process exists. A consumer without CoAP (``--coap-enabled false``, MQTT only) is probed
over HTTP instead: ``GET /healthz`` answers 200 only when the same store probe passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import aiocoap
import aiohttp

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.store import ReadingStore, StoreClosed

_LOG = logging.getLogger(__name__)

#: Bind addresses meaning "every address": the probe then goes to the loopback (dual-stack socket).
_WILDCARDS = {"", "::", "0.0.0.0"}


#: A store probe younger than this is not repeated; more frequent health requests get its answer
#: (a flood of probes from the network must not become a flood of fsyncs).
PROBE_EVERY_S = 1.0
PROBE_TIMEOUT_S = 10.0


class StoreHealth:
    """Whether the store commits now: one real write (``ReadingStore.probe``) at most every PROBE_EVERY_S."""

    def __init__(self, store: ReadingStore) -> None:
        self._store = store
        self._last: tuple[float, str | None] | None = None  # (monotonic time, fault) of the last probe
        self._lock = asyncio.Lock()  # one probe at a time; those waiting get its answer

    async def fault(self) -> str | None:
        """Why the store cannot commit now, or None when it can."""
        async with self._lock:
            if self._last is not None and time.monotonic() - self._last[0] < PROBE_EVERY_S:
                return self._last[1]
            fault: str | None = None
            try:
                await asyncio.wait_for(self._store.probe(datetime.now(UTC)), timeout=PROBE_TIMEOUT_S)
            except StoreClosed as err:
                fault = str(err)
            except TimeoutError:
                fault = f"a commit took longer than {PROBE_TIMEOUT_S:g} s"
            self._last = (time.monotonic(), fault)
            return fault


class Unhealthy(Exception):
    """The consumer did not answer the probe as a healthy one does; the message says what it did."""


def _local_uri(scheme: str, host: str, port: int, path: str, *, label: str, setting: str) -> str:
    """``scheme://host:port/path`` for a probe of this host: the loopback for a wildcard bind, an IPv6
    address in brackets; a port of 0 (picked at start) cannot be probed from outside."""
    if port == 0:
        raise Unhealthy(f"the {label} port is 0 (picked at start): the probe needs a fixed {setting}")
    host = "127.0.0.1" if host in _WILDCARDS else host
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}{path}"


def probe_uri(config: ConsumerConfig) -> str:
    """Where the probe goes: the configured address and port, or the loopback for a wildcard bind."""
    return _local_uri("coap", config.coap_host, config.coap_port, "/health", label="CoAP", setting="--coap-port")


async def probe(uri: str, *, timeout_s: float) -> str:
    """GET ``uri`` once; return the text it answered with 2.05, or raise Unhealthy."""
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        request = aiocoap.Message(code=aiocoap.GET, uri=uri)
        try:
            async with asyncio.timeout(timeout_s):
                response = await context.request(request).response
        except TimeoutError as err:
            raise Unhealthy(f"no answer from {uri} within {timeout_s:g} s") from err
        except aiocoap.error.Error as err:  # network error, reset, unreachable
            raise Unhealthy(f"{uri}: {err}") from err
    finally:
        await context.shutdown()
    text: str = response.payload.decode("utf-8", errors="replace")
    if response.code != aiocoap.CONTENT:
        raise Unhealthy(f"{uri} answered {response.code}: {text[:300]}")
    return text


def http_probe_uri(config: ConsumerConfig) -> str:
    """``/healthz`` at the configured HTTP address and port (the loopback for a wildcard bind)."""
    return _local_uri("http", config.http_host, config.http_port, "/healthz", label="HTTP", setting="--http-port")


async def probe_http(uri: str, *, timeout_s: float) -> str:
    """GET ``uri`` once; return its body if it answered 200, or raise Unhealthy."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.get(uri) as response,
        ):
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError) as err:
        raise Unhealthy(f"{uri}: {err or type(err).__name__}") from err
    if response.status != 200:
        raise Unhealthy(f"{uri} answered {response.status}: {text[:300]}")
    return text


async def healthcheck(config: ConsumerConfig, *, timeout_s: float = 5.0) -> int:
    """Exit code for a container healthcheck: 0 healthy, 1 not (the reason is logged)."""
    try:
        if config.coap_enabled:
            uri = probe_uri(config)
            await probe(uri, timeout_s=timeout_s)
        else:
            uri = http_probe_uri(config)
            await probe_http(uri, timeout_s=timeout_s)
    except Unhealthy as err:
        _LOG.error("unhealthy: %s", err)
        return 1
    _LOG.info("healthy: %s answered %s", uri, "2.05" if config.coap_enabled else "200")
    return 0
