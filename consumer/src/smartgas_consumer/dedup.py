"""Duplicate detection for CoAP over UDP, bounded in entries and in time: aiocoap's message layer, made small.

RFC 7252 §4.5 asks a server to recognise a retransmitted confirmable request by (peer, message id) and
answer it with the answer it already gave. aiocoap 0.4 does this by keeping every request, with its whole
answer (which references the request), for EXCHANGE_LIFETIME (247 s), each with its own loop timer: about
3 KB per request, so one peer sending 2,000 requests a second holds ~1.5 GB. §4.5 also allows a server
to re-process a request whose processing is idempotent instead; a PUT of a reading is (the store keeps a
reading once per (meter, epoch, seq) and answers a repeat ``stored: false``). So the consumer keeps less:

- ``RecentRequests`` holds the encoded answer (its bytes, ~100 B) per (peer, message id), oldest first,
  at most ``max_entries`` of them and none older than ``lifetime_s``; the oldest go first when either bound
  is passed, checked on each new request (no per-entry timer);
- a duplicate still held is answered with the very bytes of the first answer, without re-processing; a
  duplicate no longer held is processed again, which for a reading is safe.

``BoundedDedupMessageManager`` is a small subclass of aiocoap's ``MessageManager`` replacing its two
duplicate-detection methods; ``bounded_dedup_context`` gives a ``Context`` subclass whose udp6 transport
uses it (and names each request's task without formatting the request, a per-reading cost:
docs/benchmarks.md). When the server site offers a ``fast_path`` (``fastpath.py``: a reading's PUT taken
from here straight to the intake), the message manager hands it the requests it takes, after the same
duplicate detection. Both rest on aiocoap internals of the pinned version (constraints.txt);
``test_dedup.py`` checks that they still exist and that a running consumer uses the subclass.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

import aiocoap
from aiocoap.interfaces import EndpointAddress
from aiocoap.message import Message
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers.types import CON
from aiocoap.pipe import error_to_message, run_driving_pipe
from aiocoap.tokenmanager import TokenManager

#: Marks a request seen but not answered yet (a duplicate then gets nothing, as in aiocoap).
NOT_ANSWERED = b""


@dataclass(frozen=True, slots=True)
class DedupLimits:
    """How many requests the message layer remembers, and for how long."""

    max_entries: int = 20_000
    lifetime_s: float = 60.0


class RecentRequests:
    """(peer, message id) → the encoded answer, oldest first, bounded in count and in age."""

    def __init__(self, limits: DedupLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        #: key → (time first seen, encoded answer or NOT_ANSWERED); insertion order is arrival order.
        self._entries: OrderedDict[Hashable, tuple[float, bytes]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def seen(self, key: Hashable) -> bytes | None:
        """The answer held for a duplicate (``NOT_ANSWERED`` while being processed), or None if ``key`` is new.

        A new key is remembered; the oldest entries go first when the count or the age passes its limit.
        """
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            first_seen, answer = entry
            if now - first_seen <= self.limits.lifetime_s:
                return answer
            del self._entries[key]  # too old to count as the same request: processed again
        self._entries[key] = (now, NOT_ANSWERED)
        self._evict(now)
        return None

    def answer(self, key: Hashable, encoded: bytes) -> None:
        """Keep the answer to a request still held, for its duplicates."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], encoded)

    def _evict(self, now: float) -> None:
        entries = self._entries
        oldest_allowed = now - self.limits.lifetime_s
        while len(entries) > self.limits.max_entries:
            entries.popitem(last=False)
            self.evicted += 1
        while entries:
            first_seen, _answer = next(iter(entries.values()))
            if first_seen >= oldest_allowed:
                break
            entries.popitem(last=False)
            self.evicted += 1


class EncodedAnswer:
    """An answer already encoded, in the shape aiocoap's ``MessageInterface.send`` reads (``remote`` and
    ``encode()``): sent as these bytes, without decoding and encoding them again."""

    __slots__ = ("data", "remote")

    def __init__(self, remote: EndpointAddress, data: bytes) -> None:
        self.remote = remote
        self.data = data

    def encode(self) -> bytes:
        return self.data


