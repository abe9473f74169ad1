"""The HTTP surface against hostile callers, over real HTTP on loopback (issue 7, item 9).

A real consumer (CoAP, SQLite, uvicorn on an ephemeral port) with the repository's fleet file, an
administrator key and one reading, queried with httpx: extreme query values are 422s that keep the
connection alive, accepted sockets have TCP_NODELAY, wrong keys are throttled per client address, every
response carries the security headers, and no page loads anything from a CDN. The administrator key's rule
is checked through the real configuration loader and the real command line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiocoap
import httpx
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type information
from aiocoap.numbers.codes import Code
from fastapi import FastAPI
from running import run_serve

from conftest import reading_uri
from smartgas_consumer.api import HttpServer
from smartgas_consumer.auth import FAILED_KEY_BURST, FAILED_KEY_REFILL_S, FailedKeyThrottle, client_network
from smartgas_consumer.config import ConfigError, ConsumerConfig, load
from smartgas_consumer.dashboard import PAGE_POLICY
from smartgas_consumer.server import Consumer

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FLEET_FILE = REPO / "fleet" / "fleet.yaml"
ADMIN_KEY = "hardening-admin-key-" + "Qx7vB2mW9pLd4tRz"
METER = "bottle-0001"
WINDOW_ROUTES = [
    f"/api/meters/{METER}/stats",
    f"/api/meters/{METER}/readings",
    "/api/clients/acme-welding/stats",
    "/api/sites/lyon-gerland/stats",
    f"/dashboard/api/meters/{METER}/chart.svg",
]
EXTREME_WINDOWS = [
    ({"since": "0001-01-01T00:00:00+14:00"}, "since"),  # overflows when moved to UTC
    ({"until": "0001-01-01T00:00:00Z"}, "until"),  # the default since (until − 1 h) would underflow
    ({"until": "9999-12-31T23:59:59-14:00"}, "until"),  # overflows when moved to UTC
    ({"since": "9999-12-31T00:00:00Z", "until": "9999-12-31T23:59:59Z"}, "until"),
    ({"since": "0001-01-01T00:00:00Z", "until": "0001-01-02T00:00:00Z"}, "until"),
    ({"since": "1969-12-31T23:59:59Z", "until": "1970-01-01T00:00:01Z"}, "since"),
]


@pytest.fixture
async def hardened(consumer_config: ConsumerConfig) -> AsyncIterator[Consumer]:
    config = load({}, {"SMARTGAS_CONSUMER_ADMIN_KEY": ADMIN_KEY})  # through the rule, as at start-up
    running = Consumer(dataclasses.replace(consumer_config, fleet=FLEET_FILE, admin_key=config.admin_key))
    await running.start()
    try:
        await _feed_one_reading(running)
        yield running
    finally:
        await running.stop()


async def _feed_one_reading(consumer: Consumer) -> None:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        body = {
            "seq": 0,
            "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "pressure_bar": 150.0,
            "temperature_c": 18.0,
            "volume_l": 50.0,
        }
        message = aiocoap.Message(
            code=Code.PUT, uri=reading_uri(consumer, METER), payload=json.dumps(body).encode(), content_format=50
        )
        response = await asyncio.wait_for(context.request(message).response, 10)
        assert response.code == Code.CHANGED
    finally:
        await context.shutdown()


def _base_url(consumer: Consumer) -> str:
    return f"http://127.0.0.1:{consumer.http.port}"


@pytest.fixture
async def http(hardened: Consumer) -> AsyncIterator[httpx.AsyncClient]:
    # One connection at most: every request of a test rides the same kept-alive socket unless it is closed.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=_base_url(hardened), timeout=30, limits=limits) as client:
        yield client


def _local_port(response: httpx.Response) -> int:
    """The client-side port of the connection the response came on (the same port: the same connection)."""
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


ADMIN = {"X-API-Key": ADMIN_KEY}


# -- query parameters: bounded, 422 in the documented shape, the connection kept ---------------------------


async def test_extreme_windows_are_422_on_one_kept_alive_connection(http: httpx.AsyncClient) -> None:
    first = await http.get(f"/api/meters/{METER}/readings", headers=ADMIN)
    assert first.status_code == 200 and len(first.json()["readings"]) == 1
    for route in WINDOW_ROUTES:
        for params, named in EXTREME_WINDOWS:
            response = await http.get(route, params=params, headers=ADMIN)
            assert response.status_code == 422, (route, params, response.text)
            detail = response.json()["detail"]
            assert detail[0]["loc"] == ["query", named]
            assert "between 1970-01-01 and 9999-01-01" in detail[0]["msg"]
            assert response.headers.get("connection") != "close"
            assert _local_port(response) == _local_port(first), (route, params)  # no reset, no reconnect


@pytest.mark.parametrize(
    ("path", "params", "named"),
    [
        (f"/api/meters/{METER}/readings", {"limit": "0"}, "limit"),
        (f"/api/meters/{METER}/readings", {"limit": "10001"}, "limit"),
        (f"/api/meters/{METER}/readings", {"limit": "9" * 400}, "limit"),
        ("/api/alerts", {"limit": "5001"}, "limit"),
        ("/api/alerts", {"state": "closed"}, "state"),
        ("/api/alerts", {"meter_id": "m" * 65}, "meter_id"),
        (f"/api/meters/{METER}/stats", {"since": "1e400"}, "since"),
        (f"/dashboard/api/meters/{METER}/chart.svg", {"measure": "x" * 10_000}, "measure"),
    ],
    ids=[
        "limit-0",
        "limit-above",
        "limit-400-digits",
        "alerts-limit",
        "state",
        "meter-id-long",
        "since-1e400",
        "measure",
    ],
)
async def test_every_query_parameter_is_bounded(
    http: httpx.AsyncClient, path: str, params: dict[str, str], named: str
) -> None:
    response = await http.get(path, params=params, headers=ADMIN)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", named]


# -- TCP_NODELAY ---------------------------------------------------------------------------------------------


async def test_accepted_connections_have_tcp_nodelay(hardened: Consumer, http: httpx.AsyncClient) -> None:
    """Without it, each answer on a kept-alive connection waits ~40 ms for the client's delayed ACK."""
    responses = [await http.get("/api/me", headers=ADMIN) for _ in range(3)]
    assert {_local_port(r) for r in responses} == {_local_port(responses[0])}  # one kept-alive connection
    # The server's side of that connection, from uvicorn's own table of open connections.
    connections = list(hardened.http._server.server_state.connections)
    assert len(connections) == 1
    server_socket = connections[0].transport.get_extra_info("socket")
    assert server_socket.getpeername()[1] == _local_port(responses[0])
    assert server_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


