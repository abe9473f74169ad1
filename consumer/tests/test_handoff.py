"""The hand-off of ``--workers`` (``handoff.py``, ``workers.py``): frames between a worker and the consumer.

Both ends are the real classes on a real socket pair, the consumer's end in front of a real intake and a
real SQLite store. Where a test plays one end with raw bytes (a garbled or truncated frame), it is standing
in for a worker or a consumer with a bug: the real ones cannot be made to write such frames.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import pickle
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from smartgas_consumer.admission import UnknownMeters
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.error import ImplausibleReading, StoreUnavailable, UnknownMeterRefused
from smartgas_consumer.handoff import (
    MAX_FRAME_BYTES,
    decode_commit,
    decode_result,
    encode_commit,
    encode_result,
)
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.reading import Reading
from smartgas_consumer.realgas import NO_REAL_GAS, RealGas
from smartgas_consumer.store import CommitResult, Enrichment, ReadingStore, SequenceOutcome
from smartgas_consumer.workers import ConsumerLink, Ready, WorkerLink, WorkerPool


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def reading(meter_id: str, seq: int) -> Reading:
    return Reading(meter_id, seq, datetime.now(UTC), 180.0, 15.0, 50.0)


@dataclass
class ConsumerEnd:
    """The consumer's side of one worker link: the pool's intake on a real store, the link's end."""

    store: ReadingStore
    intake: ReadingIntake
    pool: WorkerPool


@pytest.fixture
async def consumer_end(tmp_path: Path) -> AsyncIterator[ConsumerEnd]:
    store = ReadingStore(tmp_path / "store.db")
    await store.open()
    admission = UnknownMeters(max_unknown=3, per_minute=100, forget_after=timedelta(days=1))
    intake = ReadingIntake(store, unknown_meters=admission)

    async def no_fault() -> str | None:
        return None

    pool = WorkerPool(ConsumerConfig(db=tmp_path / "store.db", device_auth="none"), intake, no_fault)
    try:
        yield ConsumerEnd(store, intake, pool)
    finally:
        await store.close()


async def linked(end: ConsumerEnd, number: int = 1) -> tuple[ConsumerLink, WorkerLink]:
    """A worker's link and the consumer's, on a socket pair, past their first frames."""
    worker_socket, consumer_socket = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, worker = await loop.create_unix_connection(ConsumerLink, sock=worker_socket)
    _, consumer = await loop.create_unix_connection(lambda: WorkerLink(number, end.pool), sock=consumer_socket)
    consumer.send_first("config")
    worker.send_first(Ready(1, 1))
    assert await asyncio.wait_for(worker.first_frame, 10) == "config"
    assert await asyncio.wait_for(consumer.first_frame, 10) == Ready(1, 1)
    return worker, consumer


async def raw_worker(end: ConsumerEnd) -> tuple[socket.socket, WorkerLink]:
    """The consumer's link to a worker played by raw bytes on a socket (the test's end), past its Ready."""
    test_socket, consumer_socket = socket.socketpair()
    _, consumer = await asyncio.get_running_loop().create_unix_connection(
        lambda: WorkerLink(7, end.pool), sock=consumer_socket
    )
    test_socket.sendall(frame(pickle.dumps(Ready(1, 1))))
    await asyncio.wait_for(consumer.first_frame, 10)
    return test_socket, consumer


def test_a_reading_and_its_result_cross_exactly() -> None:
    read = Reading("meter-1", 42, datetime(2026, 11, 29, 23, 5, 1, 123456, tzinfo=UTC), 180.25, -12.5, 50.0)
    real = RealGas(0.93, 401.5, 11.2, 9.1, None, 88.0)
    enrichment = Enrichment("client", "site", 88.0, True, real, True)
    item = marshal.loads(marshal.dumps([encode_commit(9, read, 321.5, enrichment)]))[0]
    assert decode_commit(item) == (read, 321.5, enrichment)
    assert decode_commit(encode_commit(9, read, 1.0, Enrichment()))[2].real is NO_REAL_GAS
    result = CommitResult(SequenceOutcome.GAP, 321.5, 2, 3, real)
    assert decode_result(marshal.loads(marshal.dumps(encode_result(9, result)))) == result
    refusal = UnknownMeterRefused("meter 'x' refused: --max-unknown-meters 3")
    assert decode_result(encode_result(9, refusal)) == ("UnknownMeterRefused", refusal.message, 0)


