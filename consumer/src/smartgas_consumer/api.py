"""The consumer's HTTP API (FastAPI, OpenAPI at ``/api/openapi.json``): the fleet, statistics, alerts.

Every ``/api`` route needs an ``X-API-Key`` (``auth.py``): 401 without one or with a bad one, 429 from
an address that sent too many bad ones. A client sees only its own meters, sites and alerts; another
client's meter answers 404 exactly as a meter that does not exist. An administrator key sees everything.
``/metrics`` (Prometheus) and ``/healthz`` need no key and say nothing about any client. Runs in the
consumer's event loop (``HttpServer``), which sets TCP_NODELAY on every accepted connection and adds the
security headers (``SecurityHeaders``) to every response, errors included. Every query parameter is
bounded: a value out of range is a 422 in FastAPI's validation shape, never a 500.
"""

# No `from __future__ import annotations` here: FastAPI reads these annotations at run time, and the
# dependency aliases defined inside build_app must be real objects, not strings.
import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smartgas_consumer.alert_records import AlertNotOpen
from smartgas_consumer.auth import ApiKeys, Principal
from smartgas_consumer.queries import FleetQueries, Window

_LOG = logging.getLogger(__name__)
DEFAULT_WINDOW = timedelta(hours=1)
MAX_WINDOW = timedelta(days=31)
#: The moments a window may name: far from datetime's limits, so no arithmetic on them can overflow.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 1, 1, tzinfo=UTC)
#: Longest meter id accepted as a filter: the wire format's longest (reading.py, METER_ID_PATTERN).
MAX_ID_LENGTH = 64
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such meter, site or client (or not yours)"}}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or invalid X-API-Key"},
    429: {"description": "Too many invalid keys from this address; retry after Retry-After seconds"},
}
#: Added to every response that does not set its own (the dashboard sets a stricter policy on its page).
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)
NO_ALERT: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such alert (or not yours)"},
    409: {"description": "The alert is resolved already: only an open alert can be acknowledged or closed"},
}
ADMIN_ONLY: dict[int | str, dict[str, Any]] = {403: {"description": "Only an administrator key may do this"}}
_T = TypeVar("_T")


class AlertsView(Protocol):
    """What the API needs from the alert engine."""

    async def list_alerts(
        self, *, client_id: str | None = None, state: str | None = None, meter_id: str | None = None, limit: int = 500
    ) -> list[dict[str, Any]]: ...

    async def acknowledge(self, alert_id: str, *, client_id: str | None, by: str) -> dict[str, Any] | None: ...

    async def close(self, alert_id: str, *, client_id: str | None, by: str) -> dict[str, Any] | None: ...

    async def retire(self, meter_id: str, *, by: str) -> str: ...


# -- response models (they are the OpenAPI schema) -----------------------------------------------------

#: A liquefied bottle's state (smartgas_common.content.LiquidState, spelled out: that module imports CoolProp).
LiquidState = Literal["liquid_present", "liquid_exhausted", "over_pressure", "supercritical"]


class Forecast(BaseModel):
    """How fast the bottle's gas goes and when it reaches the reserve (docs/physics.md#forecast)."""

    basis: Literal["measured", "declared"] | None = Field(
        description="measured: fitted to the readings since the last swap; declared: the fleet file's draw_mol_per_h"
        " while the fit is not yet confident; null: no figure (see note)"
    )
    consumption_mol_per_day: float | None = Field(description="gas drawn per day (real-gas moles)")
    days_to_empty: float | None = Field(
        description="days until the fill reaches reserve_fill_pct at that draw; null for a liquefied gas (its"
        " pressure gives the liquid state, not the content), a meter missing from the fleet file, or no reading yet"
    )
    empty_at: str | None = Field(description="when the reserve is reached at that draw (RFC 3339, UTC)")
    reserve_fill_pct: float = Field(description="the fill % counted down to (--forecast-reserve-fill-pct)")
    measured_points: int = Field(description="points of the fit since the last swap")
    note: str = Field(description="where the figure comes from, or why there is none")
    last_refill_at: str | None = Field(description="the last bottle swap recorded (RFC 3339, UTC)")


