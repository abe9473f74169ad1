"""The consumer's configuration: read once at start-up from flags and ``SMARTGAS_CONSUMER_*`` variables.

Every setting has one row in ``SETTINGS`` (flag, environment variable, type, default, help); the same
table builds the argument parser and the README's configuration table. A flag beats its environment
variable, which beats the default. Values are checked here, before anything opens a socket or a file,
and nothing else in the consumer reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "SMARTGAS_CONSUMER_"
#: The administrator key's rule (docs/security.md): long, printable ASCII, varied, and not a placeholder.
ADMIN_KEY_MIN_LENGTH = 32
ADMIN_KEY_MIN_DISTINCT = 8
#: --device-auth: OSCORE-protected readings only, or plain CoAP from anyone (the original lab's protocol).
DEVICE_AUTH_MODES = ("oscore", "none")
MAKE_A_KEY = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


class ConfigError(ValueError):
    """A setting has a value the consumer cannot run with; the message names the setting."""


#: The MQTT broker's port when the URL names none (IANA's port for MQTT without TLS).
MQTT_DEFAULT_PORT = 1883


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker listens: ``mqtt://HOST[:PORT]`` (TLS is not supported: the broker's network is trusted)."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Raise ValueError naming what is wrong with ``url``."""
        parts = urlsplit(url)
        if parts.scheme != "mqtt":
            raise ValueError("must be mqtt://HOST:PORT (mqtts:// and other schemes are not supported)")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must be mqtt://HOST:PORT, nothing more (credentials go in --mqtt-credentials)")
        try:
            port = parts.port if parts.port is not None else MQTT_DEFAULT_PORT
        except ValueError:  # beyond 65535, or not a number
            port = 0
        if not 1 <= port <= 65535:
            raise ValueError("has an invalid port: must be mqtt://HOST:PORT with PORT 1 to 65535")
        if not parts.hostname:
            raise ValueError("names no host: must be mqtt://HOST:PORT")
        return cls(parts.hostname, port)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """Everything the consumer is told at start-up."""

    # Either transport can be switched off, not both (docs/wire-format.md: CoAP, and MQTT through a broker).
    coap_enabled: bool = True
    coap_host: str = "::"
    coap_port: int = 5683
    # SO_REUSEPORT lets several processes share the port (and split its traffic): only on explicit request.
    coap_reuse_port: bool = False
    # Processes taking the CoAP traffic (workers.py); 1: the consumer process itself, no workers.
    workers: int = 1
    # CoAP GET /meters/{id}/reading: off, as anyone on the network could read it (docs/security.md).
    coap_reading_get: bool = False
    # Device identity (docs/security.md): "oscore" takes only OSCORE-protected readings, "none" plain CoAP.
    device_auth: str = "none"
    device_credentials: Path = Path("var/device-credentials")
    device_credentials_refresh_s: float = 5.0
    # CoAP duplicate detection (dedup.py, docs/operations.md "Memory"): how many requests' answers are kept
    # for retransmissions, and how long. 20,000 answers hold about 10 MB; 60 s covers a CON's 45 s of
    # retransmissions (RFC 7252 MAX_TRANSMIT_SPAN); a repeat after that is processed again, safely.
    coap_dedup_entries: int = 20_000
    coap_dedup_lifetime_s: float = 60.0
    # Meters missing from the fleet file: how many the consumer keeps, and how fast new ones may appear.
    max_unknown_meters: int = 2000
    max_pending_readings: int = 2048
    unknown_meters_per_minute: float = 600.0
    # MQTT ingest (mqtt.py): off unless a broker URL is given.
    mqtt_broker: str | None = None
    mqtt_credentials: Path | None = None
    mqtt_client_id: str = "smartgas-consumer"
    mqtt_shared_group: str | None = None
    mqtt_receive_maximum: int = 64
    db: Path = Path("var/smartgas.db")
    # SQLite's WAL index in a mapped -shm file (other processes can read the store) or in heap (no SIGBUS).
    store_shared_memory: bool = False
    group_window_ms: float = 2.0
    udp_receive_buffer_bytes: int = 4 * 1024 * 1024
    status_interval_s: float = 10.0
    # The span of meter timestamps believed (docs/wire-format.md): a publisher's full buffer is 8640
    # readings x 10 s = 24 h old at most; one hour more for its delivery and for clock skew.
    max_reading_age_s: float = 25 * 3600.0
    max_clock_skew_s: float = 300.0
    log_level: str = "INFO"
    log_readings: bool = False
    fleet: Path | None = None
    # Elasticsearch sink: off unless a URL is given; then every stored reading is shipped.
    elasticsearch_url: str | None = None
    elasticsearch_username: str | None = None
    elasticsearch_password: str | None = field(default=None, repr=False)
    elasticsearch_api_key: str | None = field(default=None, repr=False)
    elasticsearch_ca_certs: Path | None = None
    elasticsearch_index: str = "smartgas-readings"
    elasticsearch_alerts_index: str = "smartgas-alerts"
    elasticsearch_retention_days: int = 30
    ship_batch_size: int = 500
    ship_backoff_max_s: float = 60.0
    retention_hours: float = 168.0
    kibana_url: str | None = None
    # HTTP API, dashboard and /metrics
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    api_keys: Path | None = None
    admin_key: str | None = field(default=None, repr=False)
    wrong_keys_per_minute: int = 10
    # Fleet operations: when a meter counts as offline, and the alert thresholds (docs/alerts.md)
    expected_period_s: float = 10.0
    offline_after_periods: float = 3.0
    alert_overpressure_pct: float = 110.0
    alert_max_pressure_bar: float = 330.0
    alert_max_temperature_c: float = 55.0
    alert_low_fill_pct: float = 10.0
    alert_leak_factor: float = 3.0
    alert_idle_draw_mol_per_h: float = 0.5
    alert_jump_bar: float = 50.0
    alert_jump_c: float = 25.0
    # Forecast (docs/physics.md#forecast): days to empty count down to this fill %
    forecast_reserve_fill_pct: float = 10.0
    webhook_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.coap_enabled and self.mqtt_broker is None:
            raise ConfigError(
                "--coap-enabled false leaves no way for readings to arrive: give --mqtt-broker mqtt://HOST:PORT"
                " or keep CoAP on"
            )
        if self.mqtt_broker is None and (self.mqtt_credentials is not None or self.mqtt_shared_group is not None):
            given = "--mqtt-credentials" if self.mqtt_credentials is not None else "--mqtt-shared-group"
            raise ConfigError(
                f"{given} takes effect only with MQTT on: give --mqtt-broker mqtt://HOST:PORT or leave {given} out"
            )
        if self.elasticsearch_password is not None and self.elasticsearch_username is None:
            raise ConfigError("an Elasticsearch password needs a user name (--elasticsearch-username)")
        if self.elasticsearch_api_key is not None and self.elasticsearch_username is not None:
            raise ConfigError("give either an Elasticsearch API key or a user name and password, not both")
        if self.workers > 1 and self.device_auth != "none":
            raise ConfigError(
                "--workers above 1 needs --device-auth none: the worker processes do not share OSCORE contexts "
                "(their replay windows) yet; run --workers 1 with OSCORE"
            )
        if self.workers > 1 and self.coap_reading_get:
            raise ConfigError("--workers above 1 does not serve --coap-reading-get; turn one of them off")


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError("must be between 0 and 65535 (0 picks a free port)")
    return port


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a number above 0")
    return value


