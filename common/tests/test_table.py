"""The tabulated compressibility against CoolProp: bounded interpolation error, refusal outside the envelope."""

import math
import random
from collections.abc import Mapping

import pytest

from smartgas_common.const import (
    ENVELOPE_MAX_PRESSURE_BAR,
    ENVELOPE_MAX_TEMPERATURE_C,
    ENVELOPE_MIN_TEMPERATURE_C,
)
from smartgas_common.content import GasModel
from smartgas_common.eos import EquationOfState
from smartgas_common.gas import BUILTIN_GASES, Storage
from smartgas_common.table import INTERPOLATION_TOLERANCE, OutsideEnvelopeError

COMPRESSED = sorted(name for name, gas in BUILTIN_GASES.items() if gas.storage is Storage.COMPRESSED)
# CoolProp's full flash (with its phase-stability analysis) costs up to 0.3 s a point for a mixture.
POINTS_PURE = 300
POINTS_MIXTURE = 40


@pytest.mark.parametrize("name", COMPRESSED)
def test_interpolation_error_is_bounded_over_the_envelope(name: str, models: Mapping[str, GasModel]) -> None:
    gas = BUILTIN_GASES[name]
    eos = EquationOfState(gas)
    generator = random.Random(f"table-{name}")
    worst = 0.0
    for _ in range(POINTS_PURE if gas.is_pure else POINTS_MIXTURE):
        pressure_bar = generator.uniform(0.5, ENVELOPE_MAX_PRESSURE_BAR)
        temperature_c = generator.uniform(ENVELOPE_MIN_TEMPERATURE_C, ENVELOPE_MAX_TEMPERATURE_C)
        # Against the free flash, so the phase-imposed solve the table was built with is checked too.
        reference = eos.compressibility_free(pressure_bar, temperature_c)
        worst = max(worst, abs(models[name].compressibility(pressure_bar, temperature_c) / reference - 1.0))
    assert worst < INTERPOLATION_TOLERANCE


@pytest.mark.parametrize("name", COMPRESSED)
def test_envelope_corners_and_the_ideal_limit(name: str, models: Mapping[str, GasModel]) -> None:
    model = models[name]
    eos = EquationOfState(BUILTIN_GASES[name])
    assert model.compressibility(0.0, 15.0) == 1.0
    for pressure_bar in (ENVELOPE_MAX_PRESSURE_BAR, 1.0):
        for temperature_c in (ENVELOPE_MIN_TEMPERATURE_C, ENVELOPE_MAX_TEMPERATURE_C):
            expected = eos.compressibility_free(pressure_bar, temperature_c)
            actual = model.compressibility(pressure_bar, temperature_c)
            assert actual == pytest.approx(expected, rel=INTERPOLATION_TOLERANCE)


@pytest.mark.parametrize(
    ("pressure_bar", "temperature_c", "message"),
    [
        (400.5, 15.0, "pressure 400.5 bar is outside 0-400 bar, where the real-gas content of 'argon' is computed"),
        (-0.1, 15.0, "pressure -0.1 bar is outside 0-400 bar"),
        (math.nan, 15.0, "pressure nan bar is outside 0-400 bar"),
        (200.0, -40.5, "temperature -40.5 °C is outside -40-70 °C, where the real-gas content of 'argon' is computed"),
        (200.0, 70.5, "temperature 70.5 °C is outside -40-70 °C"),
        (200.0, math.inf, "temperature inf °C is outside -40-70 °C"),
    ],
)
def test_outside_the_envelope_is_refused_naming_the_bound(
    pressure_bar: float, temperature_c: float, message: str, models: Mapping[str, GasModel]
) -> None:
    with pytest.raises(OutsideEnvelopeError) as caught:
        models["argon"].compressibility(pressure_bar, temperature_c)
    assert str(caught.value).startswith(message)