# -- wrong keys, throttled per client address -----------------------------------------------------------------


async def test_wrong_keys_are_throttled_per_address(
    hardened: Consumer, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="smartgas_consumer.auth")
    for attempt in range(FAILED_KEY_BURST):
        wrong = await http.get("/api/me", headers={"X-API-Key": f"guess-{attempt}"})
        assert wrong.status_code == 401
    for attempt in range(5):  # rotating X-Forwarded-For changes nothing: no proxy is trusted
        spoofed = {"X-API-Key": f"guess-again-{attempt}", "X-Forwarded-For": f"203.0.113.{attempt}"}
        throttled = await http.get("/api/meters", headers=spoofed)
        assert throttled.status_code == 429
        assert 1 <= int(throttled.headers["Retry-After"]) <= FAILED_KEY_REFILL_S
        assert "too many invalid X-API-Key attempts" in throttled.json()["detail"]
    # From the throttled address even the right key waits (else guessing would go on at full speed) ...
    assert (await http.get("/api/me", headers=ADMIN)).status_code == 429
    assert (await http.get(f"/dashboard/api/meters/{METER}/chart.svg", headers=ADMIN)).status_code == 429
    # ... while the right key from another address is unaffected (127.0.0.2 is loopback on Linux).
    other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=_base_url(hardened), transport=other, timeout=30) as elsewhere:
        assert (await elsewhere.get("/api/me", headers=ADMIN)).json() == {"client_id": None, "admin": True}
        assert (await elsewhere.get("/api/me", headers={"X-API-Key": "one-wrong-guess"})).status_code == 401
    # One log line for the whole episode, naming the address, never the keys.
    lines = [r.getMessage() for r in caplog.records if r.name == "smartgas_consumer.auth"]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "429" in lines[0]
    assert not any("guess" in line for line in lines)
    assert all(r.levelno < logging.ERROR for r in caplog.records)