class Refill(BaseModel):
    """A bottle swap: the content stepped up to what a new bottle holds."""

    meter_id: str
    ts: str = Field(description="the new bottle's first reading (RFC 3339, UTC)")
    seq: int
    fill_before_pct: float | None
    fill_after_pct: float | None
    content_before_mol: float = Field(description="real-gas moles before the swap")
    content_after_mol: float = Field(description="real-gas moles after the swap")


class RefillList(BaseModel):
    """A meter's recorded refills, oldest first."""

    meter_id: str
    refills: list[Refill]


class Meter(BaseModel):
    """A meter as the registry and the fleet file know it, with its latest reading."""

    meter_id: str
    known: bool = Field(description="listed in the fleet file")
    registered: bool = Field(description="has sent at least one reading")
    client_id: str | None
    client_name: str | None
    site_id: str | None
    site_name: str | None
    latitude: float | None
    longitude: float | None
    gas: str | None
    gas_storage: Literal["compressed", "liquefied"] | None = Field(
        description="how the bottle keeps its gas (docs/fleet.md): compressed, or liquid under its vapour pressure"
    )
    volume_l: float | None
    nominal_pressure_bar: float | None
    first_seen: str | None
    last_seen: str | None = Field(description="when the consumer last stored a reading of it (RFC 3339, UTC)")
    online: bool
    epoch: int | None = Field(description="increments each time the meter restarts its sequence numbers")
    last_seq: int | None
    readings: int
    gaps: int = Field(description="readings missing between stored sequence numbers")
    replays: int = Field(description="re-sent or replayed readings, acknowledged but not stored again")
    reboots: int
    last_ts: str | None
    pressure_bar: float | None
    temperature_c: float | None
    moles: float | None = Field(description="ideal-gas moles of the latest reading, n = PV/RT")
    fill_pct: float | None = Field(
        description="latest real content as % of a full bottle (nominal pressure at 15 °C); null for a"
        " liquefied gas, outside the physics envelope and for a meter missing from the fleet file"
    )
    compressibility_z: float | None
    real_moles: float | None
    mass_kg: float | None
    standard_volume_m3: float | None = Field(description="m³ at ISO 13443 standard conditions (15 °C, 1.01325 bar)")
    liquid_state: LiquidState | None
    open_alerts: int
    retired_at: str | None = Field(
        description="when an administrator retired it (RFC 3339, UTC); null: in service. A reading received"
        " later brings it back"
    )
    forecast: Forecast | None = None


class MeterList(BaseModel):
    """The meters visible to the caller."""

    meters: list[Meter]


class ReadingPoint(BaseModel):
    """One stored reading: the meter's values, its moles (ideal gas), real-gas fields and fill %."""

    epoch: int
    seq: int
    ts: str
    received_at: str
    pressure_bar: float
    temperature_c: float
    volume_l: float
    moles: float
    fill_pct: float | None
    compressibility_z: float | None
    real_moles: float | None
    mass_kg: float | None
    standard_volume_m3: float | None
    liquid_state: LiquidState | None


class ReadingSeries(BaseModel):
    """A meter's readings in a window, oldest first."""

    meter_id: str
    since: str
    until: str
    readings: list[ReadingPoint]


class Summary(BaseModel):
    """Mean, minimum, maximum and last value of one measurement (null without readings)."""

    mean: float | None
    min: float | None
    max: float | None
    last: float | None


class Statistics(BaseModel):
    """Statistics of every measurement over a window of the meters' timestamps."""

    since: str
    until: str
    count: int = Field(description="readings in the window")
    meters: int = Field(description="meters with readings in the window")
    pressure_bar: Summary
    temperature_c: Summary
    moles: Summary
    fill_pct: Summary


class MeterStatistics(Statistics):
    """Statistics of one meter."""

    meter_id: str


class ClientStatistics(Statistics):
    """Statistics over all meters of a client."""

    client_id: str


class SiteStatistics(Statistics):
    """Statistics over all meters of a site."""

    site_id: str


