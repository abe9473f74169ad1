"""The fast path for readings (fastpath.py): taken for readings only, and answering as aiocoap's full path does.

The differential tests send the same datagrams, written by hand from a plain UDP socket (so types, message
ids, tokens and options are the test's to choose), to two real consumers on loopback: one with the fast
path, one without (``Consumer(..., coap_fast_path=False)``: every request through aiocoap's layers). Their
answers must agree in code, options and payload; the message type and id follow the request (a CON's
answer piggybacked on its ACK, a NON's answer a NON). Both paths answer a CON separately (an empty ACK
first) when the commit takes longer than their empty-ACK delay (aiocoap's 0.1 s, the fast path's 1 s),
which one test forces with a commit held back; elsewhere the helper accepts a separate answer (on a
loaded machine the timer may fire before a quick commit) and acknowledges it, as a client must. libcoap's
``coap-client-notls`` and aiocoap's client check that real clients read the fast path's answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap import Message
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.codes import Code
from aiocoap.numbers.constants import TransportTuning
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import Type
from aiocoap.options import Options
from aiocoap.optiontypes import BlockOption
from aiocoap.transports.udp6 import MessageInterfaceUDP6, UDP6EndpointAddress
from chattr import chattr, immutable  # noqa: F401 (chattr is a fixture)

from conftest import message_manager, reading_uri, wire_example
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.fastpath import DATAGRAMS_PER_WAKEUP, EMPTY_ACK_DELAY_S, ReadingFastPath
from smartgas_consumer.reading import MAX_PAYLOAD_BYTES
from smartgas_consumer.server import Consumer

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
ANSWER_TIMEOUT_S = 20.0
COAP_CLIENT = shutil.which("coap-client-notls")
JSON_FORMAT, CBOR_FORMAT = 50, 60


def datagram(
    mtype: Type,
    mid: int,
    token: bytes,
    *,
    code: Code = Code.PUT,
    path: tuple[str, ...] = ("meters", "bottle-0001", "reading"),
    payload: bytes = b"",
    content_format: int | None = JSON_FORMAT,
    extra_option: int | None = None,
    **options: Any,
) -> bytes:
    message = Message(code=code, payload=payload, uri_path=path, **options)
    if content_format is not None:
        message.opt.content_format = content_format
    if extra_option is not None:
        message.opt.add_option(OptionNumber(extra_option).create_option(value=b"x"))
    message.mtype, message.mid, message.token = mtype, mid, token
    return bytes(message.encode())


def reading_body(seq: int, **fields: Any) -> dict[str, Any]:
    return dict(wire_example("reading-250bar.json"), seq=seq, **fields)


def as_json(seq: int, **fields: Any) -> bytes:
    return json.dumps(reading_body(seq, **fields)).encode()


# -- the shape of a request on the fast path ---------------------------------------------------------------


def request(mtype: Type = Type.CON, code: Code = Code.PUT, **options: Any) -> Message:
    options.setdefault("uri_path", ("meters", "bottle-0001", "reading"))
    message = Message(code=code, payload=b"{}", **options)
    message.mtype, message.mid, message.token = mtype, 1, b"t"
    return Message.decode(message.encode())  # as the transport hands it to the message layer


def with_option(number: int, value: bytes = b"") -> Message:
    message = request(content_format=JSON_FORMAT)
    message.opt.add_option(OptionNumber(number).create_option(value=value))
    return message


TAKEN = {
    "CON PUT": request(content_format=JSON_FORMAT),
    "NON PUT": request(Type.NON, content_format=CBOR_FORMAT),
    "no Content-Format": request(),
    "Uri-Host and Uri-Port": request(uri_host="consumer.example", uri_port=5683, content_format=JSON_FORMAT),
}
NOT_TAKEN = {
    "GET": request(code=Code.GET),
    "POST": request(code=Code.POST),
    "ACK": request(Type.ACK),
    "two path segments": request(uri_path=("meters", "bottle-0001")),
    "four path segments": request(uri_path=("meters", "bottle-0001", "reading", "x")),
    "another first segment": request(uri_path=("meter", "bottle-0001", "reading")),
    "another last segment": request(uri_path=("meters", "bottle-0001", "readings")),
    "/health": request(uri_path=("health",)),
    "Block1": request(block1=BlockOption.BlockwiseTuple(0, True, 2)),
    "Block2": request(block2=BlockOption.BlockwiseTuple(0, False, 2)),
    "Size1": request(size1=100),
    "Observe": request(observe=0),
    "No-Response": request(no_response=2),
    "Accept": request(accept=JSON_FORMAT),
    "OSCORE": with_option(OptionNumber.OSCORE, b"\x09\x00"),
    "an unknown critical option": with_option(65001, b"x"),
    "an unknown elective option": with_option(65000, b"x"),
}


@pytest.mark.parametrize("message", TAKEN.values(), ids=TAKEN.keys())
def test_the_fast_path_takes_a_plain_put_of_a_reading(message: Message) -> None:
    assert ReadingFastPath(put=None).takes(message)  # type: ignore[arg-type]


@pytest.mark.parametrize("message", NOT_TAKEN.values(), ids=NOT_TAKEN.keys())
def test_anything_else_takes_aiocoaps_full_path(message: Message) -> None:
    assert not ReadingFastPath(put=None).takes(message)  # type: ignore[arg-type]


def test_the_aiocoap_internals_the_fast_path_rests_on_still_exist() -> None:
    # fastpath.py rests on aiocoap 0.4.17 (constraints.txt); a release that renames these breaks it here.
    for name in ("dispatch_message", "_next_message_id", "_send_empty_ack", "send_message", "shutdown"):
        assert callable(getattr(MessageManager, name))
    # The fast path waits longer than aiocoap before an empty ACK, and less than a client before re-sending.
    assert TransportTuning.EMPTY_ACK_DELAY < EMPTY_ACK_DELAY_S < TransportTuning.ACK_TIMEOUT
    assert isinstance(Options()._options, dict)
    assert request(content_format=JSON_FORMAT).opt._options.keys() == {OptionNumber.URI_PATH, 12}
    assert callable(MessageInterfaceUDP6.send) and callable(UDP6EndpointAddress.as_response_address)
    assert "serversite" in aiocoap.Context.__init__.__code__.co_varnames


# -- on real sockets ----------------------------------------------------------------------------------------


async def receive(sock: socket.socket, timeout_s: float = ANSWER_TIMEOUT_S) -> Message:
    loop = asyncio.get_running_loop()
    return Message.decode(await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout=timeout_s))


class Inbox:
    """A peer's socket: datagrams taken by what they are, those not wanted yet held; a separate (CON)
    answer acknowledged on arrival, as a client must."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.held: list[Message] = []

    async def send(self, port: int, sent: bytes) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, sent, ("127.0.0.1", port))

    async def take(self, wanted: Callable[[Message], bool], port: int, timeout_s: float = ANSWER_TIMEOUT_S) -> Message:
        for message in self.held:
            if wanted(message):
                self.held.remove(message)
                return message
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive(self.sock)
                if message.mtype == Type.CON and message.code.is_response():
                    ack = Message(code=Code.EMPTY)
                    ack.mtype, ack.mid = Type.ACK, message.mid
                    await self.send(port, bytes(ack.encode()))
                if wanted(message):
                    return message
                self.held.append(message)

    async def answer_to(self, port: int, sent: bytes) -> tuple[Message, bool]:
        """Send ``sent`` and return its answer, and whether it came separately (after an empty ACK)."""
        request = Message.decode(sent)
        await self.send(port, sent)
        answer = await self.take(lambda m: m.token == request.token and m.code.is_response(), port)
        separate = request.mtype == Type.CON and answer.mtype == Type.CON
        if separate:  # aiocoap's empty ACK came first
            await self.take(lambda m: m.code == Code.EMPTY and m.mid == request.mid, port)
        return answer, separate


