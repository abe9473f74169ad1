"""The dashboard over real HTTP and in a real browser: the page, its assets, its charts, its behaviour.

A real consumer (CoAP, SQLite) with the repository's fleet file and an API keys file, fed over CoAP; the
HTTP side is ``build_app`` with the dashboard router on loopback, as ``server.py`` assembles it. The
browser tests drive Debian's headless Chromium over the Chrome DevTools Protocol (aiohttp's websocket
client): open the page with a key in the fragment, read the DOM, click a meter, wait for polling. They are
skipped by name where ``/usr/bin/chromium`` is absent (``make deps`` installs it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import html.parser
import itertools
import json
import os
import signal
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiocoap
import aiohttp
import httpx
import pytest
from aiocoap.numbers.codes import Code

from conftest import reading_uri
from smartgas_consumer.api import HttpServer, build_app
from smartgas_consumer.auth import digest
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.dashboard import PAGE_POLICY, build_dashboard_router, forecast_line
from smartgas_consumer.fleet import full_moles, load_fleet
from smartgas_consumer.server import Consumer

pytestmark = pytest.mark.integration

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
FLEET = load_fleet(FLEET_FILE)
CLIENTS = sorted(FLEET.clients)
ADMIN_KEY = "admin-key-0123456789abcdef"
KEYS = {client: f"key-of-{client}-0123456789" for client in CLIENTS} | {"*": ADMIN_KEY}
OWN_METER = {client: min(m.meter_id for m in FLEET.meters.values() if m.client_id == client) for client in CLIENTS}
FED = sorted(OWN_METER.values())
READINGS_EACH = 4
SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1440,1000",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="headless browser tests need Debian's chromium (/usr/bin/chromium; make deps)"
)


HOSTILE_MESSAGE = '<img src="x" onerror="document.title=1">pressure <b>low</b> & falling'


@dataclasses.dataclass(frozen=True)
class OpenAlerts:
    """Stands in for the alert engine behind ``/api/alerts``: one open alert on the first fed meter."""

    opened_at: str

    async def list_alerts(
        self, *, client_id: str | None = None, state: str | None = None, meter_id: str | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        meter = FLEET.meters[FED[0]]
        alert = {
            "alert_id": "a-1",
            "meter_id": meter.meter_id,
            "client_id": meter.client_id,
            "site_id": meter.site.site_id,
            "kind": "low_fill",
            "severity": "warning",
            "state": "open",
            "message": HOSTILE_MESSAGE,
            "value": 12.5,
            "opened_at": self.opened_at,
            "updated_at": self.opened_at,
            "resolved_at": None,
            "occurrences": 1,
            "acknowledged_at": None,
            "acknowledged_by": None,
            "closed_by": None,
        }
        visible = client_id in (None, meter.client_id) and state in (None, "open") and meter_id in (None, FED[0])
        return [alert] if visible else []

    async def acknowledge(self, alert_id: str, *, client_id: str | None, by: str) -> dict[str, Any] | None:
        return None  # the tests of acknowledging use the consumer's own server and its real engine

    async def close(self, alert_id: str, *, client_id: str | None, by: str) -> dict[str, Any] | None:
        return None

    async def retire(self, meter_id: str, *, by: str) -> str:
        raise AssertionError("retiring is tested on the consumer's own server")


@dataclasses.dataclass
class Dashboard:
    consumer: Consumer
    base_url: str
    coap: aiocoap.Context
    next_seq: dict[str, int]

    async def feed(self, meter_id: str, pressure_bar: float, ts: datetime) -> None:
        seq = self.next_seq.get(meter_id, 0)
        self.next_seq[meter_id] = seq + 1
        body = {
            "seq": seq,
            "ts": ts.isoformat().replace("+00:00", "Z"),
            "pressure_bar": pressure_bar,
            "temperature_c": 15.0,
            "volume_l": FLEET.meters[meter_id].volume_l,
        }
        message = aiocoap.Message(
            code=Code.PUT,
            uri=reading_uri(self.consumer, meter_id),
            payload=json.dumps(body).encode(),
            content_format=50,
        )
        response = await asyncio.wait_for(self.coap.request(message).response, 10)
        assert response.code == Code.CHANGED


@pytest.fixture
async def dashboard(consumer_config: ConsumerConfig, tmp_path: Path) -> AsyncIterator[Dashboard]:
    keys_file = tmp_path / "api-keys.yaml"
    lines = [f'  - {{client: "{client}", sha256: {digest(key)}}}' for client, key in KEYS.items()]
    keys_file.write_text("keys:\n" + "\n".join(lines) + "\n")
    config = dataclasses.replace(consumer_config, fleet=FLEET_FILE, api_keys=keys_file, http_port=0)
    consumer = Consumer(config)
    await consumer.start()
    http = HttpServer(
        build_app(
            consumer.queries,
            consumer.api_keys,
            alerts=OpenAlerts(
                (datetime.now(UTC) - timedelta(minutes=3, seconds=30)).isoformat().replace("+00:00", "Z")
            ),
            dashboard=build_dashboard_router(
                consumer.queries, consumer.api_keys, expected_period_s=config.expected_period_s
            ),
        ),
        "127.0.0.1",
        0,
    )
    coap = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        await http.start()
        running = Dashboard(consumer, f"http://127.0.0.1:{http.port}", coap, {})
        now = datetime.now(UTC).replace(microsecond=0)
        # Each fed meter: READINGS_EACH readings 10 s apart ending now, pressure falling from 180 bar.
        for meter_id in FED:
            for index in range(READINGS_EACH):
                at = now - timedelta(seconds=10 * (READINGS_EACH - 1 - index))
                await running.feed(meter_id, 180.0 - 5 * index, at)
        yield running
    finally:
        await coap.shutdown()
        await http.stop()
        await consumer.stop()


@pytest.fixture
async def http(dashboard: Dashboard) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=dashboard.base_url, timeout=10) as client:
        yield client


def as_(client: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[client]}


def chart_path(meter_id: str) -> str:
    return f"/dashboard/api/meters/{meter_id}/chart.svg"


# -- the routes, over HTTP ---------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}], ids=["no-key", "bad-key", "empty"])
async def test_chart_needs_a_valid_key(http: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await http.get(chart_path(FED[0]), headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "missing or invalid X-API-Key"}


@pytest.mark.parametrize("viewer", CLIENTS)
async def test_chart_of_another_clients_meter_is_404_like_a_missing_one(http: httpx.AsyncClient, viewer: str) -> None:
    for owner in CLIENTS:
        response = await http.get(chart_path(OWN_METER[owner]), headers=as_(viewer))
        if owner == viewer:
            assert response.status_code == 200
            continue
        missing = await http.get(chart_path("no-such-meter"), headers=as_(viewer))
        assert response.status_code == missing.status_code == 404
        assert response.json()["detail"].replace(OWN_METER[owner], "X") == missing.json()["detail"].replace(
            "no-such-meter", "X"
        )


@pytest.mark.parametrize("measure", ["moles", "pressure_bar", "fill_pct", "temperature_c"])
async def test_chart_of_own_meter_is_an_svg_with_one_point_per_reading(http: httpx.AsyncClient, measure: str) -> None:
    client = CLIENTS[0]
    response = await http.get(chart_path(OWN_METER[client]), params={"measure": measure}, headers=as_(client))
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/svg+xml"
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    root = ET.fromstring(response.text)
    assert root.tag == f"{SVG}svg" and root.get("data-points") == str(READINGS_EACH)
    polyline = root.find(f".//{SVG}polyline")
    assert polyline is not None and len(polyline.get("points", "").split()) == READINGS_EACH
    title = root.find(f"{SVG}title")
    assert title is not None and OWN_METER[client] in (title.text or "")


async def test_chart_window_and_its_bounds(http: httpx.AsyncClient) -> None:
    meter, admin = FED[0], as_("*")
    old = {"since": "2020-01-01T00:00:00Z", "until": "2020-01-02T00:00:00Z"}
    empty = ET.fromstring((await http.get(chart_path(meter), params=old, headers=admin)).text)
    assert empty.get("data-points") == "0"
    recent = {"since": (datetime.now(UTC) - timedelta(seconds=15)).isoformat()}
    assert ET.fromstring((await http.get(chart_path(meter), params=recent, headers=admin)).text).get("data-points") in {
        "2",
        "3",
    }
    for params in (
        {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        {"since": "2026-01-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"},
        {"measure": "volume_l"},
        {"measure": "<svg onload=alert(1)>"},
    ):
        assert (await http.get(chart_path(meter), params=params, headers=admin)).status_code == 422, params


async def test_chart_axis_spans_the_bottle_unless_the_readings_are_asked_for(http: httpx.AsyncClient) -> None:
    meter = FLEET.meters[FED[0]]
    for measure, full in (("moles", full_moles(meter)), ("pressure_bar", meter.nominal_pressure_bar)):
        bottle = ET.fromstring((await http.get(chart_path(FED[0]), params={"measure": measure}, headers=as_("*"))).text)
        ticks = [float(t.text or "nan") for t in bottle.iter(f"{SVG}text") if "value-tick" in (t.get("class") or "")]
        assert ticks[0] == 0 and ticks[-1] >= full, (measure, ticks)
        params = {"measure": measure, "scale": "data"}
        data = ET.fromstring((await http.get(chart_path(FED[0]), params=params, headers=as_("*"))).text)
        ticks = [float(t.text or "nan") for t in data.iter(f"{SVG}text") if "value-tick" in (t.get("class") or "")]
        assert ticks[0] > 0, (measure, ticks)
    refused = await http.get(chart_path(FED[0]), params={"scale": "log"}, headers=as_("*"))
    assert refused.status_code == 422


async def test_chart_line_breaks_where_the_meter_was_silent(dashboard: Dashboard, http: httpx.AsyncClient) -> None:
    meter_id = next(m for m in sorted(FLEET.meters) if m not in FED)
    now = datetime.now(UTC).replace(microsecond=0)
    for ago_s in (400, 390, 10, 0):  # six minutes of silence between two pairs of readings
        await dashboard.feed(meter_id, 150.0, now - timedelta(seconds=ago_s))
    root = ET.fromstring((await http.get(chart_path(meter_id), headers=as_("*"))).text)
    lines = [line.get("points", "").split() for line in root.iter(f"{SVG}polyline")]
    assert [len(points) for points in lines] == [2, 2]


async def test_hostile_meter_id_in_the_path_is_never_drawn(http: httpx.AsyncClient) -> None:
    hostile = '<svg onload="alert(1)">'
    response = await http.get(chart_path(hostile.replace('"', "%22")), headers=as_("*"))
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"


class _PageReader(html.parser.HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would refuse: inline scripts, handlers, style attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True
        if tag == "style" or "style" in names or any(name.startswith("on") for name in names):
            self.inline.append(tag)

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False if tag == "script" else self._in_script

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("script body")


async def test_page_is_served_with_a_strict_policy_and_no_inline_code(http: httpx.AsyncClient) -> None:
    response = await http.get("/dashboard/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = response.headers["content-security-policy"]
    assert policy == PAGE_POLICY
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == directives["script-src"] == directives["style-src"] == "'self'"
    assert "unsafe" not in policy and "http" not in policy
    assert directives["frame-ancestors"] == "'none'"
    reader = _PageReader()
    reader.feed(response.text)
    assert reader.scripts == [{"src": "dashboard.js", "defer": None}]
    assert reader.inline == []
    assert "http://" not in response.text and "https://" not in response.text  # nothing from the internet


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("dashboard.js", "text/javascript; charset=utf-8"),
        ("dashboard.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
async def test_assets_are_served_from_the_package(http: httpx.AsyncClient, name: str, content_type: str) -> None:
    response = await http.get(f"/dashboard/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "http://" not in response.text.replace("http://www.w3.org/2000/svg", "")


@pytest.mark.parametrize("path", ["/dashboard/nope.js", "/dashboard/..%2Fdashboard.py", "/dashboard/index.html"])
async def test_nothing_else_is_served(http: httpx.AsyncClient, path: str) -> None:
    assert (await http.get(path)).status_code == 404


async def test_root_and_bare_path_lead_to_the_page(http: httpx.AsyncClient) -> None:
    for path in ("/", "/dashboard"):
        response = await http.get(path)
        assert response.status_code == 307 and response.headers["location"] == "/dashboard/"


# -- the page, in headless Chromium ------------------------------------------------------------------


class Browser:
    """One headless Chromium and one page, driven over the DevTools Protocol."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.process: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None
        self.socket: aiohttp.ClientWebSocketResponse | None = None
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            str(CHROMIUM),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={self.profile}",
            "--remote-debugging-port=0",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # its helpers share its process group, stopped together in close()
        )
        # Chromium writes the port it picked into the profile once DevTools listens.
        port_file = self.profile / "DevToolsActivePort"
        async with asyncio.timeout(20):
            while not port_file.exists() or not port_file.read_text().strip():
                assert self.process.returncode is None, "chromium exited at start-up"
                await asyncio.sleep(0.05)
        port = port_file.read_text().split()[0]
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
            pages = [t for t in await response.json() if t["type"] == "page"]
        self.socket = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")

    async def _read(self) -> None:
        assert self.socket is not None
        async for message in self.socket:
            data = json.loads(message.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            elif data.get("method") == "Runtime.exceptionThrown":
                self.errors.append(data["params"]["exceptionDetails"].get("text", "exception"))
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] == "error":
                self.errors.append(data["params"]["entry"]["text"])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        assert self.socket is not None
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        await self.socket.send_json({"id": command_id, "method": method, "params": params})
        answer = await asyncio.wait_for(future, 10)
        assert "error" not in answer, f"{method}: {answer['error']}"
        result: dict[str, Any] = answer["result"]
        return result

    async def open(self, url: str) -> None:
        """Navigate, and return once the new document has loaded (its script then runs on its own)."""
        await self.send("Page.navigate", url=url)
        path = url.split("#")[0]
        await self.wait_for(f"document.readyState === 'complete' && location.href.startsWith({json.dumps(path)})")

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = 10) -> Any:
        """The expression's value once it is truthy; fails after ``timeout_s``."""
        value = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not (value := await self.evaluate(expression)):  # noqa: ASYNC110 - polls the page
                    await asyncio.sleep(0.1)
        assert value, f"not true within {timeout_s} s: {expression}"
        return value

    async def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element, scrolled into view first."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.socket is not None:
            await self.socket.close()
        if self.session is not None:
            await self.session.close()
        if self.process is not None:
            await stop_process_group(self.process)


