"""Every alert scenario end to end, driven by the publisher's fault injection over loopback.

A real consumer (CoAP, SQLite, alert engine, webhook outbox, HTTP API) and the real publisher as a separate
process simulating the 54 meters of fleet/fleet.yaml, six of them with an injected fault. Each injected
fault must raise exactly its alert, reach the webhook receiver, and show in the API; no healthy meter may
raise any alert but a genuine low content before its bottle swap.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from webhook_receiver import Receiver

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.server import Consumer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("smartgas_publisher") is None,
        reason="needs the publisher package (make test installs both; the consumer image has only the consumer)",
    ),
]

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
PERIOD_S = 0.2
OFFLINE_AFTER_S = 5.0
READINGS = 12
ADMIN_KEY = "scenario-admin-key-0123456789"
INJECTED = {
    "bottle-0003": ("offline", "offline"),
    "bottle-0007": ("leak", "leak"),
    "bottle-0012": ("over-pressure", "over_pressure"),
    "bottle-0021": ("over-temperature", "over_temperature"),
    "bottle-0033": ("low-content", "low_content"),
    "bottle-0044": ("sensor-fault", "sensor_fault"),
}


@pytest.fixture
async def scenario_consumer(consumer_config: ConsumerConfig, receiver: Receiver) -> AsyncIterator[Consumer]:
    config = dataclasses.replace(
        consumer_config,
        fleet=FLEET_FILE,
        admin_key=ADMIN_KEY,
        expected_period_s=PERIOD_S,
        # Offline after 5 s of silence, not 0.6 s: on a loaded machine a healthy meter (or the consumer)
        # can stall for a second, which raised a false offline alert on a healthy meter.
        offline_after_periods=OFFLINE_AFTER_S / PERIOD_S,
        webhook_urls=(receiver.url,),
    )
    running = Consumer(config)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def start_publisher(coap_port: int) -> asyncio.subprocess.Process:
    """The fleet, running until stopped, six meters with a fault."""
    injections = [arg for meter, (fault, _) in INJECTED.items() for arg in ("--inject", f"{fault}:{meter}")]
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smartgas_publisher",
        "--consumer",
        f"coap://127.0.0.1:{coap_port}",
        "--fleet",
        str(FLEET_FILE),
        "--period",
        str(PERIOD_S),
        "--seed",
        "3",
        *injections,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def test_each_injected_fault_raises_its_alert(scenario_consumer: Consumer, receiver: Receiver) -> None:
    assert scenario_consumer.port is not None
    publisher = await start_publisher(scenario_consumer.port)
    wanted = {(meter_id, kind) for meter_id, (_fault, kind) in INJECTED.items()}
    try:
        # The offline check runs on the consumer's own timer (every 5 s), so this takes a few seconds.
        raised: set[tuple[str, str]] = set()
        for _ in range(150):  # at most ~30 s
            alerts = await scenario_consumer.alerts.list_alerts()
            raised = {(a["meter_id"], a["kind"]) for a in alerts}
            if wanted <= raised:
                break
            await asyncio.sleep(0.2)
    finally:
        publisher.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(publisher.wait(), timeout=30) == 0
    await scenario_consumer.alerts.flush()
    alerts = await scenario_consumer.alerts.list_alerts()
    raised = {(a["meter_id"], a["kind"]) for a in alerts}

    for meter_id, kind in wanted:
        assert (meter_id, kind) in raised, f"{meter_id}: no {kind} alert; got {sorted(raised)}"
        others = {k for m, k in raised if m == meter_id} - {kind}
        assert others <= {"low_content"}, f"{meter_id}: unexpected {others}"
    for meter_id, kind in raised:
        if meter_id not in INJECTED:
            assert kind == "low_content", f"healthy {meter_id} raised {kind}"

    # Every opened alert reached the webhook (the outbox delivers within its backoff).
    alert_ids = {a["alert_id"] for a in alerts}
    delivered: set[str] = set()
    for _ in range(100):
        delivered = {r.body["alert"]["alert_id"] for r in receiver.received if r.body["event"] == "alert.opened"}
        if alert_ids <= delivered:
            break
        await asyncio.sleep(0.1)
    assert alert_ids <= delivered

    # And the API lists them, with the meter's open count.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{scenario_consumer.http.port}") as http:
        listed = (await http.get("/api/alerts", headers={"X-API-Key": ADMIN_KEY})).json()["alerts"]
        assert {a["alert_id"] for a in listed} == alert_ids
        meter = (await http.get("/api/meters/bottle-0012", headers={"X-API-Key": ADMIN_KEY})).json()
        assert meter["open_alerts"] >= 1
