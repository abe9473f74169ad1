"""What a meter needs from a transport: send one reading, and say what became of it.

A meter's buffer, schedule and retry policy (``meter.py``) are the same whatever carries its readings;
the transports (``coap.py``, ``mqtt.py``) each implement ``Uplink`` and translate their library's answers
and errors, in one place each, into an ``Attempt``.
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from smartgas_publisher.model import Reading

#: How much of a diagnostic goes into a log line.
DIAGNOSTIC_MAX_CHARS = 200

#: Called by an uplink the moment a reading leaves (after any wait for a free socket or connection).
SendClock = Callable[[], None]


class Outcome(Enum):
    """What one attempt to deliver a reading means for it."""

    ACKED = "acked"
    FAILED = "failed"
    RETRY = "retry"


@dataclass(frozen=True)
class Attempt:
    """The outcome of one attempt and a line of text for the log (answer and diagnostic, or error)."""

    outcome: Outcome
    detail: str


class Uplink(Protocol):
    """A transport shared by the fleet's meters."""

    @property
    def files_needed(self) -> int:
        """Most open files (sockets, lock files) the uplink may hold at once."""

    async def open(self) -> None:
        """Prepare to send (load credentials); no network traffic needed."""

    async def close(self) -> None:
        """Release every socket and credential."""

    async def send(self, meter_id: str, reading: Reading, sent: SendClock) -> Attempt:
        """Deliver one reading of ``meter_id``; call ``sent`` when it leaves."""
