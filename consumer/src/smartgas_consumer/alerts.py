"""Alerts: each stored reading is judged against the fleet's rules; a silent meter is judged on a timer.

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
- ``offline``: no reading received for ``offline_after_periods`` × ``expected_period_s``;
- ``liquid_exhausted``: a liquefied-gas bottle's pressure fell below its vapour pressure (the liquid is
  gone: what is left is the gas phase); resolves once liquid is present again (a new bottle).

Each rule gives a verdict per reading: *trip* (the condition holds), *clear* (it is gone, beyond the
hysteresis) or nothing (cannot judge, or inside the hysteresis band). An alert opens on the first trip of
its (meter, kind), counts further trips as occurrences, and resolves on a clear; there is at most one open
alert per (meter, kind). Every change is one SQLite transaction in the store's file (``ALERT_SCHEMA``),
which also marks the alert pending for Elasticsearch and lets listeners add rows of their own (the webhook
outbox) in that same transaction.

Readings reach the engine through ``ReadingIntake.on_stored``: the callback only queues the event, and one
worker task judges the queue in order, so a CoAP answer never waits for an alert and a meter's readings are
judged in the order they were stored.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from smartgas_common.gas import Storage
from smartgas_consumer.admission import FORGET_UNKNOWN_AFTER
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elasticsearch_sink import Refusal, Shipment
from smartgas_consumer.fleet import Fleet, FleetMeter, ideal_fill_pct
from smartgas_consumer.intake import StoredEvent
from smartgas_consumer.realgas import LiquidState
from smartgas_consumer.store import ReadingStore, ShipState, format_timestamp, parse_timestamp

_LOG = logging.getLogger(__name__)

ALERT_SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    alert_id    TEXT    PRIMARY KEY,          -- {meter_id}:{kind}:{opened_at}; Elasticsearch _id {alert_id}:{revision}
    meter_id    TEXT    NOT NULL,
    client_id   TEXT,
    site_id     TEXT,
    kind        TEXT    NOT NULL,
    severity    TEXT    NOT NULL,             -- critical or warning
    state       TEXT    NOT NULL,             -- open or resolved
    message     TEXT    NOT NULL,
    value       REAL,
    opened_at   TEXT    NOT NULL,
    updated_at  TEXT    NOT NULL,
    resolved_at TEXT,
    occurrences INTEGER NOT NULL DEFAULT 1,
    revision    INTEGER NOT NULL UNIQUE,      -- raised at every change: the shipping key of that version
    ship_state  INTEGER NOT NULL DEFAULT 0,   -- 0 pending, 1 shipped, 2 dead-lettered (as readings)
    shipped_at  TEXT,
    ship_status INTEGER,                      -- Elasticsearch's status when it refused the alert for good
    ship_reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_one_open ON alerts (meter_id, kind) WHERE state = 'open';
CREATE INDEX IF NOT EXISTS alerts_pending ON alerts (revision) WHERE ship_state = 0;
CREATE INDEX IF NOT EXISTS alerts_client_opened ON alerts (client_id, opened_at);
CREATE INDEX IF NOT EXISTS alerts_meter_opened ON alerts (meter_id, opened_at);
-- What people did to an alert (a table of its own, so stores made before acknowledgement need no migration).
CREATE TABLE IF NOT EXISTS alert_handling (
    alert_id        TEXT    PRIMARY KEY REFERENCES alerts (alert_id),
    acknowledged_at TEXT,
    acknowledged_by TEXT,                     -- "admin" or the client id whose key acknowledged it
    closed_by       TEXT                      -- who closed it by hand or retired its meter; NULL: its rule did
);
-- Meters taken out of service: out of the fleet table and the offline rule until they send again.
CREATE TABLE IF NOT EXISTS retired_meters (
    meter_id   TEXT    PRIMARY KEY,
    retired_at TEXT    NOT NULL,
    retired_by TEXT    NOT NULL
);
"""

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
#: Seconds between two offline checks.
OFFLINE_CHECK_S = 5.0


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

OPEN = "open"
RESOLVED = "resolved"


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


