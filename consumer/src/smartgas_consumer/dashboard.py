"""The consumer's built-in dashboard: a static page, its script and stylesheet, and server-rendered charts.

``/dashboard/`` serves ``assets/dashboard/index.html``; the page's own script (``dashboard.js``) reads the
API key from the URL fragment (``#key=...``, which browsers never send to a server) or from the browser's
storage, and sends it as ``X-API-Key`` on every request to ``/api``. The charts come from
``/dashboard/api/meters/{meter_id}/chart.svg``, rendered by ``chart.py`` under the same key and the same
visibility as the API: another client's meter answers 404, as a meter that does not exist. A chart's value
axis runs from 0 to the bottle's full content or nominal pressure (from the fleet file), or over the
readings alone when the user picks that; its line breaks where readings are more than ``GAP_PERIODS``
expected periods apart. The real-gas content chart also draws the forecast (dashed, down towards the
reserve, ``forecast.py``) and a line at each refill recorded in the window.

Every response carries a strict Content-Security-Policy: scripts and styles from this origin only, no inline
script, no framing. The assets are read from the package once, when the router is built.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time.
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import RedirectResponse, Response

from smartgas_consumer.api import caller_dependency, window_dependency
from smartgas_consumer.auth import ApiKeys, Principal
from smartgas_consumer.chart import render_line_chart
from smartgas_consumer.fleet import FleetMeter, full_moles
from smartgas_consumer.queries import FleetQueries, Window
from smartgas_consumer.store import parse_timestamp

_LOG = logging.getLogger(__name__)

PREFIX = "/dashboard"
#: The page's policy: everything from this origin, nothing inline, nothing from elsewhere, never framed.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
#: A chart opened on its own may draw, and do nothing else.
CHART_POLICY = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'self'"
#: The newest readings drawn in one chart (the query's LIMIT): a window that holds more shows its latest ones.
CHART_READINGS = 2000
#: Readings more than this many expected periods apart are not joined by the line: the meter was silent
#: (the same distance beyond which the alert rules stop comparing consecutive readings).
GAP_PERIODS = 3.0
#: The forecast line reaches ahead as far as the readings reach back, and at least this far.
FORECAST_MIN_HORIZON = timedelta(minutes=1)
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


@dataclass(frozen=True, slots=True)
class Measure:
    """A chartable measurement: its column in the readings, its title and unit, and its whole scale.

    ``full_range_fn``: the axis a full bottle spans, from the fleet file's entry (None for a meter missing
    from it: from 0 to the readings); None for a measure with no natural scale (temperature).
    """

    name: str
    title: str
    unit: str
    full_range_fn: Callable[[FleetMeter | None], tuple[float, float]] | None


MEASURES: tuple[Measure, ...] = (
    Measure("real_moles", "Gas left (real gas)", "mol", lambda meter: (0.0, full_moles(meter) if meter else 0.0)),
    Measure("moles", "Gas left", "mol", lambda meter: (0.0, full_moles(meter) if meter else 0.0)),
    Measure("pressure_bar", "Pressure", "bar", lambda meter: (0.0, meter.nominal_pressure_bar if meter else 0.0)),
    Measure("fill_pct", "Fill", "%", lambda _meter: (0.0, 100.0)),
    Measure("temperature_c", "Temperature", "°C", None),
)
MeasureName = Literal["real_moles", "moles", "pressure_bar", "fill_pct", "temperature_c"]
#: ``bottle``: from 0 to full (or nominal pressure); ``data``: fitted to the readings, to see their detail.
Scale = Literal["bottle", "data"]
_BY_NAME = {measure.name: measure for measure in MEASURES}


@dataclass(frozen=True, slots=True)
class Asset:
    """A file as served: its bytes and their media type."""

    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """Every file of ``assets/dashboard``, by name, as shipped in the package."""
    folder = resources.files("smartgas_consumer") / "assets" / "dashboard"
    assets = {}
    for entry in folder.iterdir():
        suffix = entry.name[entry.name.rfind(".") :]
        if entry.is_file() and suffix in _CONTENT_TYPES:
            assets[entry.name] = Asset(entry.read_bytes(), _CONTENT_TYPES[suffix])
    return assets


def build_dashboard_router(queries: FleetQueries, api_keys: ApiKeys, *, expected_period_s: float) -> APIRouter:
    """The dashboard's routes, for ``build_app(..., dashboard=...)``; a chart's gaps from ``expected_period_s``."""
    max_gap = timedelta(seconds=GAP_PERIODS * expected_period_s)
    assets = load_assets()
    page = assets.pop("index.html")
    router = APIRouter(prefix=PREFIX)
    caller = caller_dependency(api_keys)
    window = window_dependency(queries)

    @router.get("", include_in_schema=False)
    async def bare() -> RedirectResponse:
        return RedirectResponse(url=f"{PREFIX}/")

    @router.get("/", include_in_schema=False)
    async def index() -> Response:
        return _respond(page, PAGE_POLICY)

    @router.get(
        "/api/meters/{meter_id}/chart.svg",
        summary="A meter's measurement over time, as an SVG line chart",
        responses={
            200: {"content": {"image/svg+xml": {}}, "description": "the chart"},
            401: {"description": "Missing or invalid X-API-Key"},
            404: {"description": "No such meter (or not yours)"},
            429: {"description": "Too many invalid keys from this address; retry after Retry-After seconds"},
        },
    )
    async def chart(
        meter_id: str,
        who: Annotated[Principal, Depends(caller)],
        span: Annotated[Window, Depends(window)],
        measure: Annotated[MeasureName, Query(description="what to draw")] = "moles",
        scale: Annotated[
            Scale, Query(description="value axis: bottle = from 0 to full or nominal pressure; data = the readings")
        ] = "bottle",
    ) -> Response:
        readings = await queries.readings(who.client_id, meter_id, span, CHART_READINGS)
        if readings is None:
            raise HTTPException(status_code=404, detail=f"meter {meter_id} not found")
        shown = _BY_NAME[measure]
        points = chart_points(readings, measure)
        full = shown.full_range_fn
        projection: list[tuple[datetime, float]] = []
        events: list[tuple[datetime, str]] = []
        if measure == "real_moles":
            described = await queries.meter(who.client_id, meter_id)
            forecast = described["forecast"] if described is not None else None
            if forecast is not None and points:
                projection = forecast_line(points, forecast)
            events = [
                (parse_timestamp(r["ts"]), f"refill: {r['content_before_mol']:.0f} → {r['content_after_mol']:.0f} mol")
                for r in await queries.refills(who.client_id, meter_id, span.bounds()[0]) or []
            ]
        svg = render_line_chart(
            points,
            title=shown.title,
            unit=shown.unit,
            description=f"{shown.title} of {meter_id} ({shown.unit})",
            value_range=full(queries.fleet.meter(meter_id)) if full is not None and scale == "bottle" else None,
            max_gap=max_gap,
            projection=projection,
            events=events,
        )
        return _respond(Asset(svg.encode("utf-8"), "image/svg+xml"), CHART_POLICY)

    @router.get("/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        found = assets.get(name)
        if found is None:
            raise HTTPException(status_code=404, detail="not found")
        return _respond(found, PAGE_POLICY)

    return router


def _respond(asset: Asset, policy: str) -> Response:
    return Response(
        content=asset.body,
        media_type=asset.content_type,
        headers={
            "Content-Security-Policy": policy,
            # The same framing rule for browsers that predate frame-ancestors.
            "X-Frame-Options": "SAMEORIGIN" if policy == CHART_POLICY else "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


def forecast_line(points: list[tuple[datetime, float]], forecast: dict[str, Any]) -> list[tuple[datetime, float]]:
    """The forecast from the latest reading down to the reserve, cut where it would reach further ahead than
    the readings reach back (at least FORECAST_MIN_HORIZON): a bottle weeks from empty would otherwise
    squeeze its readings into a sliver at the left of the chart."""
    if forecast["days_to_empty"] is None or forecast["consumption_mol_per_day"] is None:
        return []
    ts, content_mol = max(points)
    per_day = forecast["consumption_mol_per_day"]
    horizon = max(ts - min(points)[0], FORECAST_MIN_HORIZON)
    days = min(forecast["days_to_empty"], horizon / timedelta(days=1))
    return [(ts, content_mol), (ts + timedelta(days=days), content_mol - per_day * days)]


def chart_points(readings: list[dict[str, Any]], measure: str) -> list[tuple[datetime, float]]:
    """(time, value) of each reading; a row whose timestamp cannot be read is left out, and logged."""
    points = []
    for row in readings:
        if row[measure] is None:
            continue
        try:
            points.append((parse_timestamp(row["ts"]), float(row[measure])))
        except ValueError as err:
            _LOG.warning("chart: skipped a stored reading (seq %s) whose timestamp is unreadable: %s", row["seq"], err)
    return points
