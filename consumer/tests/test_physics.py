"""Unit tests of the ideal-gas computation, with the issue's vectors and property checks."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smartgas_consumer import physics

pressures = st.floats(min_value=0.0, max_value=1000.0)
temperatures = st.floats(min_value=-200.0, max_value=500.0)
volumes = st.floats(min_value=0.01, max_value=1000.0)


def test_250_bar_25_c_50_l() -> None:
    # 250e5 Pa × 0.05 m³ / (8.314462618 × 298.15 K) = 504.244 mol (the original lab truncated to 504).
    assert physics.moles(250, 25, 50) == pytest.approx(504.2443, abs=1e-3)


def test_200_bar_20_c_25_l() -> None:
    assert physics.moles(200, 20, 25) == pytest.approx(205.1379, abs=1e-3)


def test_result_is_a_float_not_truncated() -> None:
    result = physics.moles(250, 25, 50)
    assert isinstance(result, float)
    assert result != int(result)


def test_empty_bottle_holds_no_gas() -> None:
    assert physics.moles(0, 15, 50) == 0.0


@pytest.mark.parametrize(
    ("pressure_bar", "temperature_c", "volume_l"),
    [
        (-1, 20, 50),
        (200, -273.15, 50),
        (200, -300, 50),
        (200, 20, 0),
        (math.nan, 20, 50),
        (200, math.inf, 50),
    ],
)
def test_impossible_inputs_are_refused(pressure_bar: float, temperature_c: float, volume_l: float) -> None:
    with pytest.raises(ValueError):
        physics.moles(pressure_bar, temperature_c, volume_l)


@given(pressures, pressures, temperatures, volumes)
def test_more_pressure_means_more_gas(p1: float, p2: float, t: float, v: float) -> None:
    low, high = sorted((p1, p2))
    assert physics.moles(low, t, v) <= physics.moles(high, t, v)


@given(pressures, temperatures, temperatures, volumes)
def test_hotter_gas_at_same_pressure_is_less_gas(p: float, t1: float, t2: float, v: float) -> None:
    cold, hot = sorted((t1, t2))
    assert physics.moles(p, hot, v) <= physics.moles(p, cold, v)


@given(pressures, temperatures, volumes)
def test_moles_scale_linearly_with_volume(p: float, t: float, v: float) -> None:
    assert physics.moles(p, t, 2 * v) == pytest.approx(2 * physics.moles(p, t, v), rel=1e-12, abs=1e-12)


@given(st.floats(min_value=-1e6, max_value=1e6))
def test_unit_conversions_round_trip(x: float) -> None:
    assert physics.bar_to_pascal(x) / 1e5 == pytest.approx(x)
    assert physics.litre_to_cubic_metre(x) * 1000 == pytest.approx(x)
    assert physics.celsius_to_kelvin(x) - 273.15 == pytest.approx(x, abs=1e-6)


@given(pressures, temperatures, volumes)
def test_ideal_gas_law_holds_back(p: float, t: float, v: float) -> None:
    n = physics.moles(p, t, v)
    pressure_pa = n * physics.GAS_CONSTANT_J_PER_MOL_K * (t + 273.15) / (v / 1000)
    assert pressure_pa == pytest.approx(p * 1e5, rel=1e-9, abs=1e-6)