def _window_ms(text: str) -> float:
    value = float(text)
    # Beyond ~50 ms the answer can no longer ride on the ACK (aiocoap sends an empty ACK at 100 ms).
    if not 0 <= value <= 50:
        raise ValueError("must be between 0 and 50 milliseconds")
    return value


def _buffer_bytes(text: str) -> int:
    value = int(text)
    if value < 65536:
        raise ValueError("must be at least 65536 bytes")
    return value


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return text.rstrip("/")


def _index_name(text: str) -> str:
    if not text or text != text.lower() or any(c in text for c in ' "*\\<|,>/?#:') or text[0] in "-_+":
        raise ValueError('must be a valid Elasticsearch index name (lower case, no spaces or \\/*?"<>|,#:)')
    return text


def _stream_name(prefix: str) -> Callable[[str], str]:
    """A data stream name the SmartGas template for ``prefix*`` covers (else it would get no mapping)."""

    def parse(text: str) -> str:
        name = _index_name(text)
        if not name.startswith(prefix):
            raise ValueError(f"must start with {prefix!r}: the index template covers {prefix}* only")
        return name

    return parse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be a whole number, 0 or more")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a whole number above 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be a number, 0 or more")
    return value


def _reserve_pct(text: str) -> float:
    value = float(text)
    if not 0 <= value < 100:
        raise ValueError("must be a fill %, from 0 up to (not including) 100")
    return value


