"""Alert rules, pure: how one stored reading is judged, with its meter's recent history.

Rules (thresholds from ``ConsumerConfig``, everything else a named constant below; ``docs/alerts.md``):

- ``over_pressure``: pressure above ``alert_overpressure_pct`` % of the bottle's nominal pressure (known
  meters) or above ``alert_max_pressure_bar`` (meters missing from the fleet file);
- ``over_temperature``: temperature above ``alert_max_temperature_c``;
- ``low_content``: fill % under ``alert_low_fill_pct`` (known meters of a compressed gas: fill % is real
  content, so it does not move with the temperature of a sealed bottle);
- ``leak``: gas lost faster than ``alert_leak_factor`` × the meter's ``draw_mol_per_h``, or, while its
  site is idle, faster than ``alert_idle_draw_mol_per_h``. The rate is a least-squares fit over the last
  minutes of readings, and counts only when it beats the limit by ``LEAK_CONFIDENCE_SE`` standard errors:
  one pair of readings ten seconds apart carries far more sensor noise than any leak threshold. The
  amount fitted is the real-gas content (``real_moles``) where the physics gives one, so a sealed bottle
  cooling at night is not a leak; the ideal-gas ``moles`` otherwise (meters missing from the fleet file);
- ``sensor_fault``: pressure or temperature jumping by more than ``alert_jump_bar``/``alert_jump_c``
  between consecutive readings, unless the step is a bottle swap;
- ``offline``: no reading received for ``offline_after_periods`` × ``expected_period_s`` (judged on a
  timer by the engine, ``alerts.py``);
- ``liquid_exhausted``: a liquefied-gas bottle's pressure fell below its vapour pressure (the liquid is
  gone: what is left is the gas phase); resolves once liquid is present again (a new bottle).

Each rule gives a verdict per reading: *trip* (the condition holds), *clear* (it is gone, beyond the
hysteresis) or nothing (cannot judge, or inside the hysteresis band). Nothing here does I/O: the engine
(``alerts.py``) feeds each reading through its meter's ``MeterTrack`` and acts on ``judge``'s verdicts.
"""

from __future__ import annotations

import bisect
import enum
import math
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from smartgas_common.gas import Storage
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.fleet import FleetMeter, ideal_fill_pct
from smartgas_consumer.intake import StoredEvent
from smartgas_consumer.realgas import LiquidState

#: How far a value must come back past its limit before its alert resolves (so it does not flap).
PRESSURE_HYSTERESIS_BAR = 5.0
TEMPERATURE_HYSTERESIS_C = 2.0
FILL_HYSTERESIS_PCT = 2.0
#: A jump is judged only between consecutive readings at most this many expected periods apart.
JUMP_MAX_PERIODS = 3.0
#: A sensor fault resolves after this many steady steps in a row.
SENSOR_CLEAR_STEPS = 3
#: A bottle swap (known meters): the gas rose by at least this % of a full bottle, to a fill in this range.
SWAP_MIN_RISE_PCT = 10.0
SWAP_FILL_PCT = (80.0, 105.0)
#: Leak: the fit uses the readings of this window (at most LEAK_MAX_READINGS) ...
LEAK_WINDOW = timedelta(minutes=15)
LEAK_MAX_READINGS = 512
#: ... and judges only with at least this many readings spanning this many expected periods;
LEAK_MIN_READINGS = 6
LEAK_MIN_SPAN_PERIODS = 3.0
#: a reading closer than this many periods to the previous one in the window is left out of the fit;
LEAK_MIN_STEP_PERIODS = 0.5
#: it trips when rate − k·se > limit and clears when rate + k·se < LEAK_CLEAR_FRACTION × limit.
LEAK_CONFIDENCE_SE = 4.0
LEAK_CLEAR_FRACTION = 0.8


class Kind(enum.StrEnum):
    """What an alert is about."""

    OVER_PRESSURE = "over_pressure"
    OVER_TEMPERATURE = "over_temperature"
    LOW_CONTENT = "low_content"
    LEAK = "leak"
    SENSOR_FAULT = "sensor_fault"
    OFFLINE = "offline"
    LIQUID_EXHAUSTED = "liquid_exhausted"


