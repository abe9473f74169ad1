"""The simulated gas bottle behind one meter: pure, seeded and reproducible, no I/O.

Each meter watches one bottle of a fixed internal volume with a nominal fill pressure (at 15 °C). Gas is
drawn by a daily profile of UTC hours, with noise: a fleet-file meter draws about its ``draw_mol_per_h``
in its site's working hours (a gentle hump, lowest at the edges) and nothing outside them; an anonymous
meter follows a household-like profile (mornings and evenings, nothing at night). The gas temperature
follows a daily cycle by the meter's clock (UTC). A fleet-file meter's bottle holds a real amount of its
gas, and the meter reports the pressure that amount has at the temperature by the gas's real-gas
physics (``GasModel.pressure_bar``, the shared package's, the very tables the consumer reads), so a
sealed bottle's pressure follows the temperature as a real one does and its real content stays put. An
anonymous meter's gas is unknown to the consumer too: its bottle follows the ideal gas law,
P = n·R·T / V. A bottle starts 30-100 % full (of its real content at its nominal pressure and 15 °C);
below 5 % it is swapped for a full one of the same size. A fault (``fault.py``) may bend each of these
steps.

The pressure is computed from the temperature as reported (rounded) and reported to 1e-6 bar, without
sensor noise: the consumer computes the gas content of every reading and judges leaks by how fast it
falls between consecutive readings, so an idle bottle must come out constant (to about 1e-6 mol), and a
drawn one must fall by what was drawn. Outside the physics envelope (above 400 bar or 70 °C, where the
consumer computes no real content either) the pressure is the envelope edge's, scaled by the ideal law.

All randomness comes from one ``random.Random`` per meter, seeded from ``f"{seed}:{meter_id}"`` (the
site's temperature offset from ``f"{seed}:site:{site_id}"``, so the meters of a site agree), so the same
seed, meter and sequence of clock times give the same readings on every run and machine.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from smartgas_common.const import (
    ENVELOPE_MAX_PRESSURE_BAR,
    ENVELOPE_MAX_TEMPERATURE_C,
    ENVELOPE_MIN_TEMPERATURE_C,
)
from smartgas_publisher.fault import NO_FAULT, Fault
from smartgas_publisher.fleetfile import FleetMeter

if TYPE_CHECKING:
    from smartgas_common.content import GasModel  # imports CoolProp: built by config.py, only with a fleet file

#: Molar gas constant, J/(mol·K) (exact since the 2019 SI redefinition).
GAS_CONSTANT_J_PER_MOL_K = 8.314462618
#: 0 °C in kelvin.
ZERO_CELSIUS_K = 273.15
PASCAL_PER_BAR = 1e5
CUBIC_METRE_PER_LITRE = 1e-3

#: Liquefied gases are filled by mass, not pressure: at most this many kg per litre of the bottle's volume
#: (ADR packing instruction P200: CO2 0.75 kg/L for a 250 bar test pressure; propane 0.42 kg/L). A full
#: liquefied bottle holds this, whatever its ``nominal_pressure_bar`` (its service pressure).
FILLING_RATIO_KG_PER_L = {"co2": 0.75, "propane": 0.42}

#: Internal (water) volumes of common gas bottles, litres.
BOTTLE_VOLUMES_L = (10.0, 13.4, 26.8, 50.0)
#: Nominal fill pressures, bar; the industry states them at 15 °C.
FILL_PRESSURES_BAR = (200.0, 300.0)
FILL_TEMPERATURE_C = 15.0
#: Below this fraction of its full content the bottle counts as empty and is swapped for a full one.
SWAP_BELOW_FILL_FRACTION = 0.05
HOURS_PER_DAY = 24

#: Anonymous meters: relative draw in each UTC hour of the day (1.0 = peak): idle at night, peaks morning
#: and evening.
HOURLY_DRAW_WEIGHTS = (
    0.0, 0.0, 0.0, 0.0, 0.0, 0.1,  # 00-05
    0.6, 1.0, 0.9, 0.5, 0.3, 0.3,  # 06-11
    0.5, 0.4, 0.3, 0.3, 0.4, 0.7,  # 12-17
    1.0, 0.9, 0.6, 0.3, 0.1, 0.0,  # 18-23
)  # fmt: skip
#: Anonymous meters: per meter, the fraction of a full bottle drawn in one hour at peak weight is drawn from this range:
#: with the profile above (about 10.7 peak-hours a day) a bottle lasts roughly 2 to 6 days.
PEAK_DRAW_FRACTION_PER_HOUR = (0.015, 0.04)
#: Fleet-file meters: the shape of a working day, base + peak·sin(π·x) over the working hours (x from 0
#: to 1), scaled to average 1, so the site draws draw_mol_per_h on average, 0.65 to 1.2 of it by hour.
WORKDAY_BASE = 0.7
WORKDAY_PEAK = 0.6
#: Standard deviation of the multiplicative noise on each draw. Even at the peak of the working day, a
#: draw three times draw_mol_per_h (the consumer's leak threshold) is more than 6 standard deviations away.
DRAW_NOISE = 0.25
#: A new installation starts somewhere between these fill levels.
INITIAL_FILL_FRACTION = (0.3, 1.0)

#: Daily temperature cycle: mean, amplitude, hour of the maximum (UTC); each site is offset a little.
MEAN_TEMPERATURE_C = 15.0
DAILY_AMPLITUDE_C = 8.0
WARMEST_HOUR = 16.0
SITE_OFFSET_C = 3.0
TEMPERATURE_NOISE_C = 0.2

#: Reported precision (decimal places); see the module docstring for why the pressure has six.
PRESSURE_DECIMALS = 6
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


def draw_weight_hours(start: datetime, end: datetime, hourly_weights: tuple[float, ...] = HOURLY_DRAW_WEIGHTS) -> float:
    """A profile of 24 UTC-hour weights integrated from ``start`` to ``end``, in weight-hours (0 if end <= start)."""
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    if end <= start:
        return 0.0
    full_days, remainder = divmod(end - start, timedelta(days=1))
    total = full_days * sum(hourly_weights)
    # The rest is under a day: walk it hour boundary by hour boundary (at most 25 steps).
    cursor = start
    stop = start + remainder
    while cursor < stop:
        next_hour = cursor.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        segment_end = min(next_hour, stop)
        total += hourly_weights[cursor.hour] * _hours(segment_end - cursor)
        cursor = segment_end
    return total


def working_hours_weights(start: int, end: int) -> tuple[float, ...]:
    """24 UTC-hour weights for a site working [start, end): 0 outside, a hump averaging 1 inside.

    ``end`` may be 24; ``start > end`` wraps midnight (``[22, 6]`` works 22:00 to 06:00), as the consumer
    reads the fleet file. ``start == end`` never works.
    """
    length = end - start if start <= end else HOURS_PER_DAY - start + end
    shape = [WORKDAY_BASE + WORKDAY_PEAK * math.sin(math.pi * (i + 0.5) / length) for i in range(length)]
    weights = [0.0] * HOURS_PER_DAY
    for i, value in enumerate(shape):
        weights[(start + i) % HOURS_PER_DAY] = value * length / sum(shape)
    return tuple(weights)


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


@dataclass(frozen=True)
class Bottle:
    """The bottle a meter watches and how its site draws from it."""

    volume_l: float
    #: Nominal filling pressure at FILL_TEMPERATURE_C: a full bottle.
    fill_pressure_bar: float
    #: Gas drawn per hour at weight 1.0 of the profile, mol/h.
    draw_mol_per_h: float
    #: 24 weights, one per UTC hour.
    hourly_draw_weights: tuple[float, ...]
    #: Meters of one site share its temperature offset; None for an anonymous meter.
    site_id: str | None = None
    #: The real-gas physics of the bottle's gas; None: an ideal gas (an anonymous meter).
    gas_model: GasModel | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, meter: FleetMeter, gas_model: GasModel | None = None) -> Bottle:
        """The bottle a fleet-file meter describes, drawn in its site's working hours, of ``gas_model``'s gas."""
        return cls(
            volume_l=meter.volume_l,
            fill_pressure_bar=meter.nominal_pressure_bar,
            draw_mol_per_h=meter.draw_mol_per_h,
            hourly_draw_weights=working_hours_weights(*meter.site.working_hours_utc),
            site_id=meter.site.site_id,
            gas_model=gas_model,
        )

    @property
    def liquefied(self) -> bool:
        return self.gas_model is not None and self.gas_model.gas.storage.value == "liquefied"

    @property
    def full_amount_mol(self) -> float:
        """Moles in the full bottle: compressed, at its nominal pressure and 15 °C (the consumer's 100 %
        fill); liquefied, its gas's filling ratio (FILLING_RATIO_KG_PER_L)."""
        if self.gas_model is not None and self.liquefied:
            (fluid, _), *_ = self.gas_model.gas.components
            mass_kg = FILLING_RATIO_KG_PER_L[fluid.name] * self.volume_l
            return mass_kg / self.gas_model.molar_mass_kg_per_mol
        return self.amount_at(self.fill_pressure_bar, FILL_TEMPERATURE_C)

    def amount_at(self, pressure_bar: float, temperature_c: float) -> float:
        """The real amount of the bottle's gas at ``pressure_bar`` and ``temperature_c`` (ideal if unknown);
        for a liquefied gas, whose pressure says nothing of its amount, none (0)."""
        if self.gas_model is None:
            return amount_mol(pressure_bar, temperature_c, self.volume_l)
        if self.liquefied:
            return 0.0
        return self.gas_model.content(pressure_bar, temperature_c, self.volume_l).real_moles

    def pressure_at(self, amount: float, temperature_c: float) -> float:
        """The pressure ``amount`` moles of the bottle's gas have at ``temperature_c``."""
        if self.gas_model is None:
            return pressure_bar(amount, temperature_c, self.volume_l)
        inside_c = min(max(temperature_c, ENVELOPE_MIN_TEMPERATURE_C), ENVELOPE_MAX_TEMPERATURE_C)
        try:
            inside_bar = self.gas_model.pressure_bar(amount, self.volume_l, inside_c)
        except ValueError:  # OutsideEnvelopeError: beyond 400 bar; the ideal law from the envelope's Z
            edge_z = self.gas_model.compressibility(ENVELOPE_MAX_PRESSURE_BAR, inside_c)
            inside_bar = pressure_bar(amount, inside_c, self.volume_l) * edge_z
        return inside_bar * (temperature_c + ZERO_CELSIUS_K) / (inside_c + ZERO_CELSIUS_K)


