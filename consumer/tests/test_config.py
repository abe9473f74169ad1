"""Configuration: flags over environment over defaults, checks that name the setting, the README table."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartgas_consumer.config import ConfigError, ConsumerConfig, load, settings_table


def test_defaults() -> None:
    config = load({}, {})
    assert config == ConsumerConfig()
    assert config.elasticsearch_url is None


def test_flag_beats_environment_beats_default() -> None:
    environ = {"SMARTGAS_CONSUMER_COAP_PORT": "5700", "SMARTGAS_CONSUMER_DB": "/tmp/x.db"}
    config = load({"coap_port": "5800"}, environ)
    assert config.coap_port == 5800
    assert config.db == Path("/tmp/x.db")


def test_empty_variable_counts_as_unset() -> None:
    assert load({}, {"SMARTGAS_CONSUMER_COAP_PORT": ""}).coap_port == 5683


@pytest.mark.parametrize(
    ("flags", "environ", "named"),
    [
        ({"coap_port": "99999"}, {}, "--coap-port"),
        ({}, {"SMARTGAS_CONSUMER_GROUP_WINDOW_MS": "200"}, "SMARTGAS_CONSUMER_GROUP_WINDOW_MS"),
        ({"elasticsearch_url": "elastic:9200"}, {}, "--elasticsearch-url"),
        ({"elasticsearch_index": "Readings"}, {}, "--elasticsearch-index"),
        ({"log_level": "loud"}, {}, "--log-level"),
        ({"log_readings": "maybe"}, {}, "--log-readings"),
        ({"udp_receive_buffer_bytes": "1000"}, {}, "--udp-receive-buffer-bytes"),
    ],
)
def test_bad_values_name_the_setting(flags: dict[str, str], environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load(flags, environ)


def test_credentials_must_make_sense() -> None:
    with pytest.raises(ConfigError, match="user name"):
        load({"elasticsearch_password": "secret"}, {})
    with pytest.raises(ConfigError, match="not both"):
        load({"elasticsearch_api_key": "k", "elasticsearch_username": "u"}, {})


def test_secrets_never_printed() -> None:
    config = load({"elasticsearch_username": "elastic"}, {"SMARTGAS_CONSUMER_ELASTICSEARCH_PASSWORD": "hunter2"})
    assert config.elasticsearch_password == "hunter2"
    assert "hunter2" not in repr(config)


def test_readme_configuration_table_is_current() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    # To regenerate: python -c 'from smartgas_consumer.config import settings_table; print(settings_table())'
    assert settings_table() in readme


def test_admin_key_is_secret_and_works() -> None:
    from smartgas_consumer.auth import ApiKeys

    secret = "s3cret-admin-key-Q7vX2mWp9LdR4tYb"
    config = load({}, {"SMARTGAS_CONSUMER_ADMIN_KEY": secret})
    assert secret not in repr(config)
    keys = ApiKeys.load(None).with_admin_key(config.admin_key)
    principal = keys.authenticate(secret)
    assert principal is not None and principal.is_admin
    assert keys.authenticate("other") is None
    assert secret not in repr(keys)


@pytest.mark.parametrize("flag", ["--mqtt-credentials", "--mqtt-shared-group"])
def test_an_mqtt_setting_without_a_broker_is_refused_naming_it(flag: str, tmp_path: Path) -> None:
    # It used to be ignored without a word: the user believed MQTT was configured.
    value = str(tmp_path / "consumer.json") if flag == "--mqtt-credentials" else "ingest"
    field = flag.removeprefix("--").replace("-", "_")
    with pytest.raises(ConfigError) as refused:
        load({field: value}, {})
    assert str(refused.value).startswith(f"{flag} takes effect only with MQTT on: give --mqtt-broker")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("workers", "2x", "must be a whole number"), ("alert_jump_bar", "fifty", "must be a number")],
)
def test_a_value_that_is_not_a_number_is_refused_in_words(field: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load({field: value}, {})
    assert str(refused.value).endswith(f"={value!r}: {words}")
    assert "int()" not in str(refused.value) and "float" not in str(refused.value)
