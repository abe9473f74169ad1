"""Admission of meters missing from the fleet file: a cap on how many are held, and on how fast new ones appear.

Any peer can mint meter ids, and every meter costs memory (the alert engine's history, the registry). A
meter listed in the fleet file is always admitted. An unknown one is admitted if it is already held, or if
fewer than ``max_unknown`` are held and the rate limit allows a new one (a token bucket refilled at
``per_minute``, holding up to a minute's worth, so a fleet starting at once is not refused). Beyond the cap
the answer is 4.03 (adding the meter to the fleet file, or raising the cap, is what lets it in); faster than
the rate, 4.29 with Max-Age saying when to try again (RFC 8516). Unknown meters silent for ``forget_after``
are forgotten: their slot and their memory elsewhere (``on_forget`` listeners) are released, and they are
admitted again, as new, if they come back.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import timedelta

from smartgas_consumer.error import NewMeterRateLimited, UnknownMeterRefused

_LOG = logging.getLogger(__name__)

#: An unknown meter silent this long is forgotten (slot and memory released). Longer than the alert
#: engine's leak window (15 min), so a meter that reports at all keeps its history.
FORGET_UNKNOWN_AFTER = timedelta(hours=1)


class UnknownMeters:
    """The unknown meters the consumer holds, least recently heard first; see the module docstring."""

    def __init__(
        self,
        *,
        max_unknown: int,
        per_minute: float,
        forget_after: timedelta,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_unknown = max_unknown
        self.per_minute = per_minute
        self.forget_after_s = forget_after.total_seconds()
        self._clock = clock
        self._last_heard: OrderedDict[str, float] = OrderedDict()  # meter id -> clock, oldest first
        self._tokens = per_minute  # a full bucket: a minute's worth of new meters may arrive at once
        self._refilled_at = clock()
        self._warned_full = False  # one warning each time the cap fills, not one per refused reading
        #: Called with the ids of forgotten meters, so other stages release what they hold for them.
        self.on_forget: list[Callable[[list[str]], None]] = []

    @property
    def held(self) -> int:
        return len(self._last_heard)

    def load(self, meter_ids: Iterable[str]) -> None:
        """Meters already in the store at start: held (the cap counts them), as if just heard."""
        now = self._clock()
        for meter_id in meter_ids:
            self._last_heard[meter_id] = now

    def admit(self, meter_id: str) -> None:
        """Let a reading of this unknown meter through, or raise the refusal (4.03 or 4.29)."""
        now = self._clock()
        if meter_id in self._last_heard:
            self._last_heard[meter_id] = now
            self._last_heard.move_to_end(meter_id)
            return
        self.forget_silent(now)
        if len(self._last_heard) >= self.max_unknown:
            if not self._warned_full:
                _LOG.warning(
                    "refusing new meters missing from the fleet file: %d held (--max-unknown-meters); "
                    'refusals are counted in smartgas_readings_rejected_total{reason="unknown_meter_refused"}',
                    len(self._last_heard),
                )
                self._warned_full = True
            raise UnknownMeterRefused(
                f"meter {meter_id} is not in the fleet file and this consumer already holds "
                f"{len(self._last_heard)} such meters (--max-unknown-meters {self.max_unknown})"
            )
        self._refill(now)
        if self._tokens < 1:
            wait_s = math.ceil((1 - self._tokens) * 60 / self.per_minute)
            raise NewMeterRateLimited(
                f"meter {meter_id} is not in the fleet file and new such meters arrive faster than "
                f"{self.per_minute:g} per minute (--unknown-meters-per-minute); retry in {wait_s} s",
                max_age_s=wait_s,
            )
        self._tokens -= 1
        self._last_heard[meter_id] = now

    def _refill(self, now: float) -> None:
        elapsed_s = max(0.0, now - self._refilled_at)
        self._tokens = min(self.per_minute, self._tokens + elapsed_s * self.per_minute / 60)
        self._refilled_at = now

    def forget_silent(self, now: float | None = None) -> list[str]:
        """Forget the unknown meters silent longer than ``forget_after``; return their ids."""
        cutoff = (self._clock() if now is None else now) - self.forget_after_s
        forgotten = []
        while self._last_heard:
            meter_id, heard = next(iter(self._last_heard.items()))
            if heard > cutoff:
                break
            del self._last_heard[meter_id]
            forgotten.append(meter_id)
        if forgotten:
            self._warned_full = False
            for listener in self.on_forget:
                listener(forgotten)
        return forgotten
