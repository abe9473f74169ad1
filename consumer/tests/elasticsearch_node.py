"""A real Elasticsearch node for the test suite: Elasticsearch's own minimal distribution, run on loopback.

The artifact is ``org.elasticsearch.distribution.integ-test-zip:elasticsearch:<STACK_VERSION>:zip`` from
Maven Central (Elasticsearch's build uses it for its own REST tests): no bundled JDK, core modules only,
security off. Its version is ``STACK_VERSION`` in the repository's ``.env`` (the one pin, shared with the
compose stack's images). The zip is fetched once with the machine's Maven into ``~/.m2`` (or the
directory in ``SMARTGAS_ES_ZIP``), unpacked per test session into a temporary directory, and run with a
Java 21+ runtime found under ``/usr/lib/jvm`` (or ``ES_JAVA_HOME``), a 512 MB heap, an ephemeral HTTP port
on 127.0.0.1 and its data in that directory. Elasticsearch refuses to run as root: as root, the node runs
as ``nobody``.

What the zip has (checked on 9.5.4): composable index templates, data streams created by a write
(``op_type: create``), a template's ``lifecycle`` kept in the data stream's metadata, rollover and
``put_mapping`` on a data stream, ``_resolve/index``. What it lacks: the ``_data_stream`` REST APIs and
the lifecycle service that applies retention (both in the ``data-streams`` module), ILM, Kibana.

When anything needed is missing, :class:`NodeUnavailable` says what and why (the command and its answer),
and the fixtures skip the tests by that reason; they never pass without a node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MAVEN_GROUP = "org.elasticsearch.distribution.integ-test-zip"
MAVEN_ARTIFACT = "elasticsearch"
MIN_JAVA_MAJOR = 21
HEAP = "512m"
START_TIMEOUT_S = 240.0
FETCH_TIMEOUT_S = 900.0


class NodeUnavailable(Exception):
    """No node can be started here; the message says which part is missing and how to get it."""


def stack_version(env_file: Path = REPO_ROOT / ".env") -> str:
    """``STACK_VERSION`` from the compose ``.env``: the one place the Elasticsearch version is pinned."""
    try:
        lines = env_file.read_text().splitlines()
    except OSError as err:
        raise NodeUnavailable(f"cannot read STACK_VERSION: {env_file}: {err.strerror}") from err
    for line in lines:
        if line.startswith("STACK_VERSION="):
            return line.partition("=")[2].strip()
    raise NodeUnavailable(f"no STACK_VERSION= line in {env_file}")


def zip_path(version: str) -> Path:
    """Where Maven keeps the zip (``SMARTGAS_ES_ZIP`` names another file)."""
    explicit = os.environ.get("SMARTGAS_ES_ZIP")
    if explicit:
        return Path(explicit)
    group = MAVEN_GROUP.replace(".", "/")
    return Path.home() / f".m2/repository/{group}/{MAVEN_ARTIFACT}/{version}/{MAVEN_ARTIFACT}-{version}.zip"


def fetch_zip(version: str) -> Path:
    """The zip of ``version``, downloaded through Maven the first time."""
    path = zip_path(version)
    if path.is_file():
        return path
    mvn = shutil.which("mvn")
    if mvn is None:
        raise NodeUnavailable(f"{path} is missing and there is no `mvn` to fetch it (apt-get install maven)")
    command = [
        mvn,
        "-q",
        "-B",
        "dependency:get",
        f"-Dartifact={MAVEN_GROUP}:{MAVEN_ARTIFACT}:{version}:zip",
        "-Dtransitive=false",
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as err:
        raise NodeUnavailable(f"`{' '.join(command)}` did not finish in {FETCH_TIMEOUT_S:g} s") from err
    if done.returncode != 0 or not path.is_file():
        answer = " ".join((done.stdout + done.stderr).split())[-600:] or "(no output)"
        raise NodeUnavailable(f"`{' '.join(command)}` exited {done.returncode}, no {path}: {answer}")
    return path


def java_major(java_home: Path) -> int | None:
    """The major version of the JDK at ``java_home`` from its ``release`` file, or None."""
    try:
        for line in (java_home / "release").read_text().splitlines():
            if line.startswith("JAVA_VERSION="):
                version = line.partition("=")[2].strip().strip('"')
                head = version.split(".")[0]
                return int(head) if head.isdigit() else None
    except OSError:
        return None
    return None


def find_java(search: Path = Path("/usr/lib/jvm")) -> Path:
    """A Java 21+ home: ``ES_JAVA_HOME`` when set, else the newest under ``search``."""
    explicit = os.environ.get("ES_JAVA_HOME")
    if explicit:
        major = java_major(Path(explicit))
        if major is None or major < MIN_JAVA_MAJOR:
            raise NodeUnavailable(f"ES_JAVA_HOME={explicit} is not a Java {MIN_JAVA_MAJOR}+ home (found {major})")
        return Path(explicit)
    found: list[tuple[int, Path]] = []
    if search.is_dir():
        for home in search.iterdir():
            major = java_major(home)
            if major is not None and (home / "bin" / "java").exists():
                found.append((major, home))
    suitable = sorted((entry for entry in found if entry[0] >= MIN_JAVA_MAJOR), reverse=True)
    if not suitable:
        seen = ", ".join(f"{home.name} ({major})" for major, home in found) or "none"
        raise NodeUnavailable(f"no Java {MIN_JAVA_MAJOR}+ runtime under {search} (found: {seen}); set ES_JAVA_HOME")
    return suitable[0][1]


@dataclass
class ElasticsearchNode:
    """One node in its own temporary directory: ``start()``, ``kill()``, ``start()`` again, ``stop()``."""

    version: str
    java_home: Path
    zip_file: Path
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="smartgas-es-")))
    http_port: int = 0
    start_seconds: float = 0.0
    _process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def home(self) -> Path:
        return self.workdir / f"elasticsearch-{self.version}"

    def _prepare(self) -> None:
        if self.home.is_dir():
            return
        with zipfile.ZipFile(self.zip_file) as archive:
            archive.extractall(self.workdir)
        for script in (self.home / "bin").iterdir():
            script.chmod(0o755)
        shutil.copytree(self.home / "config", self.workdir / "config")
        (self.workdir / "data").mkdir()
        (self.workdir / "logs").mkdir()
        if os.geteuid() == 0:
            # Elasticsearch will not run as root; the node's files belong to the user it runs as.
            subprocess.run(["chown", "-R", "nobody:nogroup", str(self.workdir)], check=True)
            self.workdir.chmod(0o755)

    def start(self) -> str:
        """Start the node (on its previous port after a kill, so clients keep their URL); wait for health."""
        self._prepare()
        ports_file = self.workdir / "logs" / "http.ports"
        ports_file.unlink(missing_ok=True)
        command = [
            str(self.home / "bin" / "elasticsearch"),
            f"-Ehttp.port={self.http_port}",
            "-Etransport.port=0",
            "-Enetwork.host=127.0.0.1",
            "-Ediscovery.type=single-node",
            f"-Epath.data={self.workdir / 'data'}",
            f"-Epath.logs={self.workdir / 'logs'}",
            "-Expack.security.enabled=false",
            "-Enode.portsfile=true",
            # The test node's disk is whatever /tmp has: never let a full-ish disk block writes.
            "-Ecluster.routing.allocation.disk.threshold_enabled=false",
        ]
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *command]
        environment = {
            **os.environ,
            "ES_JAVA_HOME": str(self.java_home),
            "ES_PATH_CONF": str(self.workdir / "config"),
            "ES_JAVA_OPTS": f"-Xms{HEAP} -Xmx{HEAP}",
        }
        environment.pop("JAVA_HOME", None)
        started = time.monotonic()
        log = (self.workdir / "console.log").open("ab")
        self._process = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir
        )
        log.close()
        self._wait_ready(ports_file, started)
        self.start_seconds = time.monotonic() - started
        return self.url

    def _wait_ready(self, ports_file: Path, started: float) -> None:
        assert self._process is not None
        while time.monotonic() - started < START_TIMEOUT_S:
            if self._process.poll() is not None:
                raise NodeUnavailable(f"Elasticsearch exited {self._process.returncode}: {self.console_tail()}")
            if ports_file.is_file() and ports_file.read_text().strip():
                address = ports_file.read_text().split()[0]
                self.http_port = int(address.rpartition(":")[2])
                if self._health() in ("green", "yellow"):
                    return
            time.sleep(0.25)
        self.kill()
        raise NodeUnavailable(f"Elasticsearch not healthy in {START_TIMEOUT_S:g} s: {self.console_tail()}")

    def _health(self) -> str | None:
        try:
            with urllib.request.urlopen(f"{self.url}/_cluster/health", timeout=5) as answer:
                status: str = json.load(answer)["status"]
                return status
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            return None

    def console_tail(self, chars: int = 1500) -> str:
        try:
            text = (self.workdir / "console.log").read_text(errors="replace")
        except OSError:
            return "(no console output)"
        return " ".join(text[-chars:].split())

    def kill(self) -> None:
        """SIGKILL the node's whole process group: a crash, with no chance to flush or say goodbye."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=30)
            self._process = None

    def stop(self) -> None:
        """Stop the node (SIGTERM, then SIGKILL) and remove its directory."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=30)
            self._process = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def make_node() -> ElasticsearchNode:
    """A node ready to ``start()``, or NodeUnavailable saying what is missing."""
    version = stack_version()
    java_home = find_java()
    return ElasticsearchNode(version=version, java_home=java_home, zip_file=fetch_zip(version))
