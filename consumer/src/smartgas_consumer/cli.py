"""Command line: ``smartgas-consumer serve`` runs the consumer; ``status`` reports on a store.

Exit codes: 0 success, 2 bad configuration (the message names the setting), 1 failure at run time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from smartgas_consumer import config as config_module
from smartgas_consumer.config import ConfigError, ConsumerConfig
from smartgas_consumer.server import Consumer
from smartgas_consumer.store import ReadingStore

_LOG = logging.getLogger("smartgas_consumer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartgas-consumer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="receive readings over CoAP and store them")
    config_module.add_arguments(serve)
    status = commands.add_parser("status", help="print what a store holds, as JSON")
    config_module.add_arguments(status)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # aiocoap logs every retransmission and message at INFO/DEBUG; keep it at WARNING unless debugging.
    if level != "DEBUG":
        logging.getLogger("smartgas_consumer.coap").setLevel(logging.WARNING)


async def serve(config: ConsumerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await Consumer(config).serve_until(stop)
    return 0


async def status(config: ConsumerConfig) -> int:
    store = ReadingStore(config.db)
    await store.open()
    try:
        summary = await store.summary()
    finally:
        await store.close()
    print(json.dumps({"db": str(config.db), **dataclasses.asdict(summary)}, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    flags = {name: value for name, value in vars(arguments).items() if name != "command"}
    try:
        config = config_module.load(flags, os.environ)
    except ConfigError as err:
        print(f"smartgas-consumer: configuration error: {err}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    command = serve if arguments.command == "serve" else status
    try:
        return asyncio.run(command(config))
    except OSError as err:  # port in use, unwritable store path, ...
        _LOG.error("%s", err)
        return 1