@dataclass(frozen=True, slots=True)
class Observation:
    """What the rules judge: the new reading with the meter's recent history (same epoch) and thresholds."""

    sample: Sample
    recent: Sequence[Sample]  # the last few readings, oldest first, ending with ``sample``
    window: Sequence[Sample]  # the leak window, oldest first, ending with ``sample`` (unless left out)
    meter: FleetMeter | None
    config: ConsumerConfig


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


@dataclass(slots=True)
class MeterTrack:
    """What the engine remembers of one meter: its last readings and its leak window."""

    meter_id: str
    client_id: str | None = None
    site_id: str | None = None
    recent: deque[Sample] = field(default_factory=lambda: deque(maxlen=SENSOR_CLEAR_STEPS + 1))
    window: deque[Sample] = field(default_factory=lambda: deque(maxlen=LEAK_MAX_READINGS))

    def observe(self, sample: Sample, meter: FleetMeter | None, config: ConsumerConfig) -> Observation | None:
        """Take the next reading into the history; None if it is older than what was already seen."""
        previous = self.recent[-1] if self.recent else None
        if previous is not None and (sample.epoch, sample.seq) <= (previous.epoch, previous.seq):
            return None
        step = classify_step(previous, sample, meter, config) if previous is not None else Step.UNRELATED
        if previous is None or previous.epoch != sample.epoch:
            self.recent.clear()
        self.recent.append(sample)
        if previous is None or previous.epoch != sample.epoch or step in (Step.SWAP, Step.JUMP):
            # A new bottle, a suspect value or a rebooted meter: the fit starts again from here.
            self.window.clear()
            self.window.append(sample)
        else:
            if self.window and self.window[-1].ts >= sample.ts:
                self.window.clear()  # the meter's clock went back: the window must stay in time order
            while self.window and self.window[0].ts < sample.ts - LEAK_WINDOW:
                self.window.popleft()
            too_close = self.window and (sample.ts - self.window[-1].ts).total_seconds() < (
                LEAK_MIN_STEP_PERIODS * config.expected_period_s
            )
            if not too_close:
                self.window.append(sample)
        return Observation(sample, tuple(self.recent), tuple(self.window), meter, config)


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


def fit_loss_rate(samples: Sequence[Sample]) -> Fit | None:
    """The slope of moles over time, as a loss (positive when gas goes), or None below three readings."""
    if len(samples) < 3:
        return None
    origin = samples[0].ts
    hours = [(s.ts - origin).total_seconds() / 3600.0 for s in samples]
    moles = [s.moles for s in samples]
    n = len(samples)
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
    meter, config, sample = observation.meter, observation.config, observation.sample
    if meter is None or not observation.window or observation.window[-1] is not sample:
        return None
    if meter.gas.storage is Storage.LIQUEFIED:
        # Its pressure is the vapour pressure, set by the temperature: it shows no loss of liquid, and
        # the ideal moles of a cooling bottle would fall like a leak's.
        return None
    working = meter.site.is_working(sample.ts.hour)
    limit = config.alert_leak_factor * meter.draw_mol_per_h
    if not working:
        limit = min(limit, config.alert_idle_draw_mol_per_h)
    # Only readings of the same regime: the end of the working day must not pass for an idle-time leak.
    samples = [s for s in observation.window if meter.site.is_working(s.ts.hour) == working]
    fit = fit_loss_rate(samples)
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


# -- alerts and their changes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alert:
    """One alert as stored: open until its condition clears, then resolved for good."""

    alert_id: str
    meter_id: str
    client_id: str | None
    site_id: str | None
    kind: str
    severity: str
    state: str
    message: str
    value: float | None
    opened_at: str
    updated_at: str
    resolved_at: str | None
    occurrences: int
    acknowledged_at: str | None = None  # a person saw it: it stays open, webhooks hear no more until it ends
    acknowledged_by: str | None = None
    closed_by: str | None = None  # resolved by a person (or by retiring its meter), not by its rule

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert_id": self.alert_id,
            "meter_id": self.meter_id,
            "client_id": self.client_id,
            "site_id": self.site_id,
            "kind": self.kind,
            "severity": self.severity,
            "state": self.state,
            "message": self.message,
            "value": self.value,
            "opened_at": self.opened_at,
            "updated_at": self.updated_at,
            "resolved_at": self.resolved_at,
            "occurrences": self.occurrences,
            "acknowledged_at": self.acknowledged_at,
            "acknowledged_by": self.acknowledged_by,
            "closed_by": self.closed_by,
        }


