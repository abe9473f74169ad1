"""The fast path of the CoAP edge: datagrams read in batches, and a reading's PUT taken from the message layer
straight to the intake.

**What.** The product's traffic is one request: a CON or NON PUT to ``/meters/{id}/reading``. A request of
exactly that shape (its options only Uri-Path, three segments ``meters``, the id, ``reading``, and
Content-Format, besides Uri-Host and Uri-Port, which a server ignores) is handed by the message layer
(``dedup.BoundedDedupMessageManager.dispatch_message``), once past the duplicate detection
(``dedup.RecentRequests``), to ``ReadingFastPath.handle``. That runs ``MeterReading.put`` (so
``ReadingIntake.accept``: a ``--workers`` worker's ``ForwardingIntake`` too) in a task, encodes the answer
and sends it, and keeps its bytes for the request's duplicates. Anything else (another method or path,
Block1/Block2/Size1, Observe, No-Response, OSCORE, Uri-Path-Abbrev, proxying, any other option, critical
or not; pings, ACKs, RSTs) takes aiocoap's full path unchanged. A consumer with ``--device-auth oscore``
has no fast path: aiocoap's OSCORE site wrapper must see every request.

**Why.** Between decoding a request and encoding its answer, aiocoap 0.4 runs each request through the
TokenManager (a ``Pipe`` with its event callbacks), the Context (a second, error-translating pipe and a
render task), the ``Site``, a loop timer per CON request (the empty ACK after EMPTY_ACK_DELAY), the pipe's
events back and ``MessageManager.send_message``: about half of the consumer's event loop per reading
(docs/benchmarks.md, "Where the time goes"). Here a reading costs the decode, one task and the encode.

**The same answers.** A CON request's answer is piggybacked on the ACK (the request's message id and
token); a NON request gets a NON answer with a fresh message id from the message manager's own counter; a
refusal (``error.RenderableError``) is its ``to_message()``, as aiocoap renders it (code, diagnostic
payload, Size1 of a 4.13, Max-Age of a 4.29); any other exception is logged on aiocoap's logger and
answered 5.00, as aiocoap does. An answer not ready after ``EMPTY_ACK_DELAY_S`` (a slow commit) is
handled as aiocoap does: an empty ACK goes out (kept for the request's duplicates), then the answer as a
separate CON message that aiocoap's message layer retransmits until acknowledged. Two things differ: the
delay is 1 s, not aiocoap's 0.1 s (why at ``EMPTY_ACK_DELAY_S``), so an answer between the two rides on
the ACK where aiocoap's would come separately; and one timer serves all requests waiting, set at the
oldest one's delay, instead of one per request. (Piggybacking however late, which RFC 7252 allows, was
tried: a client holding one exchange at a time per peer (NSTART 1, as aiocoap's and so the publisher's
sockets do) then sends nothing more to the consumer until the slow reading is answered, and
``test_overload.py`` stalled.) ``test_fastpath.py`` sends the same requests to a consumer with and without
the fast path and compares the answers. Two requests on one token at once are both answered (aiocoap
drops the first).

**Datagrams read in batches.** aiocoap's udp6 transport reads one datagram per wake-up of the event loop,
and first asks the socket's error queue (ICMP errors, ``IPV6_RECVERR``) with a ``recvmsg`` that, nearly
always, fails with an exception: 17 % of the loop's time under load, more than the rest of aiocoap's
receive path. ``DatagramReader`` replaces the transport's reader callback (same socket, same protocol
methods): it reads up to ``DATAGRAMS_PER_WAKEUP`` datagrams per wake-up, and the error queue when a
wake-up found no datagram (an error queued wakes the socket's reader too: epoll always reports it) or
after a full batch (so a flood does not keep errors waiting), handing each to aiocoap's
``datagram_msg_received`` or ``datagram_errqueue_received`` as aiocoap's reader does.

**aiocoap internals it rests on** (0.4.17, pinned in constraints.txt; ``test_fastpath.py`` checks they
still exist): ``MessageManager.dispatch_message`` (overridden), ``_next_message_id`` (a NON answer's id),
``_send_empty_ack``, ``send_message`` (a separate answer) and ``message_interface.send`` (given an object
with ``remote`` and ``encode()``); ``Options._options``
(the option numbers a request carries); ``Context.serversite`` (where the context finds the fast path);
``EndpointAddress.as_response_address``; ``MessageInterfaceUDP6.transport`` (whose ``max_size``, and
whose socket's reader callback, ``DatagramReader`` replaces), ``datagram_msg_received``,
``datagram_errqueue_received``, ``error_received``, and ``aiocoap.util.socknumbers``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any

from aiocoap import Message, error
from aiocoap.interfaces import EndpointAddress
from aiocoap.numbers.codes import Code
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import ACK, CON, NON
from aiocoap.transports.udp6 import MessageInterfaceUDP6
from aiocoap.util import socknumbers

if TYPE_CHECKING:
    from smartgas_consumer.dedup import BoundedDedupMessageManager

#: The options a request on the fast path may carry; any other sends it down aiocoap's full path.
FAST_PATH_OPTIONS = frozenset(
    {OptionNumber.URI_HOST, OptionNumber.URI_PORT, OptionNumber.URI_PATH, OptionNumber.CONTENT_FORMAT}
)

#: How long a CON reading's answer may take before an empty ACK goes out and the answer follows as a separate
#: CON message: 1 s, where aiocoap waits 0.1 s (TransportTuning.EMPTY_ACK_DELAY), below the 2 s after which
#: a client first re-sends (ACK_TIMEOUT). Separate answers cost more (an exchange each, retransmission
#: timers) and go to each client address one at a time (NSTART 1, each waiting for the client's ACK), so
#: a consumer that fell 0.1 s behind under load fell further behind: at 1,489 readings/s on the loaded
#: development machine, 16,741 separate answers, p99 5 s and 2,800 readings unanswered within 5 s with
#: 0.1 s; none, p99 273 ms and all answered with 1 s (docs/benchmarks.md).
EMPTY_ACK_DELAY_S = 1.0

#: Datagrams read per wake-up of the event loop at most (then other callbacks run): 32 × ~0.1 ms.
DATAGRAMS_PER_WAKEUP = 32
#: What a recvmsg takes: aiocoap's own sizes (its RecvmsgSelectorDatagramTransport).
ANCILLARY_BYTES = 1024

#: Local addresses remembered as multicast or not (``ReadingFastPath._response_address``).
MAX_LOCAL_ADDRESSES = 256

#: ``MeterReading.put``: (meter id, request, when it arrived per ``time.perf_counter``) → the 2.04, or a
#: ``ConstructionRenderableError`` raised.
PutReading = Callable[[str, Message, float], Awaitable[Message]]


def is_reading_path(path: tuple[str, ...]) -> bool:
    """Whether a request's Uri-Path is ``meters/{id}/reading``."""
    return len(path) == 3 and path[0] == "meters" and path[2] == "reading"


