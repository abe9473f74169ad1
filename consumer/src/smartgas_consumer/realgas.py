"""The real-gas transform: what a fleet meter's reading means for its gas, beside the ideal-gas ``moles``.

For each reading of a meter listed in the fleet file, the shared physics of the meter's gas
(``smartgas_common.content``: CoolProp's reference equations, tabulated per gas at start) gives:

- compressed gases: the compressibility Z, the real moles, the mass (kg), the volume at ISO 13443
  standard conditions (m³ at 15 °C, 1.01325 bar), and fill % from real content (real moles now over real
  moles at the nominal pressure and 15 °C), so a sealed bottle's fill stays put as the temperature moves;
- liquefied gases: the liquid state (``LiquidState``) and no content from pressure (the vapour pressure
  says nothing of how much liquid is left), then the real content of the remaining gas once the liquid
  is exhausted; no fill %.

A reading outside the physics envelope (``smartgas_common.const``: 0-400 bar, −40…+70 °C) gets no
real-gas fields (null) rather than an extrapolation: the reading itself is still stored and answered.
The models are built once at start (``RealGasPhysics.build``, a few seconds: CoolProp's import and one
table per gas) and then only read, from the event loop's thread. CoolProp is imported there and not at
this module's import, so the commands that never see a reading (``healthcheck``, ``status``, ``setup``)
start without its 2.5 s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from smartgas_common.fleet import Fleet, FleetMeter
from smartgas_common.gas import Storage

if TYPE_CHECKING:
    from smartgas_common.content import GasModel

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RealGas:
    """The real-gas fields of one reading; all None for a meter missing from the fleet file or outside the
    envelope, content None for a liquefied gas while liquid is left."""

    compressibility_z: float | None = None
    real_moles: float | None = None
    mass_kg: float | None = None
    standard_volume_m3: float | None = None
    #: Liquefied gases only: ``liquid_present``, ``liquid_exhausted``, ``over_pressure``, ``supercritical``.
    liquid_state: str | None = None
    #: Compressed gases only: real moles now over real moles at the nominal pressure and 15 °C, in %.
    fill_pct: float | None = None

    def answer_fields(self) -> dict[str, float | str | None]:
        """The fields the 2.04 answer and the stored reading carry (fill % is the reading's own field)."""
        return {
            "compressibility_z": self.compressibility_z,
            "real_moles": self.real_moles,
            "mass_kg": self.mass_kg,
            "standard_volume_m3": self.standard_volume_m3,
            "liquid_state": self.liquid_state,
        }


class LiquidState:
    """The states of a liquefied bottle as stored (``smartgas_common.content.LiquidState``'s values, spelled
    out here so that this module does not import CoolProp)."""

    PRESENT = "liquid_present"
    EXHAUSTED = "liquid_exhausted"
    OVER_PRESSURE = "over_pressure"
    SUPERCRITICAL = "supercritical"


#: A reading the physics has nothing to say about.
NO_REAL_GAS = RealGas()


class RealGasPhysics:
    """The models of every gas the fleet's meters hold, and the transform of one reading."""

    def __init__(self, models: Mapping[str, GasModel]) -> None:
        self._models = models

    @classmethod
    def build(cls, fleet: Fleet) -> RealGasPhysics:
        """One model per gas in use; EquationOfStateError names a gas CoolProp cannot model."""
        started = time.perf_counter()
        if not fleet.meters:
            return cls.empty()
        from smartgas_common.content import build_models  # imports CoolProp: only when there are meters

        models = build_models(fleet.gases_in_use())
        if models:
            _LOG.info(
                "gas physics: %d gas model(s) built in %.2f s (%s)",
                len(models),
                time.perf_counter() - started,
                ", ".join(models),
            )
        return cls(models)

    @classmethod
    def empty(cls) -> RealGasPhysics:
        return cls(MappingProxyType({}))

    def evaluate(self, meter: FleetMeter, pressure_bar: float, temperature_c: float, volume_l: float) -> RealGas:
        """The real-gas fields of a reading of ``meter``; NO_REAL_GAS outside the physics envelope."""
        model = self._models.get(meter.gas.name)
        if model is None:
            return NO_REAL_GAS
        try:
            if meter.gas.storage is Storage.LIQUEFIED:
                status = model.liquefied_status(pressure_bar, temperature_c, volume_l)
                content = status.content
                if content is None:
                    return RealGas(liquid_state=status.state.value)
                return RealGas(
                    content.compressibility,
                    content.real_moles,
                    content.mass_kg,
                    content.standard_volume_m3,
                    status.state.value,
                )
            content = model.content(pressure_bar, temperature_c, volume_l)
            fill_pct = model.fill_percent(pressure_bar, temperature_c, meter.nominal_pressure_bar)
        except ValueError:
            # OutsideEnvelopeError, EquationOfStateError (both ValueErrors): beyond the envelope or the
            # equation's reach. No real-gas fields then, never a failed reading.
            return NO_REAL_GAS
        return RealGas(
            content.compressibility,
            content.real_moles,
            content.mass_kg,
            content.standard_volume_m3,
            None,
            fill_pct,
        )