async def stop_process_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM to the browser's own process group (it started it), SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    running = Browser(tmp_path / "chromium-profile")
    try:
        await running.start()
        yield running
    finally:
        await running.close()


ROWS = "document.querySelectorAll('#fleet tbody tr').length"


def cell(meter_id: str, css_class: str) -> str:
    return f"document.querySelector('tr[data-meter=\"{meter_id}\"] .{css_class}').textContent"


def chart_points(measure: str) -> str:
    return f"Number(document.querySelector('.chart-box[data-measure=\"{measure}\"] svg')?.dataset.points ?? -1)"


@needs_chromium
async def test_a_liquefied_bottle_shows_its_liquid_state(dashboard: Dashboard, browser: Browser) -> None:
    # bottle-0051 holds CO₂: 50.9 bar at 15 °C is its vapour pressure (liquid left), 20 bar is far below it.
    await dashboard.feed("bottle-0051", 50.9, datetime.now(UTC))
    await browser.open(f"{dashboard.base_url}/dashboard/#key={ADMIN_KEY}")
    await browser.wait_for(f"{ROWS} === {len(FLEET.meters)}")
    assert await browser.wait_for(f"{cell('bottle-0051', 'fill-value')} === 'liquid'")
    await dashboard.feed("bottle-0051", 20.0, datetime.now(UTC))
    await browser.open(f"{dashboard.base_url}/dashboard/")
    await browser.wait_for(f"{ROWS} === {len(FLEET.meters)}")
    assert await browser.wait_for(f"{cell('bottle-0051', 'fill-value')} === 'liquid gone'", timeout_s=10)


