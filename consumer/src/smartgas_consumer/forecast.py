"""Forecast per meter, pure: how fast a bottle's gas goes, and how many days are left until its reserve.

The amount followed is the real-gas content (``real_moles``: temperature-compensated, so a sealed bottle
cooling at night does not look consumed), the ideal-gas moles where the physics gives none. Time is the
site's *working clock*: the hours in which the site works (the fleet file's ``working_hours_utc``), so the
idle hours of nights and weekends add no time to the fit and do not dilute the rate, and a bottle read
during the night adds no point. The rate is the Theil–Sen slope of content over working hours (the
median of the slopes between every pair of points): up to 29 % of wild points leave it where the others
put it, and sensor noise averages out over the span. Days to empty is what is left above the reserve
(``forecast_reserve_fill_pct`` of a full bottle) divided by the daily draw: the rate times the site's
working hours per day. ``docs/physics.md#forecast`` says why, and what the figures are worth.

Until the fit is confident (at least ``MEASURED_MIN_POINTS`` points and a rate known within
``MEASURED_MAX_RELATIVE_ERROR``) the forecast uses the fleet file's ``draw_mol_per_h`` and says so
(``basis: declared``); a bottle swap (content stepping up) starts the series again. A liquefied gas gets
no days-to-empty from pressure (the pressure is its vapour pressure whatever the fill): its forecast
carries the liquid state instead.
"""

from __future__ import annotations

import enum
import functools
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from smartgas_common.gas import Storage
from smartgas_consumer.fleet import FleetMeter, Site, full_moles

#: The series keeps at most this many points; past it neighbours merge in pairs and the spacing doubles,
#: so a bottle's whole life since its last swap fits (the Theil–Sen fit costs this squared: 0.7 ms).
MAX_POINTS = 120
#: A measured rate needs at least this many points ...
MEASURED_MIN_POINTS = 12
#: ... and its 95 % interval (two standard errors) within this fraction of the rate; until then the
#: fleet file's declared draw stands in.
MEASURED_MAX_RELATIVE_ERROR = 0.1
#: The fit is computed again once the points changed by this fraction (at least one point): a Theil–Sen
#: fit of MAX_POINTS costs about 0.7 ms, and one more point in 120 does not move it.
REFIT_FRACTION = 0.05
#: Working hours counted exactly, hour by hour, up to this gap (seconds); a longer silence counts whole days.
_EXACT_CLOCK_LIMIT_S = 2 * 86400.0


class Basis(enum.StrEnum):
    """Where a forecast's rate comes from."""

    MEASURED = "measured"  # the fit of the readings since the last swap
    DECLARED = "declared"  # the fleet file's draw_mol_per_h, while the fit is not yet confident


@functools.cache
def _working_hours(hours_utc: tuple[int, int]) -> tuple[bool, ...]:
    """Whether each UTC hour is a working one, for a site's ``working_hours_utc`` (Site.is_working's rule)."""
    start, end = hours_utc
    return tuple((start <= hour < end) if start <= end else (hour >= start or hour < end) for hour in range(24))


def working_hours_per_day(site: Site) -> int:
    """Hours a day in which the site draws gas."""
    return sum(_working_hours(site.working_hours_utc))


