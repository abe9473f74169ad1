"""Device identity with OSCORE: enforcement, provisioning, rotation and revocation, replay, over loopback.

Every request here is a real aiocoap client's, protected (or not) by aiocoap's OSCORE transport with the
meter's side of a context that ``device_auth.provision_meter`` wrote; the consumer is a real one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap import oscore
from aiocoap.numbers.codes import Code

from conftest import reading_uri, wire_example
from smartgas_consumer import cli, device_auth
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.fleet import load_fleet
from smartgas_consumer.server import Consumer, StartupError
from smartgas_publisher.config import PublisherConfig
from smartgas_publisher.fleet import Fleet as PublisherFleet
from smartgas_publisher.stats import FleetStats

pytestmark = pytest.mark.integration

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
BODY = json.dumps(wire_example("reading-250bar.json")).encode()


@dataclasses.dataclass
class Provisioned:
    credentials: Path
    meters: Path


@pytest.fixture
def provisioned(tmp_path: Path) -> Provisioned:
    credentials, meters = tmp_path / "device-credentials", tmp_path / "meter-credentials"
    for meter_id in ("bottle-a", "bottle-b"):
        device_auth.provision_meter(credentials, meters, meter_id)
    return Provisioned(credentials, meters)


@pytest.fixture
async def oscore_consumer(consumer_config: ConsumerConfig, provisioned: Provisioned) -> AsyncIterator[Consumer]:
    config = dataclasses.replace(
        consumer_config,
        device_auth="oscore",
        device_credentials=provisioned.credentials,
        device_credentials_refresh_s=0.1,
    )
    running = Consumer(config)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


class MeterClient:
    """A meter: an aiocoap client whose requests to the consumer are protected with its own context."""

    def __init__(self, context: aiocoap.Context, security: oscore.FilesystemSecurityContext) -> None:
        self.context = context
        self.security = security

    @classmethod
    async def open(cls, meter_dir: Path, consumer: Consumer) -> MeterClient:
        context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
        security = oscore.FilesystemSecurityContext(str(meter_dir))
        context.client_credentials[f"coap://127.0.0.1:{consumer.port}/*"] = security
        return cls(context, security)

    async def put(self, uri: str, payload: bytes = BODY) -> aiocoap.Message:
        message = aiocoap.Message(code=Code.PUT, uri=uri, payload=payload, content_format=50)
        try:
            return await asyncio.wait_for(self.context.request(message).response, timeout=20)
        except oscore.NotAProtectedMessage as err:  # the consumer refused the context: a plain 4.01
            answer: aiocoap.Message = err.plain_message
            return answer

    async def close(self, *, persist: bool = True) -> None:
        await self.context.shutdown()
        if persist:
            self.security._destroy()
        else:  # its directory was replaced by a rotation: let go without writing into the new one
            self.security.lockfile.release()
            self.security.lockfile = None


async def plain_put(uri: str) -> aiocoap.Message:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        message = aiocoap.Message(code=Code.PUT, uri=uri, payload=BODY, content_format=50)
        return await asyncio.wait_for(context.request(message).response, timeout=20)
    finally:
        await context.shutdown()


async def stored(consumer: Consumer) -> list[tuple[str, int]]:
    rows = await consumer.store.read(
        lambda connection: connection.execute("SELECT meter_id, authenticated FROM readings ORDER BY id").fetchall()
    )
    return [tuple(row) for row in rows]


async def test_unprotected_put_is_refused_401_and_nothing_stored(oscore_consumer: Consumer) -> None:
    response = await plain_put(reading_uri(oscore_consumer, "bottle-a"))
    assert response.code == Code.UNAUTHORIZED
    assert b"OSCORE" in response.payload
    assert await stored(oscore_consumer) == []
    assert oscore_consumer.intake.counters.rejected["not_authenticated"] == 1


async def test_own_context_is_stored_as_authenticated(oscore_consumer: Consumer, provisioned: Provisioned) -> None:
    meter = await MeterClient.open(provisioned.meters / "bottle-a", oscore_consumer)
    try:
        response = await meter.put(reading_uri(oscore_consumer, "bottle-a"))
    finally:
        await meter.close()
    assert response.code == Code.CHANGED, response.payload
    assert json.loads(response.payload)["stored"] is True
    assert await stored(oscore_consumer) == [("bottle-a", 1)]


async def test_meter_a_on_meter_b_is_refused_403(oscore_consumer: Consumer, provisioned: Provisioned) -> None:
    meter = await MeterClient.open(provisioned.meters / "bottle-a", oscore_consumer)
    try:
        response = await meter.put(reading_uri(oscore_consumer, "bottle-b"))
    finally:
        await meter.close()
    assert response.code == Code.FORBIDDEN
    assert b"another meter" in response.payload
    assert await stored(oscore_consumer) == []


async def test_a_context_the_consumer_does_not_hold_is_refused_401(oscore_consumer: Consumer, tmp_path: Path) -> None:
    stranger = device_auth.provision_meter(tmp_path / "elsewhere", tmp_path / "stranger", "bottle-a")
    assert stranger.created
    meter = await MeterClient.open(tmp_path / "stranger" / "bottle-a", oscore_consumer)
    try:
        response = await meter.put(reading_uri(oscore_consumer, "bottle-a"))
    finally:
        await meter.close()
    assert response.code == Code.UNAUTHORIZED
    assert await stored(oscore_consumer) == []


async def test_revocation_and_rotation_take_effect_without_restart(
    oscore_consumer: Consumer, provisioned: Provisioned
) -> None:
    uri = reading_uri(oscore_consumer, "bottle-a")
    old = await MeterClient.open(provisioned.meters / "bottle-a", oscore_consumer)
    try:
        assert (await old.put(uri)).code == Code.CHANGED
        device_auth.provision_meter(provisioned.credentials, provisioned.meters, "bottle-a", rotate=True)
        # The old context is refused at once (its directory is gone), before any refresh.
        assert (await old.put(uri)).code == Code.UNAUTHORIZED
    finally:
        await old.close(persist=False)
    await asyncio.sleep(1.0)  # several refreshes (every 0.1 s) load the new context
    new = await MeterClient.open(provisioned.meters / "bottle-a", oscore_consumer)
    try:
        assert (await new.put(uri)).code == Code.CHANGED
        assert device_auth.revoke_meter(provisioned.credentials, "bottle-a")
        assert (await new.put(uri)).code == Code.UNAUTHORIZED
    finally:
        await new.close()
    assert [meter for meter, _ in await stored(oscore_consumer)] == ["bottle-a"]  # the same reading, once


async def test_files_are_private_and_no_secret_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fleet = FLEET_FILE
    count = len(load_fleet(fleet).meters)
    credentials, meters = tmp_path / "creds", tmp_path / "meters"
    argv = ["--fleet", str(fleet), "--device-credentials", str(credentials), "--meter-credentials", str(meters)]
    assert cli.main(["provision-meters", *argv]) == 0
    assert cli.main(["provision-meters", *argv]) == 0  # again: every meter keeps its context
    printed = capsys.readouterr().out
    assert f"{count} context(s) created" in printed and f"0 context(s) created, {count} kept" in printed
    secrets_hex = []
    for path in [*credentials.rglob("*"), *meters.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), path
        if path.name == device_auth.SECRET_FILE:
            secrets_hex.append(json.loads(path.read_text())["secret_hex"])
    assert len(secrets_hex) == 2 * count and len(set(secrets_hex)) == count  # each meter's secret, on both sides
    assert not any(secret in printed + caplog.text for secret in secrets_hex)


async def test_oscore_without_credentials_directory_refuses_to_start(
    consumer_config: ConsumerConfig, tmp_path: Path
) -> None:
    config = dataclasses.replace(consumer_config, device_auth="oscore", device_credentials=tmp_path / "missing")
    with pytest.raises(StartupError, match=r"--device-credentials .*missing: no such directory"):
        await Consumer(config).start()


async def test_device_auth_none_takes_plain_coap_and_warns(
    consumer_config: ConsumerConfig, caplog: pytest.LogCaptureFixture
) -> None:
    running = Consumer(consumer_config)
    await running.start()
    try:
        assert "--device-auth none" in caplog.text
        response = await plain_put(reading_uri(running, "bottle-a"))
        assert response.code == Code.CHANGED
        assert await stored(running) == [("bottle-a", 0)]
    finally:
        await running.stop()


class Recorder(asyncio.DatagramProtocol):
    """A UDP relay between one client and the consumer that keeps a copy of every request datagram."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.requests: list[bytes] = []
        self.client: tuple[str, int] | None = None
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        if addr == self.upstream:
            if self.client is not None:
                self.transport.sendto(data, self.client)
        else:
            self.client = addr
            self.requests.append(data)
            self.transport.sendto(data, self.upstream)


