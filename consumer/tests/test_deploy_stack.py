"""The repository's compose stack, checked without a Docker engine: docker-compose.yaml, .env, Dockerfiles.

``docker-compose config`` validates the file the way Compose reads it; the other tests hold it to the
deployment rules: a healthcheck on every long-running service, memory limits, image tags from .env, host
ports bound to the loopback unless told otherwise, named volumes, and a start order without a cycle.
This file reads the repository around the package, so the image build (which has no such files) skips it
by name (consumer/Dockerfile: ``--ignore=tests/test_deploy_stack.py``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type information

from smartgas_consumer import cli
from smartgas_consumer.config import ConfigError, load

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_FILE = REPO / ".env"
DOCKERFILES = {"consumer": REPO / "consumer" / "Dockerfile", "publisher": REPO / "publisher" / "Dockerfile"}
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?|-|\?)(?P<arg>[^}]*))?\}")


def read_env_file() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${X}, ${X:-default}, ${X:?error}, and $$ for a literal $."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        value = env.get(name)
        if op in (":-", "-"):
            return value if value else (arg or "")
        if op in (":?", "?") and not value:
            raise KeyError(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(replace, text)


def variables(text: str) -> set[str]:
    return {m.group("name") for m in _VARIABLE.finditer(text) if m.group("name")}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return read_env_file()


def one_shots(compose: dict[str, Any]) -> set[str]:
    """Services others wait for with service_completed_successfully (they run and exit)."""
    return {
        name
        for service in compose["services"].values()
        for name, condition in (service.get("depends_on") or {}).items()
        if condition.get("condition") == "service_completed_successfully"
    }


# -- Compose itself ----------------------------------------------------------------------------------


def test_docker_compose_config_validates() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (CI installs it: apt-get install docker-compose)")
    # Only .env may feed the file: drop the variables it sets, and Compose's own, from the environment.
    clean = {k: v for k, v in os.environ.items() if k not in read_env_file() and not k.startswith("COMPOSE_")}
    result = subprocess.run(
        [binary, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_no_version_key_and_only_known_services(compose: dict[str, Any]) -> None:
    assert "version" not in compose  # the Compose Specification, read by v1 (≥ 1.27) and v2 alike
    services = compose["services"]
    assert set(services) == {
        "elasticsearch",
        "kibana",
        "setup",
        "kibana-setup",
        "provision",
        "mosquitto",
        "consumer",
        "publisher",
        "prometheus",
        "grafana",
    }
    # Plain `up` starts the core stack; `--profile monitoring up` adds Prometheus and Grafana.
    profiles = {name: service.get("profiles", []) for name, service in services.items()}
    assert {name for name, names in profiles.items() if names} == {"prometheus", "grafana"}
    assert profiles["prometheus"] == profiles["grafana"] == ["monitoring"]


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    short_lived = one_shots(compose)
    assert short_lived == {"setup", "provision"}
    for name, service in compose["services"].items():
        check = service.get("healthcheck") or {}
        if name in short_lived:
            assert service.get("restart") == "no"
            continue
        if name == "kibana-setup":  # a one-shot that nothing waits for, restarted until its import passes
            assert service.get("restart") == "on-failure" and check.get("disable") is True
            continue
        assert not check.get("disable"), name
        assert {"interval", "timeout", "retries"} <= set(check), name
        if "test" not in check:
            # Compose keeps the image's own HEALTHCHECK test and applies these timings to it.
            dockerfile = REPO / service["build"]["dockerfile"]
            assert "HEALTHCHECK" in dockerfile.read_text(), name


def test_every_service_has_a_memory_limit(compose: dict[str, Any], env: dict[str, str]) -> None:
    for name, service in compose["services"].items():
        assert "mem_limit" in service, name
        assert re.fullmatch(r"\d+[kmg]", interpolate(str(service["mem_limit"]), env)), name


def test_images_are_pinned_by_env(compose: dict[str, Any], env: dict[str, str]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        assert variables(image) <= set(env), f"{name}: {image} uses a variable .env does not set"
        resolved = interpolate(image, env)
        repository, _, tag = resolved.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {resolved}"
        # Prometheus tags its images with a leading v (v3.14.0).
        assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: {resolved} is not a full version"
        if "build" in service:
            assert service["build"]["context"] == "."  # Dockerfiles need constraints.lock and docs/
            assert service["build"]["args"]["PYTHON_IMAGE"] == "${PYTHON_IMAGE:?set PYTHON_IMAGE in .env}"


def test_stack_version_suits_the_pinned_client(env: dict[str, str]) -> None:
    """The client talks to a cluster of its own major and of its minor or later (Elastic's compatibility rule)."""
    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line)
    stack = tuple(int(part) for part in env["STACK_VERSION"].split(".")[:2])
    client = tuple(int(part) for part in pins["elasticsearch"].split(".")[:2])
    assert stack[0] == client[0] and stack[1] >= client[1]


