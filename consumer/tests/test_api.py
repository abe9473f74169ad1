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
from typing import Any, get_args

import aiocoap
import httpx
import pytest
from aiocoap.numbers.codes import Code
from webhook_receiver import Received, Receiver

from conftest import reading_uri
from smartgas_common.content import LiquidState as SharedLiquidState
from smartgas_common.content import build_models
from smartgas_consumer.api import LiquidState
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
    # Fill % is real content over a full bottle's, and the real-gas fields are the shared physics' own.
    model = build_models([fleet_meter.gas])[fleet_meter.gas.name]
    content = model.content(160.0, 17.0, fleet_meter.volume_l)
    assert meter["fill_pct"] == pytest.approx(model.fill_percent(160.0, 17.0, fleet_meter.nominal_pressure_bar))
    assert (meter["compressibility_z"], meter["real_moles"], meter["mass_kg"], meter["standard_volume_m3"]) == (
        pytest.approx(content.compressibility),
        pytest.approx(content.real_moles),
        pytest.approx(content.mass_kg),
        pytest.approx(content.standard_volume_m3),
    )
    assert (meter["gas_storage"], meter["liquid_state"]) == ("compressed", None)
    series = (await http.get(f"/api/meters/{meter_id}/readings", headers=as_(client))).json()["readings"]
    assert [point["real_moles"] for point in series][-1] == pytest.approx(content.real_moles)
    assert (meter["site_id"], meter["gas"], meter["latitude"]) == (
        fleet_meter.site.site_id,
        fleet_meter.gas.name,
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


def test_the_api_spells_the_liquid_states_of_the_shared_physics() -> None:
    assert set(get_args(LiquidState)) == {state.value for state in SharedLiquidState}


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


# -- acknowledging and closing alerts, retiring meters -------------------------------------------------


@pytest.fixture
async def handled(consumer_config: ConsumerConfig, tmp_path: Path, receiver: Receiver) -> AsyncIterator[Consumer]:
    """A consumer whose fed meters are all offline (the real engine judged an hour of silence), with a webhook."""
    keys_file = tmp_path / "api-keys.yaml"
    keys_file.write_text("keys:\n" + "".join(f'  - {{client: "{c}", sha256: {digest(k)}}}\n' for c, k in KEYS.items()))
    config = dataclasses.replace(
        consumer_config, fleet=FLEET_FILE, api_keys=keys_file, http_port=0, webhook_urls=(receiver.url,)
    )
    running = Consumer(config)
    await running.start()
    try:
        await feed(running)
        await running.alerts.flush()
        await running.alerts.evaluate_offline(datetime.now(UTC) + timedelta(hours=1))
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def handled_http(handled: Consumer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{handled.http.port}", timeout=10) as client:
        yield client


async def offline_alert(http: httpx.AsyncClient, meter_id: str) -> dict[str, Any]:
    found = (await http.get("/api/alerts", params={"meter_id": meter_id}, headers=as_("*"))).json()["alerts"]
    (alert,) = [a for a in found if a["kind"] == "offline" and a["state"] == "open"]
    return dict(alert)


async def deliveries_of(receiver: Receiver, alert_id: str, count: int) -> list[Received]:
    """The webhook POSTs the receiver accepted for one alert, once there are ``count`` of them (20 s at most)."""
    async with asyncio.timeout(20):
        while len(found := [r for r in receiver.accepted() if r.body["alert"]["alert_id"] == alert_id]) < count:  # noqa: ASYNC110 - polls a real receiver
            await asyncio.sleep(0.05)
    return found


async def test_owner_acknowledges_its_alert_which_stays_open_and_another_client_gets_404(
    handled_http: httpx.AsyncClient,
) -> None:
    owner, other = CLIENTS[0], CLIENTS[1]
    alert = await offline_alert(handled_http, OWN_METER[owner])
    path = f"/api/alerts/{alert['alert_id']}/acknowledge"
    foreign = await handled_http.post(path, headers=as_(other))
    missing = await handled_http.post("/api/alerts/no-such-alert/acknowledge", headers=as_(other))
    assert foreign.status_code == missing.status_code == 404
    assert foreign.json()["detail"].replace(alert["alert_id"], "X") == missing.json()["detail"].replace(
        "no-such-alert", "X"
    )
    answer = await handled_http.post(path, headers=as_(owner))
    assert answer.status_code == 200
    seen = answer.json()
    assert seen["state"] == "open" and seen["acknowledged_by"] == owner and seen["acknowledged_at"]
    assert seen["closed_by"] is None
    # Again, by the administrator: the first acknowledgement stands.
    again = (await handled_http.post(path, headers=as_("*"))).json()
    assert (again["acknowledged_by"], again["acknowledged_at"]) == (owner, seen["acknowledged_at"])
    listed = await offline_alert(handled_http, OWN_METER[owner])
    assert listed["acknowledged_by"] == owner


async def test_close_resolves_an_alert_once_and_webhooks_hear_each_step_once(
    handled: Consumer, handled_http: httpx.AsyncClient, receiver: Receiver
) -> None:
    owner = CLIENTS[2]
    meter_id = OWN_METER[owner]
    alert = await offline_alert(handled_http, meter_id)
    ack = await handled_http.post(f"/api/alerts/{alert['alert_id']}/acknowledge", headers=as_(owner))
    assert ack.status_code == 200
    closed = await handled_http.post(f"/api/alerts/{alert['alert_id']}/close", headers=as_(owner))
    assert closed.status_code == 200
    assert closed.json()["state"] == "resolved" and closed.json()["closed_by"] == owner
    assert closed.json()["resolved_at"] and closed.json()["acknowledged_by"] == owner
    for action in ("close", "acknowledge"):
        refused = await handled_http.post(f"/api/alerts/{alert['alert_id']}/{action}", headers=as_("*"))
        assert refused.status_code == 409 and "resolved" in refused.json()["detail"]
    # The silence was seen by a person: no new offline alert until the meter sends again.
    await handled.alerts.evaluate_offline(datetime.now(UTC) + timedelta(hours=2))
    opened = await handled_http.get("/api/alerts", params={"meter_id": meter_id, "state": "open"}, headers=as_("*"))
    assert opened.json()["alerts"] == []
    deliveries = await deliveries_of(receiver, alert["alert_id"], 3)
    events = [r.event_header for r in deliveries]
    assert events == ["alert.opened", "alert.acknowledged", "alert.closed"]
    assert deliveries[-1].body["alert"]["closed_by"] == owner


async def test_only_an_administrator_retires_a_meter(handled_http: httpx.AsyncClient) -> None:
    for client in CLIENTS[:2]:
        for owner in CLIENTS[:2]:
            response = await handled_http.post(f"/api/meters/{OWN_METER[owner]}/retire", headers=as_(client))
            assert response.status_code == 403
    missing = await handled_http.post("/api/meters/no-such-meter/retire", headers=as_("*"))
    assert missing.status_code == 404
    listed = (await handled_http.get("/api/meters", headers=as_("*"))).json()["meters"]
    assert all(m["retired_at"] is None for m in listed)


async def test_retired_meter_leaves_the_fleet_and_the_offline_rule_until_it_sends_again(
    handled: Consumer, handled_http: httpx.AsyncClient
) -> None:
    owner = CLIENTS[0]
    meter_id = OWN_METER[owner]
    alert = await offline_alert(handled_http, meter_id)
    retired = await handled_http.post(f"/api/meters/{meter_id}/retire", headers=as_("*"))
    assert retired.status_code == 200 and retired.json()["retired_at"]
    # Its open alert closed, by the administrator.
    after = (await handled_http.get("/api/alerts", params={"meter_id": meter_id}, headers=as_("*"))).json()["alerts"]
    (closed,) = [a for a in after if a["alert_id"] == alert["alert_id"]]
    assert closed["state"] == "resolved" and closed["closed_by"] == "admin"
    # Out of the fleet list (owner's and administrator's), still reachable by id, with its readings.
    for viewer in (owner, "*"):
        listed = [m["meter_id"] for m in (await handled_http.get("/api/meters", headers=as_(viewer))).json()["meters"]]
        assert meter_id not in listed
        everything = await handled_http.get("/api/meters", params={"include_retired": "true"}, headers=as_(viewer))
        assert meter_id in [m["meter_id"] for m in everything.json()["meters"]]
    one = await handled_http.get(f"/api/meters/{meter_id}", headers=as_(owner))
    assert one.status_code == 200 and one.json()["retired_at"] == retired.json()["retired_at"]
    series = await handled_http.get(
        f"/api/meters/{meter_id}/readings",
        params={"since": (NOW - timedelta(minutes=5)).isoformat()},
        headers=as_(owner),
    )
    assert len(series.json()["readings"]) == 3
    # The offline rule leaves it alone ...
    await handled.alerts.evaluate_offline(datetime.now(UTC) + timedelta(hours=3))
    opened = await handled_http.get("/api/alerts", params={"meter_id": meter_id, "state": "open"}, headers=as_("*"))
    assert opened.json()["alerts"] == []
    # ... until a reading brings it back into service.
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        body = {
            "seq": 10,
            "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "pressure_bar": 150.0,
            "temperature_c": 15.0,
            "volume_l": FLEET.meters[meter_id].volume_l,
        }
        message = aiocoap.Message(
            code=Code.PUT, uri=reading_uri(handled, meter_id), payload=json.dumps(body).encode(), content_format=50
        )
        assert (await asyncio.wait_for(context.request(message).response, 10)).code == Code.CHANGED
    finally:
        await context.shutdown()
    back = (await handled_http.get("/api/meters", headers=as_(owner))).json()["meters"]
    assert [m["retired_at"] for m in back if m["meter_id"] == meter_id] == [None]