async def test_a_batch_with_one_reading_refused_by_the_store_answers_the_others(consumer_end: ConsumerEnd) -> None:
    """Three readings in one frame; the store refuses the one whose seq SQLite cannot hold (its SAVEPOINT is
    rolled back alone): the other two are committed and answered, the third refused 4.22."""
    worker, _ = await linked(consumer_end)
    readings = [reading("batch-1", 1), reading("batch-2", 2**70), reading("batch-3", 3)]
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(worker.commit(each, 10.0, Enrichment()) for each in readings), return_exceptions=True), 30
    )
    assert isinstance(outcomes[0], CommitResult) and outcomes[0].stored
    assert isinstance(outcomes[1], ImplausibleReading)
    assert isinstance(outcomes[2], CommitResult) and outcomes[2].stored
    stored = {meter_id: await consumer_end.store.latest(meter_id) for meter_id in ("batch-1", "batch-2", "batch-3")}
    assert [meter_id for meter_id, latest in stored.items() if latest is not None] == ["batch-1", "batch-3"]
    counters = consumer_end.intake.counters
    assert (counters.received, counters.stored, dict(counters.rejected)) == (3, 2, {"implausible_reading": 1})
    await worker.wait_closed()


async def test_a_refusal_of_the_admission_reaches_only_its_reading(consumer_end: ConsumerEnd) -> None:
    """The admission of unknown meters refuses the fourth meter (cap 3) of a batch; the others commit."""
    worker, _ = await linked(consumer_end)
    outcomes = await asyncio.wait_for(
        asyncio.gather(
            *(worker.commit(reading(f"new-{n}", 0), 1.0, Enrichment()) for n in range(4)), return_exceptions=True
        ),
        30,
    )
    assert [type(outcome) for outcome in outcomes] == [CommitResult] * 3 + [UnknownMeterRefused]
    assert "--max-unknown-meters 3" in str(outcomes[3])
    await worker.wait_closed()


@dataclass
class FakeConsumerEnd:
    """The consumer's end of a worker's link, played by the test: frames read and written by hand."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def next_frame(self) -> list[tuple[object, ...]]:
        (length,) = struct.unpack("!I", await asyncio.wait_for(self.reader.readexactly(4), 10))
        items: list[tuple[object, ...]] = marshal.loads(await asyncio.wait_for(self.reader.readexactly(length), 10))
        return items


async def worker_end() -> tuple[ConsumerLink, FakeConsumerEnd]:
    """A worker's ``ConsumerLink`` on a socket pair, past its first frame, and the other end for the test."""
    worker_socket, test_socket = socket.socketpair()
    _, worker = await asyncio.get_running_loop().create_unix_connection(ConsumerLink, sock=worker_socket)
    reader, writer = await asyncio.open_unix_connection(sock=test_socket)
    writer.write(frame(pickle.dumps("config")))
    await asyncio.wait_for(worker.first_frame, 10)
    return worker, FakeConsumerEnd(reader, writer)


async def test_readings_held_while_a_frame_waits_for_its_answers_leave_in_one_frame() -> None:
    """Nagle's rule on the worker's end: a reading sent while an earlier frame waits is held, and every
    reading held leaves in one frame when the answers come."""
    worker, consumer = await worker_end()
    writer, next_frame = consumer.writer, consumer.next_frame
    first = asyncio.create_task(worker.commit(reading("held", 1), 1.0, Enrichment()))
    (sent,) = await next_frame()
    later = []
    for seq in (2, 3, 4):  # each in its own turn of the loop
        later.append(asyncio.create_task(worker.commit(reading("held", seq), 1.0, Enrichment())))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    result = CommitResult(SequenceOutcome.FIRST, 1.0, 0)
    writer.write(frame(marshal.dumps([encode_result(sent[0], result)])))  # type: ignore[arg-type]
    assert await asyncio.wait_for(first, 10) == result
    held = await next_frame()
    assert [decode_commit(item)[0].seq for item in held] == [2, 3, 4]
    writer.write(frame(marshal.dumps([encode_result(item[0], result) for item in held])))  # type: ignore[arg-type]
    assert await asyncio.wait_for(asyncio.gather(*later), 10) == [result] * 3
    writer.close()
    await worker.wait_closed()


async def test_a_flush_scheduled_before_the_answers_came_does_not_hold_the_next_readings_for_ever() -> None:
    """The race that stalled a worker for good (found by the bench at 256 requests in flight): a reading
    queued a flush for the next turn, the answers came in the same turn and sent it at once, and the
    flush that then ran had nothing to send but marked the link as holding; after the next answers
    nothing flushed again, and every later reading of that worker waited for ever. The answers are handed
    to the protocol's ``items_received`` directly here, in the turn between the queueing and the flush:
    a socket cannot be made to deliver them at exactly that point."""
    worker, consumer = await worker_end()
    writer, next_frame = consumer.writer, consumer.next_frame
    result = CommitResult(SequenceOutcome.FIRST, 1.0, 0)
    first = asyncio.create_task(worker.commit(reading("race", 1), 1.0, Enrichment()))
    (sent,) = await next_frame()
    second = asyncio.create_task(worker.commit(reading("race", 2), 1.0, Enrichment()))
    await asyncio.sleep(0)  # its step ran: its reading is queued, a flush is due at the next turn
    assert worker.has_outgoing()
    worker.items_received([encode_result(sent[0], result)])  # type: ignore[arg-type]
    (sent,) = await next_frame()  # the second reading left with the answers
    await asyncio.sleep(0)  # the flush queued by the second reading runs, with nothing to send
    writer.write(frame(marshal.dumps([encode_result(sent[0], result)])))  # type: ignore[arg-type]
    assert await asyncio.wait_for(asyncio.gather(first, second), 10) == [result] * 2
    third = asyncio.create_task(worker.commit(reading("race", 3), 1.0, Enrichment()))
    (sent,) = await next_frame()  # before the fix: never sent
    assert decode_commit(sent)[0].seq == 3
    writer.write(frame(marshal.dumps([encode_result(sent[0], result)])))  # type: ignore[arg-type]
    assert await asyncio.wait_for(third, 10) == result
    writer.close()
    await worker.wait_closed()