def test_host_ports_bind_the_loopback_unless_told_otherwise(compose: dict[str, Any], env: dict[str, str]) -> None:
    assert env["BIND_ADDRESS"] == "127.0.0.1"
    published: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"
            assert interpolate(port, {}).startswith("127.0.0.1:")  # even without .env
            published.setdefault(name, []).append(interpolate(port, env))
    assert published == {
        "elasticsearch": ["127.0.0.1:9200:9200"],
        "kibana": ["127.0.0.1:5601:5601"],
        "consumer": ["127.0.0.1:5683:5683/udp", "127.0.0.1:8080:8080"],
        "mosquitto": ["127.0.0.1:1883:1883"],
        "prometheus": ["127.0.0.1:9090:9090"],
        "grafana": ["127.0.0.1:3000:3000"],
    }
    moved = interpolate(
        compose["services"]["consumer"]["ports"][0], {**env, "BIND_ADDRESS": "0.0.0.0", "COAP_PORT": "5684"}
    )
    assert moved == "0.0.0.0:5684:5683/udp"


def test_lab_container_names_and_consumer_address(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["consumer"]["container_name"] == "coapserver"
    assert services["publisher"]["container_name"] == "coapclient"
    assert services["publisher"]["environment"]["SMARTGAS_PUBLISHER_CONSUMER"] == "coap://coapserver:5683"
    consumer_env = services["consumer"]["environment"]
    assert consumer_env["SMARTGAS_CONSUMER_COAP_PORT"] == "5683"
    assert consumer_env["SMARTGAS_CONSUMER_DB"].startswith("/var/lib/smartgas/")


def test_start_order_is_acyclic_and_waits_on_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    expected = {
        "elasticsearch": {},
        "kibana": {"elasticsearch": "service_healthy"},
        "setup": {"elasticsearch": "service_healthy"},
        "kibana-setup": {"setup": "service_completed_successfully"},  # and nothing depends on it
        "provision": {},  # the meters' OSCORE contexts, before the consumer loads them
        "mosquitto": {"provision": "service_completed_successfully"},  # its password file and ACL
        "consumer": {
            "setup": "service_completed_successfully",
            "provision": "service_completed_successfully",
            "elasticsearch": "service_healthy",
        },
        "publisher": {"consumer": "service_healthy"},
        "prometheus": {},  # scrapes the consumer when it is there; `up` says when it is not
        "grafana": {"prometheus": "service_healthy"},
    }
    actual = {
        name: {dep: cond["condition"] for dep, cond in (service.get("depends_on") or {}).items()}
        for name, service in services.items()
    }
    assert actual == expected
    done: list[str] = []
    pending = dict(actual)
    while pending:
        ready = [name for name, deps in pending.items() if set(deps) <= set(done)]
        assert ready, f"cycle among {sorted(pending)}"
        done.extend(sorted(ready))
        for name in ready:
            del pending[name]


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("./"):
                # Configuration from the repository (the monitoring profile's provisioning), read-only.
                assert source.startswith("./deploy/") and mount.endswith(":ro"), f"{name}: {mount}"
                assert (REPO / source).is_dir(), f"{name}: {source} is missing"
                continue
            assert source in declared, f"{name}: {mount} is not a named volume"
            used.add(source)
    assert (
        used
        == declared
        == {
            "esdata",
            "kibanadata",
            "consumerdata",
            "meterdata",
            "brokerdata",
            "prometheusdata",
            "grafanadata",
        }
    )


def test_single_node_security_on_http_without_tls(compose: dict[str, Any]) -> None:
    environment = compose["services"]["elasticsearch"]["environment"]
    assert environment["discovery.type"] == "single-node"
    assert environment["xpack.security.enabled"] == "true"
    assert environment["xpack.security.http.ssl.enabled"] == "false"  # documented in docs/deployment.md
    assert "$${ELASTIC_PASSWORD}" in " ".join(compose["services"]["elasticsearch"]["healthcheck"]["test"])


def test_passwords_are_placeholders_marked_change_me(env: dict[str, str]) -> None:
    text = ENV_FILE.read_text()
    assert "CHANGE ME" in text
    keys = ("KIBANA_ENCRYPTION_KEY", "KIBANA_SECURITY_ENCRYPTION_KEY", "KIBANA_REPORTING_ENCRYPTION_KEY")
    for name in ("ELASTIC_PASSWORD", "KIBANA_PASSWORD", *keys):
        assert env[name].startswith("changeme"), name
    for name in keys:
        assert len(env[name]) >= 32, name  # Kibana refuses a shorter key
    assert len(set(map(env.get, keys))) == len(keys)  # one key per purpose
    assert len(env["ELASTIC_PASSWORD"]) >= 6 and len(env["KIBANA_PASSWORD"]) >= 6  # Elasticsearch's minimum


def test_compose_commands_are_ones_the_cli_accepts(compose: dict[str, Any], env: dict[str, str]) -> None:
    """The setup command, the consumer's command and its healthcheck are all subcommands cli.py parses."""
    parser = cli.build_parser()
    services = compose["services"]
    setup = [interpolate(str(part), env) for part in services["setup"]["command"]]
    parsed = parser.parse_args(setup)
    assert parsed.command == "setup"
    kibana_setup = parser.parse_args([interpolate(str(part), env) for part in services["kibana-setup"]["command"]])
    assert kibana_setup.command == "setup" and kibana_setup.kibana_only
    assert "SMARTGAS_CONSUMER_KIBANA_URL" not in services["setup"]["environment"]  # Kibana gates nothing
    assert "SMARTGAS_CONSUMER_KIBANA_URL" in services["kibana-setup"]["environment"]
    parser.parse_args(services["consumer"]["command"])
    assert parser.parse_args(services["provision"]["command"]).command == "provision-meters"
    test = services["consumer"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "smartgas-consumer"]
    assert parser.parse_args(test[2:]).command == "healthcheck"


# -- Dockerfiles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("package", ["consumer", "publisher"])
def test_dockerfile_rules(package: str, env: dict[str, str]) -> None:
    text = DOCKERFILES[package].read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1) == env["PYTHON_IMAGE"]  # type: ignore[union-attr]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", env["PYTHON_IMAGE"])
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M)
    assert [stage for _, stage in stages] == ["build", "test", "runtime"]
    assert stages[2][0] == "${PYTHON_IMAGE}"  # the runtime starts slim again, not from the test stage
    runtime = text.split("AS runtime", 1)[1]
    assert "COPY --from=test /tests-passed" in runtime  # BuildKit runs the test stage only if used
    assert "apt-get" not in runtime
    assert re.search(r"^USER smartgas$", runtime, re.M)
    assert "HEALTHCHECK" in runtime
    assert f'ENTRYPOINT ["smartgas-{package}"]' in runtime
    # The full lock; the shared package (fleet file, gas physics) from the repository, in the same call.
    assert f"pip install -c /src/constraints.lock --no-build-isolation /src/common /src/{package}" in text
    assert re.search(r"^COPY common/ /src/common/$", text, re.M)
    assert "constraints.txt" not in text.replace("\n#", "")
    test_stage = text.split("AS test", 1)[1].split("AS runtime", 1)[0]
    assert "python setup.py test" in test_stage
    assert "libcoap3-bin" in test_stage
    assert " mosquitto" in test_stage  # the MQTT tests run there too, not skipped by name


