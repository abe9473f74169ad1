"""Delivery counters of the fleet: one ``FleetStats``, owned by the fleet and handed to every meter.

Each produced reading ends in exactly one of: acknowledged (2.xx), failed (4.xx, never retried), dropped
(evicted from a full buffer), or still buffered. ``sent`` counts PUT attempts, so it includes re-sends;
``retried`` counts the attempts that will be repeated (5.xx, timeouts, network errors).
"""

from dataclasses import dataclass


@dataclass
class FleetStats:
    """Running totals over all meters (mutated from the one event loop thread only)."""

    meters: int = 0
    produced: int = 0
    sent: int = 0
    acked: int = 0
    retried: int = 0
    failed: int = 0
    dropped: int = 0
    buffered: int = 0

    @property
    def all_acknowledged(self) -> bool:
        """True when every reading produced so far was acknowledged by the consumer."""
        return self.acked == self.produced

    def status_line(self) -> str:
        return (
            f"fleet: meters={self.meters} produced={self.produced} sent={self.sent} acked={self.acked}"
            f" retried={self.retried} failed={self.failed} dropped={self.dropped} buffered={self.buffered}"
        )

    def summary_line(self) -> str:
        """The last line of a run: ``unsent`` is what was still buffered when the fleet stopped."""
        return (
            f"fleet finished: meters={self.meters} produced={self.produced} sent={self.sent}"
            f" acked={self.acked} retried={self.retried} failed={self.failed} dropped={self.dropped}"
            f" unsent={self.buffered}"
        )
