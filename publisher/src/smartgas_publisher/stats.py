"""Delivery counters of the fleet: one ``FleetStats``, owned by the fleet and handed to every meter.

Each produced reading ends in exactly one of: acknowledged (2.xx), failed (4.xx, never retried), dropped
(evicted from a full buffer), or still buffered. ``sent`` counts attempts, so it includes re-sends;
``retried`` counts the attempts that will be repeated (5.xx, timeouts, network errors).

``send_delays`` measures the publisher as a load source: for each reading, how long after its scheduled
time it left for the consumer (on its first attempt), which is the loop's lag, the wait for the meter's
previous reading to be settled and any wait for a free socket. It is kept as a histogram of whole
milliseconds, so percentiles cost nothing to keep for millions of readings.
"""

from dataclasses import dataclass, field

#: Sends later than this are "late" (issue 12: under 1 % of sends late by more than 1 s).
LATE_S = 1.0
#: The histogram's range in milliseconds; slower sends land in its last bucket.
DELAY_HISTOGRAM_MS = 60_000


@dataclass
class SendDelays:
    """How late each reading's first send was against its schedule: a histogram of whole milliseconds."""

    counts: list[int] = field(default_factory=lambda: [0] * (DELAY_HISTOGRAM_MS + 1))
    total: int = 0
    late: int = 0
    max_s: float = 0.0

    def record(self, delay_s: float) -> None:
        delay_s = max(delay_s, 0.0)
        self.counts[min(int(delay_s * 1000), DELAY_HISTOGRAM_MS)] += 1
        self.total += 1
        self.late += delay_s > LATE_S
        self.max_s = max(self.max_s, delay_s)

    def percentile_ms(self, fraction: float) -> int:
        """The smallest whole millisecond at or below which ``fraction`` of the sends were (0 if none)."""
        wanted = fraction * self.total
        seen = 0
        for milliseconds, count in enumerate(self.counts):
            seen += count
            if seen >= wanted and seen > 0:
                return milliseconds
        return 0

    def summary(self) -> str:
        late_percent = 100 * self.late / self.total if self.total else 0.0
        return (
            f"send_delay_ms p50={self.percentile_ms(0.5)} p99={self.percentile_ms(0.99)}"
            f" max={round(self.max_s * 1000)} late_over_{LATE_S:g}s={self.late}/{self.total} ({late_percent:.2f}%)"
        )


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
    send_delays: SendDelays = field(default_factory=SendDelays)
    #: Over MQTT, ``acked`` is the broker's PUBACK, and the consumer's answers are counted apart.
    answers_counted: bool = False
    answers_accepted: int = 0
    answers_refused: int = 0

    @property
    def all_acknowledged(self) -> bool:
        """True when every reading produced so far was acknowledged, and no answer refused one."""
        return self.acked == self.produced and self.answers_refused == 0

    def _answers(self) -> str:
        if not self.answers_counted:
            return ""
        return f" answers_accepted={self.answers_accepted} answers_refused={self.answers_refused}"

    def status_line(self) -> str:
        return (
            f"fleet: meters={self.meters} produced={self.produced} sent={self.sent} acked={self.acked}"
            f" retried={self.retried} failed={self.failed} dropped={self.dropped} buffered={self.buffered}"
            f"{self._answers()} {self.send_delays.summary()}"
        )

    def summary_line(self) -> str:
        """The last line of a run: ``unsent`` is what was still buffered when the fleet stopped."""
        return (
            f"fleet finished: meters={self.meters} produced={self.produced} sent={self.sent}"
            f" acked={self.acked} retried={self.retried} failed={self.failed} dropped={self.dropped}"
            f" unsent={self.buffered}{self._answers()} {self.send_delays.summary()}"
        )
