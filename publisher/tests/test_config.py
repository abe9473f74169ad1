"""Unit tests of configuration: defaults, flags, environment, precedence, and refusal of bad values."""

import dataclasses
import re
from pathlib import Path

import pytest

from conftest import FLEET_FILE
from smartgas_publisher import cli
from smartgas_publisher.config import OPTIONS, ConfigError, PublisherConfig, load_config
from smartgas_publisher.fault import FAULT_BY_KIND, NO_FAULT

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults() -> None:
    config = load_config([], environ={})
    assert config == PublisherConfig()
    assert config.consumer == "coap://127.0.0.1:5683"
    assert (config.meters, config.period_s, config.count, config.seed) == (1, 10.0, None, 0)
    assert (config.buffer, config.status_interval_s, config.id_prefix) == (8640, 10.0, "sim")
    assert config.drain_budget_s == 30.0
    assert config.meter_ids() == ["sim-0001"]


def test_flags() -> None:
    config = load_config(
        [
            "--consumer",
            "coap://10.0.0.5:7000",
            "--meters",
            "3",
            "--period",
            "0.5",
            "--count",
            "4",
            "--seed",
            "-9",
            "--buffer",
            "100",
            "--status-interval",
            "2.5",
            "--id-prefix",
            "site3.b",
            "--log-level",
            "debug",
            "--ack-timeout",
            "0.1",
            "--max-retransmit",
            "0",
            "--drain-timeout",
            "0",
        ],
        environ={},
    )
    assert config == PublisherConfig(
        consumer="coap://10.0.0.5:7000",
        meters=3,
        period_s=0.5,
        count=4,
        seed=-9,
        buffer=100,
        status_interval_s=2.5,
        id_prefix="site3.b",
        log_level="DEBUG",
        ack_timeout_s=0.1,
        max_retransmit=0,
        drain_timeout_s=0.0,
    )
    assert config.meter_ids() == ["site3.b-0001", "site3.b-0002", "site3.b-0003"]
    assert config.reading_uri("site3.b-0002") == "coap://10.0.0.5:7000/meters/site3.b-0002/reading"


def test_environment_and_flag_precedence() -> None:
    environ = {
        "SMARTGAS_PUBLISHER_CONSUMER": "coap://consumer:5683",
        "SMARTGAS_PUBLISHER_METERS": "500",
        "SMARTGAS_PUBLISHER_PERIOD": "2",
        "SMARTGAS_PUBLISHER_COUNT": "",  # empty counts as unset
        "SMARTGAS_PUBLISHER_SEED": "42",
        "SMARTGAS_PUBLISHER_BUFFER": "10",
        "SMARTGAS_PUBLISHER_STATUS_INTERVAL": "30",
        "SMARTGAS_PUBLISHER_LOG_LEVEL": "WARNING",
        "SMARTGAS_PUBLISHER_ID_PREFIX": "tank",
        "OTHER_METERS": "7",
    }
    config = load_config(["--meters", "5"], environ=environ)
    assert config.meters == 5  # the flag wins
    assert config.consumer == "coap://consumer:5683"
    assert (config.period_s, config.count, config.seed, config.buffer) == (2.0, None, 42, 10)
    assert (config.status_interval_s, config.log_level, config.id_prefix) == (30.0, "WARNING", "tank")
    assert config.drain_budget_s == 30.0  # max(30 s, 3 periods)
    assert load_config([], environ={"SMARTGAS_PUBLISHER_PERIOD": "20"}).drain_budget_s == 60.0


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("coap://localhost", "coap://localhost:5683"),
        ("coap://127.0.0.1:6000/", "coap://127.0.0.1:6000"),
        ("coap://[::1]:6000", "coap://[::1]:6000"),
        ("coap://no-such-host.invalid:6000", "coap://no-such-host.invalid:6000"),  # not resolved at start
    ],
)
def test_consumer_uri_is_normalised(given: str, normal: str) -> None:
    assert load_config(["--consumer", given], environ={}).consumer == normal
    assert PublisherConfig(consumer=given).consumer == normal


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--consumer", "http://127.0.0.1:5683", "coap://"),
        ("--consumer", "coaps://127.0.0.1", "coap://"),
        ("--consumer", "coap://127.0.0.1:99999", "port"),
        ("--consumer", "coap://127.0.0.1:0", "port"),
        ("--consumer", "coap://:5683", "host"),
        ("--consumer", "coap://127.0.0.1:5683/meters", "scheme, host and port"),
        ("--meters", "0", ">= 1"),
        ("--meters", "two", "integer"),
        ("--period", "0", "> 0"),
        ("--period", "-1", "> 0"),
        ("--period", "nan", "finite"),
        ("--period", "soon", "number"),
        ("--count", "0", ">= 1"),
        ("--count", "1.5", "integer"),
        ("--seed", "x", "integer"),
        ("--buffer", "0", ">= 1"),
        ("--status-interval", "0", "> 0"),
        ("--id-prefix", "-bottle", "letter or digit"),
        ("--id-prefix", "bot tle", "letter or digit"),
        ("--id-prefix", "b" * 60, "at most 64"),
        ("--log-level", "LOUD", "DEBUG"),
        ("--ack-timeout", "0", "> 0"),
        ("--max-retransmit", "11", "0 to 10"),
        ("--drain-timeout", "-1", ">= 0"),
        ("--fleet", "", "file path"),
        ("--fleet", "/no/such/fleet.yaml", "/no/such/fleet.yaml"),
        ("--inject", "leak", "KIND:METER_ID"),
        ("--inject", "overheat:bottle-0001", "unknown fault 'overheat'"),
        ("--inject", "leak:bottle/1", "'bottle/1' is not a meter id"),
        ("--inject", "leak:sim-0002", "meter 'sim-0002' is not simulated (--meters 1)"),
    ],
)
def test_bad_flag_is_refused_naming_it(flag: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config([f"{flag}={value}"], environ={})
    assert flag in str(caught.value)
    assert words in str(caught.value)


def test_bad_environment_value_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="SMARTGAS_PUBLISHER_PERIOD: must be a number"):
        load_config([], environ={"SMARTGAS_PUBLISHER_PERIOD": "ten"})