def random_bottle(rng: random.Random) -> Bottle:
    """An anonymous meter's bottle: a common size and fill pressure, drawn by the household-like profile."""
    volume_l = rng.choice(BOTTLE_VOLUMES_L)
    fill_pressure_bar = rng.choice(FILL_PRESSURES_BAR)
    full_amount_mol = amount_mol(fill_pressure_bar, FILL_TEMPERATURE_C, volume_l)
    peak_draw_mol_per_h = full_amount_mol * rng.uniform(*PEAK_DRAW_FRACTION_PER_HOUR)
    return Bottle(volume_l, fill_pressure_bar, peak_draw_mol_per_h, HOURLY_DRAW_WEIGHTS)


class BottleModel:
    """The bottle a meter watches; ``next_reading`` advances it to a clock time and measures.

    Without ``bottle`` the meter is anonymous and its bottle is drawn at random from the seed.
    """

    def __init__(self, meter_id: str, seed: int, bottle: Bottle | None = None, fault: Fault = NO_FAULT) -> None:
        self.meter_id = meter_id
        self.fault = fault
        self._rng = random.Random(f"{seed}:{meter_id}")
        rng = self._rng
        self.bottle = random_bottle(rng) if bottle is None else bottle
        site_rng = rng if self.bottle.site_id is None else random.Random(f"{seed}:site:{self.bottle.site_id}")
        self._site_offset_c = site_rng.uniform(-SITE_OFFSET_C, SITE_OFFSET_C)
        self.full_amount_mol = self.bottle.full_amount_mol
        self._extra_loss_mol_per_h = fault.extra_loss_mol_per_h(self.bottle.draw_mol_per_h)
        start_fill = rng.uniform(*(fault.start_fill_fraction or INITIAL_FILL_FRACTION))
        self._amount_mol = max(
            self.full_amount_mol * start_fill,
            self.bottle.amount_at(fault.start_min_pressure_bar, FILL_TEMPERATURE_C),
        )
        self._next_seq = 0
        self._last_measured: datetime | None = None
        self.swaps = 0

    @property
    def volume_l(self) -> float:
        return self.bottle.volume_l

    @property
    def fill_pressure_bar(self) -> float:
        return self.bottle.fill_pressure_bar

    @property
    def amount_mol(self) -> float:
        """Gas left in the bottle now, moles."""
        return self._amount_mol

    @property
    def silent_after(self) -> int | None:
        """How many readings the meter sends before it falls silent (the offline fault); None: all."""
        return self.fault.silent_after

    def next_reading(self, now: datetime) -> Reading:
        """Draw the gas used since the previous reading, measure at ``now`` and return the reading.

        ``now`` must be timezone-aware; it is taken to the millisecond, as the reading's ``ts``. A clock
        that steps back draws nothing for that interval.
        """
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("now must be a timezone-aware datetime")
        now = now.astimezone(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        fault = self.fault
        if self._last_measured is not None:
            noise = max(0.0, self._rng.gauss(1.0, DRAW_NOISE))
            weight_hours = draw_weight_hours(self._last_measured, now, self.bottle.hourly_draw_weights)
            drawn_mol = self.bottle.draw_mol_per_h * weight_hours * noise if fault.draws else 0.0
            lost_mol = self._extra_loss_mol_per_h * max(0.0, _hours(now - self._last_measured))
            self._amount_mol = max(0.0, self._amount_mol - drawn_mol - lost_mol)
        base_c = daily_temperature_c(now) + self._site_offset_c if fault.temperature_c is None else fault.temperature_c
        temperature_c = base_c + self._rng.gauss(0.0, TEMPERATURE_NOISE_C)
        if self._next_seq == fault.glitch_seq:
            temperature_c += fault.glitch_temperature_c
        temperature_c = round(temperature_c, TEMPERATURE_DECIMALS)
        if fault.swaps_when_empty and self._amount_mol < SWAP_BELOW_FILL_FRACTION * self.full_amount_mol:
            self._amount_mol = self.full_amount_mol
            self.swaps += 1
        reading = Reading(
            seq=self._next_seq,
            ts=format_timestamp(now),
            pressure_bar=round(self.bottle.pressure_at(self._amount_mol, temperature_c), PRESSURE_DECIMALS),
            temperature_c=temperature_c,
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
