"""Publisher configuration: read once at start-up into a frozen, validated ``PublisherConfig``.

Every setting comes from a command-line flag or, when the flag is absent, from an environment variable
with the ``SMARTGAS_PUBLISHER_`` prefix (an empty variable counts as unset), or else from its default.
The options are one declarative table; validation happens here, before anything touches the network, and
reports every bad value at once. The fleet file (``--fleet``) is read here too, so a bad file or an
injection naming a meter that is not simulated stops the program before it starts. Nothing else in the
package reads ``os.environ``.
"""

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from smartgas_publisher.fault import FAULT_BY_KIND, NO_FAULT, Fault, Injection, parse_injection
from smartgas_publisher.fleetfile import FleetFile, load_fleet_file
from smartgas_publisher.model import Bottle

if TYPE_CHECKING:
    from smartgas_common.content import GasModel

ENV_PREFIX = "SMARTGAS_PUBLISHER_"

#: The wire format's rule for a meter id (docs/wire-format.md).
METER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
METER_ID_MAX_CHARS = 64

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TRANSPORTS = ("coap", "mqtt")
MQTT_DEFAULT_PORT = 1883

#: Without --drain-timeout, a finite run waits this long at least for its last readings to be acknowledged...
MIN_DRAIN_TIMEOUT_S = 30.0
#: ...or this many periods, whichever is longer.
DRAIN_TIMEOUT_PERIODS = 3


class ConfigError(ValueError):
    """One or more configuration values are invalid; the message names each one. The CLI exits with 2."""


@dataclass(frozen=True)
class PublisherConfig:
    """Everything the fleet needs to know, checked on construction (which reads the fleet file, if any)."""

    consumer: str = "coap://127.0.0.1:5683"
    #: How readings travel: CoAP PUTs to ``consumer``, or MQTT publishes through ``broker``.
    transport: str = "coap"
    broker: str = "mqtt://127.0.0.1:1883"
    meters: int = 1
    period_s: float = 10.0
    count: int | None = None
    seed: int = 0
    buffer: int = 8640
    status_interval_s: float = 10.0
    #: Not the fleet file's "bottle": anonymous meters must never pass for (and alert on) real fleet meters.
    id_prefix: str = "sim"
    log_level: str = "INFO"
    ack_timeout_s: float = 2.0
    max_retransmit: int = 4
    drain_timeout_s: float | None = None
    fleet_path: str | None = None
    #: Directory of the meters' OSCORE contexts, one subdirectory per meter id (docs/security.md).
    credentials_path: str | None = None
    #: Most CoAP client sockets the fleet's meters share; made only while every one is busy.
    coap_endpoints: int = 1000
    inject: tuple[Injection, ...] = ()
    #: The fleet file's content, read from ``fleet_path`` on construction; None without one.
    fleet: FleetFile | None = field(default=None, init=False)
    #: The real-gas physics of each gas the fleet file's meters hold, built with it (CoolProp, seconds).
    gas_models: "Mapping[str, GasModel]" = field(default_factory=lambda: MappingProxyType({}), init=False)

    def __post_init__(self) -> None:
        # Accept any spelling of the consumer URI that the flag accepts, and keep its normal form.
        try:
            object.__setattr__(self, "consumer", _to_consumer_uri(self.consumer))
        except (ValueError, AttributeError):
            pass  # reported below by the consumer option's check
        try:
            object.__setattr__(self, "broker", _to_broker_url(self.broker))
        except (ValueError, AttributeError):
            pass  # reported below by the broker option's check
        problems = [
            f"{option.label}: {problem}"
            for option in OPTIONS
            if (problem := option.check(getattr(self, option.field))) is not None
        ]
        if not problems and self.fleet_path is None:
            longest_id = self.meter_id(self.meters)
            if len(longest_id) > METER_ID_MAX_CHARS:
                problems.append(
                    f"{_OPTION_BY_FIELD['id_prefix'].label}: meter ids must be at most {METER_ID_MAX_CHARS}"
                    f" characters, {longest_id!r} is {len(longest_id)}"
                )
        if not problems and self.fleet_path is not None:
            # CoolProp is imported here, with a fleet file only: anonymous meters and --help start at once.
            from smartgas_common.content import build_models

            try:
                fleet = load_fleet_file(Path(self.fleet_path))
                object.__setattr__(self, "fleet", fleet)
                object.__setattr__(self, "gas_models", build_models(fleet.gases_in_use()))
            except ValueError as err:  # FleetFileError, or EquationOfStateError: a gas CoolProp cannot model
                problems.append(f"{_OPTION_BY_FIELD['fleet_path'].label}: {err}")
        if not problems:
            simulated = set(self.meter_ids())
            problems += [
                f"{_OPTION_BY_FIELD['inject'].label}: {injection}: meter {injection.meter_id!r} is not simulated"
                + (" (not in the fleet file)" if self.fleet is not None else f" (--meters {self.meters})")
                for injection in self.inject
                if injection.meter_id not in simulated
            ]
        if problems:
            raise ConfigError("; ".join(problems))

    def meter_id(self, number: int) -> str:
        """The id of meter ``number`` (counted from 1), as it appears in the resource path."""
        return f"{self.id_prefix}-{number:04d}"

    def meter_ids(self) -> list[str]:
        """The meters to simulate: the fleet file's, or ``--meters`` anonymous ones."""
        if self.fleet is not None:
            return self.fleet.meter_ids()
        return [self.meter_id(number) for number in range(1, self.meters + 1)]

    def bottle(self, meter_id: str) -> Bottle | None:
        """The bottle a fleet-file meter watches, with its gas's physics; None for an anonymous meter."""
        fleet_meter = self.fleet.meter(meter_id) if self.fleet is not None else None
        if fleet_meter is None:
            return None
        return Bottle.of(fleet_meter, self.gas_models.get(fleet_meter.gas.name))

    def fault(self, meter_id: str) -> Fault:
        """The fault meter ``meter_id`` simulates (``NO_FAULT`` when none is injected)."""
        return next((i.fault for i in self.inject if i.meter_id == meter_id), NO_FAULT)

    def reading_uri(self, meter_id: str) -> str:
        """Where meter ``meter_id`` PUTs its readings (docs/wire-format.md)."""
        return f"{self.consumer}/meters/{meter_id}/reading"

    @property
    def drain_budget_s(self) -> float:
        """How long a finite run waits, after the last reading was produced, for the buffers to drain."""
        if self.drain_timeout_s is not None:
            return self.drain_timeout_s
        return max(MIN_DRAIN_TIMEOUT_S, DRAIN_TIMEOUT_PERIODS * self.period_s)


