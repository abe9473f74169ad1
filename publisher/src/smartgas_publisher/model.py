"""The simulated gas bottle behind one meter: pure, seeded and reproducible, no I/O.

Each meter watches one bottle of a fixed internal volume, delivered full at a nominal fill pressure. Gas
is drawn following a daily consumption profile (mornings and evenings, nothing at night) with noise; the
gas temperature follows a daily cycle by the meter's clock (UTC). The meter reports the pressure the ideal
gas law gives, P = n·R·T / V. When the bottle is nearly empty it is swapped for a full one of the same
size.

All randomness comes from one ``random.Random`` per meter, seeded from ``f"{seed}:{meter_id}"``, so the
same seed, meter id and sequence of clock times give the same readings on every run and machine.
"""

import math
import random
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

#: Molar gas constant, J/(mol·K) (exact since the 2019 SI redefinition).
GAS_CONSTANT_J_PER_MOL_K = 8.314462618
#: 0 °C in kelvin.
ZERO_CELSIUS_K = 273.15
PASCAL_PER_BAR = 1e5
CUBIC_METRE_PER_LITRE = 1e-3

#: Internal (water) volumes of common gas bottles, litres.
BOTTLE_VOLUMES_L = (10.0, 13.4, 26.8, 50.0)
#: Nominal fill pressures, bar; the industry states them at 15 °C.
FILL_PRESSURES_BAR = (200.0, 300.0)
FILL_TEMPERATURE_C = 15.0
#: Below this pressure the bottle counts as empty and is swapped for a full one.
REFILL_BELOW_BAR = 5.0

#: Relative draw in each UTC hour of the day (1.0 = peak): idle at night, peaks morning and evening.
HOURLY_DRAW_WEIGHTS = (
    0.0, 0.0, 0.0, 0.0, 0.0, 0.1,  # 00-05
    0.6, 1.0, 0.9, 0.5, 0.3, 0.3,  # 06-11
    0.5, 0.4, 0.3, 0.3, 0.4, 0.7,  # 12-17
    1.0, 0.9, 0.6, 0.3, 0.1, 0.0,  # 18-23
)  # fmt: skip
#: Per meter, the fraction of a full bottle drawn in one hour at peak weight is drawn from this range:
#: with the profile above (about 10.7 peak-hours a day) a bottle lasts roughly 2 to 6 days.
PEAK_DRAW_FRACTION_PER_HOUR = (0.015, 0.04)
#: Standard deviation of the multiplicative noise on each draw.
DRAW_NOISE = 0.25
#: A new installation starts somewhere between these fill levels.
INITIAL_FILL_FRACTION = (0.3, 1.0)

#: Daily temperature cycle: mean, amplitude, hour of the maximum (UTC); each site is offset a little.
MEAN_TEMPERATURE_C = 15.0
DAILY_AMPLITUDE_C = 8.0
WARMEST_HOUR = 16.0
SITE_OFFSET_C = 3.0
TEMPERATURE_NOISE_C = 0.2
#: Standard deviation of the pressure sensor's noise.
PRESSURE_NOISE_BAR = 0.02

#: Reported precision (decimal places).
PRESSURE_DECIMALS = 2
TEMPERATURE_DECIMALS = 2


def pressure_bar(amount_mol: float, temperature_c: float, volume_l: float) -> float:
    """Pressure of ``amount_mol`` of an ideal gas at ``temperature_c`` in ``volume_l``: P = n·R·T / V."""
    temperature_k = temperature_c + ZERO_CELSIUS_K
    volume_m3 = volume_l * CUBIC_METRE_PER_LITRE
    return amount_mol * GAS_CONSTANT_J_PER_MOL_K * temperature_k / volume_m3 / PASCAL_PER_BAR


def amount_mol(pressure_bar: float, temperature_c: float, volume_l: float) -> float:
    """Amount of ideal gas at ``pressure_bar`` and ``temperature_c`` in ``volume_l``: n = P·V / (R·T)."""
    temperature_k = temperature_c + ZERO_CELSIUS_K
    volume_m3 = volume_l * CUBIC_METRE_PER_LITRE
    return pressure_bar * PASCAL_PER_BAR * volume_m3 / (GAS_CONSTANT_J_PER_MOL_K * temperature_k)


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, to the millisecond, as docs/wire-format/reading.schema.json wants."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def daily_temperature_c(moment: datetime) -> float:
    """The cycle without site offset or noise: warmest at WARMEST_HOUR UTC, coldest twelve hours later."""
    hour = _hour_of_day(moment)
    return MEAN_TEMPERATURE_C + DAILY_AMPLITUDE_C * math.cos(2 * math.pi * (hour - WARMEST_HOUR) / 24)


