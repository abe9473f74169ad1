"""The compose profile "monitoring" (Prometheus, Grafana) checked against the consumer, without an engine.

``docker-compose config`` validates the file with and without the profile; the other tests hold the
profile to the stack's rules (healthchecks, memory limits, pinned tags, loopback ports, named volumes) and
to the consumer itself: Prometheus scrapes the service and port the consumer's HTTP API listens on, every
metric name in the Grafana dashboard's PromQL is one a ``Metrics`` object really exposes, and
docs/metrics.md describes every metric. This file reads the repository around the package; the image
build has none of it, so there the whole module is skipped by name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no type information
from prometheus_client.parser import text_string_to_metric_families

from smartgas_consumer import config as config_module
from smartgas_consumer.metrics import Metrics
from smartgas_consumer.store import CommitResult, SequenceOutcome, StoreSummary

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yaml"
ENV_FILE = REPO / ".env"
MONITORING = REPO / "deploy" / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
GRAFANA = MONITORING / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
METRICS_DOC = REPO / "docs" / "metrics.md"
PROFILE = ("prometheus", "grafana")
CONSUMER_JOB = "smartgas-consumer"
#: Series Prometheus makes itself for every target, not the consumer.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}

if not COMPOSE_FILE.exists() or not MONITORING.exists():
    pytest.skip(
        "the repository's compose files and deploy/monitoring/ are not here (image build)", allow_module_level=True
    )


def env_file() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def resolve(text: str, env: dict[str, str]) -> str:
    """Compose's ${X}, ${X:-default} and ${X:?error} substitution (enough for images, ports and limits)."""

    def replace(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        value = env.get(name)
        if value:
            return value
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\?)([^}]*))?\}", replace, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return loaded