async def test_missing_keys_are_not_guesses(http: httpx.AsyncClient) -> None:
    for _ in range(3 * FAILED_KEY_BURST):
        assert (await http.get("/api/me")).status_code == 401
    assert (await http.get("/api/me", headers=ADMIN)).status_code == 200


def test_throttle_refills_and_reports_once_per_episode(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = FailedKeyThrottle(burst=3, refill_s=6.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="smartgas_consumer.auth")
    for _ in range(3):
        assert throttle.retry_after_s("192.0.2.1") == 0
        throttle.failed("192.0.2.1")
    assert throttle.retry_after_s("192.0.2.1") == pytest.approx(6.0)
    assert throttle.retry_after_s("192.0.2.2") == 0
    now[0] = 6.0  # one more attempt allowed, and its failure throttles again without a new line
    assert throttle.retry_after_s("192.0.2.1") == 0
    throttle.failed("192.0.2.1")
    assert throttle.retry_after_s("192.0.2.1") > 0
    assert len(caplog.records) == 1
    now[0] = 1000.0  # quiet long enough: a new episode gets its own line
    for _ in range(3):
        throttle.failed("192.0.2.1")
    assert len(caplog.records) == 2


def test_wrong_keys_per_minute_sets_burst_and_pace() -> None:
    config = load({"wrong_keys_per_minute": "30"}, {})
    throttle = FailedKeyThrottle.per_minute(config.wrong_keys_per_minute)
    assert (throttle.burst, throttle.refill_s) == (30, 2.0)
    assert (ConsumerConfig().wrong_keys_per_minute, FAILED_KEY_BURST, FAILED_KEY_REFILL_S) == (10, 10, 6.0)
    with pytest.raises(ConfigError, match="--wrong-keys-per-minute='0'"):
        load({"wrong_keys_per_minute": "0"}, {})


def test_throttle_memory_is_bounded() -> None:
    now = [0.0]
    throttle = FailedKeyThrottle(max_addresses=1000, clock=lambda: now[0])
    for index in range(50_000):
        throttle.failed(f"10.{index // 65536}.{index // 256 % 256}.{index % 256}")
        assert len(throttle) <= 1000
    now[0] = 3600.0  # all refilled: the next failure drops them
    throttle.failed("192.0.2.9")
    assert len(throttle) == 1


def test_ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert client_network("2001:db8:1:2:aaaa::1") == client_network("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_network("2001:db8:1:3::1") != client_network("2001:db8:1:2::1")
    assert client_network("::ffff:192.0.2.7") == client_network("192.0.2.7") == "192.0.2.7"
    assert client_network(None) == "unknown"


# -- security headers on every response ----------------------------------------------------------------------

COMMON_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "cache-control": "no-store"}


@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/api/me", ADMIN, 200),
        ("GET", "/api/me", {}, 401),
        ("GET", "/api/meters/nobody", ADMIN, 404),
        ("GET", f"/api/meters/{METER}/stats?since=0001-01-01T00:00:00%2B14:00", ADMIN, 422),
        ("POST", "/api/me", ADMIN, 405),
        ("GET", "/no/such/page", {}, 404),
        ("GET", "/api/openapi.json", {}, 200),
        ("GET", "/healthz", {}, 200),
        ("GET", "/metrics", {}, 200),
        ("GET", "/", {}, 307),
        ("GET", "/dashboard/", {}, 200),
        ("GET", "/dashboard/dashboard.js", {}, 200),
        ("GET", f"/dashboard/api/meters/{METER}/chart.svg", ADMIN, 200),
    ],
)
async def test_every_response_carries_the_security_headers(
    http: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    response = await http.request(method, path, headers=headers)
    assert response.status_code == status
    for name, value in COMMON_HEADERS.items():
        assert response.headers.get(name) == value, name
    assert response.headers.get("x-frame-options") in {"DENY", "SAMEORIGIN"}
    assert "frame-ancestors" in response.headers["content-security-policy"]
    assert "server" not in response.headers  # no product banner
    if path.startswith("/dashboard/") and not path.endswith(".svg"):
        assert response.headers["content-security-policy"] == PAGE_POLICY  # the page keeps its strict policy
        assert response.headers["x-frame-options"] == "DENY"
    elif not path.startswith("/dashboard/"):
        assert response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"


async def test_a_server_error_carries_the_headers_too() -> None:
    """The API answers no request with 500 (that is the point), so a stand-in app raises one."""
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a fault the real app cannot be made to have")

    server = HttpServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            response = await client.get("/boom")
        assert response.status_code == 500
        for name, value in COMMON_HEADERS.items():
            assert response.headers.get(name) == value, name
    finally:
        await server.stop()


async def test_no_page_loads_anything_from_a_cdn(http: httpx.AsyncClient) -> None:
    for path in ("/api/docs", "/api/redoc", "/docs", "/redoc", "/api/docs/oauth2-redirect"):
        assert (await http.get(path)).status_code == 404, path
    assert (await http.get("/api/openapi.json")).json()["openapi"].startswith("3.")
    for path in ("/dashboard/", "/dashboard/dashboard.js", "/dashboard/dashboard.css", "/api/openapi.json"):
        body = (await http.get(path)).text
        assert not any(host in body for host in ("cdn.jsdelivr.net", "unpkg.com", "cdnjs", "fastapi.tiangolo.com"))


# -- the administrator key's rule -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("changeme-admin-key", "placeholder"),
        ("changeme-changeme-changeme-changeme", "placeholder"),
        ("x", "has 1 characters"),
        ("s3cret-admin-key", "has 16 characters"),
        ("correct horse battery staple 2026 ok", "spaces"),
        ("ключ-администратора-0123456789-abcdef", "non-ASCII"),
        ("abababababababababababababababab12", "different characters"),
    ],
)
def test_a_guessable_admin_key_is_refused(key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load({}, {"SMARTGAS_CONSUMER_ADMIN_KEY": key})
    message = str(refused.value)
    assert message.startswith("SMARTGAS_CONSUMER_ADMIN_KEY=(hidden): ")
    assert problem in message and "secrets.token_urlsafe(32)" in message
    assert key not in message  # a secret is never echoed


@pytest.mark.parametrize(
    "make", [lambda: secrets.token_urlsafe(24), secrets.token_urlsafe, lambda: secrets.token_hex(16)]
)
def test_random_keys_are_accepted(make: Any) -> None:
    for _ in range(200):
        key = make()
        assert load({}, {"SMARTGAS_CONSUMER_ADMIN_KEY": key}).admin_key == key


def test_makefile_and_docs_make_keys_the_rule_accepts() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "secrets.token_urlsafe(24)" in makefile  # 24 bytes: 32 characters
    env_text = (REPO / ".env").read_text()
    assert "secrets.token_urlsafe(32)" in env_text


def test_compose_stack_starts_with_the_shipped_env() -> None:
    """The .env placeholder is gone: the compose environment passes the consumer's configuration checks."""
    env = dict(
        line.split("=", 1)
        for line in (REPO / ".env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    given = compose["services"]["consumer"]["environment"]["SMARTGAS_CONSUMER_ADMIN_KEY"]
    assert given == "${SMARTGAS_ADMIN_KEY:-}"
    assert env["SMARTGAS_ADMIN_KEY"] == ""  # no key by default; load() skips an empty value
    assert load({}, {"SMARTGAS_CONSUMER_ADMIN_KEY": env["SMARTGAS_ADMIN_KEY"]}).admin_key is None


def test_consumer_refuses_to_start_with_the_placeholder(tmp_path: Path) -> None:
    environment = {**os.environ, "SMARTGAS_CONSUMER_ADMIN_KEY": "changeme-admin-key"}
    result = run_serve(tmp_path / "store.db", env=environment)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "SMARTGAS_CONSUMER_ADMIN_KEY" in lines[0] and "Traceback" not in result.stderr
    assert "changeme-admin-key" not in result.stderr
    assert not (tmp_path / "store.db").exists()  # refused before anything opened
