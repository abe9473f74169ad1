"""What a peer can make the consumer log, bounded: aiocoap's per-datagram lines and its decode failures.

aiocoap logs a line for many things a peer does (an unparsable datagram at WARNING, every refused request
at INFO, duplicates, pings), and a datagram whose options are not valid UTF-8 escapes its UDP transport as
an exception that asyncio logs at ERROR with a traceback. A flood of such datagrams would flood the log.

``PeerNoiseFilter`` passes at most one record per message template per ``interval_s`` from aiocoap's
logger (the consumer names it ``smartgas_consumer.coap``), noting how many were left out.
``datagram_error_handler`` is the event loop's exception handler while the consumer runs: a datagram the
transport could not decode is dropped (as aiocoap drops unparsable ones) and said at WARNING, through
the same filter; anything else goes to asyncio's default handler, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

#: The logger aiocoap's context logs to (``loggername`` of ``create_server_context``).
COAP_LOGGER = "smartgas_consumer.coap"
#: The exceptions a datagram can raise while aiocoap decodes it (options that are not UTF-8, ...).
DECODE_ERRORS = (UnicodeDecodeError, ValueError, IndexError, KeyError)
#: The callbacks that read datagrams and hand them to aiocoap: its transport's, or the fast path's reader
#: (``fastpath.DatagramReader``); a decode error escapes either (the datagrams after it wait for the next).
DATAGRAM_READERS = ("DatagramTransport", "DatagramReader.read_ready")


class PeerNoiseFilter(logging.Filter):
    """At most one record per message template (and level) per ``interval_s``; ERROR and above always pass."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        # (template, level) → (when last passed, left out since); templates are the code's own strings,
        # so this is bounded by the number of log statements, not by what peers send.
        self._seen: dict[tuple[str, int], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (str(record.msg), record.levelno)
        now = self._clock()
        last, left_out = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.interval_s:
            self._seen[key] = (last, left_out + 1)
            return False
        self._seen[key] = (now, 0)
        if left_out:
            record.msg = f"{record.msg} ({left_out} similar line(s) left out in the last {self.interval_s:g} s)"
        return True


def datagram_error_handler(log: logging.Logger) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event loop exception handler that drops undecodable datagrams with a (filtered) WARNING."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        handle = repr(context.get("handle"))
        if isinstance(exception, DECODE_ERRORS) and any(reader in handle for reader in DATAGRAM_READERS):
            log.warning("ignored a datagram that could not be decoded: %s", exception)
            return
        loop.default_exception_handler(context)

    return handle
