"""The Mosquitto launcher starts a real broker that takes a connection, keeps its port across a restart,
and refuses a user the password file does not list."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from smartgas_common.mosquitto import Mosquitto, mosquitto_binary, running_mosquitto

pytestmark = pytest.mark.skipif(
    mosquitto_binary() is None, reason="mosquitto is not installed (make test installs it: apt-get install mosquitto)"
)

# An MQTT 3.1.1 CONNECT with client id "t", clean session, no credentials; and its CONNACK codes.
CONNECT_ANONYMOUS = bytes([0x10, 13, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 60, 0, 1]) + b"t"


def connack_code(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(CONNECT_ANONYMOUS)
        answer = connection.recv(4)
    assert answer[0] == 0x20, answer  # CONNACK
    return answer[3]


def test_broker_accepts_anonymous_and_keeps_its_port_across_restart(tmp_path: Path) -> None:
    with running_mosquitto(tmp_path / "broker") as broker:
        assert connack_code(broker.port) == 0
        port = broker.port
        broker.kill()
        broker.start()
        assert broker.port == port
        assert connack_code(broker.port) == 0
    assert broker.process is None


def test_broker_with_password_file_refuses_anonymous(tmp_path: Path) -> None:
    password_file = tmp_path / "password_file"
    password_file.write_text("")  # nobody may connect
    broker = Mosquitto(tmp_path / "broker", password_file=password_file).start()
    try:
        assert connack_code(broker.port) == 5  # not authorised
    finally:
        broker.stop()


def test_foreground_launcher_refuses_a_missing_password_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from smartgas_common.mosquitto import main

    missing = tmp_path / "password_file"
    assert main(["--directory", str(tmp_path / "broker"), "--port", "1", "--password-file", str(missing)]) == 2
    assert f"--password-file {missing}: no such file" in capsys.readouterr().err