@needs_chromium
async def test_page_lists_the_whole_fleet(dashboard: Dashboard, browser: Browser, tmp_path: Path) -> None:
    await browser.open(f"{dashboard.base_url}/dashboard/#key={ADMIN_KEY}")
    assert await browser.wait_for(f"{ROWS} === {len(FLEET.meters)} && {ROWS}") == 54
    assert await browser.evaluate("location.hash") == ""  # the key left the address bar
    assert await browser.evaluate("localStorage.getItem('smartgas.apiKey')") == ADMIN_KEY
    assert await browser.evaluate("document.querySelector('#who').textContent") == "administrator"
    listed = await browser.evaluate("[...document.querySelectorAll('#fleet tbody tr')].map(r => r.dataset.meter)")
    assert sorted(listed) == sorted(FLEET.meters)
    # Sorted by client name, then site, then meter.
    order = [(FLEET.clients[m.client_id], m.site.name, m.meter_id) for m in (FLEET.meters[i] for i in listed)]
    assert order == sorted(order)
    for meter_id in FED:
        assert await browser.evaluate(cell(meter_id, "pressure")) == "165.0 bar"
        assert await browser.evaluate(cell(meter_id, "pill")) == "online"
        assert (await browser.evaluate(cell(meter_id, "ago"))).endswith(" s ago")
        assert (await browser.evaluate(cell(meter_id, "fill-value"))).endswith(" %")
    silent = next(m for m in sorted(FLEET.meters) if m not in FED)
    assert await browser.evaluate(cell(silent, "pill")) == "never seen"
    assert await browser.evaluate(cell(silent, "ago")) == "never"
    assert await browser.evaluate("document.querySelector('#count-online').textContent") == str(len(FED))
    # The open alert is listed as text: its message's markup is shown, never run.
    alerts = "document.querySelectorAll('#alerts li')"
    assert await browser.evaluate(f"{alerts}.length") == 1
    assert await browser.evaluate("document.querySelector('#alerts .alert-message').textContent") == HOSTILE_MESSAGE
    assert await browser.evaluate("document.querySelector('#alerts img, #alerts b')") is None
    assert await browser.evaluate("document.querySelector('#alerts .alert-age').textContent") == "3 min ago"
    assert await browser.evaluate("document.querySelector('#no-alerts').hidden") is True
    assert await browser.evaluate("document.querySelector('#count-alerts').textContent") == "1"
    # Nothing selected yet: the panel invites a click (it once said a meter was retired).
    facts = await browser.evaluate("document.querySelector('#meter-facts').textContent")
    assert facts == "Click a row of the table to see its readings over time."
    await browser.screenshot(tmp_path / "dashboard-fleet.png")
    assert browser.errors == []  # no script error, no refused resource, no CSP violation