#: Critical: gas may escape or a reading cannot be trusted. Warning: needs attention, not urgently.
SEVERITY: dict[Kind, str] = {
    Kind.OVER_PRESSURE: "critical",
    Kind.LEAK: "critical",
    Kind.SENSOR_FAULT: "critical",
    Kind.OVER_TEMPERATURE: "warning",
    Kind.LOW_CONTENT: "warning",
    Kind.OFFLINE: "warning",
    Kind.LIQUID_EXHAUSTED: "warning",
}


class Verdict(enum.Enum):
    """A rule's judgement of one reading; no verdict (None) means "no change"."""

    TRIP = "trip"
    CLEAR = "clear"


@dataclass(frozen=True, slots=True)
class Check:
    """A verdict with the value it was reached on and a sentence for people."""

    verdict: Verdict
    value: float
    message: str


@dataclass(frozen=True, slots=True)
class Sample:
    """One stored reading as the rules see it."""

    epoch: int
    seq: int
    ts: datetime
    pressure_bar: float
    temperature_c: float
    #: The content the rules judge: real moles where the physics gives them, else the ideal-gas moles.
    moles: float
    fill_pct: float | None
    #: A liquefied gas's state (``realgas.py``); None for a compressed gas or an unknown meter.
    liquid_state: str | None = None

    @classmethod
    def of(cls, event: StoredEvent) -> Sample:
        reading = event.reading
        real_moles = event.enrichment.real.real_moles
        return cls(
            event.result.epoch,
            reading.seq,
            reading.ts,
            reading.pressure_bar,
            reading.temperature_c,
            real_moles if real_moles is not None else event.moles,
            event.enrichment.fill_pct,
            event.enrichment.real.liquid_state,
        )


class LeakWindow:
    """A meter's leak window: the time, content and regime of each reading the fit uses, oldest first.

    Held in three flat arrays (17 bytes a reading) rather than as objects (~280 bytes a ``Sample``): a
    window holds up to LEAK_WINDOW / (LEAK_MIN_STEP_PERIODS × expected period) readings per meter (90 for a
    meter sending every 10 s, 180 for one sending faster): for 10,000 meters at most ~30 MB, where whole
    samples took up to ~460 MB (``test_alerts.py`` measures a meter's track).
    """

    __slots__ = ("moles", "ts_s", "working")

    def __init__(self) -> None:
        self.ts_s = array("d")  # the meter's timestamps, POSIX seconds, increasing
        self.moles = array("d")  # the content the rule fits (``Sample.moles``)
        self.working = bytearray()  # 1 if the meter's site was working in that hour (the fit's regimes)

    def __len__(self) -> int:
        return len(self.ts_s)

    def clear(self) -> None:
        del self.ts_s[:], self.moles[:], self.working[:]

    def append(self, ts_s: float, moles: float, working: bool) -> None:
        self.ts_s.append(ts_s)
        self.moles.append(moles)
        self.working.append(working)
        if len(self.ts_s) > LEAK_MAX_READINGS:
            self.drop_oldest(len(self.ts_s) - LEAK_MAX_READINGS)

    def drop_before(self, oldest_s: float) -> None:
        """Forget the readings older than ``oldest_s`` (the window slides)."""
        self.drop_oldest(bisect.bisect_left(self.ts_s, oldest_s))

    def drop_oldest(self, count: int) -> None:
        del self.ts_s[:count], self.moles[:count], self.working[:count]

    def fit(self, working: bool) -> Fit | None:
        """The loss rate fitted to the readings of one regime (the site working or idle)."""
        keep = [index for index, flag in enumerate(self.working) if flag == working]
        if len(keep) == len(self.working):
            return fit_points(self.ts_s, self.moles)
        return fit_points([self.ts_s[i] for i in keep], [self.moles[i] for i in keep])


@dataclass(frozen=True, slots=True)
class Observation:
    """What the rules judge: the new reading with the meter's recent history (same epoch) and thresholds."""

    sample: Sample
    recent: Sequence[Sample]  # the last few readings, oldest first, ending with ``sample``
    #: The meter's leak window itself (empty: no leak rule), to be read by ``judge`` right after ``observe``.
    window: LeakWindow
    meter: FleetMeter | None
    config: ConsumerConfig
    in_window: bool = False  # ``sample`` is the window's newest point (not left out as too close)


