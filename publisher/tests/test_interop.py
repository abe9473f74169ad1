"""Interoperability with a CoAP stack that is not aiocoap: libcoap's ``coap-server-notls`` on loopback.

With ``-d N`` it creates a resource on the first PUT to a path (2.01 Created) and updates it on later
ones (2.04 Changed); without it, a PUT to an unknown path is 4.04 Not Found. Skipped when the binary is
missing (Debian package libcoap3-bin).
"""

import asyncio
import shutil
from collections.abc import AsyncIterator

import aiocoap
import pytest

from conftest import bounded, fast_config
from smartgas_publisher.coap import transport_tuning
from smartgas_publisher.fleet import Fleet

COAP_SERVER = shutil.which("coap-server-notls")

#: The fixture's value: the port, and the servers a test started on it (stopped at teardown).
LibcoapServer = tuple[int, list[asyncio.subprocess.Process]]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(COAP_SERVER is None, reason="coap-server-notls (libcoap3-bin) is not installed"),
]


async def start_libcoap(port: int, *extra: str) -> asyncio.subprocess.Process:
    assert COAP_SERVER is not None
    process = await asyncio.create_subprocess_exec(
        COAP_SERVER,
        "-A",
        "127.0.0.1",
        "-p",
        str(port),
        *extra,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await wait_until_serving(port)
    assert process.returncode is None, "coap-server-notls exited at start"
    return process


async def wait_until_serving(port: int) -> None:
    """GET /.well-known/core until it answers (at most 50 tries, about 5 s)."""
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for _ in range(50):
            probe = aiocoap.Message(
                code=aiocoap.GET,
                uri=f"coap://127.0.0.1:{port}/.well-known/core",
                transport_tuning=transport_tuning(0.05, 0),
            )
            try:
                response = await asyncio.wait_for(client.request(probe).response, 1.0)
            except (aiocoap.error.Error, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            if response.code.is_successful():
                return
        pytest.fail(f"coap-server-notls did not answer on port {port}")
    finally:
        await client.shutdown()


@pytest.fixture
async def libcoap_server(free_udp_port: int) -> AsyncIterator[LibcoapServer]:
    processes: list[asyncio.subprocess.Process] = []
    try:
        yield free_udp_port, processes
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), 5)


async def test_fleet_delivers_to_libcoap(libcoap_server: LibcoapServer) -> None:
    port, processes = libcoap_server
    processes.append(await start_libcoap(port, "-d", "100"))
    config = fast_config(f"coap://127.0.0.1:{port}", meters=4, count=3, period_s=0.1)
    stats = await bounded(Fleet(config).run())
    assert (stats.produced, stats.acked, stats.failed, stats.buffered) == (12, 12, 0, 0)


async def test_libcoap_not_found_keeps_readings_for_retry(libcoap_server: LibcoapServer) -> None:
    # A CoAP server that is not the consumer answers 4.04: the address is wrong, not the reading,
    # so nothing is thrown away; the readings wait for a corrected --consumer.
    port, processes = libcoap_server
    processes.append(await start_libcoap(port))
    config = fast_config(f"coap://127.0.0.1:{port}", count=2, drain_timeout_s=2.0)
    stats = await bounded(Fleet(config).run())
    assert (stats.produced, stats.failed, stats.acked, stats.buffered) == (2, 0, 0, 2)
    assert stats.retried >= 2