def test_consumer_image_skips_only_this_file() -> None:
    text = DOCKERFILES["consumer"].read_text()
    (args,) = re.findall(r'--pytest-args="([^"]*)"', text)
    ignored = [arg.split("=", 1)[1] for arg in shlex.split(args) if arg.startswith("--ignore")]
    assert ignored == [f"tests/{Path(__file__).name}"]


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".env", "**/__pycache__", "**/*.egg-info", "**/*.db"} <= patterns
    assert "constraints.lock" not in patterns and "docs" not in patterns


def test_one_image_build_for_consumer_setup_and_kibana_setup(compose: dict[str, Any]) -> None:
    """Two services building one tag fail in parallel ("image already exists"): only the consumer builds it."""
    services = compose["services"]
    builders: dict[str, list[str]] = {}
    for name, service in services.items():
        if "build" in service:
            builders.setdefault(service["image"], []).append(name)
    assert all(len(names) == 1 for names in builders.values()), builders
    consumer_image = services["consumer"]["image"]
    assert builders[consumer_image] == ["consumer"]
    assert services["setup"]["image"] == services["kibana-setup"]["image"] == consumer_image
    assert services["provision"]["image"] == consumer_image


def test_kibana_keeps_sessions_across_restarts(compose: dict[str, Any]) -> None:
    environment = compose["services"]["kibana"]["environment"]
    assert environment["XPACK_SECURITY_ENCRYPTIONKEY"] == (
        "${KIBANA_SECURITY_ENCRYPTION_KEY:?set KIBANA_SECURITY_ENCRYPTION_KEY in .env}"
    )