# -- steps between consecutive readings -----------------------------------------------------------------


class Step(enum.Enum):
    """How a reading follows the previous one of its meter."""

    STEADY = "steady"
    SWAP = "swap"  # a fuller bottle replaced the old one
    JUMP = "jump"  # pressure or temperature moved more than a sensor can honestly move
    UNRELATED = "unrelated"  # another epoch, or too far apart in time to judge


def is_swap(previous: Sample, current: Sample, meter: FleetMeter | None, config: ConsumerConfig) -> bool:
    """A bottle swap: the gas rose to what a new bottle holds.

    Known meters: the fill rose by at least SWAP_MIN_RISE_PCT points, to a fill within SWAP_FILL_PCT
    (temperature-compensated, unlike pressure): the real fill % where both readings have one, else the
    ideal-gas one. Unknown meters: the pressure rose by more than ``alert_jump_bar`` and stayed within
    ``alert_max_pressure_bar``.
    """
    if meter is not None:
        if previous.fill_pct is not None and current.fill_pct is not None:
            before_pct, fill_pct = previous.fill_pct, current.fill_pct
        else:
            before_pct, fill_pct = ideal_fill_pct(meter, previous.moles), ideal_fill_pct(meter, current.moles)
        return fill_pct - before_pct >= SWAP_MIN_RISE_PCT and SWAP_FILL_PCT[0] <= fill_pct <= SWAP_FILL_PCT[1]
    rise_bar = current.pressure_bar - previous.pressure_bar
    return rise_bar > config.alert_jump_bar and current.pressure_bar <= config.alert_max_pressure_bar


def classify_step(previous: Sample, current: Sample, meter: FleetMeter | None, config: ConsumerConfig) -> Step:
    if current.epoch != previous.epoch:
        return Step.UNRELATED
    if is_swap(previous, current, meter, config):
        return Step.SWAP
    interval_s = (current.ts - previous.ts).total_seconds()
    if not 0 < interval_s <= JUMP_MAX_PERIODS * config.expected_period_s:
        return Step.UNRELATED
    jumped = (
        abs(current.pressure_bar - previous.pressure_bar) > config.alert_jump_bar
        or abs(current.temperature_c - previous.temperature_c) > config.alert_jump_c
    )
    return Step.JUMP if jumped else Step.STEADY


# -- per-meter memory --------------------------------------------------------------------------------------


def has_leak_rule(meter: FleetMeter | None) -> bool:
    """Whether the leak rule judges this meter's readings: a fleet meter of a compressed gas."""
    return meter is not None and meter.gas.storage is Storage.COMPRESSED


@dataclass(slots=True)
class MeterTrack:
    """What the engine remembers of one meter: its last readings and its leak window.

    The window is kept only for a meter the leak rule judges (``has_leak_rule``): an unknown meter or a
    liquefied gas holds none.
    """

    meter_id: str
    client_id: str | None = None
    site_id: str | None = None
    recent: deque[Sample] = field(default_factory=lambda: deque(maxlen=SENSOR_CLEAR_STEPS + 1))
    window: LeakWindow = field(default_factory=LeakWindow)

    def observe(self, sample: Sample, meter: FleetMeter | None, config: ConsumerConfig) -> Observation | None:
        """Take the next reading into the history; None if it is older than what was already seen."""
        previous = self.recent[-1] if self.recent else None
        if previous is not None and (sample.epoch, sample.seq) <= (previous.epoch, previous.seq):
            return None
        step = classify_step(previous, sample, meter, config) if previous is not None else Step.UNRELATED
        if previous is None or previous.epoch != sample.epoch:
            self.recent.clear()
        self.recent.append(sample)
        if not has_leak_rule(meter):
            return Observation(sample, tuple(self.recent), self.window, meter, config)
        assert meter is not None
        ts_s, working = sample.ts.timestamp(), meter.site.is_working(sample.ts.hour)
        if previous is None or previous.epoch != sample.epoch or step in (Step.SWAP, Step.JUMP):
            # A new bottle, a suspect value or a rebooted meter: the fit starts again from here.
            self.window.clear()
            self.window.append(ts_s, sample.moles, working)
            in_window = True
        else:
            window = self.window
            if window and window.ts_s[-1] >= ts_s:
                window.clear()  # the meter's clock went back: the window must stay in time order
            window.drop_before(ts_s - LEAK_WINDOW.total_seconds())
            too_close = bool(window) and ts_s - window.ts_s[-1] < LEAK_MIN_STEP_PERIODS * config.expected_period_s
            in_window = not too_close
            if in_window:
                window.append(ts_s, sample.moles, working)
        return Observation(sample, tuple(self.recent), self.window, meter, config, in_window)