@needs_chromium
async def test_clicking_a_meter_draws_its_charts_and_polling_brings_new_readings(
    dashboard: Dashboard, browser: Browser, tmp_path: Path
) -> None:
    meter_id = FED[1]
    await browser.open(f"{dashboard.base_url}/dashboard/#key={ADMIN_KEY}&poll=1")
    await browser.wait_for(f"{ROWS} === {len(FLEET.meters)}")
    await browser.click(f'tr[data-meter="{meter_id}"]')
    for measure in ("moles", "pressure_bar", "fill_pct"):
        assert await browser.wait_for(f"{chart_points(measure)} > 0 && {chart_points(measure)}") == READINGS_EACH
    assert await browser.evaluate("location.hash") == f"#poll=1&meter={meter_id}"
    assert await browser.evaluate(f"document.querySelector('tr[data-meter=\"{meter_id}\"]').ariaSelected") == "true"
    assert meter_id in await browser.evaluate("document.querySelector('#meter-title').textContent")
    polyline = "document.querySelector('.chart-box[data-measure=\"moles\"] polyline').getAttribute('points')"
    assert len((await browser.evaluate(polyline)).split()) == READINGS_EACH
    await browser.screenshot(tmp_path / "dashboard-meter.png")

    await dashboard.feed(meter_id, 150.0, datetime.now(UTC))
    assert await browser.wait_for(f"{chart_points('moles')} === {READINGS_EACH + 1}", timeout_s=8)
    assert await browser.wait_for(f"{cell(meter_id, 'pressure')} === '150.0 bar'", timeout_s=4)
    assert browser.errors == []