GARBLED = {
    "not marshal": frame(b"\xff\x00garbage"),
    "a frame longer than any": struct.pack("!I", MAX_FRAME_BYTES + 1) + b"x" * 64,
    "not a list": frame(marshal.dumps({"seq": 1})),
    "a request of no known kind": frame(marshal.dumps([(1, 99)])),
    "a reading of the wrong shape": frame(marshal.dumps([(1, 0, "meter", 1)])),
    "a reading of the wrong types": frame(
        marshal.dumps([(1, 0, 5, "1", 0, 1.0, 1.0, 1.0, 1.0, None, None, None, True, False, None)])
    ),
    "not a tuple": frame(marshal.dumps([7])),
}


@pytest.mark.parametrize("garble", GARBLED.values(), ids=GARBLED.keys())
async def test_a_garbled_frame_from_a_worker_closes_its_link_and_nothing_else(
    consumer_end: ConsumerEnd, garble: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """The consumer logs it and closes that worker's link (the worker then stops and is restarted, like a
    worker that died); nothing of it is committed, and another worker's link still commits."""
    test_socket, consumer = await raw_worker(consumer_end)
    with caplog.at_level(logging.ERROR, logger="smartgas_consumer.handoff"):
        test_socket.sendall(garble)
        await asyncio.wait_for(consumer.closed.wait(), 10)
    assert "the link with CoAP worker 7 is closed: it sent a frame that cannot be read" in caplog.text
    test_socket.close()
    worker, _ = await linked(consumer_end, number=2)
    assert (await asyncio.wait_for(worker.commit(reading("after-garble", 1), 1.0, Enrichment()), 30)).stored
    assert consumer_end.intake.counters.received == 1
    assert await consumer_end.store.latest("after-garble") is not None
    await worker.wait_closed()


async def test_a_frame_cut_short_by_a_worker_that_dies_commits_nothing_of_it(consumer_end: ConsumerEnd) -> None:
    test_socket, consumer = await raw_worker(consumer_end)
    whole = frame(marshal.dumps([encode_commit(1, reading("cut-short", 1), 1.0, Enrichment())]))
    test_socket.sendall(whole[: len(whole) // 2])
    test_socket.close()
    await asyncio.wait_for(consumer.closed.wait(), 10)
    await asyncio.sleep(0.1)  # a commit, were one wrongly started, would be under way; none is
    assert consumer_end.intake.counters.received == 0
    assert await consumer_end.store.latest("cut-short") is None


async def test_a_garbled_answer_closes_the_workers_link_and_its_readings_are_refused_503() -> None:
    worker_socket, test_socket = socket.socketpair()
    _, worker = await asyncio.get_running_loop().create_unix_connection(ConsumerLink, sock=worker_socket)
    test_socket.sendall(frame(pickle.dumps("config")))
    await asyncio.wait_for(worker.first_frame, 10)
    waiting = asyncio.create_task(worker.commit(reading("answered-badly", 1), 1.0, Enrichment()))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    test_socket.sendall(frame(marshal.dumps([(0, 0, "no such outcome", 1.0, 0, 0, None)])))
    with pytest.raises(StoreUnavailable, match="the consumer stopped"):
        await asyncio.wait_for(waiting, 10)
    assert worker.closed.is_set()
    test_socket.close()


async def test_a_health_question_is_answered_even_when_the_store_probe_fails(consumer_end: ConsumerEnd) -> None:
    """The worker holds its next readings until an answer comes, so every question gets one: a probe that
    raises (a stand-in for a bug in it: the real probe cannot be made to) is answered with its error, and
    a reading sent after it is still forwarded and committed."""

    async def broken_probe() -> str | None:
        raise RuntimeError("probe bug")

    consumer_end.pool.store_fault = broken_probe
    worker, _ = await linked(consumer_end)
    assert await asyncio.wait_for(worker.fault(), 10) == "the store probe failed: probe bug"
    assert (await asyncio.wait_for(worker.commit(reading("after-probe", 1), 1.0, Enrichment()), 30)).stored
    await worker.wait_closed()