_ALERT_COLUMNS = (
    "alert_id, meter_id, client_id, site_id, kind, severity, state, message, value, opened_at, updated_at,"
    " resolved_at, occurrences"
)
_HANDLING_COLUMNS = "acknowledged_at, acknowledged_by, closed_by"
#: Every alert column, with what people did to it: ``{_SELECT_ALERTS} WHERE ...``.
_SELECT_ALERTS = f"SELECT {_ALERT_COLUMNS}, {_HANDLING_COLUMNS} FROM alerts LEFT JOIN alert_handling USING (alert_id)"


def _alert(row: sqlite3.Row) -> Alert:
    return Alert(**dict(row))


class ChangeEvent(enum.StrEnum):
    """What happened to an alert (the webhook's ``event``)."""

    OPENED = "alert.opened"
    UPDATED = "alert.updated"
    RESOLVED = "alert.resolved"
    ACKNOWLEDGED = "alert.acknowledged"  # by a person: still open
    CLOSED = "alert.closed"  # resolved by a person, or because its meter was retired


@dataclass(frozen=True, slots=True)
class AlertChange:
    """One change to one alert, as listeners and webhooks receive it."""

    event: ChangeEvent
    alert: Alert

    def as_dict(self) -> dict[str, Any]:
        return {"event": str(self.event), "alert": self.alert.as_dict()}


#: Called inside the transaction that records a change, so what it writes commits with the change.
Recorder = Callable[[sqlite3.Connection, dict[str, Any]], None]


def _save(connection: sqlite3.Connection, alert: Alert) -> None:
    """Insert or update an alert, raise its revision and mark it pending for shipping again."""
    (revision,) = connection.execute("SELECT coalesce(max(revision), 0) + 1 FROM alerts").fetchone()
    connection.execute(
        f"INSERT INTO alerts ({_ALERT_COLUMNS}, revision, ship_state)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)"
        " ON CONFLICT (alert_id) DO UPDATE SET state = excluded.state, message = excluded.message,"
        " value = excluded.value, updated_at = excluded.updated_at, resolved_at = excluded.resolved_at,"
        " occurrences = excluded.occurrences, revision = excluded.revision, ship_state = 0,"
        " ship_status = NULL, ship_reason = NULL",
        (
            alert.alert_id,
            alert.meter_id,
            alert.client_id,
            alert.site_id,
            alert.kind,
            alert.severity,
            alert.state,
            alert.message,
            alert.value,
            alert.opened_at,
            alert.updated_at,
            alert.resolved_at,
            alert.occurrences,
            revision,
        ),
    )
    if alert.acknowledged_at is not None or alert.closed_by is not None:
        connection.execute(
            f"INSERT INTO alert_handling (alert_id, {_HANDLING_COLUMNS}) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (alert_id) DO UPDATE SET acknowledged_at = excluded.acknowledged_at,"
            " acknowledged_by = excluded.acknowledged_by, closed_by = excluded.closed_by",
            (alert.alert_id, alert.acknowledged_at, alert.acknowledged_by, alert.closed_by),
        )


class AlertNotOpen(Exception):
    """Only an open alert can be acknowledged or closed; this one is resolved already."""

    def __init__(self, alert_id: str, action: str) -> None:
        super().__init__(f"alert {alert_id} is resolved: only an open alert can be {action}")


@dataclass(frozen=True, slots=True)
class _Queued:
    event: StoredEvent
    silent_s: float | None  # how long the meter had been silent before this reading arrived


