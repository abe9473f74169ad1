"""Duplicate detection bounded in entries and time (dedup.py): the bound itself, and CoAP still whole over it.

Unit tests drive ``RecentRequests`` with a hand-turned clock. Integration tests send datagrams written by
hand from plain UDP sockets (so message ids and retransmissions are the test's to choose) at a consumer on
loopback whose cache holds only ``CACHED`` requests, and compare answers byte for byte; block-wise goes
through libcoap's ``coap-client-notls`` (skipped by name when it is not installed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap import Message
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type
from aiocoap.optiontypes import BlockOption

from conftest import message_manager, reading_uri, wire_example
from smartgas_consumer.config import ConfigError, ConsumerConfig, load
from smartgas_consumer.dedup import NOT_ANSWERED, DedupLimits, RecentRequests
from smartgas_consumer.server import SERVING_GC_THRESHOLDS, Consumer

CACHED = 4
ANSWER_TIMEOUT_S = 15.0
COAP_CLIENT = shutil.which("coap-client-notls")


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


# -- the bound ------------------------------------------------------------------------------------------


def test_a_new_request_is_remembered_and_its_answer_returned_for_a_duplicate() -> None:
    recent = RecentRequests(DedupLimits(max_entries=10, lifetime_s=60), Clock())
    assert recent.seen(("peer", 1)) is None
    assert recent.seen(("peer", 1)) == NOT_ANSWERED  # a duplicate while the first is processed
    recent.answer(("peer", 1), b"answer")
    assert recent.seen(("peer", 1)) == b"answer"
    assert recent.seen(("other peer", 1)) is None  # same message id, another peer: a new request


def test_the_oldest_go_first_past_the_entry_cap() -> None:
    recent = RecentRequests(DedupLimits(max_entries=3, lifetime_s=60), Clock())
    for mid in range(5):
        assert recent.seen(("peer", mid)) is None
    assert len(recent) == 3 and recent.evicted == 2
    assert ("peer", 0) not in recent and ("peer", 1) not in recent and ("peer", 4) in recent
    assert recent.seen(("peer", 0)) is None  # forgotten: processed again


def test_entries_older_than_the_lifetime_go_and_a_late_repeat_is_new() -> None:
    clock = Clock()
    recent = RecentRequests(DedupLimits(max_entries=100, lifetime_s=60), clock)
    recent.seen(("peer", 1))
    recent.answer(("peer", 1), b"answer")
    clock.now_s += 30
    recent.seen(("peer", 2))
    clock.now_s += 31  # ("peer", 1) is 61 s old, ("peer", 2) 31 s
    assert recent.seen(("peer", 1)) is None  # too old to be a retransmission: processed again
    assert recent.seen(("peer", 2)) == NOT_ANSWERED
    clock.now_s += 61
    recent.seen(("peer", 3))  # a new request sweeps out everything past the lifetime
    assert len(recent) == 1


def test_a_flood_never_holds_more_than_the_cap() -> None:
    recent = RecentRequests(DedupLimits(max_entries=1000, lifetime_s=3600), Clock())
    for n in range(50_000):
        recent.seen((f"port-{n % 977}", n % 65536))
        recent.answer((f"port-{n % 977}", n % 65536), b"x" * 60)
        assert len(recent) <= 1000
    assert recent.evicted == 49_000


def test_the_aiocoap_internals_replaced_still_exist() -> None:
    # The subclass rests on aiocoap 0.4.17 (constraints.txt); a release that renames these breaks it here.
    for name in ("_deduplicate_message", "_store_response_for_duplicates", "_send_via_transport"):
        assert callable(getattr(MessageManager, name))
    assert callable(aiocoap.Context._append_tokenmanaged_messagemanaged_transport)


def test_the_settings_and_their_defaults() -> None:
    config = load({"coap_dedup_entries": "500"}, {"SMARTGAS_CONSUMER_COAP_DEDUP_LIFETIME_S": "30"})
    assert (config.coap_dedup_entries, config.coap_dedup_lifetime_s) == (500, 30.0)
    assert ConsumerConfig().coap_dedup_entries == DedupLimits().max_entries
    assert ConsumerConfig().coap_dedup_lifetime_s == DedupLimits().lifetime_s
    with pytest.raises(ConfigError, match="--coap-dedup-entries"):
        load({"coap_dedup_entries": "0"}, {})


# -- CoAP over it, on real sockets ------------------------------------------------------------------------


@pytest.fixture
def consumer_config(consumer_config: ConsumerConfig) -> ConsumerConfig:
    return dataclasses.replace(consumer_config, coap_dedup_entries=CACHED, coap_dedup_lifetime_s=3600)


def put(mtype: Type, mid: int, seq: int, meter_id: str = "bottle-0001", **options: Any) -> bytes:
    body = dict(wire_example("reading-250bar.json"), seq=seq)
    message = Message(
        code=Code.PUT,
        payload=json.dumps(body).encode(),
        uri_path=("meters", meter_id, "reading"),
        content_format=50,
        **options,
    )
    message.mtype, message.mid, message.token = mtype, mid, mid.to_bytes(2, "big")
    return bytes(message.encode())


async def exchange(sock: socket.socket, port: int, datagram: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(sock, datagram, ("127.0.0.1", port))
    return await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout=ANSWER_TIMEOUT_S)


@pytest.mark.integration
async def test_the_consumer_uses_the_bounded_message_layer_with_its_settings(consumer: Consumer) -> None:
    assert message_manager(consumer).recent_requests.limits == DedupLimits(CACHED, 3600)


@pytest.mark.integration
async def test_a_duplicate_con_is_answered_identically_without_processing(
    consumer: Consumer, peer: socket.socket
) -> None:
    assert consumer.port is not None
    first = await exchange(peer, consumer.port, put(Type.CON, 100, seq=1))
    again = await exchange(peer, consumer.port, put(Type.CON, 100, seq=1))
    assert again == first  # the same bytes: ACK, message id, token, 2.04 and "stored": true
    answer = Message.decode(first)
    assert (answer.mtype, answer.mid, answer.code) == (Type.ACK, 100, Code.CHANGED)
    assert json.loads(answer.payload)["stored"] is True
    assert consumer.intake.counters.received == 1 and consumer.intake.counters.duplicates == 0


@pytest.mark.integration
async def test_a_duplicate_after_eviction_is_processed_again_and_stored_once(
    consumer: Consumer, peer: socket.socket
) -> None:
    assert consumer.port is not None
    first = Message.decode(await exchange(peer, consumer.port, put(Type.CON, 200, seq=1)))
    for n in range(CACHED):  # pushes message 200 out of the cache
        await exchange(peer, consumer.port, put(Type.CON, 300 + n, seq=2 + n))
    assert message_manager(consumer).recent_requests.evicted >= 1
    late = Message.decode(await exchange(peer, consumer.port, put(Type.CON, 200, seq=1)))
    assert (late.mid, late.code) == (first.mid, Code.CHANGED)
    assert json.loads(first.payload)["stored"] is True and json.loads(late.payload)["stored"] is False
    assert consumer.intake.counters.duplicates == 1  # processed again; the store kept it once
    assert (await consumer.store.summary()).readings == 1 + CACHED


@pytest.mark.integration
async def test_non_is_answered_non_and_its_duplicate_is_dropped(consumer: Consumer, peer: socket.socket) -> None:
    assert consumer.port is not None
    answer = Message.decode(await exchange(peer, consumer.port, put(Type.NON, 400, seq=1)))
    assert (answer.mtype, answer.code) == (Type.NON, Code.CHANGED)
    # The duplicate NON is dropped before any processing; the CON after it is answered, and only it processed.
    loop = asyncio.get_running_loop()
    await loop.sock_sendto(peer, put(Type.NON, 400, seq=1), ("127.0.0.1", consumer.port))
    following = Message.decode(await exchange(peer, consumer.port, put(Type.CON, 401, seq=2)))
    assert (following.mtype, following.mid) == (Type.ACK, 401)
    assert consumer.intake.counters.received == 2 and consumer.intake.counters.duplicates == 0


@pytest.mark.integration
async def test_a_ping_gets_rst_each_time_and_takes_no_entry(consumer: Consumer, peer: socket.socket) -> None:
    assert consumer.port is not None
    ping = Message(code=Code.EMPTY)
    ping.mtype, ping.mid = Type.CON, 500
    for _ in range(2):  # pings are not requests: never deduplicated
        answer = Message.decode(await exchange(peer, consumer.port, bytes(ping.encode())))
        assert (answer.mtype, answer.mid, answer.code) == (Type.RST, 500, Code.EMPTY)
    assert len(message_manager(consumer).recent_requests) == 0


@pytest.mark.integration
async def test_a_duplicate_block_is_answered_identically_and_the_upload_completes(
    consumer: Consumer, peer: socket.socket
) -> None:
    assert consumer.port is not None
    body = json.dumps(dict(wire_example("reading-250bar.json"), seq=7)).encode()
    chunks = [body[i : i + 64] for i in range(0, len(body), 64)]
    answers: list[bytes] = []
    for number, chunk in enumerate(chunks):
        message = Message(code=Code.PUT, payload=chunk, uri_path=("meters", "bottle-0001", "reading"))
        message.opt.content_format = 50
        message.opt.block1 = BlockOption.BlockwiseTuple(number, number < len(chunks) - 1, 2)  # 64 bytes
        message.mtype, message.mid, message.token = Type.CON, 600 + number, b"blk"
        answers.append(await exchange(peer, consumer.port, bytes(message.encode())))
        if number == 0:  # a retransmitted first block: the same Continue, the assembly undisturbed
            assert await exchange(peer, consumer.port, bytes(message.encode())) == answers[0]
            assert Message.decode(answers[0]).code == Code.CONTINUE
    last = Message.decode(answers[-1])
    assert last.code == Code.CHANGED and json.loads(last.payload)["stored"] is True
    assert (await consumer.store.summary()).readings == 1


@pytest.mark.integration
@pytest.mark.skipif(COAP_CLIENT is None, reason="coap-client-notls not installed (Debian libcoap3-bin)")
async def test_libcoap_block_wise_put_and_a_repeat_over_a_full_cache(consumer: Consumer) -> None:
    assert COAP_CLIENT is not None
    body = json.dumps(wire_example("reading-250bar.json"))
    outputs = []
    for _ in range(2 + CACHED):  # more uploads than the cache holds, each of several 16-byte blocks
        process = await asyncio.create_subprocess_exec(
            COAP_CLIENT,
            "-B",
            "5",
            "-b",
            "16",
            "-m",
            "put",
            "-t",
            "50",
            "-e",
            body,
            reading_uri(consumer),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=15)
        assert stdout, stderr
        outputs.append(json.loads(stdout))
    assert [answer["stored"] for answer in outputs] == [True] + [False] * (1 + CACHED)
    assert (await consumer.store.summary()).readings == 1


@pytest.mark.integration
@pytest.mark.skipif(COAP_CLIENT is None, reason="coap-client-notls not installed (Debian libcoap3-bin)")
async def test_libcoap_non_put_is_answered(consumer: Consumer) -> None:
    assert COAP_CLIENT is not None
    body = json.dumps(wire_example("reading-250bar.json"))
    process = await asyncio.create_subprocess_exec(
        COAP_CLIENT, "-B", "5", "-N", "-m", "put", "-t", "50", "-e", body, reading_uri(consumer),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=15)
    assert stdout, stderr
    assert json.loads(stdout)["stored"] is True
    assert (await consumer.store.summary()).readings == 1


@pytest.mark.integration
async def test_aiocoap_client_con_and_non_through_the_bounded_layer(consumer: Consumer, coap: aiocoap.Context) -> None:
    for n, tuning in enumerate((aiocoap.Reliable, aiocoap.Unreliable)):
        body = json.dumps(dict(wire_example("reading-250bar.json"), seq=n)).encode()
        message = Message(
            code=Code.PUT, uri=reading_uri(consumer), payload=body, content_format=50, transport_tuning=tuning
        )
        response = await asyncio.wait_for(coap.request(message).response, timeout=ANSWER_TIMEOUT_S)
        assert response.code == Code.CHANGED and json.loads(response.payload)["stored"] is True
    assert (await consumer.store.summary()).readings == 2
    assert len(message_manager(consumer).recent_requests) <= CACHED


def test_operations_doc_states_the_defaults() -> None:
    operations = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    defaults = ConsumerConfig()
    assert f"`--coap-dedup-entries` ({defaults.coap_dedup_entries:,}: " in operations
    assert f"`--coap-dedup-lifetime` ({defaults.coap_dedup_lifetime_s:.0f} s)" in operations


@pytest.mark.integration
async def test_serving_freezes_the_start_up_heap_and_restores_the_collector(
    consumer_config: ConsumerConfig, peer: socket.socket
) -> None:
    before = gc.get_threshold()
    consumer = Consumer(consumer_config)
    stop = asyncio.Event()
    serving = asyncio.create_task(consumer.serve_until(stop))
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while consumer.port is None or gc.get_freeze_count() == 0:  # the heap is frozen once start-up is done
            assert not serving.done(), serving
            assert asyncio.get_running_loop().time() < deadline, "serving, but the start-up heap not frozen"
            await asyncio.sleep(0.01)
        assert gc.get_threshold() == SERVING_GC_THRESHOLDS
        answer = Message.decode(await exchange(peer, consumer.port, put(Type.CON, 700, seq=1)))
        assert answer.code == Code.CHANGED  # serving as usual with the collector tuned
    finally:
        stop.set()
        await asyncio.wait_for(serving, timeout=30)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
