"""Health probe of a running consumer: a real CoAP GET of ``/.well-known/core``, as a meter would reach it.

The container's healthcheck (``smartgas-consumer healthcheck``) runs this inside the consumer's own
container. It passes only when the CoAP server answers ``2.05 Content`` with a link format that lists
``/meters``, so it proves the UDP socket is bound and the event loop is serving requests, not merely that
the process exists.
"""

from __future__ import annotations

import asyncio
import logging

import aiocoap

from smartgas_consumer.config import ConsumerConfig

_LOG = logging.getLogger(__name__)

#: Bind addresses meaning "every address": the probe then goes to the loopback (dual-stack socket).
_WILDCARDS = {"", "::", "0.0.0.0"}


class Unhealthy(Exception):
    """The consumer did not answer the probe as a healthy one does; the message says what it did."""


def probe_uri(config: ConsumerConfig) -> str:
    """Where the probe goes: the configured address and port, or the loopback for a wildcard bind."""
    if config.coap_port == 0:
        raise Unhealthy("the CoAP port is 0 (picked at start): the probe needs a fixed --coap-port")
    host = "127.0.0.1" if config.coap_host in _WILDCARDS else config.coap_host
    if ":" in host:
        host = f"[{host}]"
    return f"coap://{host}:{config.coap_port}/.well-known/core"


async def probe(uri: str, *, timeout_s: float) -> str:
    """GET ``uri`` once; return the link format it answered, or raise Unhealthy."""
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
    links: str = response.payload.decode("utf-8", errors="replace")
    if response.code != aiocoap.CONTENT:
        raise Unhealthy(f"{uri} answered {response.code}: {links[:200]}")
    if "</meters>" not in links:
        raise Unhealthy(f"{uri} does not list </meters>: {links[:200]}")
    return links


async def healthcheck(config: ConsumerConfig, *, timeout_s: float = 5.0) -> int:
    """Exit code for a container healthcheck: 0 healthy, 1 not (the reason is logged)."""
    try:
        uri = probe_uri(config)
        await probe(uri, timeout_s=timeout_s)
    except Unhealthy as err:
        _LOG.error("unhealthy: %s", err)
        return 1
    _LOG.info("healthy: %s answered 2.05", uri)
    return 0