@needs_chromium
async def test_without_a_key_the_page_asks_for_one(dashboard: Dashboard, browser: Browser) -> None:
    await browser.open(f"{dashboard.base_url}/dashboard/#key=not-a-key")
    await browser.wait_for("!document.querySelector('#login').hidden")
    assert "refused" in await browser.evaluate("document.querySelector('#login-error').textContent")
    assert await browser.evaluate("document.querySelector('#main').hidden") is True
    assert await browser.evaluate("localStorage.getItem('smartgas.apiKey')") is None
    # Type a client's key into the form: the page opens with that client's meters only.
    client = CLIENTS[2]
    await browser.evaluate("document.querySelector('#key-input').focus()")
    await browser.send("Input.insertText", text=KEYS[client])
    await browser.click("#login-form button[type=submit]")
    own = sorted(m.meter_id for m in FLEET.meters.values() if m.client_id == client)
    await browser.wait_for(f"{ROWS} === {len(own)}")
    listed = await browser.evaluate("[...document.querySelectorAll('#fleet tbody tr')].map(r => r.dataset.meter)")
    assert sorted(listed) == own
    assert await browser.evaluate("document.querySelector('#who').textContent") == f"client {client}"
    # The browser's 401 for not-a-key is the one error expected on the console.
    assert all("401" in error for error in browser.errors), browser.errors


@needs_chromium
async def test_selected_meter_is_addressable_in_the_fragment(dashboard: Dashboard, tmp_path: Path) -> None:
    """Load and render with no driver at all: ``--dump-dom`` after a budget of virtual time."""
    meter_id = FED[0]
    profile = tmp_path / "dump-profile"
    url = f"{dashboard.base_url}/dashboard/#key={ADMIN_KEY}&meter={meter_id}"
    process = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=4000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        dom, _ = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            await stop_process_group(process)
    page = dom.decode()
    assert page.count("<tr data-meter=") == len(FLEET.meters)
    assert f'data-meter="{meter_id}" tabindex="0" aria-selected="true"' in page
    assert f"Meter {meter_id}" in page
    assert f'data-points="{READINGS_EACH}"' in page
    assert ADMIN_KEY not in page