def _url_list(text: str) -> tuple[str, ...]:
    urls = tuple(part.strip() for part in text.split(",") if part.strip())
    for url in urls:
        _http_url(url)
    return urls


def _mqtt_url(text: str) -> str:
    return BrokerAddress.parse(text.strip()).url


#: An MQTT client id or shared-subscription group name: no topic separators or wildcards, nothing odd.
_MQTT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _mqtt_name(text: str) -> str:
    if not _MQTT_NAME.fullmatch(text):
        raise ValueError("must be 1 to 64 of A-Z a-z 0-9 _ . -, starting with a letter or digit")
    return text


def _receive_maximum(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError("must be a whole number from 1 to 65535 (MQTT 5 Receive Maximum)")
    return value


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in logging.getLevelNamesMapping():
        raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
    return level


def _admin_key(text: str) -> str:
    if "changeme" in text.lower():
        problem = "is a placeholder"
    elif len(text) < ADMIN_KEY_MIN_LENGTH:
        problem = f"has {len(text)} characters"
    elif not all("!" <= c <= "~" for c in text):
        problem = "holds spaces, control or non-ASCII characters"
    elif len(set(text)) < ADMIN_KEY_MIN_DISTINCT:
        problem = f"uses only {len(set(text))} different characters"
    else:
        return text
    raise ValueError(
        f"{problem}: it must be at least {ADMIN_KEY_MIN_LENGTH} random printable ASCII characters, at least"
        f" {ADMIN_KEY_MIN_DISTINCT} of them different (make one: {MAKE_A_KEY})"
    )


def _device_auth(text: str) -> str:
    mode = text.strip().lower()
    if mode not in DEVICE_AUTH_MODES:
        raise ValueError(f"must be one of {', '.join(DEVICE_AUTH_MODES)}")
    return mode


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be true or false")


@dataclass(frozen=True, slots=True)
class Setting:
    """One configurable value: its field in ConsumerConfig, flag, parser and help."""

    field: str
    flag: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False  # never echoed in an error message

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "coap_enabled",
        "--coap-enabled",
        _boolean,
        "take readings over CoAP (false: MQTT only, which then needs --mqtt-broker)",
    ),
    Setting("coap_host", "--coap-host", str, "address the CoAP server binds (UDP); '::' is every address"),
    Setting("coap_port", "--coap-port", _port, "UDP port of the CoAP server"),
    Setting(
        "coap_reuse_port",
        "--coap-reuse-port",
        _boolean,
        "bind the CoAP port with SO_REUSEPORT so several consumer processes share it (each with its own --db)",
    ),
    Setting(
        "workers",
        "--workers",
        _positive_int,
        "processes taking the CoAP traffic on one port (SO_REUSEPORT), all committing through this one's store "
        "(docs/architecture.md); 1: this process alone. Needs --device-auth none above 1",
    ),
    Setting(
        "coap_reading_get",
        "--coap-reading-get",
        _boolean,
        "answer CoAP GET /meters/{id}/reading with the latest reading, without client or site (anyone can ask)",
    ),
    Setting(
        "device_auth",
        "--device-auth",
        _device_auth,
        "oscore: a reading must be OSCORE-protected by its own meter's context (else 4.01/4.03); none: plain "
        "CoAP from anyone, with a warning at start (docs/security.md)",
    ),
    Setting(
        "device_credentials",
        "--device-credentials",
        Path,
        "directory of the meters' OSCORE contexts, one per meter (`smartgas-consumer provision-meters`)",
    ),
    Setting(
        "device_credentials_refresh_s",
        "--device-credentials-refresh-s",
        _positive_float,
        "seconds between re-reads of --device-credentials (new, rotated and revoked meters take effect)",
    ),
    Setting(
        "coap_dedup_entries",
        "--coap-dedup-entries",
        _positive_int,
        "CoAP requests whose answer is kept to answer a retransmission identically (oldest dropped first)",
    ),
    Setting(
        "coap_dedup_lifetime_s",
        "--coap-dedup-lifetime",
        _positive_float,
        "seconds a CoAP request's answer is kept for retransmissions; later repeats are processed again",
    ),
    Setting(
        "max_pending_readings",
        "--max-pending-readings",
        _positive_int,
        "readings that may wait for the commit at once; beyond, a reading is refused 5.03 at once (a peer "
        "sending faster than the store commits must not grow memory without end)",
    ),
    Setting(
        "max_unknown_meters",
        "--max-unknown-meters",
        _non_negative_int,
        "meters missing from the fleet file that the consumer takes readings from (0: none); others get 4.03",
    ),
    Setting(
        "unknown_meters_per_minute",
        "--unknown-meters-per-minute",
        _positive_float,
        "how many meters missing from the fleet file may first appear per minute; faster ones get 4.29",
    ),
    Setting(
        "mqtt_broker",
        "--mqtt-broker",
        _mqtt_url,
        "MQTT broker to take readings from, mqtt://HOST:PORT (topics in docs/wire-format.md); unset, MQTT is off",
    ),
    Setting(
        "mqtt_credentials",
        "--mqtt-credentials",
        Path,
        'JSON file {"username": ..., "password": ...} the consumer logs in to the broker with (provision-meters '
        "writes <device-credentials>/mosquitto/consumer.json); unset, anonymous",
    ),
    Setting(
        "mqtt_client_id",
        "--mqtt-client-id",
        _mqtt_name,
        "MQTT client id, the name of the consumer's persistent session at the broker (one per consumer process)",
    ),
    Setting(
        "mqtt_shared_group",
        "--mqtt-shared-group",
        _mqtt_name,
        "subscribe through the shared subscription $share/NAME/smartgas/meters/+/reading, so that consumers "
        "of one group split the readings; unset, a plain subscription",
    ),
    Setting(
        "mqtt_receive_maximum",
        "--mqtt-receive-maximum",
        _receive_maximum,
        "MQTT readings handled at once: the Receive Maximum told the broker, and the consumer reads no more"
        " from it while it handles that many",
    ),
    Setting("db", "--db", Path, "path of the SQLite store (created if missing)"),
    Setting(
        "store_shared_memory",
        "--store-shared-memory",
        _boolean,
        "keep SQLite's WAL index in a mapped -shm file so `status` and sqlite3 can open the store while the "
        "consumer runs (a -shm made unwritable then kills it with SIGBUS; docs/operations.md)",
    ),
    Setting(
        "group_window_ms",
        "--group-window-ms",
        _window_ms,
        "how long a commit waits to group readings into one transaction (0 to 50 ms)",
    ),
    Setting(
        "udp_receive_buffer_bytes",
        "--udp-receive-buffer-bytes",
        _buffer_bytes,
        "SO_RCVBUF asked for the CoAP socket, so bursts are queued rather than dropped",
    ),
    Setting(
        "status_interval_s",
        "--status-interval",
        _positive_float,
        "seconds between status lines in the log and status snapshots beside the store",
    ),
    Setting(
        "max_reading_age_s",
        "--max-reading-age",
        _positive_float,
        "oldest reading accepted, in seconds before the consumer's clock: the longest backlog a meter may hold",
    ),
    Setting(
        "max_clock_skew_s",
        "--max-clock-skew",
        _non_negative_float,
        "how many seconds a meter's timestamp may be ahead of the consumer's clock",
    ),
    Setting("log_level", "--log-level", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    Setting("log_readings", "--log-readings", _boolean, "log every accepted reading at INFO (true/false)"),
    Setting(
        "fleet",
        "--fleet",
        Path,
        "fleet file (YAML: clients, sites, meters; docs/fleet.md); unset, every meter is unknown",
    ),
    Setting(
        "elasticsearch_url",
        "--elasticsearch-url",
        _http_url,
        "Elasticsearch to ship readings to; unset, the consumer runs on its store alone",
    ),
    Setting("elasticsearch_username", "--elasticsearch-username", str, "Elasticsearch user (basic auth)"),
    Setting(
        "elasticsearch_password",
        "--elasticsearch-password",
        str,
        "password of that user (prefer the environment variable: flags show in `ps`)",
        secret=True,
    ),
    Setting(
        "elasticsearch_api_key",
        "--elasticsearch-api-key",
        str,
        "Elasticsearch API key (base64 'id:key'), instead of user and password",
        secret=True,
    ),
    Setting(
        "elasticsearch_ca_certs",
        "--elasticsearch-ca-certs",
        Path,
        "CA certificate file to trust for an https:// Elasticsearch",
    ),
    Setting(
        "elasticsearch_index",
        "--elasticsearch-index",
        _stream_name("smartgas-readings"),
        "data stream the readings go to (smartgas-readings or smartgas-readings-*)",
    ),
    Setting(
        "elasticsearch_alerts_index",
        "--elasticsearch-alerts-index",
        _stream_name("smartgas-alerts"),
        "data stream the alerts go to (smartgas-alerts or smartgas-alerts-*)",
    ),
    Setting(
        "elasticsearch_retention_days",
        "--elasticsearch-retention-days",
        _non_negative_int,
        "days Elasticsearch keeps readings and alerts (data stream lifecycle; 0 keeps them forever)",
    ),
    Setting("ship_batch_size", "--ship-batch-size", _positive_int, "readings per bulk request"),
    Setting(
        "ship_backoff_max_s",
        "--ship-backoff-max",
        _positive_float,
        "longest wait, in seconds, between retries while Elasticsearch is failing",
    ),
    Setting(
        "retention_hours",
        "--retention-hours",
        _positive_float,
        "how long shipped readings stay in the local store before they are pruned",
    ),
    Setting("kibana_url", "--kibana-url", _http_url, "Kibana, for `smartgas-consumer setup` to import objects"),
    Setting("http_host", "--http-host", str, "address of the HTTP API, dashboard and /metrics"),
    Setting("http_port", "--http-port", _port, "port of the HTTP API, dashboard and /metrics (0 picks a free port)"),
    Setting(
        "api_keys",
        "--api-keys",
        Path,
        "API keys file (YAML: client → SHA-256 of its key; docs/api.md); unset, the API answers 401 to all",
    ),
    Setting(
        "admin_key",
        "--admin-key",
        _admin_key,
        "an administrator API key, besides the keys file (best as the environment variable; .env in compose):"
        " at least 32 random printable ASCII characters, 8 or more different; a placeholder is refused",
        secret=True,
    ),
    Setting(
        "wrong_keys_per_minute",
        "--wrong-keys-per-minute",
        _positive_int,
        "wrong X-API-Keys an address may send at once, and then per minute, before it is answered 429",
    ),
    Setting("expected_period_s", "--expected-period", _positive_float, "seconds between two readings of a meter"),
    Setting(
        "offline_after_periods",
        "--offline-after-periods",
        _positive_float,
        "a meter silent this many periods is offline (and alerted)",
    ),
    Setting(
        "alert_overpressure_pct",
        "--alert-overpressure-pct",
        _positive_float,
        "over-pressure above this % of the bottle's nominal filling pressure",
    ),
    Setting(
        "alert_max_pressure_bar",
        "--alert-max-pressure-bar",
        _positive_float,
        "over-pressure above this, for meters missing from the fleet file",
    ),
    Setting("alert_max_temperature_c", "--alert-max-temperature-c", float, "over-temperature above this"),
    Setting("alert_low_fill_pct", "--alert-low-fill-pct", _non_negative_float, "low content under this fill %"),
    Setting(
        "alert_leak_factor",
        "--alert-leak-factor",
        _positive_float,
        "leak when gas falls faster than this many times the meter's draw_mol_per_h",
    ),
    Setting(
        "alert_idle_draw_mol_per_h",
        "--alert-idle-draw-mol-per-h",
        _non_negative_float,
        "leak when gas falls faster than this while the site is idle",
    ),
    Setting(
        "alert_jump_bar",
        "--alert-jump-bar",
        _positive_float,
        "sensor fault when pressure jumps by more than this between two readings",
    ),
    Setting(
        "alert_jump_c",
        "--alert-jump-c",
        _positive_float,
        "sensor fault when temperature jumps by more than this between two readings",
    ),
    Setting(
        "forecast_reserve_fill_pct",
        "--forecast-reserve-fill-pct",
        _reserve_pct,
        "days to empty count down to this fill % (the reserve kept for the swap)",
    ),
    Setting("webhook_urls", "--webhook-urls", _url_list, "comma-separated URLs that receive alerts as JSON POSTs"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; its default is None so that unset flags fall back to the environment."""
    defaults = ConsumerConfig()
    for setting in SETTINGS:
        parser.add_argument(
            setting.flag,
            dest=setting.field,
            default=None,
            metavar=setting.field.split("_")[-1].upper(),  # the value, by the last word: --group-window-ms MS
            help=argparse_text(f"{setting.help} [env {setting.env}, default {getattr(defaults, setting.field)}]"),
        )


def argparse_text(text: str) -> str:
    """``text`` as argparse help: argparse %-formats help strings, so a literal ``%`` must be doubled."""
    return text.replace("%", "%%")


def load(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> ConsumerConfig:
    """Build the config from parsed flags (raw strings or None) and the environment, checking each value."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = flags.get(setting.field)
        source = setting.flag
        if raw is None:
            raw = environ.get(setting.env)
            source = setting.env
        if raw is None or raw == "":
            continue
        try:
            values[setting.field] = setting.parse(str(raw))
        except ValueError as err:
            shown = "(hidden)" if setting.secret else repr(raw)
            raise ConfigError(f"{source}={shown}: {_plain(err)}") from err
    return ConsumerConfig(**values)


def _plain(err: ValueError) -> str:
    """A parse error in words a user acts on: int()'s and float()'s own messages name Python, not the fix."""
    text = str(err)
    if text.startswith("invalid literal for int()"):
        return "must be a whole number"
    if text.startswith("could not convert string to float"):
        return "must be a number"
    return text


def settings_table(settings: Sequence[Setting] = SETTINGS) -> str:
    """The configuration table in Markdown, as the README shows it."""
    defaults = ConsumerConfig()
    known = {f.name for f in fields(ConsumerConfig)}
    rows = ["| flag | environment variable | default | meaning |", "|---|---|---|---|"]
    for setting in settings:
        assert setting.field in known
        rows.append(f"| `{setting.flag}` | `{setting.env}` | `{getattr(defaults, setting.field)}` | {setting.help} |")
    return "\n".join(rows)