class Alert(BaseModel):
    """An alert: opened once per meter and kind, updated while it holds, then resolved."""

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
    acknowledged_at: str | None = Field(description="when a person acknowledged it; it stays open")
    acknowledged_by: str | None = Field(description='"admin" or the client whose key acknowledged it')
    closed_by: str | None = Field(
        description='who resolved it by hand ("admin" or a client id) or by retiring its meter; null: its rule'
    )


class AlertList(BaseModel):
    """Alerts visible to the caller, newest first."""

    alerts: list[Alert]


class Caller(BaseModel):
    """The owner of the presented key."""

    client_id: str | None
    admin: bool


# -- shared dependencies (the dashboard's chart route uses them too) --------------------------------------


def caller_dependency(api_keys: ApiKeys) -> Callable[..., Principal]:
    """A FastAPI dependency: the principal of the request's X-API-Key, or 401 (429 from an address that
    sent too many wrong keys: then no key is even looked at, so guessing cannot go on at full speed)."""
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="your client's API key")

    def caller(request: Request, key: Annotated[str | None, Security(key_header)]) -> Principal:
        address = request.client.host if request.client is not None else None
        wait_s = api_keys.throttle.retry_after_s(address)
        if wait_s > 0:
            raise HTTPException(
                status_code=429,
                detail="too many invalid X-API-Key attempts from your address; retry later",
                headers={"Retry-After": str(math.ceil(wait_s))},
            )
        principal = api_keys.authenticate(key)
        if principal is None:
            if key:  # a missing key is no guess; a wrong one is
                api_keys.throttle.failed(address)
            raise HTTPException(status_code=401, detail="missing or invalid X-API-Key")
        return principal

    return caller


def window_dependency(queries: FleetQueries) -> Callable[..., Window]:
    """A FastAPI dependency: the ``since``/``until`` window of the request, or 422."""

    def window(
        since: Annotated[
            datetime | None,
            Query(
                description="start (RFC 3339, years 1970 to 9998); default: until − 1 h. Not after until; at most"
                " 31 days before it."
            ),
        ] = None,
        until: Annotated[datetime | None, Query(description="end (RFC 3339, years 1970 to 9998); default: now")] = None,
    ) -> Window:
        end = _moment("until", until) if until is not None else queries.now()
        start = _moment("since", since) if since is not None else end - DEFAULT_WINDOW
        if start > end:
            raise _invalid_query("since", since, "since must not be after until")
        if end - start > MAX_WINDOW:
            raise _invalid_query("since", since, f"the window may span at most {MAX_WINDOW.days} days")
        return Window(start, end)

    return window


# -- the application -------------------------------------------------------------------------------------


