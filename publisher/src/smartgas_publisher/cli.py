"""The ``smartgas-publisher`` command: configuration, logging, signals, one fleet run, the exit code.

Exit codes: 0 when every reading produced was acknowledged by the consumer; 1 when any was refused
(4.xx), dropped from a full buffer or still unsent at the end; 2 when the configuration is invalid or
the fleet cannot start on this host.
"""

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from smartgas_publisher.config import ConfigError, PublisherConfig, load_config
from smartgas_publisher.fleet import Fleet, FleetError
from smartgas_publisher.stats import FleetStats

log = logging.getLogger(__name__)

EXIT_ALL_ACKNOWLEDGED = 0
EXIT_READINGS_LOST = 1
EXIT_CONFIG_ERROR = 2

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: aiocoap's loggers; chatty at INFO (one line per retransmission), so they only follow DEBUG.
AIOCOAP_LOGGERS = ("coap", "coap-server")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as err:
        print(f"smartgas-publisher: error: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    configure_logging(config.log_level)
    try:
        stats = asyncio.run(run(config))
    except FleetError as err:
        log.error("cannot start: %s", err)
        return EXIT_CONFIG_ERROR
    return EXIT_ALL_ACKNOWLEDGED if stats.all_acknowledged else EXIT_READINGS_LOST


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    for name in AIOCOAP_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


async def run(config: PublisherConfig) -> FleetStats:
    """Run one fleet, with SIGTERM and SIGINT asking it to stop (see ``Fleet.request_stop``)."""
    fleet = Fleet(config)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for signum in signals:
        loop.add_signal_handler(signum, fleet.request_stop)
    try:
        return await fleet.run()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
