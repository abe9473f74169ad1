"""The HTTP API over real HTTP on loopback: keys, who sees what, statistics, series.

A real consumer (CoAP, SQLite, uvicorn) with the repository's fleet file and an API keys file; readings
go in over CoAP and come out over HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiocoap
import httpx
import pytest
from aiocoap.numbers.codes import Code

from conftest import reading_uri
from smartgas_consumer.auth import digest
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.fleet import load_fleet
from smartgas_consumer.server import Consumer

pytestmark = pytest.mark.integration

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
FLEET = load_fleet(FLEET_FILE)
CLIENTS = sorted(FLEET.clients)
KEYS = {client: f"key-of-{client}-0123456789" for client in CLIENTS} | {"*": "admin-key-0123456789abcdef"}
# One meter of each client gets readings, plus a meter missing from the fleet file.
OWN_METER = {client: min(m.meter_id for m in FLEET.meters.values() if m.client_id == client) for client in CLIENTS}
UNKNOWN_METER = "stray-meter-1"
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
async def api_consumer(consumer_config: ConsumerConfig, tmp_path: Path) -> AsyncIterator[Consumer]:
    keys_file = tmp_path / "api-keys.yaml"
    lines = [f'  - {{client: "{client}", sha256: {digest(key)}}}' for client, key in KEYS.items()]
    keys_file.write_text("keys:\n" + "\n".join(lines) + "\n")
    config = dataclasses.replace(consumer_config, fleet=FLEET_FILE, api_keys=keys_file, http_port=0)
    running = Consumer(config)
    await running.start()
    try:
        await feed(running)
        yield running
    finally:
        await running.stop()


async def feed(consumer: Consumer) -> None:
    """Three readings for each client's first meter and for an unknown meter, 10 s apart, ending now."""
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        for meter_id in [*OWN_METER.values(), UNKNOWN_METER]:
            volume = FLEET.meters[meter_id].volume_l if meter_id in FLEET.meters else 50.0
            for seq, pressure in enumerate([180.0, 170.0, 160.0]):
                ts = (NOW - timedelta(seconds=10 * (2 - seq))).isoformat().replace("+00:00", "Z")
                body = {"seq": seq, "ts": ts, "pressure_bar": pressure, "temperature_c": 15.0 + seq, "volume_l": volume}
                message = aiocoap.Message(
                    code=Code.PUT,
                    uri=reading_uri(consumer, meter_id),
                    payload=json.dumps(body).encode(),
                    content_format=50,
                )
                response = await asyncio.wait_for(context.request(message).response, 10)
                assert response.code == Code.CHANGED
    finally:
        await context.shutdown()


@pytest.fixture
async def http(api_consumer: Consumer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_consumer.http.port}", timeout=10) as client:
        yield client


def as_(client: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[client]}


ENDPOINTS = [
    "/api/me",
    "/api/meters",
    "/api/meters/{meter}",
    "/api/meters/{meter}/readings",
    "/api/meters/{meter}/stats",
    "/api/clients/{client}/stats",
    "/api/sites/{site}/stats",
    "/api/alerts",
]


@pytest.mark.parametrize("path", ENDPOINTS)
@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}], ids=["no-key", "bad-key", "empty"])
async def test_every_api_route_needs_a_valid_key(http: httpx.AsyncClient, path: str, headers: dict[str, str]) -> None:
    meter = OWN_METER[CLIENTS[0]]
    url = path.format(meter=meter, client=CLIENTS[0], site=FLEET.meters[meter].site.site_id)
    response = await http.get(url, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "missing or invalid X-API-Key"}


async def test_who_am_i(http: httpx.AsyncClient) -> None:
    assert (await http.get("/api/me", headers=as_(CLIENTS[1]))).json() == {"client_id": CLIENTS[1], "admin": False}
    assert (await http.get("/api/me", headers=as_("*"))).json() == {"client_id": None, "admin": True}


@pytest.mark.parametrize("viewer", CLIENTS)
@pytest.mark.parametrize("owner", CLIENTS)
@pytest.mark.parametrize("path", [p for p in ENDPOINTS if "{meter}" in p])
async def test_authorisation_matrix_for_meters(http: httpx.AsyncClient, viewer: str, owner: str, path: str) -> None:
    meter = OWN_METER[owner]
    response = await http.get(path.format(meter=meter), headers=as_(viewer))
    if viewer == owner:
        assert response.status_code == 200
    else:
        # Another client's meter answers exactly as a meter that does not exist.
        missing = await http.get(path.format(meter="no-such-meter"), headers=as_(viewer))
        assert response.status_code == missing.status_code == 404
        assert response.json()["detail"].replace(meter, "X") == missing.json()["detail"].replace("no-such-meter", "X")


@pytest.mark.parametrize("viewer", CLIENTS)
@pytest.mark.parametrize("owner", CLIENTS)
async def test_authorisation_matrix_for_clients_and_sites(http: httpx.AsyncClient, viewer: str, owner: str) -> None:
    site = FLEET.meters[OWN_METER[owner]].site.site_id
    for path in (f"/api/clients/{owner}/stats", f"/api/sites/{site}/stats"):
        response = await http.get(path, headers=as_(viewer))
        assert response.status_code == (200 if viewer == owner else 404), path


async def test_meter_list_holds_only_own_meters(http: httpx.AsyncClient) -> None:
    for client in CLIENTS:
        meters = (await http.get("/api/meters", headers=as_(client))).json()["meters"]
        ids = {m["meter_id"] for m in meters}
        assert ids == {m.meter_id for m in FLEET.meters.values() if m.client_id == client}
        assert {m["client_id"] for m in meters} == {client}
        assert UNKNOWN_METER not in ids