def compared(answer: Message) -> tuple[Code, list[tuple[int, Any]], bytes]:
    """What two consumers' answers must share: code, options, payload."""
    return answer.code, [(int(option.number), option.value) for option in answer.opt.option_list()], answer.payload


def check_type_and_id(answer: Message, sent: bytes, separate: bool) -> None:
    request = Message.decode(sent)
    assert answer.token == request.token
    if request.mtype == Type.NON:
        assert answer.mtype == Type.NON
    elif separate:
        assert answer.mtype == Type.CON
    else:
        assert (answer.mtype, answer.mid) == (Type.ACK, request.mid)


@dataclasses.dataclass
class Pair:
    """Two consumers on the same settings, with and without the fast path, and a peer socket for each."""

    fast: Consumer
    full: Consumer
    fast_inbox: Inbox
    full_inbox: Inbox

    def sides(self) -> list[tuple[Consumer, Inbox, int]]:
        assert self.fast.port is not None and self.full.port is not None
        return [(self.fast, self.fast_inbox, self.fast.port), (self.full, self.full_inbox, self.full.port)]

    async def both(self, sent: bytes) -> tuple[Message, Message]:
        """The two answers to ``sent``: they agree, each in the message type its request asks for."""
        assert self.fast.port is not None and self.full.port is not None
        fast, fast_separate = await self.fast_inbox.answer_to(self.fast.port, sent)
        full, full_separate = await self.full_inbox.answer_to(self.full.port, sent)
        assert compared(fast) == compared(full)
        check_type_and_id(fast, sent, fast_separate)
        check_type_and_id(full, sent, full_separate)
        return fast, full


