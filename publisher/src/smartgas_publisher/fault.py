"""Faults a meter can be told to simulate (``--inject KIND:METER_ID``), each meant to raise one consumer alert.

A fault is one row of parameters that bend the bottle model (``model.py``) at fixed points: how full the
bottle starts, whether the site draws from it, what it loses besides, the gas temperature, one glitched
reading, whether an empty bottle is swapped, and when the meter falls silent. ``NO_FAULT`` is the healthy
row; ``FAULTS`` holds the others, one per kind. Pure, no I/O.

The magnitudes cross the consumer's alert thresholds, at their defaults, by a wide margin (the publisher
README gives the numbers):

==================  ================  ==================================================================
kind                consumer alert    its rule
==================  ================  ==================================================================
over-pressure       over_pressure     pressure above 110 % of the nominal filling pressure (330 bar if
                                      the meter is missing from the fleet file)
over-temperature    over_temperature  temperature above 55 °C
low-content         low_content       fill under 10 % (moles now / moles at nominal pressure and 15 °C)
leak                leak              moles falling faster than 3 × draw_mol_per_h, or faster than
                                      0.5 mol/h while the site is idle
offline             offline           no reading for 3 expected periods
sensor-fault        sensor_fault      a jump of more than 50 bar or 25 °C between consecutive readings
==================  ================  ==================================================================
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    """How one kind of fault bends the bottle model; the defaults are a healthy meter."""

    kind: str
    #: The consumer alert this fault is meant to raise, as the consumer names its kind.
    alert: str
    #: What the meter then does, in a line (for the log).
    effect: str
    #: The bottle starts at a fill fraction drawn from this range (None: the model's healthy 30-100 %)...
    start_fill_fraction: tuple[float, float] | None = None
    #: ...but with at least this pressure at 15 °C, bar.
    start_min_pressure_bar: float = 0.0
    #: Whether the site draws gas from the bottle in its working hours.
    draws: bool = True
    #: Gas lost at every hour besides the draw, in multiples of the bottle's draw_mol_per_h...
    extra_loss_draws: float = 0.0
    #: ...and at least this much, mol/h, whenever extra_loss_draws is set (a bottle may draw nothing).
    extra_loss_min_mol_per_h: float = 0.0
    #: The gas is held at this temperature, °C (plus the usual noise), instead of the daily cycle.
    temperature_c: float | None = None
    #: The reading with this seq reports the gas this much warmer, °C (the pressure follows, so the gas
    #: content computed from the reading stays right); the next reading is normal again.
    glitch_seq: int | None = None
    glitch_temperature_c: float = 0.0
    #: Whether a nearly empty bottle is swapped for a full one.
    swaps_when_empty: bool = True
    #: The meter sends this many readings, then none (it stays up, silent).
    silent_after: int | None = None

    def extra_loss_mol_per_h(self, draw_mol_per_h: float) -> float:
        """The loss besides the draw, mol/h, for a bottle that normally draws ``draw_mol_per_h``."""
        if self.extra_loss_draws == 0:
            return 0.0
        return max(self.extra_loss_draws * draw_mol_per_h, self.extra_loss_min_mol_per_h)


NO_FAULT = Fault(kind="none", alert="none", effect="healthy")

FAULTS: tuple[Fault, ...] = (
    Fault(
        kind="over-pressure",
        alert="over_pressure",
        effect="over-filled bottle, 360 bar at 15 °C (113-180 % of nominal content), not drawn from",
        # 360 bar at 15 °C stays above 110 % of a 300 bar bottle and above the consumer's absolute 330 bar
        # for meters it does not know down to -9 °C (the coldest daily cycle is +4 °C), and under the
        # physics envelope's 400 bar up to the warmest (about +27 °C), so the consumer computes its content.
        start_fill_fraction=(1.0, 1.0),
        start_min_pressure_bar=360.0,
        draws=False,
    ),
    Fault(
        kind="over-temperature",
        alert="over_temperature",
        effect="gas held at 65 °C; the pressure follows the gas's physics",
        # 65 °C: well above the consumer's 55 °C limit, and inside the physics envelope (up to 70 °C with
        # the 0.2 °C noise), so the consumer still computes the bottle's real content.
        temperature_c=65.0,
        # At 65 °C a bottle above about 95 % full is over-pressure too (P grows with T); starting at most
        # 80 % full keeps that second alert away until the bottle is swapped for a full one.
        start_fill_fraction=(0.3, 0.8),
    ),
    Fault(
        kind="low-content",
        alert="low_content",
        effect="bottle starts 7-9 % full and is never swapped",
        start_fill_fraction=(0.07, 0.09),
        swaps_when_empty=False,
    ),
    Fault(
        kind="leak",
        alert="leak",
        effect="loses 10 × draw_mol_per_h (at least 5 mol/h) at every hour, working or idle",
        extra_loss_draws=10.0,
        extra_loss_min_mol_per_h=5.0,
    ),
    Fault(
        kind="offline",
        alert="offline",
        effect="sends 2 readings, then stays silent",
        silent_after=2,
    ),
    Fault(
        kind="sensor-fault",
        alert="sensor_fault",
        effect="reading seq 2 reports the gas 30 °C colder (pressure follows), seq 3 is normal again",
        # Downwards: the daily cycle never goes above 27 °C, so +30 °C could cross 55 °C and raise an
        # over-temperature alert as well. Pressure moves about 11 %, well under the 50 bar jump rule.
        glitch_seq=2,
        glitch_temperature_c=-30.0,
    ),
)

FAULT_BY_KIND = {fault.kind: fault for fault in FAULTS}


@dataclass(frozen=True)
class Injection:
    """One ``--inject KIND:METER_ID``: a fault and the meter that simulates it."""

    fault: Fault
    meter_id: str

    def __str__(self) -> str:
        return f"{self.fault.kind}:{self.meter_id}"


def parse_injection(text: str) -> Injection:
    """``KIND:METER_ID`` into an Injection; ValueError naming the unknown kind or the bad spelling."""
    kind, separator, meter_id = text.strip().partition(":")
    kind, meter_id = kind.strip(), meter_id.strip()
    if not separator or not kind or not meter_id:
        raise ValueError(f"must be KIND:METER_ID, got {text!r}")
    fault = FAULT_BY_KIND.get(kind)
    if fault is None:
        raise ValueError(f"unknown fault {kind!r} in {text!r}; known: {', '.join(FAULT_BY_KIND)}")
    return Injection(fault, meter_id)