@pytest.fixture(scope="module")
def exposed() -> set[str]:
    """Every sample name a Metrics object renders once each stage has counted something."""
    metrics = Metrics(alert_kinds=["offline"])
    metrics.reading_received()
    metrics.reading_stored(CommitResult(SequenceOutcome.GAP, 500.0, 0, missing=1))
    metrics.reading_stored(CommitResult(SequenceOutcome.DUPLICATE, 500.0, 0))
    metrics.reading_rejected("invalid_reading")
    metrics.ack_latency(0.003)
    metrics.commit(2, 0.001)
    metrics.shipped("readings", 1)
    metrics.dead_lettered("readings", 1)
    metrics.retried("readings", 1)
    metrics.ship_failure("readings")
    metrics.refresh(StoreSummary(1, 1, None, 0, None, 0), datetime.now(UTC))
    metrics.set_meters(1, 1, 1)
    metrics.set_open_alerts({"offline": 1})
    body, _ = metrics.render()
    return {sample.name for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) for every target of every panel."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                queries.append((path.name, panel["title"], target["expr"]))
    return queries


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers directly followed by a label matcher."""
    return set(re.findall(r"([A-Za-z_:][A-Za-z0-9_:]*)\{", expr))


# -- Compose --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", [None, "monitoring"])
def test_docker_compose_config_validates(profile: str | None) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (CI installs it: apt-get install docker-compose)")
    clean = {k: v for k, v in os.environ.items() if k not in env_file() and not k.startswith("COMPOSE_")}
    arguments = [binary, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    if profile is not None:
        arguments += ["--profile", profile]
    result = subprocess.run(
        [*arguments, "config", "-q"], cwd=REPO, env=clean, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


def test_only_prometheus_and_grafana_are_in_the_profile(compose: dict[str, Any]) -> None:
    in_profile = {name for name, service in compose["services"].items() if service.get("profiles")}
    assert in_profile == set(PROFILE)
    for name in PROFILE:
        assert compose["services"][name]["profiles"] == ["monitoring"]
    # A core service waiting on a profile service would pull it into a plain `up`.
    for name, service in compose["services"].items():
        if name not in PROFILE:
            assert not set(service.get("depends_on") or {}) & set(PROFILE), name


@pytest.mark.parametrize("name", PROFILE)
def test_profile_services_follow_the_stack_rules(compose: dict[str, Any], name: str) -> None:
    env = env_file()
    service = compose["services"][name]
    check = service["healthcheck"]
    assert check["test"][:2] == ["CMD", "wget"]  # both images carry busybox wget
    assert {"interval", "timeout", "retries", "start_period"} <= set(check)
    assert re.fullmatch(r"\d+[kmg]", resolve(str(service["mem_limit"]), env))
    image = resolve(service["image"], env)
    repository, _, tag = image.rpartition(":")
    assert repository in {"prom/prometheus", "grafana/grafana"}
    assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{image}: not a pinned full version"
    for port in service["ports"]:
        assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:")
    assert service["restart"] == "unless-stopped"
    data = [mount for mount in service["volumes"] if not mount.startswith("./")]
    assert [mount.split(":")[0] for mount in data] == [f"{name}data"]
    assert f"{name}data" in compose["volumes"]
    for mount in service["volumes"]:
        if mount.startswith("./"):
            assert mount.endswith(":ro") and (REPO / mount.split(":")[0]).is_dir(), mount


def test_healthchecks_probe_each_servers_health_endpoint(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["prometheus"]["healthcheck"]["test"][-1] == "http://127.0.0.1:9090/-/healthy"
    assert services["grafana"]["healthcheck"]["test"][-1] == "http://127.0.0.1:3000/api/health"
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_healthy"}}


def test_env_pins_the_images_ports_memory_and_a_placeholder_password() -> None:
    env = env_file()
    assert env["PROMETHEUS_IMAGE"] == "prom/prometheus" and env["PROMETHEUS_TAG"].startswith("v3.")
    assert env["GRAFANA_IMAGE"] == "grafana/grafana"
    assert (env["API_PORT"], env["PROMETHEUS_PORT"], env["GRAFANA_PORT"]) == ("8080", "9090", "3000")
    assert env["GRAFANA_ADMIN_PASSWORD"].startswith("changeme")
    assert {"PROMETHEUS_MEM_LIMIT", "GRAFANA_MEM_LIMIT"} <= set(env)


def test_consumer_api_listens_where_prometheus_scrapes(
    compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    consumer = compose["services"]["consumer"]
    environment = {k: resolve(str(v), env_file()) for k, v in consumer["environment"].items()}
    settings = config_module.load({}, environment)
    assert settings.http_host == "0.0.0.0"  # reachable from the compose network, not only the loopback
    assert f"${{BIND_ADDRESS:-127.0.0.1}}:${{API_PORT:-8080}}:{settings.http_port}" in consumer["ports"]
    (job,) = [job for job in prometheus_config["scrape_configs"] if job["job_name"] == CONSUMER_JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (static,) = job["static_configs"]
    assert static["targets"] == [f"consumer:{settings.http_port}"]
    host = static["targets"][0].split(":")[0]
    assert host in compose["services"]  # the service name resolves on the compose network


def test_prometheus_reads_the_mounted_config(compose: dict[str, Any]) -> None:
    service = compose["services"]["prometheus"]
    assert "./deploy/monitoring/prometheus:/etc/prometheus:ro" in service["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in service["command"]
    assert "--storage.tsdb.path=/prometheus" in service["command"]
    assert "prometheusdata:/prometheus" in service["volumes"]


# -- Grafana ----------------------------------------------------------------------------------------


def test_grafana_datasource_points_at_the_prometheus_service(compose: dict[str, Any]) -> None:
    document = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = document["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] is True
    assert source["url"] == "http://prometheus:9090"
    assert any(port.endswith(":9090") for port in compose["services"]["prometheus"]["ports"])
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == source["uid"]


def test_grafana_loads_the_dashboards_folder_it_is_given(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    document = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "smartgas.yaml").read_text())
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert f"./deploy/monitoring/grafana/dashboards:{provider['options']['path']}:ro" in service["volumes"]
    assert "./deploy/monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in service["volumes"]
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"] + "/")
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()
    assert (
        service["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
        == "${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD in .env}"
    )


def test_dashboard_has_the_agreed_panels() -> None:
    (path,) = DASHBOARDS
    dashboard = json.loads(path.read_text())
    assert (dashboard["uid"], dashboard["title"]) == ("smartgas-consumer", "SmartGas consumer")
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {
        "Readings per second by outcome",
        "Rejected readings by reason",
        "Acknowledgement latency",
        "Store group commits",
        "Shipping lag",
        "Meters online",
        "Open alerts by kind",
        "Consumer CPU",
        "Consumer memory",
    } <= titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(set(ids)) == len(ids)
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area


def test_latency_panel_shows_p50_p95_p99_from_the_histogram() -> None:
    (path,) = DASHBOARDS
    (panel,) = [p for p in json.loads(path.read_text())["panels"] if p["title"] == "Acknowledgement latency"]
    expressions = [target["expr"] for target in panel["targets"]]
    for quantile in ("0.5", "0.95", "0.99"):
        assert any(
            e.startswith(f"histogram_quantile({quantile}, sum by (le) (rate(smartgas_ack_latency_seconds_bucket{{")
            for e in expressions
        ), quantile
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"


@pytest.mark.parametrize(("dashboard", "title", "expr"), dashboard_queries())
def test_every_dashboard_query_uses_exposed_metrics_of_the_consumer_job(
    dashboard: str, title: str, expr: str, exposed: set[str]
) -> None:
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    names = metric_names(expr)
    assert names, f"{title}: no metric selector with a label matcher in {expr}"
    # Every selector names its job: process_* exists for Prometheus's own job too.
    assert expr.count(f'job="{CONSUMER_JOB}"') == len(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*\{", expr)), expr
    bare = set(re.findall(r"\b((?:smartgas|process|python)_[a-z0-9_]+)\b", expr))
    assert bare <= names, f"{title}: {bare - names} without a label matcher"
    process_names = {n for n in names if n.startswith("process_")}
    if process_names and sys.platform != "linux":
        pytest.skip("process_* metrics come from /proc (Linux)")
    unknown = names - exposed - SYNTHETIC
    assert not unknown, f"{dashboard} / {title}: {sorted(unknown)} not in the consumer's exposition"


def test_the_scrape_job_in_the_dashboard_exists(prometheus_config: dict[str, Any]) -> None:
    jobs = {job["job_name"] for job in prometheus_config["scrape_configs"]}
    assert CONSUMER_JOB in jobs


# -- documentation ------------------------------------------------------------------------------------


def test_docs_describe_every_smartgas_metric() -> None:
    metrics = Metrics(alert_kinds=["offline"])
    body, _ = metrics.render()
    families = {family.name for family in text_string_to_metric_families(body.decode())}
    names = {name for name in families if name.startswith("smartgas_") and not name.endswith("_created")}
    text = METRICS_DOC.read_text()
    for name in sorted(names):
        # A counter's family is its name without _total: `smartgas_readings_received_total` matches.
        assert f"`{name}" in text, f"docs/metrics.md does not describe {name}"


def test_every_bucket_a_query_names_is_an_edge_of_its_histogram() -> None:
    """A ``le="X"`` that is not one of the histogram's edges selects nothing, and the query answers 0 or
    nothing without an error: the docs' example queries and the dashboards' are checked against the edges."""
    metrics = Metrics(alert_kinds=["offline"])
    body, _ = metrics.render()
    edges: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                edges.setdefault(sample.name, set()).add(sample.labels["le"])
    queries = [METRICS_DOC.read_text(), *(expr for _, _, expr in dashboard_queries())]
    named = [(name, le) for text in queries for name, le in re.findall(r'(\w+_bucket)\{[^}]*le="([^"]+)"', text)]
    assert ("smartgas_ack_latency_seconds_bucket", "1.0") in named  # the docs' query of separate answers
    for name, le in named:
        assert le in edges.get(name, set()), f'{name}{{le="{le}"}}: not an edge of {sorted(edges.get(name, []))}'