async def set_viewport(browser: Browser, width: int, height: int) -> None:
    await browser.send(
        "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
    )


@needs_chromium
async def test_client_and_site_names_are_never_cut_at_1400_px(dashboard: Dashboard, browser: Browser) -> None:
    await set_viewport(browser, 1400, 1000)
    await browser.open(f"{dashboard.base_url}/dashboard/#key={ADMIN_KEY}")
    await browser.wait_for(f"{ROWS} === {len(FLEET.meters)}")
    assert await browser.evaluate("innerWidth") == 1400
    cut = await browser.evaluate(
        "[...document.querySelectorAll('#fleet td.client, #fleet td.site')]"
        ".filter(td => td.scrollWidth > td.clientWidth).map(td => td.textContent)"
    )
    assert cut == []
    untitled = await browser.evaluate(
        "[...document.querySelectorAll('#fleet td.client, #fleet td.site')]"
        ".filter(td => td.title !== td.textContent).length"
    )
    assert untitled == 0
    # The table still fits the page: nothing hides behind a horizontal scroll bar either.
    assert await browser.evaluate("document.querySelector('.table-wrap').scrollWidth") <= await browser.evaluate(
        "document.querySelector('.table-wrap').clientWidth"
    )
    names = set(FLEET.clients.values()) | {site.name for site in FLEET.sites.values()}
    shown = set(
        await browser.evaluate(
            "[...document.querySelectorAll('#fleet td.client, #fleet td.site')].map(td => td.textContent)"
        )
    )
    assert shown <= names and len(shown) > 10


@needs_chromium
async def test_on_a_narrow_screen_a_selected_meter_shows_its_charts_where_the_user_looks(
    dashboard: Dashboard, browser: Browser, tmp_path: Path
) -> None:
    await set_viewport(browser, 1000, 800)
    await browser.open(f"{dashboard.base_url}/dashboard/#key={ADMIN_KEY}")
    await browser.wait_for(f"{ROWS} === {len(FLEET.meters)}")
    last = await browser.evaluate("[...document.querySelectorAll('#fleet tbody tr')].at(-1).dataset.meter")
    await browser.click(f'tr[data-meter="{last}"]')
    await browser.wait_for(f"document.querySelector('#meter-title').textContent === 'Meter {last}'")
    for measure in ("moles", "pressure_bar", "fill_pct"):
        await browser.wait_for(f"{chart_points(measure)} >= 0")
    await browser.wait_for("Math.abs(document.querySelector('#meter-panel').getBoundingClientRect().top) < 2")
    panel_top = await browser.evaluate("document.querySelector('#meter-panel').getBoundingClientRect().top")
    chart_top = await browser.evaluate(
        "document.querySelector('.chart-box[data-measure=\"moles\"] svg').getBoundingClientRect().top"
    )
    height = await browser.evaluate("innerHeight")
    assert abs(panel_top) < 2, panel_top
    assert 0 < chart_top < height, chart_top
    assert await browser.evaluate("document.activeElement.id") == "meter-title"
    await browser.screenshot(tmp_path / "dashboard-narrow.png")
    assert browser.errors == []


@needs_chromium
async def test_axes_over_a_flat_series_run_from_zero_to_the_full_bottle(
    dashboard: Dashboard, browser: Browser, tmp_path: Path
) -> None:
    """A bottle that holds steady (0.01 bar of noise) draws as a flat line, not as a steep fall."""
    meter_id = next(m for m in sorted(FLEET.meters) if m not in FED)
    meter = FLEET.meters[meter_id]
    now = datetime.now(UTC).replace(microsecond=0)
    for index in range(6):
        await dashboard.feed(meter_id, 150.0 + (0.01 if index % 2 else 0.0), now - timedelta(seconds=10 * (5 - index)))
    await browser.open(f"{dashboard.base_url}/dashboard/#key={ADMIN_KEY}&meter={meter_id}")
    await browser.wait_for(f"{chart_points('moles')} === 6 && {chart_points('pressure_bar')} === 6")

    def ticks(measure: str) -> str:
        return (
            f"[...document.querySelectorAll('.chart-box[data-measure=\"{measure}\"] .value-tick')]"
            ".map(t => Number(t.textContent))"
        )

    def line_height(measure: str) -> str:
        return f"document.querySelector('.chart-box[data-measure=\"{measure}\"] polyline').getBBox().height"

    moles, pressure = await browser.evaluate(ticks("moles")), await browser.evaluate(ticks("pressure_bar"))
    assert moles[0] == 0 and moles[-1] >= full_moles(meter)
    assert pressure[0] == 0 and pressure[-1] >= meter.nominal_pressure_bar
    assert await browser.evaluate(line_height("moles")) < 1
    assert await browser.evaluate(line_height("pressure_bar")) < 1
    await browser.screenshot(tmp_path / "dashboard-flat.png")
    # The user may zoom into the readings instead.
    await browser.evaluate(
        "(() => { const s = document.querySelector('#scale'); s.value = 'data';"
        " s.dispatchEvent(new Event('change')); })()"
    )
    await browser.wait_for(f"{ticks('pressure_bar')}[0] > 100")
    assert browser.errors == []