def build_app(
    queries: FleetQueries,
    api_keys: ApiKeys,
    *,
    alerts: AlertsView | None = None,
    metrics: Callable[[str | None], tuple[bytes, str]] | None = None,
    dashboard: APIRouter | None = None,
    store_fault: Callable[[], Awaitable[str | None]] | None = None,
    mqtt_fault: Callable[[], str | None] | None = None,
) -> FastAPI:
    """The whole HTTP surface, assembled in one place. ``mqtt_fault``: why the MQTT ingest is down, or None
    while it is connected (given only when MQTT is on)."""
    app = FastAPI(
        title="SmartGas consumer API",
        version="1",
        description="The gas-bottle fleet: meters, readings, statistics and alerts. Send your key as X-API-Key.",
        openapi_url="/api/openapi.json",
        # The Swagger UI and ReDoc pages load their scripts from a CDN: off. The spec is the JSON above.
        docs_url=None,
        redoc_url=None,
    )
    caller = caller_dependency(api_keys)
    window = window_dependency(queries)
    Who = Annotated[Principal, Depends(caller)]
    Span = Annotated[Window, Depends(window)]
    api = APIRouter(prefix="/api", responses=UNAUTHORIZED)

    @api.get("/me", response_model=Caller, summary="Who the key belongs to")
    async def me(who: Who) -> dict[str, Any]:
        return {"client_id": who.client_id, "admin": who.is_admin}

    @api.get("/meters", response_model=MeterList, summary="The meters you may see, with their latest reading")
    async def meters(
        who: Who,
        include_retired: Annotated[bool, Query(description="list retired meters too")] = False,
    ) -> dict[str, Any]:
        return {"meters": await queries.meters(who.client_id, include_retired=include_retired)}

    @api.get("/meters/{meter_id}", response_model=Meter, responses=NOT_FOUND, summary="One meter")
    async def meter(meter_id: str, who: Who) -> dict[str, Any]:
        return _found(await queries.meter(who.client_id, meter_id), f"meter {meter_id}")

    @api.get(
        "/meters/{meter_id}/readings", response_model=ReadingSeries, responses=NOT_FOUND, summary="Readings over time"
    )
    async def readings(
        meter_id: str, who: Who, span: Span, limit: Annotated[int, Query(ge=1, le=10000)] = 1000
    ) -> dict[str, Any]:
        series = _found(await queries.readings(who.client_id, meter_id, span, limit), f"meter {meter_id}")
        since, until = span.bounds()
        return {"meter_id": meter_id, "since": since, "until": until, "readings": series}

    @api.get(
        "/meters/{meter_id}/refills", response_model=RefillList, responses=NOT_FOUND, summary="Bottle swaps recorded"
    )
    async def refills(meter_id: str, who: Who) -> dict[str, Any]:
        found = _found(await queries.refills(who.client_id, meter_id), f"meter {meter_id}")
        return {"meter_id": meter_id, "refills": found}

    @api.get(
        "/meters/{meter_id}/stats",
        response_model=MeterStatistics,
        responses=NOT_FOUND,
        summary="Count, mean, min, max and last of each measurement over a window",
    )
    async def meter_stats(meter_id: str, who: Who, span: Span) -> dict[str, Any]:
        return _found(await queries.meter_stats(who.client_id, meter_id, span), f"meter {meter_id}")

    @api.get("/clients/{client_id}/stats", response_model=ClientStatistics, responses=NOT_FOUND)
    async def client_stats(client_id: str, who: Who, span: Span) -> dict[str, Any]:
        """Statistics over all of a client's meters."""
        return _found(await queries.group_stats(who.client_id, "client", client_id, span), f"client {client_id}")

    @api.get("/sites/{site_id}/stats", response_model=SiteStatistics, responses=NOT_FOUND)
    async def site_stats(site_id: str, who: Who, span: Span) -> dict[str, Any]:
        """Statistics over all meters of a site."""
        return _found(await queries.group_stats(who.client_id, "site", site_id, span), f"site {site_id}")

    @api.get("/alerts", response_model=AlertList, summary="Alerts, open and resolved")
    async def list_alerts(
        who: Who,
        state: Annotated[Literal["open", "resolved"] | None, Query(description="only this state")] = None,
        meter_id: Annotated[str | None, Query(description="only this meter", max_length=MAX_ID_LENGTH)] = None,
        limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    ) -> dict[str, Any]:
        if alerts is None:
            return {"alerts": []}
        found = await alerts.list_alerts(client_id=who.client_id, state=state, meter_id=meter_id, limit=limit)
        return {"alerts": found}

    if alerts is not None:
        engine = alerts

        @api.post(
            "/alerts/{alert_id}/acknowledge",
            response_model=Alert,
            responses=NO_ALERT,
            summary="Acknowledge an open alert: it stays open; webhooks hear of it again only when it ends",
        )
        async def acknowledge_alert(alert_id: str, who: Who) -> dict[str, Any]:
            return await _alert_handled(engine.acknowledge(alert_id, client_id=who.client_id, by=_actor(who)), alert_id)

        @api.post(
            "/alerts/{alert_id}/close",
            response_model=Alert,
            responses=NO_ALERT,
            summary="Close an open alert by hand (resolved; a condition that still holds opens a new one)",
        )
        async def close_alert(alert_id: str, who: Who) -> dict[str, Any]:
            return await _alert_handled(engine.close(alert_id, client_id=who.client_id, by=_actor(who)), alert_id)

        @api.post(
            "/meters/{meter_id}/retire",
            response_model=Meter,
            responses={**NOT_FOUND, **ADMIN_ONLY},
            summary="Retire a meter (administrators): its alerts close, it leaves the fleet list and the offline rule",
        )
        async def retire_meter(meter_id: str, who: Who) -> dict[str, Any]:
            if not who.is_admin:
                raise HTTPException(status_code=403, detail="only an administrator key may retire a meter")
            _found(await queries.meter(None, meter_id), f"meter {meter_id}")
            await engine.retire(meter_id, by=_actor(who))
            return _found(await queries.meter(None, meter_id), f"meter {meter_id}")

    app.include_router(api)

    @app.get("/healthz", include_in_schema=False)
    async def healthz(response: Response) -> dict[str, str]:
        # 503 when the store cannot commit now (a real write, see health.StoreHealth), so that a load
        # balancer or orchestrator stops trusting a consumer that can only answer 5.03 to readings.
        fault = await store_fault() if store_fault is not None else None
        if fault is not None:
            response.status_code = 503
            return {"status": "unavailable", "reason": f"store {fault}"}
        if mqtt_fault is None:
            return {"status": "ok"}
        # A broker that is away makes the consumer degraded, not unavailable: it reconnects by itself,
        # keeps serving CoAP, and a restart would bring no broker back.
        down = mqtt_fault()
        if down is not None:
            return {"status": "degraded", "mqtt": f"down: {down}"}
        return {"status": "ok", "mqtt": "connected"}

    if metrics is not None:
        render = metrics

        @app.get("/metrics", include_in_schema=False)
        async def prometheus_metrics(request: Request) -> Response:
            # The scraper's Accept header chooses the format (Prometheus asks for OpenMetrics).
            body, content_type = render(request.headers.get("accept"))
            return Response(content=body, media_type=content_type)

    if dashboard is not None:
        app.include_router(dashboard)

        @app.get("/", include_in_schema=False)
        async def root(request: Request) -> RedirectResponse:
            return RedirectResponse(url="/dashboard/")

    return app


