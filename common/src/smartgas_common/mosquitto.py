"""Run a real Mosquitto broker on loopback: for the tests of both packages and for ``make run`` over MQTT.

The broker is Debian's ``mosquitto`` (2.0, MQTT 3.1.1 and 5), started as a child process with a
configuration written here: one listener on 127.0.0.1, persistence in a directory of its own (so a
restarted broker still holds the persistent sessions and their queued QoS 1 messages), and, when given,
a password file and an ACL file (what ``provision-meters`` writes, docs/security.md). Mosquitto cannot
be told to pick a free port itself, so a free one is found first and the start is retried on the rare
race where another process takes it meanwhile.

``python -m smartgas_common.mosquitto --directory DIR --port PORT [--password-file F] [--acl-file F]``
writes the same configuration and becomes that broker in the foreground (``make run RUN_TRANSPORT=mqtt``
starts it so, and stops it with SIGINT); it exits with 2, saying why, if ``mosquitto`` is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: How long a start may take before it is given up (a loaded 2-core machine starts it in well under 1 s).
START_TIMEOUT_S = 20.0
START_ATTEMPTS = 5


class BrokerError(Exception):
    """Mosquitto is missing or did not start; the message says why and what to do."""


def mosquitto_binary() -> str | None:
    """Path of the ``mosquitto`` executable (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at this moment."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class Mosquitto:
    """One Mosquitto process in ``directory`` (config, persistence, log), listening on 127.0.0.1:``port``.

    Without ``password_file`` the broker accepts anonymous clients; with it, only the users it lists,
    restricted by ``acl_file`` when that is given as well.
    """

    directory: Path
    password_file: Path | None = None
    acl_file: Path | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def _write_config(self) -> Path:
        persistence = self.directory / "persistence"
        persistence.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {persistence}/",
            # Every change to a persistent session is written at once (autosave after each change), so a
            # broker killed with SIGKILL loses no queued message the tests count on.
            "autosave_interval 1",
            "autosave_on_changes true",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # A meter's message waits for a consumer that is down: no cap on the queue under test.
            "max_queued_messages 0",
        ]
        if os.geteuid() == 0:
            # Started as root, Mosquitto would switch to the "mosquitto" user, which cannot read a root
            # test's private directories: it stays the user that started it.
            lines.append("user root")
        if self.password_file is not None:
            lines += ["allow_anonymous false", f"password_file {self.password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        config = self.directory / "mosquitto.conf"
        config.write_text("\n".join(lines) + "\n")
        return config

    def _listening(self) -> bool:
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
            probe.settimeout(0.5)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self) -> Mosquitto:
        """Start the broker (on a free port the first time, on the same port after ``stop``/``kill``)."""
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto is not installed: apt-get install mosquitto (make test installs it)")
        self.directory.mkdir(parents=True, exist_ok=True)
        keep_port = self.port != 0
        for _attempt in range(START_ATTEMPTS):
            if not keep_port:
                self.port = free_loopback_port()
            config = self._write_config()
            self.process = subprocess.Popen(
                [binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                if self._listening():
                    return self
                time.sleep(0.05)
            else:
                self.stop()
                raise BrokerError(f"mosquitto did not listen on port {self.port} within {START_TIMEOUT_S:.0f} s")
            # It exited: most likely the port was taken meanwhile (retry elsewhere), else a bad config.
            error = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            self.process = None
            if keep_port and "Address already in use" in error:
                time.sleep(0.2)  # the old process's socket is still closing: same port, try again
                continue
            if "Address already in use" not in error:
                raise BrokerError(f"mosquitto exited at start: {error.strip() or 'no message'} (see {self.log_path})")
        raise BrokerError(f"mosquitto found no free port in {START_ATTEMPTS} attempts")

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the broker cleanly (it saves its persistence file on SIGTERM)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the broker (what a crash does): it keeps what its last autosave wrote."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def running_mosquitto(
    directory: Path, *, password_file: Path | None = None, acl_file: Path | None = None
) -> Iterator[Mosquitto]:
    """A broker for the length of a ``with`` block, always stopped afterwards."""
    broker = Mosquitto(directory, password_file=password_file, acl_file=acl_file).start()
    try:
        yield broker
    finally:
        broker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Write the broker's configuration into ``--directory`` and become that broker (exec)."""
    parser = argparse.ArgumentParser(
        prog="python -m smartgas_common.mosquitto", description="Run Mosquitto on 127.0.0.1 in the foreground."
    )
    parser.add_argument("--directory", type=Path, required=True, help="configuration, persistence and log")
    parser.add_argument("--port", type=int, required=True, help="the TCP port on 127.0.0.1")
    parser.add_argument("--password-file", type=Path, help="Mosquitto password file (default: anonymous)")
    parser.add_argument("--acl-file", type=Path, help="Mosquitto ACL file")
    arguments = parser.parse_args(argv)
    binary = mosquitto_binary()
    if binary is None:
        print("mosquitto is not installed: apt-get install mosquitto (make deps installs it)", file=sys.stderr)
        return 2
    for option, path in (("--password-file", arguments.password_file), ("--acl-file", arguments.acl_file)):
        if path is not None and not path.is_file():
            print(f"{option} {path}: no such file (smartgas-consumer provision-meters writes it)", file=sys.stderr)
            return 2
    arguments.directory.mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(
        arguments.directory.resolve(),
        password_file=arguments.password_file.resolve() if arguments.password_file else None,
        acl_file=arguments.acl_file.resolve() if arguments.acl_file else None,
        port=arguments.port,
    )
    config = broker._write_config()
    os.execv(binary, [binary, "-c", str(config)])


if __name__ == "__main__":
    raise SystemExit(main())