def two_consumers_config(config: ConsumerConfig, tmp_path: Path, name: str) -> ConsumerConfig:
    return dataclasses.replace(config, db=tmp_path / name / "store.db")


@pytest.fixture
async def pair(consumer_config: ConsumerConfig, tmp_path: Path) -> AsyncIterator[Pair]:
    # The fleet file (bottle-0001: real-gas fields); one unknown meter at most (the second is refused 4.03);
    # one reading at most waiting for the commit (the second is refused 5.03).
    config = dataclasses.replace(consumer_config, fleet=FLEET_FILE, max_unknown_meters=1, max_pending_readings=1)
    consumers = []
    for name, fast_path in (("fast", True), ("full", False)):
        (tmp_path / name).mkdir()
        consumer = Consumer(two_consumers_config(config, tmp_path, name), coap_fast_path=fast_path)
        await consumer.start()
        consumers.append(consumer)
    peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in consumers]
    for sock in peers:
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
    try:
        yield Pair(consumers[0], consumers[1], Inbox(peers[0]), Inbox(peers[1]))
    finally:
        for sock in peers:
            sock.close()
        for consumer in consumers:
            await consumer.stop()


LONG_ID = "m" * 300
#: Every file of a running store (no -shm: the WAL index is in heap memory).
STORE_FILES = ("store.db", "store.db-wal")
#: (name, datagram): sent in this order to both consumers, each a new message id and token.
CASES: list[tuple[str, bytes]] = [
    ("JSON reading", datagram(Type.CON, 1, b"t1", payload=as_json(0))),
    ("the same reading again, a new message id", datagram(Type.CON, 2, b"t2", payload=as_json(0))),
    ("CBOR reading", datagram(Type.CON, 3, b"t3", payload=cbor2.dumps(reading_body(1)), content_format=CBOR_FORMAT)),
    ("no Content-Format: JSON", datagram(Type.CON, 4, b"t4", payload=as_json(2), content_format=None)),
    ("Uri-Host and Uri-Port", datagram(Type.CON, 5, b"t5", payload=as_json(3), uri_host="x.example", uri_port=9)),
    ("NON reading", datagram(Type.NON, 6, b"t6", payload=as_json(4))),
    ("malformed JSON", datagram(Type.CON, 7, b"t7", payload=b'{"seq": 5,')),
    ("NON, malformed JSON", datagram(Type.NON, 8, b"t8", payload=b"[")),
    ("a field out of bounds", datagram(Type.CON, 9, b"t9", payload=as_json(5, pressure_bar=5000.0))),
    ("an invalid meter id", datagram(Type.CON, 10, b"t10", path=("meters", "-bad", "reading"), payload=as_json(0))),
    ("a long meter id", datagram(Type.CON, 11, b"t11", path=("meters", LONG_ID, "reading"), payload=as_json(0))),
    ("over the size limit", datagram(Type.CON, 12, b"t12", payload=b" " * (MAX_PAYLOAD_BYTES + 200))),
    ("another Content-Format", datagram(Type.CON, 13, b"t13", payload=b"seq=1", content_format=0)),
    ("an empty body", datagram(Type.CON, 14, b"t14", payload=b"")),
    ("an unknown meter", datagram(Type.CON, 15, b"t15", path=("meters", "m-a", "reading"), payload=as_json(0))),
    (
        "an unknown meter past the cap",
        datagram(Type.CON, 16, b"t16", path=("meters", "m-b", "reading"), payload=as_json(0)),
    ),
    # Not on the fast path: the full path's answers on both, as a control.
    ("GET of a reading", datagram(Type.CON, 17, b"t17", code=Code.GET, content_format=None)),
    ("POST", datagram(Type.CON, 18, b"t18", code=Code.POST, payload=as_json(6))),
    ("another resource", datagram(Type.CON, 19, b"t19", path=("meters", "bottle-0001", "x"), payload=as_json(6))),
    ("an unknown critical option", datagram(Type.CON, 20, b"t20", payload=as_json(6), extra_option=65001)),
]