async def test_admin_sees_every_meter_including_unknown_ones(http: httpx.AsyncClient) -> None:
    meters = {m["meter_id"]: m for m in (await http.get("/api/meters", headers=as_("*"))).json()["meters"]}
    assert set(meters) == set(FLEET.meters) | {UNKNOWN_METER}
    stray = meters[UNKNOWN_METER]
    assert (stray["known"], stray["registered"], stray["client_id"], stray["fill_pct"]) == (False, True, None, None)
    assert (await http.get(f"/api/meters/{UNKNOWN_METER}/stats", headers=as_("*"))).json()["count"] == 3


async def test_meter_shows_registry_latest_reading_and_fill(http: httpx.AsyncClient) -> None:
    client = CLIENTS[0]
    meter_id = OWN_METER[client]
    fleet_meter = FLEET.meters[meter_id]
    meter = (await http.get(f"/api/meters/{meter_id}", headers=as_(client))).json()
    assert (meter["registered"], meter["known"], meter["online"], meter["last_seq"], meter["readings"]) == (
        True,
        True,
        True,
        2,
        3,
    )
    assert meter["pressure_bar"] == 160.0
    assert meter["fill_pct"] == pytest.approx(100 * meter["moles"] / fleet_meter.full_moles)
    assert (meter["site_id"], meter["gas"], meter["latitude"]) == (
        fleet_meter.site.site_id,
        fleet_meter.gas,
        fleet_meter.site.latitude,
    )
    silent = next(m for m in FLEET.meters.values() if m.client_id == client and m.meter_id != meter_id)
    never = (await http.get(f"/api/meters/{silent.meter_id}", headers=as_(client))).json()
    assert (never["registered"], never["online"], never["readings"], never["pressure_bar"]) == (False, False, 0, None)


async def test_meter_statistics(http: httpx.AsyncClient) -> None:
    client = CLIENTS[0]
    stats = (await http.get(f"/api/meters/{OWN_METER[client]}/stats", headers=as_(client))).json()
    assert (stats["count"], stats["meters"]) == (3, 1)
    assert stats["pressure_bar"] == {"mean": 170.0, "min": 160.0, "max": 180.0, "last": 160.0}
    assert stats["temperature_c"] == {"mean": 16.0, "min": 15.0, "max": 17.0, "last": 17.0}
    assert stats["moles"]["max"] > stats["moles"]["last"] == stats["moles"]["min"]
    assert stats["fill_pct"]["mean"] is not None


async def test_statistics_window(http: httpx.AsyncClient) -> None:
    client = CLIENTS[0]
    meter = OWN_METER[client]
    since = (NOW - timedelta(seconds=5)).isoformat()
    recent = (await http.get(f"/api/meters/{meter}/stats", params={"since": since}, headers=as_(client))).json()
    assert recent["count"] == 1 and recent["pressure_bar"]["last"] == 160.0
    old = {"since": "2020-01-01T00:00:00Z", "until": "2020-01-02T00:00:00Z"}
    empty = (await http.get(f"/api/meters/{meter}/stats", params=old, headers=as_(client))).json()
    assert empty["count"] == 0 and empty["pressure_bar"] == {"mean": None, "min": None, "max": None, "last": None}


@pytest.mark.parametrize(
    "params",
    [
        {"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"},
        {"since": "2026-01-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"},
        {"since": "yesterday"},
    ],
    ids=["reversed", "too-long", "not-a-date"],
)
async def test_bad_windows_are_422(http: httpx.AsyncClient, params: dict[str, str]) -> None:
    response = await http.get(f"/api/meters/{OWN_METER[CLIENTS[0]]}/stats", params=params, headers=as_(CLIENTS[0]))
    assert response.status_code == 422


async def test_client_and_site_statistics(http: httpx.AsyncClient) -> None:
    client = CLIENTS[0]
    site = FLEET.meters[OWN_METER[client]].site.site_id
    by_client = (await http.get(f"/api/clients/{client}/stats", headers=as_(client))).json()
    by_site = (await http.get(f"/api/sites/{site}/stats", headers=as_(client))).json()
    assert by_client["client_id"] == client and by_site["site_id"] == site
    assert by_client["count"] == by_site["count"] == 3
    assert by_client["pressure_bar"]["mean"] == 170.0
    assert (await http.get("/api/clients/nobody/stats", headers=as_("*"))).status_code == 404


async def test_reading_series_oldest_first_with_limit(http: httpx.AsyncClient) -> None:
    client = CLIENTS[1]
    meter = OWN_METER[client]
    series = (await http.get(f"/api/meters/{meter}/readings", headers=as_(client))).json()
    assert [r["seq"] for r in series["readings"]] == [0, 1, 2]
    assert [r["pressure_bar"] for r in series["readings"]] == [180.0, 170.0, 160.0]
    last_two = (await http.get(f"/api/meters/{meter}/readings", params={"limit": 2}, headers=as_(client))).json()
    assert [r["seq"] for r in last_two["readings"]] == [1, 2]


async def test_openapi_and_unauthenticated_health(http: httpx.AsyncClient) -> None:
    spec = (await http.get("/api/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "your client's API key",
    }
    assert "/api/meters/{meter_id}/stats" in spec["paths"]
    assert (await http.get("/healthz")).json() == {"status": "ok"}


def test_no_key_file_refuses_everyone() -> None:
    from smartgas_consumer.auth import ApiKeys

    assert ApiKeys.load(None).authenticate("anything") is None