def test_every_bad_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(["--meters", "0", "--period", "-5"], environ={"SMARTGAS_PUBLISHER_BUFFER": "0"})
    message = str(caught.value)
    assert "--meters" in message and "--period" in message and "SMARTGAS_PUBLISHER_BUFFER" in message


def test_meter_count_must_fit_the_id_length() -> None:
    prefix = "b" * 58  # "-0001" makes 63 characters, "-10000" would make 64, "-100000" 65
    assert PublisherConfig(id_prefix=prefix, meters=99999).meter_id(99999) == f"{prefix}-99999"
    with pytest.raises(ConfigError, match="at most 64"):
        PublisherConfig(id_prefix=prefix, meters=100000)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match="meters"):
        PublisherConfig(meters=0)
    with pytest.raises(ConfigError, match="period"):
        PublisherConfig(period_s=True)  # booleans are not numbers


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PublisherConfig().meters = 2  # type: ignore[misc]


def test_options_table_covers_every_setting() -> None:
    settings = [f.name for f in dataclasses.fields(PublisherConfig) if f.init]  # not `fleet`, read from the file
    assert [o.field for o in OPTIONS] == settings
    assert all(o.env_var == "SMARTGAS_PUBLISHER_" + o.flag[2:].upper().replace("-", "_") for o in OPTIONS)


def test_readme_documents_every_option() -> None:
    readme = README.read_text()
    for option in OPTIONS:
        row = re.search(rf"^\|\s*`{option.flag}[^|]*\|\s*`{option.env_var}`", readme, re.MULTILINE)
        assert row is not None, f"README has no table row for {option.flag} / {option.env_var}"


def test_cli_exits_2_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--meters", "0", "--consumer", "udp://x"]) == 2
    err = capsys.readouterr().err
    assert "--meters: must be an integer >= 1, got 0" in err
    assert "--consumer" in err


def test_unknown_flag_is_argparse_exit_2() -> None:
    with pytest.raises(SystemExit) as caught:
        load_config(["--meterz", "3"], environ={})
    assert caught.value.code == 2


# ---- the fleet file and fault injection


def test_fleet_file_names_the_meters() -> None:
    config = load_config(["--fleet", str(FLEET_FILE)], environ={})
    assert config.fleet is not None
    assert config.meter_ids() == [f"bottle-{n:04d}" for n in range(1, 55)]
    assert load_config([], environ={"SMARTGAS_PUBLISHER_FLEET": str(FLEET_FILE)}).meter_ids() == config.meter_ids()
    assert config.fault("bottle-0003") is NO_FAULT


def test_default_anonymous_meters_never_take_a_fleet_file_id() -> None:
    # Beside `make run`, anonymous meters named like the fleet's once raised false alerts on real meters.
    fleet_ids = set(load_config(["--fleet", str(FLEET_FILE)], environ={}).meter_ids())
    anonymous_ids = load_config(["--meters", "9999"], environ={}).meter_ids()
    assert anonymous_ids[0] == "sim-0001"
    assert fleet_ids.isdisjoint(anonymous_ids)