class AlertEngine:
    """Judges readings and silence, and keeps the alerts. ``await start()``, feed ``on_stored``, ``stop()``.

    Listeners: ``on_change`` (after commit, with ``{"event": ..., "alert": {...}}``) and ``recorders``
    (inside the change's transaction, with the connection and the same dict).
    """

    def __init__(
        self,
        store: ReadingStore,
        config: ConsumerConfig,
        *,
        fleet: Fleet | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        offline_check_s: float = OFFLINE_CHECK_S,
    ) -> None:
        self.store = store
        self.config = config
        self.fleet = fleet or Fleet()
        self._clock = clock
        self._offline_check_s = offline_check_s
        self.offline_after = timedelta(seconds=config.offline_after_periods * config.expected_period_s)
        self.on_change: list[Callable[[dict[str, Any]], None]] = []
        self.recorders: list[Recorder] = []
        self._tracks: dict[str, MeterTrack] = {}
        self._last_received: dict[str, datetime] = {}
        self._open: dict[tuple[str, str], Alert] = {}
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self._lock = asyncio.Lock()
        self._started_at: datetime | None = None
        self._tasks: list[asyncio.Task[None]] = []
        #: Meters whose stored state could not be read at start (each logged at WARNING).
        self.skipped_at_start = 0

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load open alerts and each meter's recent readings from the store, then start judging."""
        opened, meters, unwatched = await self.store.read(self._load)
        self._open = {(alert.meter_id, alert.kind): alert for alert in opened}
        for meter_id, client_id, site_id, last_seen, samples in meters:
            track = self._tracks[meter_id] = MeterTrack(meter_id, client_id, site_id)
            meter = self.fleet.meter(meter_id)
            for sample in samples:
                track.observe(sample, meter, self.config)
            if meter_id not in unwatched and self._expects(meter_id):
                self._last_received[meter_id] = max(last_seen, self._last_received.get(meter_id, last_seen))
        # A meter gets a whole offline window from now: the consumer's own downtime is not the meter's fault.
        self._started_at = self._clock()
        self._tasks = [
            asyncio.create_task(self._work(), name="alerts-worker"),
            asyncio.create_task(self._watch_offline(), name="alerts-offline"),
        ]
        _LOG.info("alerts: %d open, %d meters tracked", len(self._open), len(self._tracks))

    async def stop(self) -> None:
        """Judge what is queued, then stop. Call before the store closes."""
        if not self._tasks:
            return
        worker = self._tasks[0]
        if not worker.done():
            await self._queue.join()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def _load(self, connection: sqlite3.Connection) -> tuple[list[Alert], list[Any], set[str]]:
        opened = [_alert(row) for row in connection.execute(f"{_SELECT_ALERTS} WHERE state = ?", (OPEN,)).fetchall()]
        meters = []
        # A meter missing from the fleet file and silent for longer than the consumer holds such meters
        # is forgotten (admission.py): no memory for it, however many the store remembers.
        forgotten_before = format_timestamp(self._clock() - FORGET_UNKNOWN_AFTER)
        for meter in connection.execute(
            "SELECT meter_id, client_id, site_id, epoch, last_seen, last_ts FROM meters"
        ).fetchall():
            if not self._expects(meter["meter_id"]) and meter["last_seen"] < forgotten_before:
                continue
            try:
                meters.append(self._load_meter(connection, meter))
            except ValueError as err:
                # A row the consumer cannot read (damaged by hand or by an old version) must not stop the
                # start: the meter is tracked afresh from its next reading.
                self.skipped_at_start += 1
                _LOG.warning(
                    "alerts: skipped meter %r at start, its stored state is unreadable: %s", meter["meter_id"], err
                )
        # Meters whose silence is nobody's concern until they send again: retired ones, and those whose
        # offline alert a person closed.
        unwatched = {
            row[0]
            for row in connection.execute(
                "SELECT meter_id FROM retired_meters JOIN meters USING (meter_id) WHERE last_seen <= retired_at"
                " UNION SELECT alerts.meter_id FROM alerts JOIN alert_handling USING (alert_id)"
                " JOIN meters USING (meter_id) WHERE kind = ? AND closed_by IS NOT NULL AND resolved_at >= last_seen",
                (str(Kind.OFFLINE),),
            )
        }
        return opened, meters, unwatched

    @staticmethod
    def _load_meter(connection: sqlite3.Connection, meter: sqlite3.Row) -> tuple[Any, ...]:
        since = format_timestamp(parse_timestamp(meter["last_ts"]) - LEAK_WINDOW)
        rows = connection.execute(
            "SELECT epoch, seq, ts, pressure_bar, temperature_c, coalesce(real_moles, moles) AS moles, fill_pct,"
            " liquid_state FROM readings"
            " WHERE meter_id = ? AND epoch = ? AND ts >= ? ORDER BY seq DESC LIMIT ?",
            (meter["meter_id"], meter["epoch"], since, LEAK_MAX_READINGS),
        ).fetchall()
        samples = [
            Sample(
                row["epoch"],
                row["seq"],
                parse_timestamp(row["ts"]),
                row["pressure_bar"],
                row["temperature_c"],
                row["moles"],
                row["fill_pct"],
                row["liquid_state"],
            )
            for row in reversed(rows)
        ]
        last_seen = parse_timestamp(meter["last_seen"])
        return meter["meter_id"], meter["client_id"], meter["site_id"], last_seen, samples

    # -- readings ------------------------------------------------------------------------------------------

    def _expects(self, meter_id: str) -> bool:
        """Whether the meter's silence is an alert: listed in the fleet file, or any meter with no fleet file.

        A meter missing from a fleet file is nobody's bottle: nobody expects it to report, so it never
        opens an offline alert (and a peer minting ids cannot open thousands of them).
        """
        return not self.fleet.meters or self.fleet.meter(meter_id) is not None

    def forget(self, meter_ids: Iterable[str]) -> None:
        """Release what the engine holds for meters the consumer forgot (admission.UnknownMeters)."""
        for meter_id in meter_ids:
            self._tracks.pop(meter_id, None)
            self._last_received.pop(meter_id, None)

    @property
    def tracked(self) -> int:
        """Meters the engine holds memory for (history or arrival times)."""
        return len(self._tracks.keys() | self._last_received.keys())

    def on_stored(self, event: StoredEvent) -> None:
        """The intake's listener: note the arrival (for offline) and queue the reading to be judged."""
        meter_id = event.reading.meter_id
        previous = self._last_received.get(meter_id)
        silent_s = (event.received_at - previous).total_seconds() if previous is not None else None
        if (previous is None or event.received_at > previous) and self._expects(meter_id):
            self._last_received[meter_id] = event.received_at
        self._queue.put_nowait(_Queued(event, silent_s))

    async def flush(self) -> None:
        """Wait until every reading queued so far has been judged (and its changes committed)."""
        await self._queue.join()

    @property
    def backlog(self) -> int:
        """Readings queued and not yet judged."""
        return self._queue.qsize()

    async def _work(self) -> None:
        while True:
            queued = await self._queue.get()
            try:
                async with self._lock:
                    await self._evaluate(queued)
            except Exception:  # one bad reading (or a store error) must not stop the judging of the others
                _LOG.exception("alerts: could not judge reading of %s", queued.event.reading.meter_id)
            finally:
                self._queue.task_done()

    async def _evaluate(self, queued: _Queued) -> None:
        event = queued.event
        meter_id = event.reading.meter_id
        track = self._tracks.get(meter_id)
        if track is None:
            track = self._tracks[meter_id] = MeterTrack(meter_id)
        track.client_id, track.site_id = event.enrichment.client_id, event.enrichment.site_id
        changes: list[AlertChange] = []
        offline = self._open.get((meter_id, Kind.OFFLINE))
        if offline is not None:
            silent = f"{queued.silent_s:.0f} s" if queued.silent_s is not None else "a while"
            at = format_timestamp(event.received_at)
            changes.append(self._resolve(offline, queued.silent_s, f"reading received after {silent} of silence", at))
        observation = track.observe(Sample.of(event), event.meter, self.config)
        if observation is not None:
            at = format_timestamp(event.reading.ts)
            for kind, check in judge(observation).items():
                change = self._decide(track, kind, check, at)
                if change is not None:
                    changes.append(change)
        if changes:
            await self._commit(changes)

    def _decide(self, track: MeterTrack, kind: Kind, check: Check, at: str) -> AlertChange | None:
        current = self._open.get((track.meter_id, kind))
        if check.verdict is Verdict.TRIP:
            if current is None:
                return self._open_alert(track, kind, check.value, check.message, at)
            updated = replace(
                current,
                value=check.value,
                message=check.message,
                updated_at=max(at, current.updated_at),
                occurrences=current.occurrences + 1,
            )
            return AlertChange(ChangeEvent.UPDATED, updated)
        if current is not None:
            return self._resolve(current, check.value, check.message, at)
        return None

    @staticmethod
    def _open_alert(track: MeterTrack, kind: Kind, value: float | None, message: str, at: str) -> AlertChange:
        alert = Alert(
            alert_id=f"{track.meter_id}:{kind}:{at}",
            meter_id=track.meter_id,
            client_id=track.client_id,
            site_id=track.site_id,
            kind=str(kind),
            severity=SEVERITY[kind],
            state=OPEN,
            message=message,
            value=value,
            opened_at=at,
            updated_at=at,
            resolved_at=None,
            occurrences=1,
        )
        return AlertChange(ChangeEvent.OPENED, alert)

    @staticmethod
    def _resolve(alert: Alert, value: float | None, message: str, at: str) -> AlertChange:
        at = max(at, alert.opened_at)  # a meter clock that stepped back must not resolve before opening
        resolved = replace(alert, state=RESOLVED, value=value, message=message, updated_at=at, resolved_at=at)
        return AlertChange(ChangeEvent.RESOLVED, resolved)

    async def _commit(
        self, changes: list[AlertChange], also: Callable[[sqlite3.Connection], None] | None = None
    ) -> None:
        """Record the changes (and ``also``'s writes) in one transaction, then tell the listeners."""
        payloads = [change.as_dict() for change in changes]

        def write(connection: sqlite3.Connection) -> None:
            if also is not None:
                also(connection)
            for change, payload in zip(changes, payloads, strict=True):
                _save(connection, change.alert)
                for recorder in self.recorders:
                    recorder(connection, payload)

        await self.store.write(write)
        for change in changes:
            key = (change.alert.meter_id, change.alert.kind)
            if change.alert.state == OPEN:
                self._open[key] = change.alert
            else:
                self._open.pop(key, None)
            if change.event is not ChangeEvent.UPDATED:
                log = _LOG.warning if change.event is ChangeEvent.OPENED else _LOG.info
                log(
                    "alert %s: %s %s (%s) %s",
                    str(change.event).removeprefix("alert."),
                    change.alert.meter_id,
                    change.alert.kind,
                    change.alert.severity,
                    change.alert.message,
                )
        for payload in payloads:
            for listener in self.on_change:
                listener(payload)

    # -- what people do ------------------------------------------------------------------------------------

    async def acknowledge(self, alert_id: str, *, client_id: str | None, by: str) -> dict[str, Any] | None:
        """Mark an open alert as seen by ``by``: it stays open, and webhooks hear of it again only when it ends.

        None when no such alert is visible to ``client_id`` (None: an administrator); AlertNotOpen when it
        is resolved. Acknowledging again changes nothing: the first acknowledgement stands.
        """
        async with self._lock:
            alert = await self._find(alert_id, client_id)
            if alert is None:
                return None
            if alert.state != OPEN:
                raise AlertNotOpen(alert.alert_id, "acknowledged")
            if alert.acknowledged_at is not None:
                return alert.as_dict()
            at = format_timestamp(self._clock())
            seen = replace(alert, acknowledged_at=at, acknowledged_by=by, updated_at=max(at, alert.updated_at))
            await self._commit([AlertChange(ChangeEvent.ACKNOWLEDGED, seen)])
            return seen.as_dict()

    async def close(self, alert_id: str, *, client_id: str | None, by: str) -> dict[str, Any] | None:
        """Resolve an open alert by hand (None and AlertNotOpen as ``acknowledge``).

        If its condition still holds, the next reading that trips the rule opens a new alert; a closed
        offline alert is not opened again until its meter has sent a reading (a person saw the silence).
        """
        async with self._lock:
            alert = await self._find(alert_id, client_id)
            if alert is None:
                return None
            if alert.state != OPEN:
                raise AlertNotOpen(alert.alert_id, "closed")
            change = self._closed(alert, by, format_timestamp(self._clock()))
            await self._commit([change])
            if alert.kind == Kind.OFFLINE:
                self._last_received.pop(alert.meter_id, None)
            return change.alert.as_dict()

    async def retire(self, meter_id: str, *, by: str) -> str:
        """Take a meter out of service: its open alerts close and its silence is no longer watched.

        Recorded in ``retired_meters`` with the time (returned) in the same transaction as the closures.
        A reading received later brings the meter back (``docs/alerts.md``).
        """
        async with self._lock:
            at = format_timestamp(self._clock())
            changes = [self._closed(alert, by, at) for (owner, _kind), alert in self._open.items() if owner == meter_id]

            def record(connection: sqlite3.Connection) -> None:
                connection.execute(
                    "INSERT INTO retired_meters (meter_id, retired_at, retired_by) VALUES (?, ?, ?)"
                    " ON CONFLICT (meter_id) DO UPDATE SET retired_at = excluded.retired_at,"
                    " retired_by = excluded.retired_by",
                    (meter_id, at, by),
                )

            await self._commit(changes, also=record)
            self._last_received.pop(meter_id, None)
            _LOG.info("meter %s retired by %s (%d open alert(s) closed)", meter_id, by, len(changes))
            return at

    async def _find(self, alert_id: str, client_id: str | None) -> Alert | None:
        alert = next((a for a in self._open.values() if a.alert_id == alert_id), None)
        if alert is None:
            row = await self.store.read(
                lambda connection: connection.execute(f"{_SELECT_ALERTS} WHERE alert_id = ?", (alert_id,)).fetchone()
            )
            alert = _alert(row) if row is not None else None
        if alert is None or (client_id is not None and alert.client_id != client_id):
            return None
        return alert

    @staticmethod
    def _closed(alert: Alert, by: str, at: str) -> AlertChange:
        at = max(at, alert.opened_at)
        closed = replace(alert, state=RESOLVED, updated_at=max(at, alert.updated_at), resolved_at=at, closed_by=by)
        return AlertChange(ChangeEvent.CLOSED, closed)

    # -- silence -------------------------------------------------------------------------------------------

    async def _watch_offline(self) -> None:
        while True:
            await asyncio.sleep(self._offline_check_s)
            try:
                await self.evaluate_offline(self._clock())
            except Exception:  # the next tick tries again; a failed check must not end the timer
                _LOG.exception("alerts: offline check failed")

    async def evaluate_offline(self, now: datetime) -> None:
        """Open an offline alert for every registered meter silent longer than the offline window."""
        async with self._lock:
            changes = []
            at = format_timestamp(now)
            for meter_id, last in self._last_received.items():
                if (meter_id, Kind.OFFLINE) in self._open:
                    continue
                since = max(last, self._started_at) if self._started_at is not None else last
                if now - since <= self.offline_after:
                    continue
                track = self._tracks.get(meter_id) or MeterTrack(meter_id)
                silent_s = (now - last).total_seconds()
                # A text that stays true while the alert is open (the dashboard counts the silence as it shows
                # it): "since" a moment, not "for" a duration measured once.
                message = (
                    f"no reading since {format_timestamp(last)} (expected every {self.config.expected_period_s:g} s,"
                    f" offline after {self.offline_after.total_seconds():g} s)"
                )
                changes.append(self._open_alert(track, Kind.OFFLINE, silent_s, message, at))
            if changes:
                await self._commit(changes)

    # -- reading alerts back ----------------------------------------------------------------------------------

    def open_counts(self) -> dict[str, int]:
        """Open alerts by kind (every kind present, zero included), for metrics."""
        counts = {str(kind): 0 for kind in Kind}
        for _meter_id, kind in self._open:
            counts[kind] += 1
        return counts

    def open_by_meter(self) -> dict[str, int]:
        """Open alerts per meter, for the fleet table."""
        counts: dict[str, int] = {}
        for meter_id, _kind in self._open:
            counts[meter_id] = counts.get(meter_id, 0) + 1
        return counts

    async def list_alerts(
        self,
        *,
        client_id: str | None = None,
        state: str | None = None,
        meter_id: str | None = None,
        limit: int = 500,
    ) -> list[dict[str, Any]]:
        """Alerts, newest opened first, filtered by client, state and meter (None: any)."""
        conditions, parameters = [], []
        for column, wanted in (("client_id", client_id), ("state", state), ("meter_id", meter_id)):
            if wanted is not None:
                conditions.append(f"{column} = ?")
                parameters.append(wanted)
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        query = f"{_SELECT_ALERTS}{where} ORDER BY opened_at DESC, alert_id LIMIT ?"

        def select(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = connection.execute(query, (*parameters, limit)).fetchall()
            return [_alert(row).as_dict() for row in rows]

        return await self.store.read(select)


# -- shipping to Elasticsearch -------------------------------------------------------------------------------


def to_alert_document(alert: Alert) -> dict[str, Any]:
    """The Elasticsearch document of an alert (fields as in the alerts index template).

    ``@timestamp`` is the last change, so an alert that is still changing stays in the dashboard's window.
    """
    document: dict[str, Any] = {
        "@timestamp": alert.updated_at,
        "alert_id": alert.alert_id,
        "meter_id": alert.meter_id,
        "kind": alert.kind,
        "state": alert.state,
        "severity": alert.severity,
        "message": alert.message,
        "opened_at": alert.opened_at,
        "updated_at": alert.updated_at,
        "occurrences": alert.occurrences,
    }
    optional = {
        "client_id": alert.client_id,
        "site": alert.site_id,
        "value": alert.value,
        "resolved_at": alert.resolved_at,
        "acknowledged_at": alert.acknowledged_at,
        "acknowledged_by": alert.acknowledged_by,
        "closed_by": alert.closed_by,
    }
    document.update({name: value for name, value in optional.items() if value is not None})
    return document


def alert_document_id(alert: Alert, revision: int) -> str:
    """The ``_id`` of one version of an alert: a replay of that version is answered 409, a change is new."""
    return f"{alert.alert_id}:{revision}"


class AlertSource:
    """Alerts from the store, shipped to the alerts data stream: each change is a document of its own.

    A data stream is append-only, so the alerts stream is the history of every alert: each version is a
    document with ``_id`` = ``{alert_id}:{revision}`` (the latest ``updated_at`` per ``alert_id`` is the
    current state). The shipping key is the alert's ``revision``: a change made while a batch is in
    flight raises it, so confirming the old version never marks the new one shipped. Alerts are kept
    (``prune`` removes none).
    """

    name = "alerts"

    def __init__(self, store: ReadingStore, *, index: str = "smartgas-alerts") -> None:
        self.store = store
        self.index = index

    async def pending(self, limit: int) -> list[Shipment]:
        def select(connection: sqlite3.Connection) -> list[Shipment]:
            rows = connection.execute(
                f"SELECT revision, {_ALERT_COLUMNS}, {_HANDLING_COLUMNS} FROM alerts"
                " LEFT JOIN alert_handling USING (alert_id) WHERE ship_state = ? ORDER BY revision LIMIT ?",
                (ShipState.PENDING, limit),
            ).fetchall()
            shipments = []
            for row in rows:
                values = dict(row)
                revision = values.pop("revision")
                alert = Alert(**values)
                shipments.append(Shipment(revision, alert_document_id(alert, revision), to_alert_document(alert)))
            return shipments

        return await self.store.read(select)

    async def mark_shipped(self, shipments: list[Shipment], at: datetime) -> None:
        shipped_at = format_timestamp(at)

        def update(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "UPDATE alerts SET ship_state = ?, shipped_at = ? WHERE revision = ? AND ship_state = ?",
                [(ShipState.SHIPPED, shipped_at, s.key, ShipState.PENDING) for s in shipments],
            )

        await self.store.write(update)

    async def dead_letter(self, refusals: list[Refusal], at: datetime) -> None:
        failed_at = format_timestamp(at)

        def update(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "UPDATE alerts SET ship_state = ?, shipped_at = ?, ship_status = ?, ship_reason = ?"
                " WHERE revision = ? AND ship_state = ?",
                [
                    (ShipState.DEAD_LETTERED, failed_at, r.status, r.reason, r.shipment.key, ShipState.PENDING)
                    for r in refusals
                ],
            )

        await self.store.write(update)

    async def prune(self, now: datetime) -> int:
        return 0
