"""Cost of the real-gas physics per reading, and the tabulation's error against CoolProp (docs/physics.md).

For every built-in gas: the time to build its model (once per process), the time of one evaluation on
the per-reading path (``content`` for compressed gases, ``liquefied_status`` for liquefied ones) over
random points of the service conditions, CoolProp's own time for the same point, and the largest
relative error of the tabulated Z against CoolProp's full flash over random points of the envelope.

    .venv/bin/python common/bench/bench_physics.py [--evaluations 20000] [--error-points 400] [--seed 1]
"""

import argparse
import random
import time

from smartgas_common.const import ENVELOPE_MAX_PRESSURE_BAR, ENVELOPE_MAX_TEMPERATURE_C, ENVELOPE_MIN_TEMPERATURE_C
from smartgas_common.content import GasModel
from smartgas_common.eos import EquationOfState
from smartgas_common.gas import BUILTIN_GASES, Storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluations", type=int, default=20_000, help="timed evaluations per gas")
    parser.add_argument("--error-points", type=int, default=400, help="random points checked per pure gas")
    parser.add_argument("--mixture-error-points", type=int, default=60, help="per mixture (CoolProp is slow)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    generator = random.Random(args.seed)
    print(f"{'gas':<12} {'build s':>8} {'path µs':>8} {'CoolProp µs':>12} {'max |ΔZ/Z|':>11}")
    for name, gas in BUILTIN_GASES.items():
        started = time.perf_counter()
        model = GasModel.build(gas)
        build_s = time.perf_counter() - started
        eos = EquationOfState(gas)
        # Service conditions, -20..+45 °C: a compressed bottle at 1-300 bar; a liquefied one below its
        # vapour pressure, the slowest path (the exhausted bottle's content from CoolProp, no table).
        if gas.storage is Storage.COMPRESSED:
            points = [(generator.uniform(1.0, 300.0), generator.uniform(-20.0, 45.0)) for _ in range(args.evaluations)]
        else:
            temperatures_c = [generator.uniform(-20.0, min(45.0, eos.critical_temperature_c - 1.0)) for _ in range(200)]
            points = [
                (eos.vapour_pressure_bar(t) * generator.uniform(0.2, 0.85), t)
                for t in (generator.choice(temperatures_c) for _ in range(args.evaluations))
            ]
        started = time.perf_counter()
        if gas.storage is Storage.COMPRESSED:
            for pressure_bar, temperature_c in points:
                model.content(pressure_bar, temperature_c, 50.0)
        else:
            for pressure_bar, temperature_c in points:
                model.liquefied_status(pressure_bar, temperature_c, 50.0)
        path_us = (time.perf_counter() - started) / len(points) * 1e6
        library_points = points[: max(1, len(points) // (100 if gas.is_pure else 1000))]
        started = time.perf_counter()
        for pressure_bar, temperature_c in library_points:
            eos.compressibility_free(pressure_bar, temperature_c)
        library_us = (time.perf_counter() - started) / len(library_points) * 1e6
        error = "-"
        if gas.storage is Storage.COMPRESSED:
            worst = 0.0
            for _ in range(args.error_points if gas.is_pure else args.mixture_error_points):
                pressure_bar = generator.uniform(0.5, ENVELOPE_MAX_PRESSURE_BAR)
                temperature_c = generator.uniform(ENVELOPE_MIN_TEMPERATURE_C, ENVELOPE_MAX_TEMPERATURE_C)
                reference = eos.compressibility_free(pressure_bar, temperature_c)
                worst = max(worst, abs(model.compressibility(pressure_bar, temperature_c) / reference - 1.0))
            error = f"{worst:.1e}"
        print(f"{name:<12} {build_s:>8.2f} {path_us:>8.1f} {library_us:>12.1f} {error:>11}")


if __name__ == "__main__":
    main()
