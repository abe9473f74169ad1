"""Device identity over MQTT: the broker users ``provision-meters`` writes, enforced by a real Mosquitto.

The password file's hashes are checked by Mosquitto itself (a meter logs in with its ``mqtt.json``), the
ACL by what the broker lets each meter publish and read, and the consumer behind it stores a meter's
readings as authenticated."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mqtt_meter import MqttMeter, reading_body, wait_until
from paho.mqtt.reasoncodes import ReasonCode

from smartgas_common.mosquitto import Mosquitto, mosquitto_binary
from smartgas_common.mqtt_contract import answer_topic, reading_topic
from smartgas_consumer import broker_auth, cli
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.server import Consumer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed (make deps installs it)"),
]

WAIT_S = 30.0


@dataclasses.dataclass
class Provisioned:
    credentials: Path
    meters: Path

    @property
    def broker_files(self) -> Path:
        return self.credentials / broker_auth.BROKER_DIR

    def meter_user(self, meter_id: str) -> dict[str, str]:
        user: dict[str, str] = json.loads((self.meters / meter_id / broker_auth.METER_FILE).read_text())
        return user

    def consumer_user(self) -> dict[str, str]:
        user: dict[str, str] = json.loads((self.broker_files / broker_auth.CONSUMER_FILE).read_text())
        return user


def provision(tmp_path: Path, *meter_ids: str, rotate: bool = False) -> Provisioned:
    provisioned = Provisioned(tmp_path / "device-credentials", tmp_path / "meter-credentials")
    for meter_id in meter_ids:
        argv = ["provision-meter", meter_id, "--device-credentials", str(provisioned.credentials)]
        argv += ["--meter-credentials", str(provisioned.meters), *(["--rotate"] if rotate else [])]
        assert cli.main(argv) == 0
    return provisioned


@pytest.fixture
def provisioned(tmp_path: Path) -> Provisioned:
    return provision(tmp_path, "bottle-a", "bottle-b")


@pytest.fixture
def broker(tmp_path: Path, provisioned: Provisioned) -> Iterator[Mosquitto]:
    files = provisioned.broker_files
    running = Mosquitto(
        tmp_path / "broker",
        password_file=files / broker_auth.PASSWORD_FILE,
        acl_file=files / broker_auth.ACL_FILE,
    ).start()
    try:
        yield running
    finally:
        running.stop()


def meter(broker: Mosquitto, provisioned: Provisioned, meter_id: str, *, password: str | None = None) -> MqttMeter:
    user = provisioned.meter_user(meter_id)
    return MqttMeter(broker.port, meter_id, username=user["username"], password=password or user["password"])


def connack_of(client: MqttMeter) -> ReasonCode | None:
    """Connect without asserting success; the CONNACK's reason code."""
    client.client.connect("127.0.0.1", client.port)
    client.client.loop_start()
    try:
        wait_until(lambda: client.connack is not None, WAIT_S, "a CONNACK")
        return client.connack
    finally:
        client.client.disconnect()
        client.client.loop_stop()


def test_mosquitto_takes_the_provisioned_passwords_and_no_others(broker: Mosquitto, provisioned: Provisioned) -> None:
    assert str(connack_of(meter(broker, provisioned, "bottle-a"))) == "Success"
    assert str(connack_of(meter(broker, provisioned, "bottle-a", password="guess"))) != "Success"
    consumer = provisioned.consumer_user()
    assert consumer["username"] == broker_auth.CONSUMER_USER
    as_consumer = MqttMeter(broker.port, "x", username=consumer["username"], password=consumer["password"])
    assert str(connack_of(as_consumer)) == "Success"
    anonymous = MqttMeter(broker.port, "nobody")
    assert str(connack_of(anonymous)) != "Success"