@pytest.mark.parametrize(
    ("argv", "environ", "words"),
    [
        (["--meters", "5"], {}, "--meters: cannot be combined with --fleet"),
        ([], {"SMARTGAS_PUBLISHER_ID_PREFIX": "tank"}, "SMARTGAS_PUBLISHER_ID_PREFIX: cannot be combined with --fleet"),
    ],
)
def test_fleet_file_cannot_be_combined_with_meters_or_id_prefix(
    argv: list[str], environ: dict[str, str], words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(["--fleet", str(FLEET_FILE), *argv], environ=environ)


def test_bad_fleet_file_is_refused_naming_the_entry(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text(FLEET_FILE.read_text().replace("volume_l: 20,", "volume_l: -20,", 1))
    with pytest.raises(ConfigError) as caught:
        load_config(["--fleet", str(bad)], environ={})
    assert f"--fleet (SMARTGAS_PUBLISHER_FLEET): {bad}: meters[1]: volume_l = -20 must be above 0" in str(caught.value)


def test_injections_from_repeated_flags_or_a_comma_separated_variable() -> None:
    fleet = ["--fleet", str(FLEET_FILE)]
    config = load_config([*fleet, "--inject", "leak:bottle-0007", "--inject", "offline:bottle-0003"], environ={})
    assert [str(i) for i in config.inject] == ["leak:bottle-0007", "offline:bottle-0003"]
    assert config.fault("bottle-0007") is FAULT_BY_KIND["leak"]
    assert config.fault("bottle-0003") is FAULT_BY_KIND["offline"]
    assert config.fault("bottle-0001") is NO_FAULT
    from_env = load_config(fleet, environ={"SMARTGAS_PUBLISHER_INJECT": "leak:bottle-0007, offline:bottle-0003"})
    assert from_env.inject == config.inject
    flag_wins = load_config(
        [*fleet, "--inject", "sensor-fault:bottle-0050"], environ={"SMARTGAS_PUBLISHER_INJECT": "leak:bottle-0007"}
    )
    assert [str(i) for i in flag_wins.inject] == ["sensor-fault:bottle-0050"]


def test_injection_into_an_unknown_meter_or_twice_into_one_is_refused() -> None:
    fleet = ["--fleet", str(FLEET_FILE)]
    with pytest.raises(ConfigError, match=r"leak:bottle-0099: meter 'bottle-0099' is not simulated \(not in the fleet"):
        load_config([*fleet, "--inject", "leak:bottle-0099"], environ={})
    with pytest.raises(ConfigError, match="one fault per meter, and 'bottle-0001' already has one"):
        load_config([*fleet, "--inject", "leak:bottle-0001,offline:bottle-0001"], environ={})
    anonymous = load_config(["--meters", "3", "--inject", "over-pressure:sim-0003"], environ={})
    assert anonymous.fault("sim-0003") is FAULT_BY_KIND["over-pressure"]


def test_cli_exits_2_naming_a_bad_injection(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--fleet", str(FLEET_FILE), "--inject", "leak:bottle-9999"]) == 2
    assert "--inject (SMARTGAS_PUBLISHER_INJECT): leak:bottle-9999: meter 'bottle-9999'" in capsys.readouterr().err


def test_credentials_must_be_a_directory(tmp_path: Path) -> None:
    expected = r"--credentials \(SMARTGAS_PUBLISHER_CREDENTIALS\): must be a directory \(smartgas-consumer provision"
    with pytest.raises(ConfigError, match=expected):
        PublisherConfig(credentials_path=str(tmp_path / "missing"))
    assert PublisherConfig(credentials_path=str(tmp_path)).credentials_path == str(tmp_path)


def test_transport_and_broker() -> None:
    config = load_config(["--transport", "MQTT", "--broker", "mqtt://broker.example"], {})
    assert (config.transport, config.broker) == ("mqtt", "mqtt://broker.example:1883")
    assert load_config([], {}).transport == "coap"
    assert load_config([], {"SMARTGAS_PUBLISHER_BROKER": "mqtt://[::1]:1884/"}).broker == "mqtt://[::1]:1884"
    with pytest.raises(ConfigError, match=r"--transport: must be one of coap, mqtt, got 'amqp'"):
        load_config(["--transport", "amqp"], {})
    with pytest.raises(ConfigError, match=r"--broker: must be an mqtt:// URL"):
        load_config(["--broker", "coap://127.0.0.1:5683"], {})
    with pytest.raises(ConfigError, match=r"--broker: must be only scheme, host and port"):
        load_config(["--broker", "mqtt://127.0.0.1:1883/topic"], {})
