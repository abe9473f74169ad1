"""The consumer's HTTP API (FastAPI, OpenAPI at ``/api/openapi.json``): the fleet, statistics, alerts.

Every ``/api`` route needs an ``X-API-Key`` (``auth.py``): 401 without one or with a bad one. A client
sees only its own meters, sites and alerts; another client's meter answers 404 exactly as a meter that
does not exist. An administrator key sees everything. ``/metrics`` (Prometheus) and ``/healthz`` need no
key and say nothing about any client. Runs in the consumer's event loop (``HttpServer``).
"""

# No `from __future__ import annotations` here: FastAPI reads these annotations at run time, and the
# dependency aliases defined inside build_app must be real objects, not strings.
import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from smartgas_consumer.auth import ApiKeys, Principal
from smartgas_consumer.queries import FleetQueries, Window

_LOG = logging.getLogger(__name__)
DEFAULT_WINDOW = timedelta(hours=1)
MAX_WINDOW = timedelta(days=31)
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such meter, site or client (or not yours)"}}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: {"description": "Missing or invalid X-API-Key"}}
_T = TypeVar("_T")


class AlertsView(Protocol):
    """What the API needs from the alert engine."""

    async def list_alerts(
        self, *, client_id: str | None = None, state: str | None = None, meter_id: str | None = None, limit: int = 500
    ) -> list[dict[str, Any]]: ...


# -- response models (they are the OpenAPI schema) -----------------------------------------------------


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
    moles: float | None
    fill_pct: float | None
    open_alerts: int


class MeterList(BaseModel):
    """The meters visible to the caller."""

    meters: list[Meter]


class ReadingPoint(BaseModel):
    """One stored reading: the meter's values, its moles and fill %."""

    epoch: int
    seq: int
    ts: str
    received_at: str
    pressure_bar: float
    temperature_c: float
    volume_l: float
    moles: float
    fill_pct: float | None


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


class AlertList(BaseModel):
    """Alerts visible to the caller, newest first."""

    alerts: list[Alert]


class Caller(BaseModel):
    """The owner of the presented key."""

    client_id: str | None
    admin: bool


# -- shared dependencies (the dashboard's chart route uses them too) --------------------------------------


def caller_dependency(api_keys: ApiKeys) -> Callable[..., Principal]:
    """A FastAPI dependency: the principal of the request's X-API-Key, or 401."""
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="your client's API key")

    def caller(key: Annotated[str | None, Security(key_header)]) -> Principal:
        principal = api_keys.authenticate(key)
        if principal is None:
            raise HTTPException(status_code=401, detail="missing or invalid X-API-Key")
        return principal

    return caller


def window_dependency(queries: FleetQueries) -> Callable[..., Window]:
    """A FastAPI dependency: the ``since``/``until`` window of the request, or 422."""

    def window(
        since: Annotated[
            datetime | None,
            Query(description="start (RFC 3339); default: until − 1 h. Not after until; at most 31 days before it."),
        ] = None,
        until: Annotated[datetime | None, Query(description="end (RFC 3339); default: now")] = None,
    ) -> Window:
        end = _utc(until) if until is not None else queries.now()
        start = _utc(since) if since is not None else end - DEFAULT_WINDOW
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
) -> FastAPI:
    """The whole HTTP surface, assembled in one place."""
    app = FastAPI(
        title="SmartGas consumer API",
        version="1",
        description="The gas-bottle fleet: meters, readings, statistics and alerts. Send your key as X-API-Key.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
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
    async def meters(who: Who) -> dict[str, Any]:
        return {"meters": await queries.meters(who.client_id)}

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
        meter_id: Annotated[str | None, Query(description="only this meter")] = None,
        limit: Annotated[int, Query(ge=1, le=5000)] = 500,
    ) -> dict[str, Any]:
        if alerts is None:
            return {"alerts": []}
        found = await alerts.list_alerts(client_id=who.client_id, state=state, meter_id=meter_id, limit=limit)
        return {"alerts": found}

    app.include_router(api)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

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


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _found(value: _T | None, what: str) -> _T:
    if value is None:
        raise HTTPException(status_code=404, detail=f"{what} not found")
    return value


class _QuietServer(uvicorn.Server):
    """uvicorn inside a larger service: the consumer, not uvicorn, handles SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serves an ASGI app on (host, port) in the running event loop; ``port`` is known after ``start()``."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self._host, self._wanted_port = host, port
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
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