@needs_chromium
async def test_alerts_are_acknowledged_closed_and_a_meter_retired_from_the_page(
    dashboard: Dashboard, browser: Browser, tmp_path: Path
) -> None:
    """On the consumer's own HTTP server, with the real alert engine: every fed meter has gone offline."""
    consumer = dashboard.consumer
    await consumer.alerts.flush()
    await consumer.alerts.evaluate_offline(datetime.now(UTC) + timedelta(hours=1))
    assert consumer.http.port is not None
    base = f"http://127.0.0.1:{consumer.http.port}"
    await browser.open(f"{base}/dashboard/#key={ADMIN_KEY}&poll=1")
    await browser.wait_for(f"document.querySelectorAll('#alerts li').length === {len(FED)}")
    first, second, third = FED[0], FED[1], FED[2]

    def alert_of(meter_id: str) -> str:
        return f"document.querySelector('#alerts li[data-meter=\"{meter_id}\"]')"

    # The silence is counted when shown, from the meter's last reading: seconds now, not an hour.
    message = f"{alert_of(first)}.querySelector('.alert-message').textContent"
    shown = await browser.evaluate(message)
    assert shown.startswith("no reading for ") and " s (last at " in shown and " h " not in shown
    await browser.wait_for(f"{message} !== {json.dumps(shown)}")  # and counted again every second

    await browser.click(f'#alerts li[data-meter="{first}"] button[data-action="acknowledge"]')
    await browser.wait_for(
        f"{alert_of(first)}?.querySelector('.acknowledged')?.textContent === 'acknowledged by admin'"
    )
    assert await browser.evaluate(f"{alert_of(first)}.querySelector('button[data-action=\"acknowledge\"]')") is None

    await browser.click(f'#alerts li[data-meter="{second}"] button[data-action="close"]')
    await browser.wait_for(f"{alert_of(second)} === null")
    (closed,) = await consumer.alerts.list_alerts(meter_id=second)
    assert (closed["state"], closed["closed_by"]) == ("resolved", "admin")

    # Retire: select the meter, click twice (the first click only arms the button).
    await browser.click(f'tr[data-meter="{third}"]')
    await browser.wait_for("!document.querySelector('#retire').hidden")
    await browser.click("#retire")
    assert (await browser.evaluate("document.querySelector('#retire').textContent")) == f"Confirm: retire {third}"
    assert await browser.evaluate(f"document.querySelector('tr[data-meter=\"{third}\"]') !== null")
    await browser.click("#retire")
    await browser.wait_for(f"document.querySelector('tr[data-meter=\"{third}\"]') === null")
    assert await browser.wait_for(f"{ROWS} === {len(FLEET.meters) - 1} && {ROWS}") == len(FLEET.meters) - 1
    assert await browser.evaluate("document.querySelector('#count-meters').textContent") == str(len(FLEET.meters) - 1)
    assert "retired" in await browser.evaluate("document.querySelector('#meter-facts').textContent")
    await browser.wait_for(f"{alert_of(third)} === null")
    await browser.screenshot(tmp_path / "dashboard-handled.png")
    assert browser.errors == []

    # A client's key: its own alert has the buttons, but there is no retire button.
    client = FLEET.meters[FED[3]].client_id
    await browser.open(f"{base}/dashboard/#key={KEYS[client]}&meter={FED[3]}")
    await browser.wait_for(f"document.querySelector('#who').textContent === 'client {client}'")
    await browser.wait_for(f"{alert_of(FED[3])}?.querySelector('button[data-action=\"close\"]') != null")
    assert await browser.evaluate("document.querySelector('#retire').hidden") is True


