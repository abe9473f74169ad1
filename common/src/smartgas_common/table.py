"""Compressibility of one compressed gas, tabulated over the envelope for the per-reading path.

CoolProp costs 10-600 µs a point (``eos.py``); the consumer evaluates every reading at ~2,000 a second.
So Z is computed once per gas and process on a grid — every ``PRESSURE_STEP_BAR`` from 0 to
``ENVELOPE_MAX_PRESSURE_BAR``, every ``TEMPERATURE_STEP_C`` over the envelope's temperatures — and read
back by bilinear interpolation (~2 µs). At 0 bar Z is 1 exactly (every gas is ideal in that limit), and
Z is nearly linear in pressure at low pressure, so the first cell is as good as the others.

The interpolation error is bounded by ``INTERPOLATION_TOLERANCE`` (relative), checked against CoolProp
at random points for every built-in compressed gas (tests/test_table.py); docs/physics.md gives the
measured maxima. Outside the envelope the table refuses instead of extrapolating.
"""

import math
from dataclasses import dataclass

from smartgas_common.const import (
    ENVELOPE_MAX_PRESSURE_BAR,
    ENVELOPE_MAX_TEMPERATURE_C,
    ENVELOPE_MIN_TEMPERATURE_C,
)
from smartgas_common.eos import EquationOfState

PRESSURE_STEP_BAR = 5.0
TEMPERATURE_STEP_C = 2.5
#: The documented bound on |Z_table / Z_CoolProp - 1| over the envelope.
INTERPOLATION_TOLERANCE = 1e-3


class OutsideEnvelopeError(ValueError):
    """A pressure or temperature outside the tabulated envelope; the message names the bound."""


@dataclass(frozen=True)
class CompressibilityTable:
    """Z on a regular pressure × temperature grid; ``rows[i][j]`` is Z at pressure i·step, temperature j."""

    gas_name: str
    rows: tuple[tuple[float, ...], ...]

    @classmethod
    def build(cls, eos: EquationOfState) -> "CompressibilityTable":
        pressure_count = round(ENVELOPE_MAX_PRESSURE_BAR / PRESSURE_STEP_BAR) + 1
        temperature_count = round((ENVELOPE_MAX_TEMPERATURE_C - ENVELOPE_MIN_TEMPERATURE_C) / TEMPERATURE_STEP_C) + 1
        temperatures_c = [ENVELOPE_MIN_TEMPERATURE_C + j * TEMPERATURE_STEP_C for j in range(temperature_count)]
        rows = [tuple(1.0 for _ in temperatures_c)]  # the ideal limit at 0 bar
        for i in range(1, pressure_count):
            pressure_bar = i * PRESSURE_STEP_BAR
            rows.append(tuple(eos.compressibility(pressure_bar, t) for t in temperatures_c))
        return cls(eos.gas.name, tuple(rows))

    def compressibility(self, pressure_bar: float, temperature_c: float) -> float:
        """Z at a point of the envelope, interpolated; OutsideEnvelopeError outside it."""
        if not (math.isfinite(pressure_bar) and 0.0 <= pressure_bar <= ENVELOPE_MAX_PRESSURE_BAR):
            raise OutsideEnvelopeError(
                f"pressure {pressure_bar:g} bar is outside 0-{ENVELOPE_MAX_PRESSURE_BAR:g} bar, "
                f"where the real-gas content of {self.gas_name!r} is computed"
            )
        if not (
            math.isfinite(temperature_c) and ENVELOPE_MIN_TEMPERATURE_C <= temperature_c <= ENVELOPE_MAX_TEMPERATURE_C
        ):
            raise OutsideEnvelopeError(
                f"temperature {temperature_c:g} °C is outside {ENVELOPE_MIN_TEMPERATURE_C:g}"
                f"-{ENVELOPE_MAX_TEMPERATURE_C:g} °C, where the real-gas content of {self.gas_name!r} is computed"
            )
        rows = self.rows
        # Cell indices, clamped so that the upper edge of the envelope uses the last cell.
        x = pressure_bar / PRESSURE_STEP_BAR
        i = min(int(x), len(rows) - 2)
        y = (temperature_c - ENVELOPE_MIN_TEMPERATURE_C) / TEMPERATURE_STEP_C
        j = min(int(y), len(rows[0]) - 2)
        u = x - i
        v = y - j
        low, high = rows[i], rows[i + 1]
        at_j = low[j] + (high[j] - low[j]) * u
        at_j1 = low[j + 1] + (high[j + 1] - low[j + 1]) * u
        return at_j + (at_j1 - at_j) * v
