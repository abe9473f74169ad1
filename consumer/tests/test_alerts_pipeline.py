"""End to end over loopback: CoAP PUT → intake → store → alert engine → webhook outbox → a real receiver.

The pieces are assembled here as ``server.py`` assembles them, with the real resource tree (``build_site``),
so the test needs nothing of the consumer but its modules.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from test_webhook import wait_until
from webhook_receiver import Receiver

from smartgas_consumer.alert_records import ALERT_SCHEMA
from smartgas_consumer.alerts import AlertEngine
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elasticsearch_sink import Backoff
from smartgas_consumer.fleet import load_fleet
from smartgas_consumer.health import StoreHealth
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.server import build_site
from smartgas_consumer.store import ReadingStore
from smartgas_consumer.webhook import WEBHOOK_SCHEMA, WebhookDispatcher

pytestmark = pytest.mark.integration

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


async def test_an_over_pressure_reading_reaches_the_webhook_opened_then_resolved(
    tmp_path: Path, receiver: Receiver
) -> None:
    config = ConsumerConfig(db=tmp_path / "store.db", webhook_urls=(receiver.url,))
    fleet = load_fleet(FLEET_FILE)
    # The assembly server.py does: one store holding the alert and outbox tables, the engine listening to
    # the intake, the dispatcher recording inside the engine's transactions.
    store = ReadingStore(config.db, extra_schema=[ALERT_SCHEMA, WEBHOOK_SCHEMA])
    # The readings are of T0; the intake's clock says so too (it refuses readings a day older than its clock).
    intake = ReadingIntake(store, fleet=fleet, clock=lambda: T0 + timedelta(seconds=30))
    engine = AlertEngine(store, config, fleet=fleet)
    webhooks = WebhookDispatcher(store, config.webhook_urls, backoff=Backoff(base_s=0.01, cap_s=0.1), poll_s=0.05)
    engine.recorders.append(webhooks.record)
    engine.on_change.append(lambda _change: webhooks.wake())
    intake.on_stored.append(engine.on_stored)
    await store.open()
    await engine.start()
    await webhooks.start()
    site = build_site(intake, store_fault=StoreHealth(store).fault)
    server = await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", 0), transports=["udp6"])
    (interface,) = server.request_interfaces
    port = interface.token_interface.message_interface.transport.get_extra_info("socket").getsockname()[1]
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    uri = f"coap://127.0.0.1:{port}/meters/bottle-0001/reading"  # 50 L, 200 bar nominal
    try:
        for seq, pressure_bar in enumerate((250.0, 200.0)):
            body = {
                "seq": seq,
                "ts": (T0 + timedelta(seconds=10 * seq)).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "pressure_bar": pressure_bar,
                "temperature_c": 20.0,
                "volume_l": 50.0,
            }
            request = aiocoap.Message(code=Code.PUT, uri=uri, payload=json.dumps(body).encode(), content_format=50)
            response = await asyncio.wait_for(client.request(request).response, timeout=10)
            assert response.code == Code.CHANGED
        await wait_until(lambda: len(receiver.accepted()) == 2)
    finally:
        await client.shutdown()
        await server.shutdown()
        await engine.stop()
        await webhooks.stop()
        await store.close()
    opened, resolved = (r.body for r in receiver.accepted())
    assert opened["event"] == "alert.opened" and resolved["event"] == "alert.resolved"
    assert (
        opened["alert"]["alert_id"]
        == resolved["alert"]["alert_id"]
        == ("bottle-0001:over_pressure:2026-11-23T08:00:00.000000Z")
    )
    assert opened["alert"] == {
        "alert_id": "bottle-0001:over_pressure:2026-11-23T08:00:00.000000Z",
        "meter_id": "bottle-0001",
        "client_id": "acme-welding",
        "site_id": "lyon-gerland",
        "kind": "over_pressure",
        "severity": "critical",
        "state": "open",
        "message": "pressure 250.0 bar, above 220.0 bar",
        "value": 250.0,
        "opened_at": "2026-11-23T08:00:00.000000Z",
        "updated_at": "2026-11-23T08:00:00.000000Z",
        "resolved_at": None,
        "occurrences": 1,
        "acknowledged_at": None,
        "acknowledged_by": None,
        "closed_by": None,
    }
    assert resolved["alert"]["resolved_at"] == "2026-11-23T08:00:10.000000Z"