class ReadingFastPath:
    """Answers readings' PUTs for the message layer; ``taken`` counts the requests it took."""

    def __init__(self, put: PutReading, empty_ack_delay_s: float = EMPTY_ACK_DELAY_S) -> None:
        self._put = put
        self.empty_ack_delay_s = empty_ack_delay_s
        self.taken = 0
        # Requests being processed: referenced until done (a task only weakly held may vanish), and
        # cancelled when the transport shuts down.
        self._tasks: set[asyncio.Task[None]] = set()
        # CON requests whose answer can still be piggybacked: key → (arrival per the loop's clock, request,
        # its message manager), in arrival order. One timer for all of them, at the oldest one's delay,
        # sends their empty ACKs (aiocoap schedules a timer per request).
        self._piggybackable: dict[Hashable, tuple[float, Message, BoundedDedupMessageManager]] = {}
        self._empty_acks: asyncio.TimerHandle | None = None
        # Local address (the datagram's IPV6_PKTINFO) → whether it is a multicast one, which aiocoap's
        # as_response_address works out from text per request (~3 % of the loop): a server has a few.
        self._multicast_locally: dict[bytes, bool] = {}
        self.reader: DatagramReader | None = None

    def takes(self, message: Message) -> bool:
        if message.code != Code.PUT or (message.mtype is not CON and message.mtype is not NON):
            return False
        if not message.opt._options.keys() <= FAST_PATH_OPTIONS:
            return False
        return is_reading_path(message.opt.uri_path)

    def handle(self, message: Message, key: Hashable, manager: BoundedDedupMessageManager) -> None:
        self.taken += 1
        if message.mtype is CON:
            loop = manager.loop
            arrived = loop.time()
            self._piggybackable[key] = (arrived, message, manager)
            if self._empty_acks is None:
                self._empty_acks = loop.call_at(arrived + self.empty_ack_delay_s, self._send_empty_acks, loop)
        task = asyncio.create_task(self._answer(message, key, manager, time.perf_counter()), name="CoAP reading")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def read_datagrams(self, message_interface: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Read the udp6 transport's datagrams in batches (``DatagramReader``); not another transport's."""
        if isinstance(message_interface, MessageInterfaceUDP6):
            self.reader = DatagramReader(message_interface)
            self.reader.install(loop)

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._empty_acks is not None:
            self._empty_acks.cancel()
            self._empty_acks = None
        self._piggybackable.clear()

    def _send_empty_acks(self, loop: asyncio.AbstractEventLoop) -> None:
        """An empty ACK for each CON request unanswered for ``empty_ack_delay_s``, as aiocoap sends (so the
        client stops retransmitting and, holding one exchange at a time, sends its next requests)."""
        self._empty_acks = None
        now = loop.time()
        while self._piggybackable:
            key, (arrived, request, manager) = next(iter(self._piggybackable.items()))
            due = arrived + self.empty_ack_delay_s
            if due > now:
                self._empty_acks = loop.call_at(due, self._send_empty_acks, loop)
                return
            del self._piggybackable[key]
            # Kept for the request's duplicates, as aiocoap keeps it (_store_response_for_duplicates).
            manager._send_empty_ack(request.remote, request.mid, "Response took too long to prepare")

    async def _answer(
        self, request: Message, key: Hashable, manager: BoundedDedupMessageManager, started: float
    ) -> None:
        try:
            response = await self._put(request.opt.uri_path[1], request, started)
        except error.RenderableError as err:
            response = _refusal(err, manager)
        except Exception as err:  # a bug of ours: what aiocoap's error_to_message does with it
            manager.log.error("An exception occurred while rendering a resource: %r", err, exc_info=err)
            response = Message(code=Code.INTERNAL_SERVER_ERROR)
        response.token = request.token
        remote = self._response_address(request.remote)
        if request.mtype is NON:
            response.mtype, response.mid = NON, manager._next_message_id()
        elif self._still_piggybackable(key, request):
            del self._piggybackable[key]
            response.mtype, response.mid = ACK, request.mid
        else:  # its empty ACK went out: a separate CON answer, retransmitted by aiocoap until acknowledged
            response.mtype, response.remote = CON, remote
            manager.send_message(response, _ignore_reset)
            return
        encoded = bytes(response.encode())
        manager.recent_requests.answer(key, encoded)
        manager.send_encoded(remote, encoded)

    def _response_address(self, remote: EndpointAddress) -> EndpointAddress:
        """``remote.as_response_address()``: the request's remote itself unless it came to a multicast address."""
        local = getattr(remote, "pktinfo", None)  # udp6's local address and interface, as bytes
        if local is None:
            return remote.as_response_address()
        multicast = self._multicast_locally.get(local)
        if multicast is None:
            if len(self._multicast_locally) >= MAX_LOCAL_ADDRESSES:  # a bound; never reached on a real host
                self._multicast_locally.clear()
            multicast = self._multicast_locally[local] = remote.as_response_address() is not remote
        return remote.as_response_address() if multicast else remote

    def _still_piggybackable(self, key: Hashable, request: Message) -> bool:
        """Whether no empty ACK went out for ``request`` (under ``key``: not another request since under it)."""
        entry = self._piggybackable.get(key)
        return entry is not None and entry[1] is request


def _ignore_reset() -> None:
    """A separate answer the client rejected (RST) or never acknowledged: nothing to undo (as in aiocoap,
    whose render task is over by then)."""


def _refusal(err: error.RenderableError, manager: BoundedDedupMessageManager) -> Message:
    """The answer aiocoap renders for an error raised by a resource (``aiocoap.pipe.error_to_message``)."""
    try:
        response = err.to_message()
        if response is None:
            raise ValueError(f"Exception to_message failed to produce a message on {err!r}")
    except Exception as failure:
        manager.log.error("Rendering the renderable exception failed: %r", failure, exc_info=failure)
        return Message(code=Code.INTERNAL_SERVER_ERROR)
    return response  # type: ignore[no-any-return]


class DatagramReader:
    """The reader callback of aiocoap's udp6 socket, reading datagrams in batches (module docstring).
    ``wakeups``, ``datagrams`` and ``errors`` count what it did."""

    def __init__(self, message_interface: Any) -> None:
        transport = message_interface.transport
        self._socket: socket.socket = transport.get_extra_info("socket")
        self._protocol = message_interface
        self._max_size: int = transport.max_size
        self._errqueue = bool(socknumbers.HAS_RECVERR)
        self.wakeups = self.datagrams = self.errors = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take the socket's reader callback over (aiocoap's transport removes it when it closes)."""
        loop.add_reader(self._socket.fileno(), self.read_ready)

    def read_ready(self) -> None:
        self.wakeups += 1
        read = 0
        while read < DATAGRAMS_PER_WAKEUP:
            try:
                data, ancdata, flags, address = self._socket.recvmsg(self._max_size, ANCILLARY_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._protocol.error_received(exc)
                break
            read += 1
            self.datagrams += 1
            # A datagram aiocoap cannot decode raises here, as from aiocoap's reader (edgelog.py drops it);
            # the datagrams after it are read on the next wake-up.
            self._protocol.datagram_msg_received(data, ancdata, flags, address)
        if self._errqueue and (read == 0 or read == DATAGRAMS_PER_WAKEUP):
            self._read_errors()

    def _read_errors(self) -> None:
        try:
            data, ancdata, flags, address = self._socket.recvmsg(
                self._max_size, ANCILLARY_BYTES, socknumbers.MSG_ERRQUEUE
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._protocol.error_received(exc)
            return
        self.errors += 1
        self._protocol.datagram_errqueue_received(data, ancdata, flags, address)