def draw_weight_hours(start: datetime, end: datetime) -> float:
    """The consumption profile integrated from ``start`` to ``end``, in peak-hours (0 if end <= start)."""
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    if end <= start:
        return 0.0
    full_days, remainder = divmod(end - start, timedelta(days=1))
    total = full_days * sum(HOURLY_DRAW_WEIGHTS)
    # The rest is under a day: walk it hour boundary by hour boundary (at most 25 steps).
    cursor = start
    stop = start + remainder
    while cursor < stop:
        next_hour = cursor.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        segment_end = min(next_hour, stop)
        total += HOURLY_DRAW_WEIGHTS[cursor.hour] * _hours(segment_end - cursor)
        cursor = segment_end
    return total


@dataclass(frozen=True)
class Reading:
    """One reading, exactly the body the wire format defines (docs/wire-format.md)."""

    seq: int
    ts: str
    pressure_bar: float
    temperature_c: float
    volume_l: float

    def to_dict(self) -> dict[str, int | float | str]:
        return asdict(self)


class BottleModel:
    """The bottle a meter watches; ``next_reading`` advances it to a clock time and measures."""

    def __init__(self, meter_id: str, seed: int) -> None:
        self.meter_id = meter_id
        self._rng = random.Random(f"{seed}:{meter_id}")
        rng = self._rng
        self.volume_l = rng.choice(BOTTLE_VOLUMES_L)
        self.fill_pressure_bar = rng.choice(FILL_PRESSURES_BAR)
        self._peak_draw_fraction_per_hour = rng.uniform(*PEAK_DRAW_FRACTION_PER_HOUR)
        self._site_offset_c = rng.uniform(-SITE_OFFSET_C, SITE_OFFSET_C)
        self.full_amount_mol = amount_mol(self.fill_pressure_bar, FILL_TEMPERATURE_C, self.volume_l)
        self._amount_mol = self.full_amount_mol * rng.uniform(*INITIAL_FILL_FRACTION)
        self._next_seq = 0
        self._last_measured: datetime | None = None
        self.swaps = 0

    @property
    def amount_mol(self) -> float:
        """Gas left in the bottle now, moles."""
        return self._amount_mol

    def next_reading(self, now: datetime) -> Reading:
        """Draw the gas used since the previous reading, measure at ``now`` and return the reading.

        ``now`` must be timezone-aware. A clock that steps back draws nothing for that interval.
        """
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be a timezone-aware datetime")
        now = now.astimezone(UTC)
        if self._last_measured is not None:
            noise = max(0.0, self._rng.gauss(1.0, DRAW_NOISE))
            drawn_mol = (
                self.full_amount_mol
                * self._peak_draw_fraction_per_hour
                * draw_weight_hours(self._last_measured, now)
                * noise
            )
            self._amount_mol = max(0.0, self._amount_mol - drawn_mol)
        temperature_c = (
            daily_temperature_c(now) + self._site_offset_c + self._rng.gauss(0.0, TEMPERATURE_NOISE_C)
        )
        if pressure_bar(self._amount_mol, temperature_c, self.volume_l) < REFILL_BELOW_BAR:
            self._amount_mol = self.full_amount_mol
            self.swaps += 1
        measured_bar = pressure_bar(self._amount_mol, temperature_c, self.volume_l)
        measured_bar += self._rng.gauss(0.0, PRESSURE_NOISE_BAR)
        reading = Reading(
            seq=self._next_seq,
            ts=format_timestamp(now),
            pressure_bar=round(max(0.0, measured_bar), PRESSURE_DECIMALS),
            temperature_c=round(temperature_c, TEMPERATURE_DECIMALS),
            volume_l=self.volume_l,
        )
        self._next_seq += 1
        self._last_measured = now
        return reading


def _hour_of_day(moment: datetime) -> float:
    moment = moment.astimezone(UTC)
    return moment.hour + moment.minute / 60 + (moment.second + moment.microsecond / 1e6) / 3600


def _hours(delta: timedelta) -> float:
    return delta / timedelta(hours=1)