# ---- conversions from text (flag or environment) to typed values; each raises ValueError with a reason


def _to_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"must be an integer, got {text!r}") from None


def _to_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"must be a number, got {text!r}") from None
    return value


def _normal_url(text: str, scheme: str, default_port: int, what: str) -> str:
    """Normalise ``SCHEME://HOST[:PORT][/]`` to ``SCHEME://HOST:PORT`` without resolving the host."""
    parts = urlsplit(text.strip())
    if parts.scheme != scheme:
        raise ValueError(f"must be {what}, got {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"has an invalid port, got {text!r}") from None
    if not parts.hostname:
        raise ValueError(f"must name a host, got {text!r}")
    if parts.username is not None or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise ValueError(f"must be only scheme, host and port ({scheme}://HOST:PORT), got {text!r}")
    if port == 0:
        raise ValueError(f"port must be 1 to 65535, got {text!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{scheme}://{host}:{default_port if port is None else port}"


def _to_consumer_uri(text: str) -> str:
    return _normal_url(text, "coap", 5683, "a coap:// URI (plain CoAP over UDP)")


def _to_broker_url(text: str) -> str:
    return _normal_url(text, "mqtt", MQTT_DEFAULT_PORT, "an mqtt:// URL (MQTT over TCP)")


def _to_transport(text: str) -> str:
    transport = text.strip().lower()
    if transport not in TRANSPORTS:
        raise ValueError(f"must be one of {', '.join(TRANSPORTS)}, got {text!r}")
    return transport


def _to_log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level


def _to_text(text: str) -> str:
    return text


def _to_injections(text: str) -> tuple[Injection, ...]:
    """Comma-separated ``KIND:METER_ID`` (repeated flags are joined with commas before this)."""
    return tuple(parse_injection(item) for item in text.split(",") if item.strip())


# ---- checks of typed values; each returns what is wrong, or None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(minimum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not _is_int(value) or value < minimum:
            return f"must be an integer >= {minimum}, got {value!r}"
        return None

    return check


def _int_between(minimum: int, maximum: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if not _is_int(value) or not minimum <= value <= maximum:
            return f"must be an integer from {minimum} to {maximum}, got {value!r}"
        return None

    return check


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda value: None if value is None else check(value)


def _positive_number(value: Any) -> str | None:
    if not _is_number(value) or value <= 0:
        return f"must be a finite number > 0, got {value!r}"
    return None


def _non_negative_number(value: Any) -> str | None:
    if not _is_number(value) or value < 0:
        return f"must be a finite number >= 0, got {value!r}"
    return None


def _any_int(value: Any) -> str | None:
    return None if _is_int(value) else f"must be an integer, got {value!r}"


def _valid_consumer(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be a coap://HOST:PORT URI, got {value!r}"
    try:
        _to_consumer_uri(value)
    except ValueError as err:
        return str(err)
    return None


def _valid_broker(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"must be an mqtt://HOST:PORT URL, got {value!r}"
    try:
        _to_broker_url(value)
    except ValueError as err:
        return str(err)
    return None


def _valid_transport(value: Any) -> str | None:
    return None if value in TRANSPORTS else f"must be one of {', '.join(TRANSPORTS)}, got {value!r}"


def _valid_log_level(value: Any) -> str | None:
    return None if value in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}"


def _valid_id_prefix(value: Any) -> str | None:
    if not isinstance(value, str) or METER_ID_PATTERN.fullmatch(value) is None:
        return (
            f"must start with a letter or digit and contain only A-Z a-z 0-9 _ . - (docs/wire-format.md), got {value!r}"
        )
    return None


def _optional_path(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        return f"must be a file path, got {value!r}"
    return None


def _optional_directory(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not Path(value).is_dir():
        return f"must be a directory (smartgas-consumer provision-meters --meter-credentials DIR), got {value!r}"
    return None


def _valid_injections(value: Any) -> str | None:
    if not isinstance(value, tuple) or not all(isinstance(item, Injection) for item in value):
        return f"must be KIND:METER_ID faults, got {value!r}"
    seen: set[str] = set()
    for injection in value:
        if METER_ID_PATTERN.fullmatch(injection.meter_id) is None:
            return f"{injection}: {injection.meter_id!r} is not a meter id (docs/wire-format.md)"
        if injection.meter_id in seen:
            return f"{injection}: one fault per meter, and {injection.meter_id!r} already has one"
        seen.add(injection.meter_id)
    return None


@dataclass(frozen=True)
class Option:
    """One setting: its ``PublisherConfig`` field, flag, environment variable and rules."""

    field: str
    flag: str
    env: str
    metavar: str
    help: str
    convert: Callable[[str], Any]
    check: Callable[[Any], str | None]
    #: The flag may be given several times; the values are joined with commas (as the variable has them).
    repeatable: bool = False

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.env

    @property
    def label(self) -> str:
        return f"{self.flag} ({self.env_var})"


OPTIONS: tuple[Option, ...] = (
    Option(
        field="consumer",
        flag="--consumer",
        env="CONSUMER",
        metavar="coap://HOST:PORT",
        help="the consumer to send readings to (default coap://127.0.0.1:5683)",
        convert=_to_consumer_uri,
        check=_valid_consumer,
    ),
    Option(
        field="transport",
        flag="--transport",
        env="TRANSPORT",
        metavar="coap|mqtt",
        help="how readings travel: CoAP PUTs to --consumer, or MQTT 5 publishes through --broker (default coap)",
        convert=_to_transport,
        check=_valid_transport,
    ),
    Option(
        field="broker",
        flag="--broker",
        env="BROKER",
        metavar="mqtt://HOST:PORT",
        help="with --transport mqtt, the MQTT broker (default mqtt://127.0.0.1:1883)",
        convert=_to_broker_url,
        check=_valid_broker,
    ),
    Option(
        field="meters",
        flag="--meters",
        env="METERS",
        metavar="N",
        help="how many meters to simulate (default 1)",
        convert=_to_int,
        check=_int_at_least(1),
    ),
    Option(
        field="period_s",
        flag="--period",
        env="PERIOD",
        metavar="SECONDS",
        help="seconds between two readings of a meter (default 10)",
        convert=_to_float,
        check=_positive_number,
    ),
    Option(
        field="count",
        flag="--count",
        env="COUNT",
        metavar="K",
        help="produce K readings per meter, deliver them, then exit (default: run until SIGTERM/SIGINT)",
        convert=_to_int,
        check=_optional(_int_at_least(1)),
    ),
    Option(
        field="seed",
        flag="--seed",
        env="SEED",
        metavar="INT",
        help="seed of the simulation; same seed, same readings (default 0)",
        convert=_to_int,
        check=_any_int,
    ),
    Option(
        field="buffer",
        flag="--buffer",
        env="BUFFER",
        metavar="N",
        help="most unsent readings kept per meter; when full the oldest is dropped (default 8640)",
        convert=_to_int,
        check=_int_at_least(1),
    ),
    Option(
        field="status_interval_s",
        flag="--status-interval",
        env="STATUS_INTERVAL",
        metavar="SECONDS",
        help="seconds between two fleet status log lines (default 10)",
        convert=_to_float,
        check=_positive_number,
    ),
    Option(
        field="id_prefix",
        flag="--id-prefix",
        env="ID_PREFIX",
        metavar="PREFIX",
        help="meter ids are PREFIX-0001, PREFIX-0002, ... (default sim)",
        convert=_to_text,
        check=_valid_id_prefix,
    ),
    Option(
        field="log_level",
        flag="--log-level",
        env="LOG_LEVEL",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default INFO)",
        convert=_to_log_level,
        check=_valid_log_level,
    ),
    Option(
        field="ack_timeout_s",
        flag="--ack-timeout",
        env="ACK_TIMEOUT",
        metavar="SECONDS",
        help="CoAP ACK_TIMEOUT, wait before the first retransmission (default 2, as RFC 7252)",
        convert=_to_float,
        check=_positive_number,
    ),
    Option(
        field="max_retransmit",
        flag="--max-retransmit",
        env="MAX_RETRANSMIT",
        metavar="N",
        help="CoAP MAX_RETRANSMIT, retransmissions before an attempt fails (default 4, as RFC 7252)",
        convert=_to_int,
        check=_int_between(0, 10),
    ),
    Option(
        field="drain_timeout_s",
        flag="--drain-timeout",
        env="DRAIN_TIMEOUT",
        metavar="SECONDS",
        help="with --count, how long to wait for the last readings to be acknowledged "
        f"(default max({MIN_DRAIN_TIMEOUT_S:g}, {DRAIN_TIMEOUT_PERIODS} periods))",
        convert=_to_float,
        check=_optional(_non_negative_number),
    ),
    Option(
        field="fleet_path",
        flag="--fleet",
        env="FLEET",
        metavar="PATH",
        help="simulate exactly the meters of this fleet file (YAML, fleet/fleet.yaml); not with --meters or "
        "--id-prefix (default: --meters anonymous meters)",
        convert=_to_text,
        check=_optional_path,
    ),
    Option(
        field="credentials_path",
        flag="--credentials",
        env="CREDENTIALS",
        metavar="PATH",
        help="directory of the meters' credentials (one subdirectory per meter id, as provisioned): over CoAP "
        "each meter's OSCORE context protects its requests, over MQTT each connects with its mqtt.json "
        "(default: plain CoAP, anonymous MQTT)",
        convert=_to_text,
        check=_optional_directory,
    ),
    Option(
        field="coap_endpoints",
        flag="--coap-endpoints",
        env="COAP_ENDPOINTS",
        metavar="N",
        help="most CoAP client sockets the meters share, each carrying one request at a time; made only "
        "when all are busy (default 1000)",
        convert=_to_int,
        check=_int_at_least(1),
    ),
    Option(
        field="inject",
        flag="--inject",
        env="INJECT",
        metavar="KIND:METER_ID",
        help=f"make a meter simulate a fault, one of {', '.join(FAULT_BY_KIND)}; repeatable, one per meter "
        "(the variable takes a comma-separated list)",
        convert=_to_injections,
        check=_valid_injections,
        repeatable=True,
    ),
)

#: With --fleet, the fleet file names the meters; these options would contradict it.
FLEET_REPLACES = ("meters", "id_prefix")

_OPTION_BY_FIELD = {option.field: option for option in OPTIONS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartgas-publisher",
        description="Simulate gas-bottle meters that send readings to the SmartGas consumer over CoAP or MQTT.",
        epilog=f"Every flag can also be set by an environment variable {ENV_PREFIX}<NAME>; the flag wins.",
    )
    for option in OPTIONS:
        # Parsed as text here so that flags and environment variables share one conversion and one message.
        parser.add_argument(
            option.flag,
            dest=option.field,
            metavar=option.metavar,
            default=None,
            action="append" if option.repeatable else "store",
            # argparse %-formats help strings: a literal % in a help text must reach it doubled.
            help=f"{option.help} [env {option.env_var}]".replace("%", "%%"),
        )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> PublisherConfig:
    """Read the configuration from ``argv`` (default: sys.argv) and ``environ`` (default: os.environ).

    Raises ConfigError naming every bad value. Unknown flags and ``--help`` are argparse's to handle
    (it exits with 2 or 0).
    """
    environ = os.environ if environ is None else environ
    flags = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    problems: list[str] = []
    sources: dict[str, str] = {}
    for option in OPTIONS:
        given: str | list[str] | None = getattr(flags, option.field)
        text = ",".join(given) if isinstance(given, list) else given
        source = option.flag
        if text is None:
            text = environ.get(option.env_var) or None
            source = option.env_var
        if text is None:
            continue
        sources[option.field] = source
        try:
            value = option.convert(text)
        except ValueError as err:
            problems.append(f"{source}: {err}")
            continue
        if (problem := option.check(value)) is not None:
            problems.append(f"{source}: {problem}")
        values[option.field] = value
    if "fleet_path" in sources:
        problems += [
            f"{sources[name]}: cannot be combined with {sources['fleet_path']}: the fleet file names the meters"
            for name in FLEET_REPLACES
            if name in sources
        ]
    if problems:
        raise ConfigError("; ".join(problems))
    return PublisherConfig(**values)