def test_the_readings_data_stream_is_one_the_template_covers(compose: dict[str, Any], env: dict[str, str]) -> None:
    """The compose name goes through the consumer's own check, which refuses what the template does not match."""
    for service in ("setup", "consumer"):
        name = interpolate(compose["services"][service]["environment"]["SMARTGAS_CONSUMER_ELASTICSEARCH_INDEX"], env)
        assert load({}, {"SMARTGAS_CONSUMER_ELASTICSEARCH_INDEX": name}).elasticsearch_index == name
    with pytest.raises(ConfigError, match="smartgas-readings"):
        load({}, {"SMARTGAS_CONSUMER_ELASTICSEARCH_INDEX": "fleet-readings"})


# -- the three-node cluster (docker-compose.cluster.yaml) ------------------------------------------------

CLUSTER_FILE = REPO / "docker-compose.cluster.yaml"


def compose_config(*args: str) -> dict[str, Any]:
    """``docker-compose -f docker-compose.yaml -f docker-compose.cluster.yaml [args] config``, parsed."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (CI installs it: apt-get install docker-compose)")
    clean = {k: v for k, v in os.environ.items() if k not in read_env_file() and not k.startswith("COMPOSE_")}
    command = [binary, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE), "-f", str(CLUSTER_FILE)]
    result = subprocess.run(
        [*command, *args, "config"], cwd=REPO, env=clean, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    merged: dict[str, Any] = yaml.safe_load(result.stdout)
    return merged


@pytest.mark.parametrize("profile", [[], ["--profile", "monitoring"]])
def test_cluster_file_validates_with_and_without_profiles(profile: list[str]) -> None:
    services = compose_config(*profile)["services"]
    assert {"elasticsearch", "es02", "es03", "es-certs", "consumer", "kibana-setup"} <= set(services)
    assert services["es02"].get("profiles") is None  # the cluster file's nodes belong to no profile


def test_cluster_has_three_nodes_with_tls_between_them() -> None:
    services = compose_config()["services"]
    nodes = {"elasticsearch": "es01", "es02": "es02", "es03": "es03"}
    data_volumes = set()
    for service, node in nodes.items():
        environment = services[service]["environment"]
        assert environment["node.name"] == node
        assert environment["discovery.type"] == "multi-node"
        assert environment["discovery.seed_hosts"] == "elasticsearch,es02,es03"
        assert environment["cluster.initial_master_nodes"] == "es01,es02,es03"
        assert environment["xpack.security.enabled"] == "true"
        assert environment["xpack.security.transport.ssl.enabled"] == "true"
        assert environment["xpack.security.transport.ssl.verification_mode"] == "certificate"
        assert environment["xpack.security.transport.ssl.key"] == f"certs/{node}/{node}.key"
        assert environment["xpack.security.transport.ssl.certificate"] == f"certs/{node}/{node}.crt"
        assert environment["xpack.security.transport.ssl.certificate_authorities"] == "certs/ca/ca.crt"
        assert services[service]["depends_on"]["es-certs"]["condition"] == "service_completed_successfully"
        assert services[service]["mem_limit"]
        mounts = [
            mount if isinstance(mount, str) else f"{mount['source']}:{mount['target']}"
            for mount in services[service]["volumes"]
        ]
        assert any(m.startswith("escerts:/usr/share/elasticsearch/config/certs") for m in mounts), service
        data_volumes |= {m.split(":")[0] for m in mounts if ":/usr/share/elasticsearch/data" in m}
    assert data_volumes == {"esdata", "esdata02", "esdata03"}  # es01 keeps the single node's data
    certs_script = services["es-certs"]["command"][-1]
    for node in nodes.values():
        assert f"name: {node}" in certs_script
    # Clients keep the single-node URL: es01 is still the service "elasticsearch".
    assert services["consumer"]["environment"]["SMARTGAS_CONSUMER_ELASTICSEARCH_URL"] == "http://elasticsearch:9200"
    assert services["elasticsearch"]["ports"] == ["127.0.0.1:9200:9200/tcp"]


# -- the MQTT broker (service mosquitto) ----------------------------------------------------------------

MOSQUITTO_CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
BROKER_VOLUME = "/var/lib/smartgas-broker"


def test_broker_and_consumer_share_the_provisioned_files(compose: dict[str, Any]) -> None:
    """provision writes the broker's files into brokerdata, away from consumerdata's OSCORE secrets; the
    broker runs as the user that wrote them (0600), and the consumer logs in with its own broker user."""
    services = compose["services"]
    provision = cli.build_parser().parse_args(services["provision"]["command"])
    assert str(provision.broker_files) == f"{BROKER_VOLUME}/auth"
    assert f"brokerdata:{BROKER_VOLUME}" in services["provision"]["volumes"]
    broker = services["mosquitto"]
    assert broker["user"] == "10001:10001"  # the consumer image's smartgas user (consumer/Dockerfile)
    assert "useradd --system --uid 10001" in DOCKERFILES["consumer"].read_text()
    assert f"brokerdata:{BROKER_VOLUME}" in broker["volumes"]
    assert not any(mount.startswith(("consumerdata", "meterdata")) for mount in broker["volumes"])
    assert "./deploy/mosquitto:/mosquitto/config:ro" in broker["volumes"]
    consumer_env = services["consumer"]["environment"]
    config = load({}, {k: str(v) for k, v in consumer_env.items() if k.startswith("SMARTGAS_CONSUMER_MQTT")})
    assert config.mqtt_broker == "mqtt://mosquitto:1883"
    assert str(config.mqtt_credentials) == f"{BROKER_VOLUME}/auth/consumer.json"
    assert f"brokerdata:{BROKER_VOLUME}:ro" in services["consumer"]["volumes"]
    text = MOSQUITTO_CONF.read_text()
    assert f"password_file {BROKER_VOLUME}/auth/password_file" in text
    assert f"acl_file {BROKER_VOLUME}/auth/acl_file" in text
    assert "allow_anonymous false" in text and "persistence true" in text


def test_the_repositorys_broker_config_and_healthcheck_run_on_a_real_mosquitto(
    tmp_path: Path, compose: dict[str, Any]
) -> None:
    """deploy/mosquitto/mosquitto.conf, its paths moved into a temporary folder, run by Debian's Mosquitto
    with what provision-meters writes: the compose healthcheck passes (as the consumer's user, through the
    ACL), and a meter logs in with its mqtt.json; with the broker stopped, the healthcheck fails."""
    from smartgas_common.mosquitto import free_loopback_port, mosquitto_binary

    binary = mosquitto_binary()
    if binary is None or shutil.which("mosquitto_sub") is None:
        pytest.skip("mosquitto and mosquitto_sub are not installed (make deps installs them)")
    volume, port = tmp_path / "brokerdata", free_loopback_port()
    argv = ["--device-credentials", str(tmp_path / "c"), "--meter-credentials", str(tmp_path / "m")]
    assert cli.main(["provision-meter", "bottle-a", *argv, "--broker-files", str(volume / "auth")]) == 0
    config = MOSQUITTO_CONF.read_text().replace(BROKER_VOLUME, str(volume)).replace("1883 0.0.0.0", f"{port} 127.0.0.1")
    config += "user root\n" if os.geteuid() == 0 else ""  # as root, Mosquitto would switch to its own user
    (tmp_path / "mosquitto.conf").write_text(config)
    healthcheck = compose["services"]["mosquitto"]["healthcheck"]["test"]
    assert healthcheck[0] == "CMD-SHELL"
    command = healthcheck[1].replace("$$", "$").replace(BROKER_VOLUME, str(volume)).replace("-p 1883", f"-p {port}")
    broker = subprocess.Popen([binary, "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.PIPE, text=True)
    try:
        outcome = None
        for _ in range(100):  # bounded: until the broker listens (a loaded machine takes a second or two)
            outcome = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, check=False)
            if outcome.returncode == 0 or broker.poll() is not None:
                break
            time.sleep(0.2)
        assert outcome is not None and outcome.returncode == 0, (outcome, broker.poll())
        meter = json.loads((tmp_path / "m" / "bottle-a" / "mqtt.json").read_text())
        as_meter = command.replace("-u smartgas-consumer", f"-u {meter['username']}")
        as_meter = as_meter[: as_meter.index(" -P ")] + f" -P {meter['password']} -t smartgas/meters/bottle-a/answer"
        # A meter may log in but may not read the broker's uptime: the ACL is in force (nothing arrives).
        refused = subprocess.run(["sh", "-c", as_meter], capture_output=True, text=True, timeout=30, check=False)
        assert refused.returncode != 0 and "not authori" not in refused.stderr, refused
    finally:
        broker.terminate()
        broker.wait(timeout=30)
    down = subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=30, check=False)
    assert down.returncode != 0