@pytest.mark.integration
async def test_the_same_requests_get_the_same_answers_with_and_without_the_fast_path(pair: Pair) -> None:
    answers: dict[str, Message] = {}
    for name, sent in CASES:
        answers[name], _full = await pair.both(sent)
    assert answers["JSON reading"].code == Code.CHANGED
    assert json.loads(answers["JSON reading"].payload)["real_moles"] is not None
    assert json.loads(answers["the same reading again, a new message id"].payload)["stored"] is False
    assert cbor2.loads(answers["CBOR reading"].payload)["stored"] is True
    assert answers["NON reading"].code == Code.CHANGED
    assert answers["over the size limit"].code == Code.REQUEST_ENTITY_TOO_LARGE
    assert answers["over the size limit"].opt.size1 == MAX_PAYLOAD_BYTES
    assert answers["an unknown meter past the cap"].code == Code.FORBIDDEN
    # RFC 7252 §5.4.1: 4.02 (``ReadingSite``: aiocoap 0.4.17 over UDP would process the request without it).
    assert answers["an unknown critical option"].code == Code.BAD_OPTION
    # The counters and refusals moved alike; the fast path took the readings' PUTs, and only them.
    assert pair.fast.intake.counters == pair.full.intake.counters
    assert pair.fast.intake.counters.received == 17  # the 16 readings' PUTs, and the one with an unknown option
    fast_path = message_manager(pair.fast).fast_path
    assert isinstance(fast_path, ReadingFastPath) and fast_path.taken == 16
    assert message_manager(pair.full).fast_path is None
    assert reading_counts(pair.fast) == reading_counts(pair.full)


def reading_counts(consumer: Consumer) -> list[str]:
    """The readings' counters of the metrics (received, stored, duplicate, refused by reason, per transport),
    and how many acknowledgement latencies were observed."""
    counted = ("smartgas_readings_", "smartgas_transport_readings_", "smartgas_ack_latency_seconds_count")
    lines = consumer.metrics.render()[0].decode().splitlines()
    return [line for line in lines if line.startswith(counted) and "_created" not in line]


@pytest.mark.integration
async def test_a_con_reading_is_answered_on_its_ack_and_a_non_reading_with_a_non(
    consumer: Consumer, peer: socket.socket
) -> None:
    assert consumer.port is not None
    fast_path = message_manager(consumer).fast_path
    assert isinstance(fast_path, ReadingFastPath)
    fast_path.empty_ack_delay_s = 3600.0  # however slow this machine, no empty ACK: the answer is piggybacked
    inbox = Inbox(peer)
    con, _separate = await inbox.answer_to(consumer.port, datagram(Type.CON, 30, b"con", payload=as_json(0)))
    assert (con.mtype, con.mid, con.token, con.code) == (Type.ACK, 30, b"con", Code.CHANGED)
    non, _separate = await inbox.answer_to(consumer.port, datagram(Type.NON, 31, b"non", payload=as_json(1)))
    assert (non.mtype, non.token, non.code) == (Type.NON, b"non", Code.CHANGED)
    assert fast_path.taken == 2 and consumer.intake.counters.stored == 2


@pytest.mark.integration
async def test_a_duplicate_gets_the_first_answers_bytes_on_both_paths(pair: Pair) -> None:
    sent = datagram(Type.CON, 40, b"dup", payload=as_json(0))
    for consumer, inbox, port in pair.sides():
        first, separate = await inbox.answer_to(port, sent)
        await inbox.send(port, sent)
        again = await inbox.take(lambda _message: True, port)
        if not separate:  # (after a separate answer, the duplicate gets the empty ACK again)
            assert (again.mtype, again.mid, again.token, compared(again)) == (
                first.mtype,
                first.mid,
                first.token,
                compared(first),
            )
        assert consumer.intake.counters.received == 1