def test_our_hashes_are_mosquittos_format(tmp_path: Path) -> None:
    hashed = broker_auth.hash_password("correct horse", salt=b"0123456789ab")
    assert hashed.startswith("$7$101$") and broker_auth.check_password("correct horse", hashed)
    assert not broker_auth.check_password("wrong horse", hashed)
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed (Debian's mosquitto package has it)")
    made_by_mosquitto = tmp_path / "passwords"
    made_by_mosquitto.write_text("")
    subprocess.run([tool, "-b", str(made_by_mosquitto), "someone", "correct horse"], check=True, timeout=30)
    (line,) = made_by_mosquitto.read_text().splitlines()
    assert broker_auth.check_password("correct horse", line.partition(":")[2])


@pytest.fixture
async def authenticated_consumer(
    consumer_config: ConsumerConfig, broker: Mosquitto, provisioned: Provisioned
) -> AsyncIterator[Consumer]:
    config = dataclasses.replace(
        consumer_config,
        mqtt_broker=broker.url,
        mqtt_credentials=provisioned.broker_files / broker_auth.CONSUMER_FILE,
        max_reading_age_s=25 * 3600.0,
    )
    consumer = Consumer(config)
    await consumer.start()
    try:
        async with asyncio.timeout(WAIT_S):
            while not (consumer.mqtt is not None and consumer.mqtt.link.connected):  # noqa: ASYNC110 - polls state
                await asyncio.sleep(0.02)
        yield consumer
    finally:
        await consumer.stop()


async def stored(consumer: Consumer) -> list[tuple[str, int, int]]:
    rows = await consumer.store.read(
        lambda connection: list(connection.execute("SELECT meter_id, seq, authenticated FROM readings ORDER BY seq"))
    )
    return [tuple(row) for row in rows]


async def test_a_meter_under_another_meters_topic_is_refused_by_the_broker(
    authenticated_consumer: Consumer, broker: Mosquitto, provisioned: Provisioned
) -> None:
    """The ACL lets bottle-a publish on its own topic only; what it publishes there is stored as
    authenticated, what it publishes as bottle-b never reaches the consumer; it cannot read bottle-b's
    answers either."""
    a = await asyncio.to_thread(meter(broker, provisioned, "bottle-a").connect)
    b = await asyncio.to_thread(meter(broker, provisioned, "bottle-b").connect)
    try:
        forged = await asyncio.to_thread(
            a.publish, reading_body(5), topic=reading_topic("bottle-b"), response_topic=answer_topic("bottle-b")
        )
        assert str(forged) == "Not authorized"
        # Mosquitto 2.0 then drops bottle-a's connection (its answer to a denied QoS 1 PUBLISH): reconnect.
        await asyncio.to_thread(a.close)
        a = await asyncio.to_thread(meter(broker, provisioned, "bottle-a").connect)
        # bottle-a may subscribe to bottle-b's answers (Mosquitto grants it), but is sent none of them.
        a.client.subscribe(answer_topic("bottle-b"), qos=1)
        assert str(await asyncio.to_thread(a.publish_reading, 1)) == "Success"
        assert str(await asyncio.to_thread(b.publish_reading, 2)) == "Success"
        (own,) = await asyncio.to_thread(a.wait_answers, 1)
        (other,) = await asyncio.to_thread(b.wait_answers, 1)
        assert (own.topic, own.document["seq"]) == (answer_topic("bottle-a"), 1)
        assert (other.topic, other.document["seq"]) == (answer_topic("bottle-b"), 2)
        await asyncio.sleep(0.5)  # time for a stray answer to reach bottle-a, if the broker sent one
        assert len(a.answers) == 1
    finally:
        await asyncio.to_thread(a.close)
        await asyncio.to_thread(b.close)
    assert await stored(authenticated_consumer) == [("bottle-a", 1, 1), ("bottle-b", 2, 1)]


def test_provisioning_again_keeps_rotate_replaces_revoke_removes(
    tmp_path: Path, broker: Mosquitto, provisioned: Provisioned, capsys: pytest.CaptureFixture[str]
) -> None:
    before = provisioned.meter_user("bottle-a")
    provision(tmp_path, "bottle-a")
    assert provisioned.meter_user("bottle-a") == before
    # The broker's files lost: provisioning writes them again from the meters' side, passwords unchanged.
    shutil.rmtree(provisioned.broker_files)
    provision(tmp_path, "bottle-a", "bottle-b")
    assert provisioned.meter_user("bottle-a") == before
    provision(tmp_path, "bottle-a", rotate=True)
    rotated = provisioned.meter_user("bottle-a")
    assert rotated["username"] == "bottle-a" and rotated["password"] != before["password"]
    assert broker.process is not None
    broker.process.send_signal(signal.SIGHUP)  # Mosquitto re-reads its password file
    wait_until(
        lambda: str(connack_of(meter(broker, provisioned, "bottle-a", password=before["password"]))) != "Success",
        WAIT_S,
        "the old password refused",
    )
    assert str(connack_of(meter(broker, provisioned, "bottle-a"))) == "Success"
    connected = meter(broker, provisioned, "bottle-a").connect()
    argv = ["revoke-meter", "bottle-a", "--device-credentials", str(provisioned.credentials)]
    assert cli.main(argv) == 0
    assert "revoked (its context and its broker user removed)" in capsys.readouterr().out
    broker.process.send_signal(signal.SIGHUP)
    # Mosquitto re-checks the clients it has: the revoked meter's open connection is closed too.
    wait_until(lambda: not connected.client.is_connected(), WAIT_S, "the revoked meter disconnected")
    connected.client.loop_stop()
    wait_until(lambda: str(connack_of(meter(broker, provisioned, "bottle-a"))) != "Success", WAIT_S, "bottle-a refused")
    assert str(connack_of(meter(broker, provisioned, "bottle-b"))) == "Success"
    assert cli.main(argv) == 1  # nothing left to revoke


def test_broker_files_are_private_and_no_password_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    provisioned = provision(tmp_path, "bottle-a")
    printed = capsys.readouterr().out
    assert "broker users: 1 created, 0 kept" in printed
    files = [*provisioned.broker_files.rglob("*"), provisioned.meters / "bottle-a" / broker_auth.METER_FILE]
    assert {path.name for path in files} >= {"password_file", "acl_file", "consumer.json", "mqtt.json"}
    for path in [provisioned.broker_files, *files]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    for password in (provisioned.meter_user("bottle-a")["password"], provisioned.consumer_user()["password"]):
        assert len(password) >= 40 and password not in printed
        assert password not in (provisioned.broker_files / broker_auth.PASSWORD_FILE).read_text()


@pytest.mark.parametrize("meter_id", broker_auth.RESERVED_METER_IDS)
def test_reserved_meter_ids_are_refused(tmp_path: Path, meter_id: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["provision-meter", meter_id, "--device-credentials", str(tmp_path / "c")]
    assert cli.main([*argv, "--meter-credentials", str(tmp_path / "m")]) == 2
    assert "reserved" in capsys.readouterr().err
    assert not (tmp_path / "c" / meter_id).exists()


def test_broker_files_can_live_in_a_directory_of_their_own(tmp_path: Path) -> None:
    """The compose stack keeps them in the broker's volume, away from the OSCORE secrets."""
    files = tmp_path / "broker" / "auth"
    common = ["--device-credentials", str(tmp_path / "c"), "--broker-files", str(files)]
    assert cli.main(["provision-meter", "bottle-a", *common, "--meter-credentials", str(tmp_path / "m")]) == 0
    assert not (tmp_path / "c" / broker_auth.BROKER_DIR).exists()
    assert "bottle-a" in broker_auth.read_password_file(files / broker_auth.PASSWORD_FILE)
    assert cli.main(["revoke-meter", "bottle-a", *common]) == 0
    assert broker_auth.read_password_file(files / broker_auth.PASSWORD_FILE).keys() == {broker_auth.CONSUMER_USER}
