"""Soak: a peer mints 50,000 meter ids at a real consumer process; memory stays flat once the cap is full.

The consumer runs with the repository's fleet file and ``--max-unknown-meters 1000`` (the rate limit set
high, so the cap is what refuses). Every id gets one reading: the first 1000 are stored, the rest refused
with 4.03. RSS (``/proc/PID/status``) is read every 10,000 ids.

Every request is also remembered by the CoAP layer for retransmissions, but only the last
``--coap-dedup-entries`` (20,000 by default, dedup.py): by 30,000 ids both the unknown-meter cap and that
cache are full, and the test asserts that the last 20,000 ids add less than ``FLAT_BYTES`` of RSS (with
aiocoap's own duplicate detection, which kept every request for 247 s, they added ~60 MB).
Bounded in time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from running import ConsumerProcess, consumer_process

from conftest import wire_example

pytestmark = pytest.mark.integration

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
IDS = 50_000
CAP = 1000
CHECKPOINT = 10_000
#: RSS is compared between here and IDS: the last 20,000 ids, minted after every cap is full.
FLAT_FROM = 30_000
CONCURRENCY = 64
DEADLINE_S = 900
#: What the last 20,000 ids may add: allocator noise, far below the ~60 MB that remembering them would cost.
FLAT_BYTES = 4 * 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_rss_is_flat_after_the_cap_while_50000_ids_are_minted(tmp_path: Path) -> None:
    with consumer_process(
        tmp_path / "store.db",
        "--fleet",
        str(FLEET_FILE),
        "--max-unknown-meters",
        str(CAP),
        "--unknown-meters-per-minute",
        "1000000",
    ) as consumer:
        await mint_ids_sampling_rss(consumer)


async def mint_ids_sampling_rss(consumer: ConsumerProcess) -> None:
    port = consumer.coap_port
    minter = await aiocoap.Context.create_client_context(transports=["udp6"])
    codes: Counter[str] = Counter()
    samples: dict[int, int] = {}
    try:
        # A current timestamp: the example's fixed one is older than --max-reading-age allows.
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        body = json.dumps(wire_example("reading-250bar.json") | {"ts": now}).encode()
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
                samples[sent - sent % CHECKPOINT] = rss_bytes(consumer.pid)
        assert codes == {"2.04 Changed": CAP, "4.03 Forbidden": IDS - CAP}
        assert consumer.running()
        print(f"\nRSS (MB) by ids minted: { {ids: round(rss / 2**20, 1) for ids, rss in sorted(samples.items())} }")
        last_growth = samples[IDS] - samples[FLAT_FROM]
        assert last_growth < FLAT_BYTES, f"the last {IDS - FLAT_FROM} ids added {last_growth / 2**20:.1f} MB"
        assert await asyncio.to_thread(consumer.stop) == 0, consumer.log()
    finally:
        await minter.shutdown()