@needs_chromium
async def test_days_to_empty_column_and_the_content_chart_with_its_forecast_and_refill(
    dashboard: Dashboard, browser: Browser, tmp_path: Path
) -> None:
    meter_id = FED[0]
    now = datetime.now(UTC)  # after the fixture's readings (its "now" is cut to the second), not in the future
    # The fixture drew the bottle down to 165 bar; a full one (200 bar at 15 °C) replaces it: a refill.
    for index, pressure_bar in enumerate((200.0, 199.8, 199.6)):
        await dashboard.feed(meter_id, pressure_bar, now - timedelta(milliseconds=3 - index))
    await dashboard.feed("bottle-0051", 50.9, now)  # liquefied CO₂, liquid left
    await dashboard.consumer.forecaster.flush()
    await browser.open(f"{dashboard.base_url}/dashboard/#key={ADMIN_KEY}")
    await browser.wait_for(f"{ROWS} === {len(FLEET.meters)}")
    header = "[...document.querySelectorAll('#fleet th')].map(th => th.textContent.trim())"
    assert "Days to empty" in await browser.evaluate(header)
    days = await browser.evaluate(cell(meter_id, "days"))
    assert days.endswith(" d") and float(days.removesuffix(" d")) > 0, days
    assert await browser.evaluate(cell("bottle-0051", "days")) == "liquid"
    silent = next(m for m in sorted(FLEET.meters) if m not in FED and m != "bottle-0051")
    assert await browser.evaluate(cell(silent, "days")) == "–"
    # Sorting by it puts the fewest days first and the meters with no figure last.
    await browser.click('th[data-sort="days_to_empty"] button')
    first = "document.querySelector('#fleet tbody tr').dataset.meter"
    last = "[...document.querySelectorAll('#fleet tbody tr')].at(-1).dataset.meter"
    assert await browser.evaluate(first) in FED and await browser.evaluate(last) not in FED

    await browser.click(f'tr[data-meter="{meter_id}"]')
    box = '.chart-box[data-measure="real_moles"]'
    assert await browser.wait_for(f"{chart_points('real_moles')} > 0 && {chart_points('real_moles')}") == (
        READINGS_EACH + 3
    )
    assert await browser.evaluate(f"document.querySelectorAll('{box} polyline.forecast').length") == 1
    assert await browser.evaluate(f"document.querySelectorAll('{box} line.event').length") == 1
    refill_text = await browser.evaluate(f"document.querySelector('{box} line.event title').textContent")
    assert refill_text.startswith("refill: ")
    facts = await browser.evaluate("document.querySelector('#meter-facts').textContent")
    assert "reserve (10 %) in " in facts and "mol/day (declared)" in facts
    await browser.screenshot(tmp_path / "dashboard-forecast.png")
    assert browser.errors == []


async def test_content_chart_draws_the_forecast_and_the_refills_over_http(
    dashboard: Dashboard, http: httpx.AsyncClient
) -> None:
    meter_id = FED[0]
    await dashboard.feed(meter_id, 200.0, datetime.now(UTC))
    await dashboard.consumer.forecaster.flush()
    response = await http.get(chart_path(meter_id), params={"measure": "real_moles"}, headers=as_("*"))
    svg = ET.fromstring(response.text)
    (forecast,) = [line for line in svg.iter(f"{SVG}polyline") if line.get("class") == "forecast"]
    start, end = (tuple(map(float, vertex.split(","))) for vertex in forecast.get("points", "").split())
    assert end[0] > start[0] and end[1] >= start[1]  # later, not higher (SVG y grows downwards)
    events = [line for line in svg.iter(f"{SVG}line") if line.get("class") == "event"]
    assert len(events) == 1
    # The ideal-gas chart stays as it was: no forecast on it.
    plain = ET.fromstring((await http.get(chart_path(meter_id), headers=as_("*"))).text)
    assert not [line for line in plain.iter(f"{SVG}polyline") if line.get("class") == "forecast"]


def test_forecast_line_runs_down_to_the_reserve_or_as_far_ahead_as_the_readings_reach_back() -> None:
    t0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    points = [(t0, 400.0), (t0 + timedelta(hours=1), 399.0)]
    forecast = {"days_to_empty": 10.0, "consumption_mol_per_day": 24.0}
    # Ten days away: cut an hour ahead (the readings span an hour), one mole lower at 24 mol/day.
    assert forecast_line(points, forecast) == [(t0 + timedelta(hours=1), 399.0), (t0 + timedelta(hours=2), 398.0)]
    # Half an hour away: the line ends at the reserve.
    soon = forecast_line(points, {"days_to_empty": 1 / 48, "consumption_mol_per_day": 24.0})
    assert soon[1][0] == t0 + timedelta(hours=1, minutes=30) and soon[1][1] == pytest.approx(398.5)
    assert forecast_line(points, {"days_to_empty": None, "consumption_mol_per_day": None}) == []
