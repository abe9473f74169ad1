"""Command line: ``smartgas-consumer serve`` runs the consumer; ``status`` reports on a store;
``provision-meter``, ``provision-meters`` and ``revoke-meter`` manage the meters' OSCORE contexts and their
MQTT broker users.

Exit codes (docs/operations.md): 0 success; 2 the consumer refused to start, with one line on stderr naming
the setting or path and the fix (a bad setting, fleet or keys file, a store that is damaged, read-only or
served by another consumer, a port in use); 1 a failure at run time. A traceback accompanies a start-up
refusal only with ``--log-level DEBUG``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smartgas_consumer import broker_auth, device_auth, health, provision
from smartgas_consumer import config as config_module
from smartgas_consumer.auth import ApiKeysFileError, key_file_line, new_key
from smartgas_consumer.config import ConfigError, ConsumerConfig
from smartgas_consumer.fleet import FleetFileError, load_fleet
from smartgas_consumer.reading import METER_ID_PATTERN
from smartgas_consumer.server import Consumer, StartupError
from smartgas_consumer.status import build_report, read_snapshot, snapshot_path
from smartgas_consumer.store import NotAStoreError, ReadingStore, StoreLock, StoreUnusable, check_existing_store

_LOG = logging.getLogger("smartgas_consumer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartgas-consumer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="receive readings over CoAP and store them")
    config_module.add_arguments(serve)
    status = commands.add_parser(
        "status", help="print what an existing store holds (and the shipping lag, with Elasticsearch), as JSON"
    )
    config_module.add_arguments(status)
    setup = commands.add_parser(
        "setup", help="make Elasticsearch and Kibana ready (templates, kibana_system password, dashboard)"
    )
    config_module.add_arguments(setup)
    setup.add_argument(
        "--kibana-system-password-env",
        metavar="VARIABLE",
        default=None,
        help="environment variable holding the password to set for the kibana_system user",
    )
    setup.add_argument(
        "--wait-timeout",
        metavar="SECONDS",
        type=float,
        default=300.0,
        help="how long to wait for Elasticsearch, then for Kibana (default 300)",
    )
    setup.add_argument(
        "--kibana-only",
        action="store_true",
        help="only import the Kibana saved objects (what is missing or older than ours); needs --kibana-url",
    )
    healthcheck = commands.add_parser(
        "healthcheck",
        help="exit 0 if a CoAP GET of /health answers 2.05 (the consumer serves and its store commits); with"
        " --coap-enabled false, if an HTTP GET of /healthz answers 200",
    )
    config_module.add_arguments(healthcheck)
    healthcheck.add_argument("--timeout", metavar="SECONDS", type=float, default=5.0)
    for name, text in (
        (
            "provision-meter",
            "create a meter's OSCORE context and MQTT broker user (consumer, meter and broker sides); --rotate"
            " replaces them",
        ),
        (
            "provision-meters",
            "create an OSCORE context and a broker user for every meter of the fleet file (--fleet) that has none",
        ),
        (
            "revoke-meter",
            "remove a meter's OSCORE context (the running consumer refuses it from then on, 4.01) and its broker"
            " user (refused by Mosquitto once it re-reads its password file)",
        ),
    ):
        device = commands.add_parser(name, help=text)
        config_module.add_arguments(device)
        if name != "provision-meters":
            device.add_argument("meter_id", metavar="METER_ID")
        device.add_argument(
            "--broker-files",
            metavar="DIR",
            type=Path,
            default=None,
            help="directory of the broker's password file, ACL and the consumer's broker user (default:"
            " <--device-credentials>/mosquitto; the compose stack keeps them in the broker's own volume)",
        )
        if name != "revoke-meter":
            device.add_argument(
                "--meter-credentials",
                metavar="DIR",
                type=Path,
                required=True,
                help="directory for the meters' side of their contexts (the publisher's --credentials)",
            )
            device.add_argument("--rotate", action="store_true", help="replace existing contexts with new keys")
    hash_key = commands.add_parser(
        "hash-key", help="make a new API key for a client (or hash one given on stdin) and print its keys-file line"
    )
    hash_key.add_argument("client", help='client id, or "*" for an administrator')
    hash_key.add_argument("--stdin", action="store_true", help="read the key from standard input instead")
    return parser


def print_key_line(client: str, from_stdin: bool) -> int:
    """Print a key (unless it came from stdin) and the line for the API keys file."""
    key = sys.stdin.readline().strip() if from_stdin else new_key()
    if not key:
        print("smartgas-consumer: no key on standard input", file=sys.stderr)
        return 2
    if not from_stdin:
        print(f"# key for {client} (give it to the client; it is not stored anywhere): {key}")
    print(key_file_line(client, key))
    return 0


#: Options of single subcommands, not settings of the consumer.
_COMMAND_OPTIONS = {
    "command",
    "kibana_system_password_env",
    "wait_timeout",
    "timeout",
    "kibana_only",
    "meter_id",
    "meter_credentials",
    "rotate",
    "broker_files",
}


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # aiocoap logs every retransmission and message at INFO/DEBUG; keep it at WARNING unless debugging.
    if level != "DEBUG":
        logging.getLogger("smartgas_consumer.coap").setLevel(logging.WARNING)
        # The Elasticsearch transport logs every HTTP request at INFO.
        logging.getLogger("elastic_transport").setLevel(logging.WARNING)


def device_command(arguments: argparse.Namespace, config: ConsumerConfig) -> int:
    """provision-meter, provision-meters, revoke-meter: print one line per meter (never a secret)."""
    credentials = config.device_credentials
    broker_files = arguments.broker_files or broker_auth.broker_dir(credentials)
    if arguments.command == "revoke-meter":
        meter_id = check_meter_id_text(arguments.meter_id)
        had_context = device_auth.revoke_meter(credentials, meter_id)
        had_user = broker_auth.revoke_broker_user(broker_files, meter_id)
        if not (had_context or had_user):
            print(f"smartgas-consumer: meter {meter_id!r} has no context in {credentials}", file=sys.stderr)
            return 1
        removed = " and ".join(
            what for what, done in (("its context", had_context), ("its broker user", had_user)) if done
        )
        print(
            f"{meter_id}: revoked ({removed} removed);"
            " the broker refuses it once it re-reads its password file (SIGHUP)"
        )
        return 0
    if arguments.command == "provision-meter":
        meter_ids = [check_meter_id_text(arguments.meter_id)]
    else:
        if config.fleet is None:
            print("smartgas-consumer: provision-meters needs the fleet file (--fleet FILE)", file=sys.stderr)
            return 2
        meter_ids = sorted(load_fleet(config.fleet).meters)
    for meter_id in meter_ids:
        broker_auth.check_meter_id_for_broker(meter_id)
    created = 0
    provisioned = device_auth.provision_meters(
        credentials, arguments.meter_credentials, meter_ids, rotate=arguments.rotate
    )
    for done in provisioned:
        created += done.created
        if arguments.command == "provision-meter" or done.created:
            print(done.describe())
    # The broker users after the contexts: a rotated context replaces the meter's side, mqtt.json with it.
    broker = broker_auth.provision_broker(broker_files, arguments.meter_credentials, meter_ids, rotate=arguments.rotate)
    print(
        f"{created} context(s) created, {len(meter_ids) - created} kept; consumer side in {credentials};"
        f" {broker.describe()}"
    )
    return 0


def check_meter_id_text(meter_id: str) -> str:
    """A meter id given on the command line, checked as the CoAP edge checks one."""
    if not METER_ID_PATTERN.fullmatch(meter_id):
        raise device_auth.CredentialsError(f"meter id {meter_id[:80]!r} is invalid: use 1 to 64 of A-Z a-z 0-9 _ . -")
    return meter_id


async def serve(config: ConsumerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(signum: signal.Signals) -> None:
        # Logged, so that an operator (and the tests of `make run`) can see each stop request arrive once.
        if stop.is_set():
            _LOG.info("%s received again: already stopping", signum.name)
        else:
            _LOG.info("%s received: stopping (closing the socket, committing what is held)", signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, request_stop, signum)
    await Consumer(config).serve_until(stop)
    return 0


async def status(config: ConsumerConfig) -> int:
    """Print what the store at ``config.db`` holds; the shipping lag only when readings are being shipped.

    A consumer serving the store holds it alone: then the report is the snapshot it writes beside the
    store every ``--status-interval`` (with ``as_of``, ``age_s`` and ``served_by_pid``).
    """
    holder = StoreLock(config.db).holder()
    try:
        check_existing_store(config.db)
    except NotAStoreError as err:
        if holder is None:
            print(f"smartgas-consumer: --db {err}; give the store the consumer writes (serve --db)", file=sys.stderr)
            return 2
    # The shared WAL index: readable beside a consumer that runs with --store-shared-memory true.
    store = ReadingStore(config.db, shared_memory=True)
    try:
        await store.open()
    except StoreUnusable as err:
        await store.close()
        holder = holder or StoreLock(config.db).holder()
        if holder is None:
            raise
        snapshot = read_snapshot(config.db, datetime.now(UTC))
        if snapshot is None:
            raise StartupError(
                f"--db {config.db}: served by the consumer with PID {holder}, which has not written its status "
                f"snapshot ({snapshot_path(config.db).name}) yet; try again after --status-interval"
            ) from err
        print(json.dumps(snapshot, indent=2))
        return 0
    try:
        summary = await store.summary()
        letters = await store.dead_letters(limit=20)
    finally:
        await store.close()
    shipping = config.elasticsearch_url is not None
    print(json.dumps(build_report(config.db, summary, letters, shipping=shipping, now=datetime.now(UTC)), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "hash-key":
        return print_key_line(arguments.client, arguments.stdin)
    flags = {name: value for name, value in vars(arguments).items() if name not in _COMMAND_OPTIONS}
    try:
        config = config_module.load(flags, os.environ)
    except ConfigError as err:
        print(f"smartgas-consumer: configuration error: {err}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    if arguments.command in {"provision-meter", "provision-meters", "revoke-meter"}:
        try:
            return device_command(arguments, config)
        except (FleetFileError, device_auth.CredentialsError, broker_auth.BrokerCredentialsError, OSError) as err:
            print(f"smartgas-consumer: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
    runner: Coroutine[Any, Any, int]
    if arguments.command == "setup":
        runner = provision.main_setup(
            config,
            os.environ,
            kibana_system_password_env=arguments.kibana_system_password_env,
            wait_timeout_s=arguments.wait_timeout,
            kibana_only=arguments.kibana_only,
        )
    elif arguments.command == "healthcheck":
        runner = health.healthcheck(config, timeout_s=arguments.timeout)
    elif arguments.command == "status":
        runner = status(config)
    else:
        runner = serve(config)
    try:
        return asyncio.run(runner)
    except (StartupError, StoreUnusable, FleetFileError, ApiKeysFileError) as err:
        _LOG.debug("start-up refused", exc_info=True)
        print(f"smartgas-consumer: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # an unexpected system error at run time
        _LOG.debug("failed", exc_info=True)
        print(f"smartgas-consumer: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
