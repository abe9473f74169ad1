"""Soak: a peer mints 50,000 meter ids at a real consumer process; memory stays flat once the cap is full.

The consumer runs with the repository's fleet file and ``--max-unknown-meters 1000`` (the rate limit set
high, so the cap is what refuses). Every id gets one reading: the first 1000 are stored, the rest refused
with 4.03. RSS (``/proc/PID/status``) is read after 10,000 ids and after 50,000.

RSS is not flat per *request*: aiocoap keeps every request's answer for duplicate detection during
EXCHANGE_LIFETIME (247 s), whatever the meter, about 3.5 KB each. So a control phase then sends 20,000
requests for one id already refused (the same path, from a second client endpoint so message ids never
wrap), and the test asserts that 40,000 new ids cost no more than 40,000 requests for one id, within a
margin far below what holding them would cost (the issue measured ~6 KB per meter held: 240 MB for 40,000).
Bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from test_process import LISTENING, first_match

from conftest import EXAMPLES_MAX_AGE_S, wire_example

pytestmark = pytest.mark.integration

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
IDS = 50_000
CAP = 1000
CHECKPOINT = 10_000
CONTROL_REQUESTS = 20_000
CONCURRENCY = 64
DEADLINE_S = 900
#: What 40,000 new ids may cost beyond 40,000 plain requests: far below the ~240 MB of holding them.
MARGIN_BYTES = 24 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_rss_is_flat_after_the_cap_while_50000_ids_are_minted(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smartgas_consumer",
        "serve",
        "--coap-host",
        "127.0.0.1",
        "--coap-port",
        "0",
        "--http-port",
        "0",
        "--db",
        str(tmp_path / "store.db"),
        "--fleet",
        str(FLEET_FILE),
        "--max-unknown-meters",
        str(CAP),
        "--unknown-meters-per-minute",
        "1000000",
        "--max-reading-age",
        str(EXAMPLES_MAX_AGE_S),  # the wire example is dated 2026-11-23
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    minter = await aiocoap.Context.create_client_context(transports=["udp6"])
    control = await aiocoap.Context.create_client_context(transports=["udp6"])
    codes: Counter[str] = Counter()
    samples: dict[int, int] = {}
    try:
        port = int((await asyncio.wait_for(first_match(process.stderr, LISTENING), timeout=30)).group(1))
        drain = asyncio.create_task(process.stderr.read())
        body = json.dumps(wire_example("reading-250bar.json")).encode()
        deadline = time.monotonic() + DEADLINE_S

        async def put(client: aiocoap.Context, n: int) -> None:
            uri = f"coap://127.0.0.1:{port}/meters/minted-{n:05d}/reading"
            message = aiocoap.Message(code=Code.PUT, uri=uri, payload=body, content_format=50)
            response = await asyncio.wait_for(client.request(message).response, timeout=60)
            codes[str(response.code)] += 1

        for start in range(0, IDS, CONCURRENCY):
            assert time.monotonic() < deadline, f"soak over its time budget after {start} ids"
            await asyncio.gather(*(put(minter, n) for n in range(start, min(start + CONCURRENCY, IDS))))
            sent = min(start + CONCURRENCY, IDS)
            if sent % CHECKPOINT < CONCURRENCY:
                samples[sent - sent % CHECKPOINT] = rss_bytes(process.pid)
        assert codes == {"2.04 Changed": CAP, "4.03 Forbidden": IDS - CAP}
        codes.clear()
        for start in range(0, CONTROL_REQUESTS, CONCURRENCY):  # one id, refused again and again
            assert time.monotonic() < deadline, "control phase over its time budget"
            await asyncio.gather(*(put(control, IDS - 1) for _ in range(min(CONCURRENCY, CONTROL_REQUESTS - start))))
        control_rss = rss_bytes(process.pid)
        assert codes == {"4.03 Forbidden": CONTROL_REQUESTS}
        assert process.returncode is None
        minted_growth = samples[IDS] - samples[CHECKPOINT]
        per_request = (control_rss - samples[IDS]) / CONTROL_REQUESTS
        beyond_requests = minted_growth - per_request * (IDS - CHECKPOINT)
        mb = {ids: round(rss / 2**20, 1) for ids, rss in sorted(samples.items())}
        print(f"\nRSS (MB) by ids minted: {mb}; after {CONTROL_REQUESTS} more for one id: {control_rss / 2**20:.1f}")
        print(
            f"{IDS - CHECKPOINT} new ids added {minted_growth / 2**20:.1f} MB; one request for one id adds"
            f" {per_request:.0f} B; the new ids beyond their requests: {beyond_requests / 2**20:.1f} MB"
        )
        assert beyond_requests < MARGIN_BYTES, f"new ids cost {beyond_requests / 2**20:.1f} MB beyond their requests"
        process.terminate()
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        drain.cancel()
    finally:
        await minter.shutdown()
        await control.shutdown()
        if process.returncode is None:
            process.kill()
            await process.wait()