# -- the rules ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Threshold:
    """A rule that compares one value with a limit: trips beyond it, clears once back by ``hysteresis``."""

    kind: Kind
    measure: str
    unit: str
    above: bool  # True: trips above the limit; False: below it
    hysteresis: float
    value_fn: Callable[[Sample], float | None]
    limit_fn: Callable[[FleetMeter | None, ConsumerConfig], float | None]

    def check(self, observation: Observation) -> Check | None:
        value = self.value_fn(observation.sample)
        limit = self.limit_fn(observation.meter, observation.config)
        if value is None or limit is None:
            return None
        side = "above" if self.above else "below"
        if (value > limit) if self.above else (value < limit):
            return Check(Verdict.TRIP, value, f"{self.measure} {value:.1f} {self.unit}, {side} {limit:.1f} {self.unit}")
        back = limit - self.hysteresis if self.above else limit + self.hysteresis
        if (value <= back) if self.above else (value >= back):
            return Check(Verdict.CLEAR, value, f"{self.measure} back to {value:.1f} {self.unit} (limit {limit:.1f})")
        return None


def _pressure_limit(meter: FleetMeter | None, config: ConsumerConfig) -> float:
    if meter is None:
        return config.alert_max_pressure_bar
    return meter.nominal_pressure_bar * config.alert_overpressure_pct / 100.0


def _fill_limit(meter: FleetMeter | None, config: ConsumerConfig) -> float | None:
    return config.alert_low_fill_pct if meter is not None else None


THRESHOLDS: tuple[Threshold, ...] = (
    Threshold(
        Kind.OVER_PRESSURE,
        "pressure",
        "bar",
        True,
        PRESSURE_HYSTERESIS_BAR,
        lambda s: s.pressure_bar,
        _pressure_limit,
    ),
    Threshold(
        Kind.OVER_TEMPERATURE,
        "temperature",
        "°C",
        True,
        TEMPERATURE_HYSTERESIS_C,
        lambda s: s.temperature_c,
        lambda _meter, config: config.alert_max_temperature_c,
    ),
    Threshold(Kind.LOW_CONTENT, "fill", "%", False, FILL_HYSTERESIS_PCT, lambda s: s.fill_pct, _fill_limit),
)


@dataclass(frozen=True, slots=True)
class Fit:
    """Rate of gas loss from a least-squares line through (time, moles), with its standard error."""

    rate_mol_per_h: float
    standard_error: float
    readings: int
    span_h: float


def fit_points(times_s: Sequence[float], moles: Sequence[float]) -> Fit | None:
    """The slope of moles over time, as a loss (positive when gas goes), of readings given as their times
    (POSIX seconds, in order) and their moles; None below three readings."""
    n = len(times_s)
    if n < 3:
        return None
    origin_s = times_s[0]
    hours = [(t - origin_s) / 3600.0 for t in times_s]
    mean_t, mean_n = sum(hours) / n, sum(moles) / n
    sxx = sum((t - mean_t) ** 2 for t in hours)
    if sxx <= 0:
        return None
    slope = sum((t - mean_t) * (m - mean_n) for t, m in zip(hours, moles, strict=True)) / sxx
    residuals = sum((m - mean_n - slope * (t - mean_t)) ** 2 for t, m in zip(hours, moles, strict=True))
    standard_error = math.sqrt(residuals / (n - 2) / sxx)
    return Fit(-slope, standard_error, n, hours[-1] - hours[0])