@pytest.mark.integration
async def test_a_refusal_with_max_age_is_the_same_on_both_paths(
    consumer_config: ConsumerConfig, tmp_path: Path
) -> None:
    # Fewer than one new unknown meter a minute: the bucket never holds a whole one, so every unknown meter
    # is refused 4.29 with the same Max-Age (60 s) however long the test takes.
    config = dataclasses.replace(consumer_config, unknown_meters_per_minute=0.5)
    consumers = []
    for name, fast_path in (("fast", True), ("full", False)):
        (tmp_path / name).mkdir()
        consumers.append(Consumer(two_consumers_config(config, tmp_path, name), coap_fast_path=fast_path))
    peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in consumers]
    try:
        for consumer, sock in zip(consumers, peers, strict=True):
            await consumer.start()
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
        fast, _full = await Pair(consumers[0], consumers[1], Inbox(peers[0]), Inbox(peers[1])).both(
            datagram(Type.CON, 50, b"rate", path=("meters", "m-new", "reading"), payload=as_json(0))
        )
        assert (fast.code, fast.opt.max_age) == (Code.TOO_MANY_REQUESTS, 60)
    finally:
        for sock in peers:
            sock.close()
        for consumer in consumers:
            await consumer.stop()


@pytest.mark.integration
async def test_overload_5_03_and_a_slow_commit_answered_separately_alike(pair: Pair) -> None:
    waiting = datagram(Type.CON, 60, b"wait", payload=as_json(0))
    refused = datagram(Type.CON, 61, b"over", payload=as_json(0), path=("meters", "bottle-0002", "reading"))
    answers = []
    for consumer, inbox, port in pair.sides():
        release = threading.Event()
        # The writer thread is busy until released (what a stalled disk does): the reading waits for its commit.
        blocker = asyncio.create_task(consumer.store.write(lambda _connection, release=release: release.wait(60)))
        await inbox.send(port, waiting)
        for _ in range(3000):  # bounded: 30 s
            if consumer.intake.pending == 1:
                break
            await asyncio.sleep(0.01)
        over, over_separate = await inbox.answer_to(port, refused)
        assert over.code == Code.SERVICE_UNAVAILABLE and not over_separate
        assert b"(--max-pending-readings 1)" in over.payload
        # An empty ACK after the empty-ACK delay (0.1 s, 1 s on the fast path); a retransmission gets it again.
        empty = await inbox.take(lambda m: m.mid == 60, port)
        assert (empty.mtype, empty.code, empty.token) == (Type.ACK, Code.EMPTY, b"")
        await inbox.send(port, waiting)
        again = await inbox.take(lambda m: m.mid == 60, port)
        assert (again.mtype, again.code) == (Type.ACK, Code.EMPTY)
        release.set()
        await blocker
        # The answer, later, as a separate CON (acknowledged by the inbox, as a client must).
        late = await inbox.take(lambda m: m.token == b"wait", port)
        assert (late.mtype, late.code) == (Type.CON, Code.CHANGED)
        answers.append((compared(over), compared(late)))
    assert answers[0] == answers[1]
    fast_path = message_manager(pair.fast).fast_path
    assert isinstance(fast_path, ReadingFastPath) and fast_path.taken == 2


@pytest.mark.integration
@pytest.mark.usefixtures("chattr")
async def test_a_store_that_cannot_commit_gets_5_03_alike(pair: Pair) -> None:
    await pair.both(datagram(Type.CON, 70, b"ok", payload=as_json(0)))
    files = [consumer.config.db.with_name(name) for consumer in (pair.fast, pair.full) for name in STORE_FILES]
    with immutable(*files):
        fast, _full = await pair.both(datagram(Type.CON, 71, b"ro", payload=as_json(1)))
    assert fast.code == Code.SERVICE_UNAVAILABLE and b"could not commit" in fast.payload


# -- real clients --------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_aiocoap_clients_con_and_non_are_answered_by_the_fast_path(consumer: Consumer) -> None:
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for seq, tuning in enumerate((aiocoap.Reliable, aiocoap.Unreliable)):
            message = Message(
                code=Code.PUT,
                uri=reading_uri(consumer),
                payload=as_json(seq),
                content_format=50,
                transport_tuning=tuning,
            )
            response = await asyncio.wait_for(client.request(message).response, timeout=ANSWER_TIMEOUT_S)
            assert response.code == Code.CHANGED and json.loads(response.payload)["stored"] is True
        health = Message(code=Code.GET, uri=f"coap://127.0.0.1:{consumer.port}/health")
        assert (await asyncio.wait_for(client.request(health).response, timeout=ANSWER_TIMEOUT_S)).code == Code.CONTENT
    finally:
        await client.shutdown()
    fast_path = message_manager(consumer).fast_path
    assert isinstance(fast_path, ReadingFastPath) and fast_path.taken == 2  # the readings; not /health