def replay(datagram: bytes, port: int) -> aiocoap.Message:
    """Send a captured datagram again from a fresh socket; the consumer's answer, decoded."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(datagram, ("127.0.0.1", port))
        return aiocoap.Message.decode(sock.recv(2048))


async def test_replayed_protected_request_is_refused_and_not_stored(
    oscore_consumer: Consumer, provisioned: Provisioned
) -> None:
    assert oscore_consumer.port is not None
    loop = asyncio.get_running_loop()
    transport, recorder = await loop.create_datagram_endpoint(
        lambda: Recorder(("127.0.0.1", oscore_consumer.port or 0)), local_addr=("127.0.0.1", 0)
    )
    relay_port = transport.get_extra_info("sockname")[1]
    context = await aiocoap.Context.create_client_context(transports=["oscore", "udp6"])
    security = oscore.FilesystemSecurityContext(str(provisioned.meters / "bottle-a"))
    context.client_credentials[f"coap://127.0.0.1:{relay_port}/*"] = security
    try:
        message = aiocoap.Message(
            code=Code.PUT, uri=f"coap://127.0.0.1:{relay_port}/meters/bottle-a/reading", payload=BODY, content_format=50
        )
        response = await asyncio.wait_for(context.request(message).response, timeout=20)
        assert response.code == Code.CHANGED
    finally:
        await context.shutdown()
        security._destroy()
        transport.close()
    (captured,) = recorder.requests
    answer = await asyncio.to_thread(replay, captured, oscore_consumer.port)
    assert answer.code == Code.UNAUTHORIZED and answer.payload == b"Replay detected"
    assert await stored(oscore_consumer) == [("bottle-a", 1)]


async def run_protected_fleet(
    consumer_config: ConsumerConfig,
    tmp_path: Path,
    meters: int,
    *,
    provision: int | None = None,
    revoke: tuple[str, ...] = (),
    drain_s: float = 120,
) -> tuple[FleetStats, list[tuple[str, int]], Consumer]:
    """Provision ``provision`` (default all) of ``meters`` simulated meters and revoke ``revoke`` on the
    consumer's side, run the real publisher fleet with --credentials against a consumer with --device-auth
    oscore; its stats and what was stored."""
    credentials, meter_credentials = tmp_path / "device-credentials", tmp_path / "meter-credentials"
    ids = [f"sim-{number:04d}" for number in range(1, meters + 1)]
    device_auth.provision_meters(credentials, meter_credentials, ids[: provision if provision is not None else meters])
    for meter_id in revoke:
        device_auth.revoke_meter(credentials, meter_id)
    config = dataclasses.replace(
        consumer_config, device_auth="oscore", device_credentials=credentials, max_unknown_meters=meters
    )
    running = Consumer(config)
    await running.start()
    try:
        publisher = PublisherConfig(
            consumer=f"coap://127.0.0.1:{running.port}",
            meters=meters,
            count=2,
            period_s=0.5,
            status_interval_s=3600,
            drain_timeout_s=drain_s,
            ack_timeout_s=5,
            credentials_path=str(meter_credentials),
        )
        stats = await asyncio.wait_for(PublisherFleet(publisher).run(), timeout=600)
        return stats, await stored(running), running
    finally:
        await running.stop()


async def test_protected_fleet_every_reading_accounted_for(consumer_config: ConsumerConfig, tmp_path: Path) -> None:
    stats, rows, _ = await run_protected_fleet(consumer_config, tmp_path, 20)
    assert stats.produced == stats.acked == 40 and stats.failed == stats.dropped == 0
    assert len(rows) == 40 and all(authenticated == 1 for _, authenticated in rows)


async def test_meter_whose_context_is_refused_keeps_its_readings_buffered(
    consumer_config: ConsumerConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stats, rows, _ = await run_protected_fleet(consumer_config, tmp_path, 3, provision=2, drain_s=3)
    assert stats.produced == 6 and stats.acked == 4
    assert stats.buffered == 2 and stats.dropped == 0  # sim-0003's two readings wait, not lost
    assert {meter for meter, _ in rows} == {"sim-0001", "sim-0002"}
    assert "sim-0003" in caplog.text and "4.01" in caplog.text


async def test_meter_with_a_revoked_context_keeps_its_readings_buffered(
    consumer_config: ConsumerConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The meter protects its readings with a context the consumer no longer holds: a plain 4.01, which
    aiocoap's client raises as NotAProtectedMessage and the publisher logs and retries."""
    stats, rows, _ = await run_protected_fleet(consumer_config, tmp_path, 2, revoke=("sim-0002",), drain_s=3)
    assert stats.produced == 4 and stats.acked == 2
    assert stats.buffered == 2 and stats.dropped == stats.failed == 0
    assert {meter for meter, _ in rows} == {"sim-0001"}
    assert "sim-0002" in caplog.text and "Security context not found" in caplog.text