def check_leak(observation: Observation) -> Check | None:
    """Leak: the fitted loss rate beats the limit by LEAK_CONFIDENCE_SE standard errors (known meters)."""
    meter, config = observation.meter, observation.config
    # A liquefied gas has no window (``has_leak_rule``): its pressure is the vapour pressure, set by the
    # temperature, so it shows no loss of liquid, and the ideal moles of a cooling bottle would fall like a leak's.
    if meter is None or not observation.in_window or not observation.window:
        return None
    working = bool(observation.window.working[-1])
    limit = config.alert_leak_factor * meter.draw_mol_per_h
    if not working:
        limit = min(limit, config.alert_idle_draw_mol_per_h)
    # Only readings of the same regime: the end of the working day must not pass for an idle-time leak.
    fit = observation.window.fit(working)
    if fit is None or fit.readings < LEAK_MIN_READINGS:
        return None
    if fit.span_h * 3600.0 < LEAK_MIN_SPAN_PERIODS * config.expected_period_s:
        return None
    margin = LEAK_CONFIDENCE_SE * fit.standard_error
    where = "site idle" if not working else "site working"
    if fit.rate_mol_per_h - margin > limit:
        message = f"losing {fit.rate_mol_per_h:.2f} mol/h, limit {limit:.2f} mol/h ({where})"
        return Check(Verdict.TRIP, fit.rate_mol_per_h, message)
    if fit.rate_mol_per_h + margin < LEAK_CLEAR_FRACTION * limit:
        message = f"loss back to {fit.rate_mol_per_h:.2f} mol/h (limit {limit:.2f} mol/h, {where})"
        return Check(Verdict.CLEAR, fit.rate_mol_per_h, message)
    return None


def check_sensor_fault(observation: Observation) -> Check | None:
    """Sensor fault: the newest step jumped; cleared after SENSOR_CLEAR_STEPS steady steps in a row."""
    meter, config, recent = observation.meter, observation.config, observation.recent
    if len(recent) < 2:
        return None
    steps = [classify_step(a, b, meter, config) for a, b in zip(recent, list(recent)[1:], strict=False)]
    if steps[-1] is Step.JUMP:
        previous, current = recent[-2], recent[-1]
        jump_bar = current.pressure_bar - previous.pressure_bar
        jump_c = current.temperature_c - previous.temperature_c
        interval_s = (current.ts - previous.ts).total_seconds()
        if abs(jump_bar) > config.alert_jump_bar:
            message = f"pressure jumped {jump_bar:+.1f} bar in {interval_s:.0f} s ({previous.pressure_bar:.1f} → "
            message += f"{current.pressure_bar:.1f} bar)"
            return Check(Verdict.TRIP, abs(jump_bar), message)
        message = f"temperature jumped {jump_c:+.1f} °C in {interval_s:.0f} s ({previous.temperature_c:.1f} → "
        message += f"{current.temperature_c:.1f} °C)"
        return Check(Verdict.TRIP, abs(jump_c), message)
    if len(steps) >= SENSOR_CLEAR_STEPS and all(s in (Step.STEADY, Step.SWAP) for s in steps[-SENSOR_CLEAR_STEPS:]):
        return Check(Verdict.CLEAR, 0.0, f"readings steady again ({SENSOR_CLEAR_STEPS} steps without a jump)")
    return None


def check_liquid_exhausted(observation: Observation) -> Check | None:
    """Liquid exhausted: a liquefied bottle's state says its liquid is gone; clears once liquid is present."""
    state = observation.sample.liquid_state
    if state == LiquidState.EXHAUSTED:
        return Check(
            Verdict.TRIP, observation.sample.pressure_bar, "pressure below the vapour pressure: no liquid left"
        )
    if state == LiquidState.PRESENT:
        return Check(Verdict.CLEAR, observation.sample.pressure_bar, "liquid present again (a new bottle?)")
    return None


#: Every rule judged on each reading, by kind (offline is judged on the timer).
RULES: tuple[tuple[Kind, Callable[[Observation], Check | None]], ...] = (
    *((threshold.kind, threshold.check) for threshold in THRESHOLDS),
    (Kind.LEAK, check_leak),
    (Kind.SENSOR_FAULT, check_sensor_fault),
    (Kind.LIQUID_EXHAUSTED, check_liquid_exhausted),
)


def judge(observation: Observation) -> dict[Kind, Check]:
    """Every rule's verdict on one observation (rules with no verdict are left out)."""
    checks = {kind: rule(observation) for kind, rule in RULES}
    return {kind: check for kind, check in checks.items() if check is not None}