@pytest.mark.integration
@pytest.mark.skipif(COAP_CLIENT is None, reason="coap-client-notls not installed (Debian libcoap3-bin)")
async def test_libcoap_con_and_non_puts_are_answered_by_the_fast_path(consumer: Consumer) -> None:
    assert COAP_CLIENT is not None
    for seq, flags in enumerate(([], ["-N"])):
        process = await asyncio.create_subprocess_exec(
            COAP_CLIENT, "-B", "5", *flags, "-m", "put", "-t", "50", "-e", as_json(seq).decode(), reading_uri(consumer),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=ANSWER_TIMEOUT_S)
        assert json.loads(stdout)["stored"] is True, stderr
    fast_path = message_manager(consumer).fast_path
    assert isinstance(fast_path, ReadingFastPath) and fast_path.taken == 2


@pytest.mark.integration
async def test_no_fast_path_with_oscore(consumer_config: ConsumerConfig, tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    consumer = Consumer(dataclasses.replace(consumer_config, device_auth="oscore", device_credentials=credentials))
    await consumer.start()
    try:
        assert message_manager(consumer).fast_path is None  # aiocoap's OSCORE wrapper sees every request
    finally:
        await consumer.stop()


class _Interface:
    """What a UDP6EndpointAddress holds a weak reference to (its transport)."""


@pytest.mark.parametrize(
    ("local_address", "multicast"), [("::ffff:127.0.0.1", False), ("::1", False), ("ff02::fd", True)]
)
def test_the_answer_goes_back_as_aiocoap_would_send_it(local_address: str, multicast: bool) -> None:
    interface = _Interface()
    pktinfo = struct.pack("16sI", socket.inet_pton(socket.AF_INET6, local_address), 1)
    remote = UDP6EndpointAddress(("::ffff:127.0.0.1", 40000, 0, 0), interface, pktinfo=pktinfo)
    fast_path = ReadingFastPath(put=None)  # type: ignore[arg-type]
    for _ in range(2):  # worked out once per local address, then remembered
        answer_address = fast_path._response_address(remote)
        assert answer_address == remote.as_response_address()
        assert (answer_address is remote) is not multicast
        assert answer_address.pktinfo == (None if multicast else pktinfo)


@pytest.mark.integration
async def test_a_burst_of_datagrams_is_read_by_the_fast_paths_reader(consumer: Consumer, peer: socket.socket) -> None:
    assert consumer.port is not None
    fast_path = message_manager(consumer).fast_path
    assert isinstance(fast_path, ReadingFastPath) and fast_path.reader is not None
    before = fast_path.reader.datagrams
    inbox = Inbox(peer)
    burst = 2 * DATAGRAMS_PER_WAKEUP + 5  # sent at once: more than a batch waits in the socket
    for n in range(burst):
        meter = ("meters", f"burst-{n}", "reading")
        await inbox.send(consumer.port, datagram(Type.CON, 100 + n, b"b%d" % n, path=meter, payload=as_json(0)))
    for n in range(burst):
        answer = await inbox.take(lambda m, n=n: m.token == b"b%d" % n, consumer.port)
        assert answer.code == Code.CHANGED
    assert fast_path.reader.datagrams - before == burst and fast_path.taken == burst
    assert consumer.intake.counters.stored == burst


@pytest.mark.integration
async def test_an_icmp_error_is_read_from_the_error_queue_and_serving_goes_on(consumer: Consumer) -> None:
    assert consumer.port is not None
    fast_path = message_manager(consumer).fast_path
    assert isinstance(fast_path, ReadingFastPath) and fast_path.reader is not None
    # A peer that sends and is gone before the answer: the answer meets a closed port, and the kernel queues
    # the ICMP "port unreachable" on the consumer's socket (IPV6_RECVERR), which aiocoap is told of.
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))
    gone.sendto(
        datagram(Type.CON, 1, b"gone", code=Code.GET, path=("health",), content_format=None),
        ("127.0.0.1", consumer.port),
    )
    gone.close()
    for _ in range(1000):  # bounded: 10 s
        if fast_path.reader.errors:
            break
        await asyncio.sleep(0.01)
    assert fast_path.reader.errors >= 1
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        message = Message(code=Code.PUT, uri=reading_uri(consumer), payload=as_json(0), content_format=50)
        response = await asyncio.wait_for(client.request(message).response, timeout=ANSWER_TIMEOUT_S)
        assert response.code == Code.CHANGED
    finally:
        await client.shutdown()