def working_hours_between(site: Site, start: datetime, end: datetime) -> float:
    """Working hours of ``site`` in [start, end) (0 if end <= start). On every stored reading: in seconds
    since the epoch, hour by hour (readings seconds apart mostly fall in one hour: one step)."""
    start_s, end_s = start.timestamp(), end.timestamp()
    if end_s <= start_s:
        return 0.0
    working = _working_hours(site.working_hours_utc)
    total_s = 0.0
    if end_s - start_s > _EXACT_CLOCK_LIMIT_S:
        whole_days = int((end_s - start_s) // 86400) - 1
        total_s += whole_days * sum(working) * 3600.0
        start_s += whole_days * 86400.0
    cursor_s = start_s
    while cursor_s < end_s:
        hour = int(cursor_s // 3600)
        segment_end_s = min((hour + 1) * 3600.0, end_s)
        if working[hour % 24]:
            total_s += segment_end_s - cursor_s
        cursor_s = segment_end_s
    return total_s / 3600.0


@dataclass(frozen=True, slots=True)
class ConsumptionFit:
    """Gas drawn per working hour (positive when gas goes), with its standard error."""

    rate_mol_per_working_h: float
    standard_error: float
    points: int
    span_working_h: float


def fit_consumption(working_h: np.ndarray, content_mol: np.ndarray) -> ConsumptionFit | None:
    """Theil–Sen slope of content over working hours, as a draw; None below three points or no span.

    The standard error is the least-squares one of the residuals around the Theil–Sen line (outliers
    widen it, so a series with many wild points stays "declared" longer rather than "measured" wrongly).
    """
    n = len(working_h)
    if n < 3:
        return None
    span_h = float(working_h[-1] - working_h[0])
    if span_h <= 0:
        return None
    upper = np.triu_indices(n, k=1)
    # Pairs (i, j) with i < j: later minus earlier (the series is in time order).
    dx = (working_h[None, :] - working_h[:, None])[upper]
    dy = (content_mol[None, :] - content_mol[:, None])[upper]
    apart = dx > 0
    if not apart.any():
        return None
    slope = float(np.median(dy[apart] / dx[apart]))
    intercept = float(np.median(content_mol - slope * working_h))
    residuals = content_mol - (intercept + slope * working_h)
    sxx = float(np.sum((working_h - working_h.mean()) ** 2))
    standard_error = math.sqrt(float(np.sum(residuals**2)) / (n - 2) / sxx) if sxx > 0 else math.inf
    return ConsumptionFit(-slope, standard_error, n, span_h)


@dataclass(slots=True)
class ContentSeries:
    """One meter's content on its site's working clock since its last bottle swap, in at most MAX_POINTS.

    Each point is the mean of the readings of one stretch of ``spacing_h`` working hours (one reading
    while the series is short). Past MAX_POINTS, neighbouring points merge in pairs (their means) and the
    spacing doubles: every reading still counts, its noise averaged out rather than thrown away. The points
    are flat arrays of doubles (8 bytes a value, not a 24-byte float object and its 8-byte reference): one
    series per meter of the fleet, ~2 KB each rather than ~8 KB (``test_forecast.py`` measures it).
    """

    working_h: array[float] = field(default_factory=lambda: array("d"))
    content_mol: array[float] = field(default_factory=lambda: array("d"))
    #: The working clock at the last reading seen (idle or not), and that reading's time.
    clock_h: float = 0.0
    last_ts: datetime | None = None
    #: Working hours one point covers; readings within it are averaged into the open one.
    spacing_h: float = 0.0
    #: The point being filled: sums of working hours and content, and how many readings.
    _open_h: float = 0.0
    _open_mol: float = 0.0
    _open_count: int = 0
    _first_open_h: float = 0.0
    #: The last fit, and how many points it saw (-1: none since the series began again).
    _fit: ConsumptionFit | None = None
    _fitted_points: int = -1

    def add(self, site: Site, ts: datetime, content_mol: float) -> None:
        """Take a reading in time order (an older one than the last is ignored); idle hours add no point."""
        if self.last_ts is not None:
            if ts <= self.last_ts:
                return
            self.clock_h += working_hours_between(site, self.last_ts, ts)
        self.last_ts = ts
        if not _working_hours(site.working_hours_utc)[ts.hour] or not math.isfinite(content_mol):
            return
        if self._open_count == 0:
            self._first_open_h = self.clock_h
        self._open_h += self.clock_h
        self._open_mol += content_mol
        self._open_count += 1
        if self.clock_h - self._first_open_h < self.spacing_h:
            return
        self.working_h.append(self._open_h / self._open_count)
        self.content_mol.append(self._open_mol / self._open_count)
        self._open_h = self._open_mol = 0.0
        self._open_count = 0
        if len(self.working_h) > MAX_POINTS:
            self.working_h = array("d", _pair_means(self.working_h))
            self.content_mol = array("d", _pair_means(self.content_mol))
            self.spacing_h = 2 * max(self.spacing_h, (self.working_h[-1] - self.working_h[0]) / len(self.working_h))

    def restart(self) -> None:
        """A new bottle: what the old one did says nothing of the new one's content."""
        del self.working_h[:], self.content_mol[:]
        self.spacing_h = self._open_h = self._open_mol = 0.0
        self._open_count = 0
        self._fit, self._fitted_points = None, -1

    def fit(self) -> ConsumptionFit | None:
        """The fit of the points kept, computed again only once they changed by REFIT_FRACTION (the fleet
        table and every shipped document ask for it)."""
        points = len(self.working_h)
        if self._fitted_points < 0 or abs(points - self._fitted_points) >= max(1, REFIT_FRACTION * points):
            self._fit = fit_consumption(
                np.asarray(self.working_h, dtype=float), np.asarray(self.content_mol, dtype=float)
            )
            self._fitted_points = points
        return self._fit


def _pair_means(values: Sequence[float]) -> list[float]:
    """Neighbours merged in pairs (an odd last one kept as it is)."""
    merged = [(values[i] + values[i + 1]) / 2 for i in range(0, len(values) - 1, 2)]
    if len(values) % 2:
        merged.append(values[-1])
    return merged


@dataclass(frozen=True, slots=True)
class Forecast:
    """What a meter's bottle is expected to do; ``days_to_empty`` None when there is no figure (``note``)."""

    basis: Basis | None
    consumption_mol_per_day: float | None
    days_to_empty: float | None
    empty_at: datetime | None
    reserve_fill_pct: float
    measured_points: int
    note: str

    def as_dict(self) -> dict[str, object]:
        return {
            "basis": str(self.basis) if self.basis is not None else None,
            "consumption_mol_per_day": self.consumption_mol_per_day,
            "days_to_empty": self.days_to_empty,
            "empty_at": self.empty_at,
            "reserve_fill_pct": self.reserve_fill_pct,
            "measured_points": self.measured_points,
            "note": self.note,
        }


def no_forecast(reserve_fill_pct: float, note: str) -> Forecast:
    return Forecast(None, None, None, None, reserve_fill_pct, 0, note)


def forecast(
    meter: FleetMeter | None,
    series: ContentSeries | None,
    *,
    ts: datetime | None,
    content_mol: float | None,
    fill_pct: float | None,
    liquid_state: str | None,
    reserve_fill_pct: float,
) -> Forecast:
    """The forecast of a meter whose latest reading (at ``ts``) holds ``content_mol`` at ``fill_pct``."""
    if meter is None:
        return no_forecast(reserve_fill_pct, "not in the fleet file: no bottle size or working hours to forecast from")
    if meter.gas.storage is Storage.LIQUEFIED:
        # In words (the note is the dashboard's tooltip): "liquid_present" → "(liquid present)".
        state = f" ({liquid_state.replace('_', ' ')})" if liquid_state else ""
        return no_forecast(
            reserve_fill_pct, f"liquefied gas: its pressure gives the liquid state{state}, not the content left"
        )
    if ts is None or content_mol is None:
        return no_forecast(reserve_fill_pct, "no reading yet")
    hours_per_day = working_hours_per_day(meter.site)
    fit = series.fit() if series is not None else None
    points = fit.points if fit is not None else 0
    confident = (
        fit is not None
        and fit.points >= MEASURED_MIN_POINTS
        and fit.rate_mol_per_working_h > 0
        and 2 * fit.standard_error <= MEASURED_MAX_RELATIVE_ERROR * fit.rate_mol_per_working_h
    )
    if fit is not None and confident:
        basis, rate = Basis.MEASURED, fit.rate_mol_per_working_h
        note = f"measured over {fit.span_working_h:.2f} working hours ({fit.points} points)"
    else:
        basis, rate = Basis.DECLARED, meter.draw_mol_per_h
        note = f"learning ({points} points so far): the fleet file's draw of {meter.draw_mol_per_h:g} mol/h stands in"
    daily_mol = rate * hours_per_day
    if daily_mol <= 0:
        return Forecast(basis, daily_mol, None, None, reserve_fill_pct, points, "no consumption expected")
    # The full bottle in the units of the content: real fill % is real content over a real full bottle.
    full_mol = content_mol * 100.0 / fill_pct if fill_pct is not None and fill_pct > 0 else full_moles(meter)
    above_reserve_mol = content_mol - full_mol * reserve_fill_pct / 100.0
    days = max(0.0, above_reserve_mol / daily_mol)
    return Forecast(basis, daily_mol, days, ts + timedelta(days=days), reserve_fill_pct, points, note)