def _invalid_query(name: str, value: object, message: str) -> RequestValidationError:
    """A 422 in the same shape as FastAPI's own validation errors (the documented HTTPValidationError)."""
    return RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": ("query", name),
                "msg": message,
                "input": None if value is None else str(value),
            }
        ]
    )


def _moment(name: str, moment: datetime) -> datetime:
    """A window's end in UTC (naive means UTC), or 422 when it lies outside EARLIEST..LATEST."""
    try:
        utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError:  # year 1 with a positive offset, year 9999 with a negative one
        utc = None
    if utc is None or not EARLIEST <= utc < LATEST:
        raise _invalid_query(name, moment, f"{name} must lie between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} (UTC)")
    return utc


def _actor(who: Principal) -> str:
    """Who did it, as alerts record it: "admin" or the client id."""
    return who.client_id if who.client_id is not None else "admin"


async def _alert_handled(change: Awaitable[dict[str, Any] | None], alert_id: str) -> dict[str, Any]:
    """A person's change to an alert: 409 if it is no longer open, 404 if it is missing or not theirs."""
    try:
        found = await change
    except AlertNotOpen as err:
        raise HTTPException(status_code=409, detail=str(err)) from err
    return _found(found, f"alert {alert_id}")


def _found(value: _T | None, what: str) -> _T:
    if value is None:
        raise HTTPException(status_code=404, detail=f"{what} not found")
    return value


class SecurityHeaders:
    """ASGI wrapper: every response, errors and 404s included, gets SECURITY_HEADERS it does not set itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(header for header in SECURITY_HEADERS if header[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _QuietServer(uvicorn.Server):
    """uvicorn inside a larger service: the consumer, not uvicorn, handles SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serves an ASGI app on (host, port) in the running event loop; ``port`` is known after ``start()``."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on accepted sockets whose protocol
        # says TCP, and without it every kept-alive answer waits ~40 ms for the client's delayed ACK (Nagle).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._host, self._wanted_port = host, port
        config = uvicorn.Config(
            SecurityHeaders(app),
            log_level="warning",
            lifespan="off",
            access_log=False,
            server_header=False,
            # No proxy stands in front: X-Forwarded-For is a client's claim and must not pick the address
            # that wrong keys are counted against.
            proxy_headers=False,
        )
        self._server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self._host, self._wanted_port))
        self.port = self._socket.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http-server")
        while not self._server.started:  # bounded by uvicorn's own start-up; fails the task otherwise
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self._socket.close()