class FastPath(Protocol):
    """What the message layer asks of a fast path (``fastpath.ReadingFastPath``)."""

    def takes(self, message: Message) -> bool:
        """Whether ``message`` (a request, decoded, not yet deduplicated) is one this path answers."""
        ...

    def handle(self, message: Message, key: Hashable, manager: BoundedDedupMessageManager) -> None:
        """Answer ``message``, new under ``key`` in ``manager.recent_requests``; keep the answer there."""
        ...

    def cancel(self) -> None:
        """Drop the requests still being processed (the transport shuts down, as aiocoap's does)."""
        ...

    def read_datagrams(self, message_interface: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Read the datagrams of ``message_interface`` (aiocoap's udp6 transport) from now on."""
        ...


class BoundedDedupMessageManager(MessageManager):  # type: ignore[misc]
    """aiocoap's CoAP-over-UDP message layer, with duplicate detection held in ``RecentRequests`` and the
    requests a ``fast_path`` takes handed to it."""

    def __init__(self, token_manager: TokenManager, limits: DedupLimits, fast_path: FastPath | None = None) -> None:
        super().__init__(token_manager)
        self.recent_requests = RecentRequests(limits)
        self.fast_path = fast_path

    def dispatch_message(self, message: Message) -> None:
        fast_path = self.fast_path
        if fast_path is None or not fast_path.takes(message):
            super().dispatch_message(message)
            return
        if not self._deduplicate_message(message):
            fast_path.handle(message, (message.remote, message.mid), self)

    def send_encoded(self, remote: EndpointAddress, data: bytes) -> None:
        """Put an encoded answer on the wire as it is (aiocoap's transport, with its error attribution)."""
        self.message_interface.send(EncodedAnswer(remote, data))

    async def shutdown(self) -> None:
        if self.fast_path is not None:
            self.fast_path.cancel()  # as aiocoap's TokenManager drops the requests it still renders
        await super().shutdown()

    def _deduplicate_message(self, message: Message) -> bool:
        """True if ``message`` is a duplicate (then its first answer, if any, is sent again)."""
        answer = self.recent_requests.seen((message.remote, message.mid))
        if answer is None:
            return False
        if message.mtype is CON and answer != NOT_ANSWERED:
            self.send_encoded(message.remote.as_response_address(), answer)
        return True

    def _store_response_for_duplicates(self, message: Message) -> None:
        """Keep the answer's bytes (not the message, which references the request) for duplicates."""
        key = (message.remote, message.mid)
        if key in self.recent_requests:  # not for pings' RSTs or the consumer's own requests
            self.recent_requests.answer(key, message.encode())


def bounded_dedup_context(limits: DedupLimits) -> type[aiocoap.Context]:
    """A ``Context`` class whose udp6 (and other message-managed) transports use ``BoundedDedupMessageManager``,
    with the server site's ``fast_path`` if it has one.

    Use it as ``aiocoap.Context`` is used: ``await bounded_dedup_context(limits).create_server_context(...)``.
    """

    class BoundedDedupContext(aiocoap.Context):  # type: ignore[misc]
        async def _append_tokenmanaged_messagemanaged_transport(self, message_interface_constructor: Any) -> None:
            # aiocoap's own method (0.4.17), with the message manager swapped for ours.
            token_manager = TokenManager(self)
            fast_path = getattr(self.serversite, "fast_path", None)  # resource.ReadingSite's, unless turned off
            message_manager = BoundedDedupMessageManager(token_manager, limits, fast_path)
            transport = await message_interface_constructor(message_manager)
            message_manager.message_interface = transport
            if fast_path is not None:  # its datagrams read in batches too (fastpath.DatagramReader)
                fast_path.read_datagrams(transport, self.loop)
            token_manager.token_interface = message_manager
            self.request_interfaces.append(token_manager)

        def render_to_pipe(self, pipe: Any) -> None:
            # aiocoap's own method (0.4.17), but its task is not named "Rendering for %r" % request: that
            # repr (addresses formatted, options listed) was ~4 % of the event loop's time per reading.
            run_driving_pipe(error_to_message(pipe, self.log), self._render_to_pipe(pipe), name="CoAP request")

    return BoundedDedupContext
