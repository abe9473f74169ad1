"""OSCORE replay protection across crashes: real processes killed with SIGKILL, then restarted.

A captured protected request replayed to a consumer restarted after ``kill -9`` is refused (aiocoap's
Echo recovery, RFC 8613 Appendix B.1.2) while the real meter goes on; a meter process killed with
``kill -9`` resumes from its persisted sequence number and reuses no nonce (Appendix B.1.1).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import textwrap
from pathlib import Path

import aiocoap
import pytest
from aiocoap import oscore
from aiocoap.numbers.codes import Code
from running import consumer_process
from test_device_auth import Recorder, replay

from conftest import EXAMPLES_MAX_AGE_S, wire_example
from smartgas_consumer import device_auth

pytestmark = pytest.mark.integration

#: The wire example is dated 2026-11-23: the time window is widened for it.
EXAMPLES = ("--max-reading-age", str(EXAMPLES_MAX_AGE_S))


def body(seq: int) -> bytes:
    reading = wire_example("reading-250bar.json")
    reading["seq"] = seq
    return json.dumps(reading).encode()


async def protected_put(uri: str, security: oscore.FilesystemSecurityContext, seq: int) -> aiocoap.Message:
    context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    context.client_credentials[uri.split("/meters/", 1)[0] + "/*"] = security
    try:
        message = aiocoap.Message(code=Code.PUT, uri=uri, payload=body(seq), content_format=50)
        return await asyncio.wait_for(context.request(message).response, timeout=30)
    finally:
        await context.shutdown()


def stored_seqs(db: Path) -> list[tuple[str, int, int]]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT meter_id, seq, authenticated FROM readings ORDER BY seq").fetchall()
    return [tuple(row) for row in rows]


async def test_replay_across_a_consumer_kill_9_is_refused(tmp_path: Path) -> None:
    credentials, meters, db = tmp_path / "device-credentials", tmp_path / "meters", tmp_path / "store.db"
    device_auth.provision_meter(credentials, meters, "bottle-a")
    options = ("--device-auth", "oscore", "--device-credentials", str(credentials), *EXAMPLES)
    security = oscore.FilesystemSecurityContext(str(meters / "bottle-a"))
    loop = asyncio.get_running_loop()
    try:
        with consumer_process(db, *options) as consumer:
            port = consumer.coap_port
            transport, recorder = await loop.create_datagram_endpoint(
                lambda: Recorder(("127.0.0.1", port)), local_addr=("127.0.0.1", 0)
            )
            relay_port = transport.get_extra_info("sockname")[1]
            try:
                response = await protected_put(f"coap://127.0.0.1:{relay_port}/meters/bottle-a/reading", security, 0)
            finally:
                transport.close()
            assert response.code == Code.CHANGED
            await asyncio.to_thread(consumer.stop, signal.SIGKILL)  # no clean stop: the window is not written back
        (captured,) = recorder.requests
        with consumer_process(db, *options) as consumer:
            port = consumer.coap_port
            answer = await asyncio.to_thread(replay, captured, port)
            # Echo recovery: a protected 4.01 with an Echo challenge (its outer code is 2.04, as for every
            # OSCORE response), which only the meter can answer; the replay never reaches the intake.
            assert answer.opt.oscore is not None
            # The real meter answers the Echo challenge (aiocoap does it) and goes on.
            response = await protected_put(f"coap://127.0.0.1:{port}/meters/bottle-a/reading", security, 1)
            assert response.code == Code.CHANGED
            again = await asyncio.to_thread(replay, captured, port)
            assert again.code == Code.UNAUTHORIZED and again.payload == b"Replay detected"
            assert await asyncio.to_thread(consumer.stop) == 0
    finally:
        security._destroy()
    assert stored_seqs(db) == [("bottle-a", 0, 1), ("bottle-a", 1, 1)]
    with sqlite3.connect(db) as connection:  # a replay that reached the intake would count as a re-send
        assert connection.execute("SELECT replays FROM meters").fetchall() == [(0,)]


#: A meter in its own process: sends readings 0..n-1 protected with its context, then kills itself.
METER_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    import aiocoap
    from aiocoap import oscore
    from aiocoap.numbers.codes import Code

    async def main(uri, basedir, count):
        security = oscore.FilesystemSecurityContext(basedir)
        context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
        context.client_credentials[uri.split("/meters/", 1)[0] + "/*"] = security
        for seq in range(count):
            payload = ('{"seq": %d, "ts": "2026-11-23T08:00:00Z", "pressure_bar": 250.0,'
                       ' "temperature_c": 25.0, "volume_l": 50.0}' % seq).encode()
            message = aiocoap.Message(code=Code.PUT, uri=uri, payload=payload, content_format=50)
            response = await context.request(message).response
            assert response.code == Code.CHANGED, response
        print(security.sender_sequence_number, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)


async def test_meter_killed_with_kill_9_resumes_without_reusing_a_nonce(tmp_path: Path) -> None:
    credentials, meters, db = tmp_path / "device-credentials", tmp_path / "meters", tmp_path / "store.db"
    device_auth.provision_meter(credentials, meters, "bottle-a")
    options = ("--device-auth", "oscore", "--device-credentials", str(credentials), *EXAMPLES)
    with consumer_process(db, *options) as consumer:
        uri = f"coap://127.0.0.1:{consumer.coap_port}/meters/bottle-a/reading"
        meter = await asyncio.create_subprocess_exec(
            sys.executable, "-c", METER_SCRIPT, uri, str(meters / "bottle-a"), "3", stdout=asyncio.subprocess.PIPE
        )
        output, _ = await asyncio.wait_for(meter.communicate(), timeout=60)
        assert meter.returncode == -9
        next_before_kill = int(output)
        security = oscore.FilesystemSecurityContext(str(meters / "bottle-a"))
        try:
            # Resumes past every number the killed process may have used: no nonce is used twice.
            assert security.sender_sequence_number >= next_before_kill
            response = await protected_put(uri, security, 3)
            assert response.code == Code.CHANGED  # a reused number would be refused as a replay
        finally:
            security._destroy()
        assert await asyncio.to_thread(consumer.stop) == 0
    assert [seq for _, seq, _ in stored_seqs(db)] == [0, 1, 2, 3]