async def test_a_thousand_provisioned_meters(consumer_config: ConsumerConfig, tmp_path: Path) -> None:
    stats, rows, _ = await run_protected_fleet(consumer_config, tmp_path, 1000)
    assert stats.produced == stats.acked == 2000 and stats.failed == stats.dropped == 0
    assert len(rows) == 2000 and len({meter for meter, _ in rows}) == 1000


def test_contexts_held_by_another_holder_are_skipped_and_logged(
    provisioned: Provisioned, caplog: pytest.LogCaptureFixture
) -> None:
    """aiocoap locks each context directory: a second consumer on the same credentials loads none of them."""
    first = device_auth.MeterContexts(provisioned.credentials)
    second = device_auth.MeterContexts(provisioned.credentials)
    try:
        assert first.refresh() == (2, 0)
        assert second.refresh() == (0, 0) and len(second) == 0
        assert caplog.text.count("device credentials: cannot load") == 2
        first.close()
        assert second.refresh() == (2, 0)  # let go by the first: the second takes them
    finally:
        first.close()
        second.close()


async def test_garbled_oscore_requests_get_4xx_never_5xx(oscore_consumer: Consumer, provisioned: Provisioned) -> None:
    """Hostile OSCORE options and ciphertexts, for unknown kids and for a real meter's kid: every answer is a
    4.xx, nothing is stored, and the real meter is served afterwards. Before GuardedOscoreSite, an option
    aiocoap's parser choked on (``09``, ``1901``, ``ffffff``) was a 5.00 with a traceback."""
    (kid_dir,) = (provisioned.credentials / "bottle-a").iterdir()
    real_kid = bytes.fromhex(kid_dir.name)
    rng = random.Random(11)
    options = [b"", b"\x09", b"\x19\x01", b"\xff\xff\xff", b"\x08\x01\x02", b"\x09\x00" + real_kid]
    options += [bytes([0x09, 0x00, len(real_kid)]) + real_kid, bytes([0x0E]) + real_kid]
    options += [rng.randbytes(rng.randrange(0, 16)) for _ in range(60)]
    options += [bytes([0x09]) + rng.randbytes(1) + real_kid for _ in range(20)]
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    codes = []
    try:
        for value in options:
            for code in (Code.POST, Code.PUT, Code.FETCH):
                message = aiocoap.Message(
                    code=code, uri=f"coap://127.0.0.1:{oscore_consumer.port}/", payload=rng.randbytes(rng.randrange(30))
                )
                message.opt.oscore = value
                response = await asyncio.wait_for(context.request(message).response, timeout=20)
                codes.append((value.hex(), str(response.code)))
                assert response.code.class_ == 4, (value.hex(), code, response.code, response.payload)
    finally:
        await context.shutdown()
    assert await stored(oscore_consumer) == []
    meter = await MeterClient.open(provisioned.meters / "bottle-a", oscore_consumer)
    try:
        assert (await meter.put(reading_uri(oscore_consumer, "bottle-a"))).code == Code.CHANGED
    finally:
        await meter.close()
