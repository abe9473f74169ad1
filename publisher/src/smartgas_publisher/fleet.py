"""The fleet: N meters run concurrently, counted in one ``FleetStats``, started and stopped as one.

The meters are those of the fleet file (``--fleet``) or ``--meters`` anonymous ones; each simulates the
fault injected into it, if any (``--inject``).

A run has three phases. *Production*: every meter produces its readings (``--count`` of them, or until
a stop is requested) while its send loop delivers them; a status line is logged every
``--status-interval``. *Drain*: production is over and the fleet waits until every buffer is empty, for
at most the drain budget (``--drain-timeout``; after a stop request, at most ``SHUTDOWN_DRAIN_S``).
*Shutdown*: the loops are cancelled, the uplink's sockets and credentials are released, and a summary line
is logged in which anything still buffered is reported as ``unsent``.

One scheduler takes every meter's readings when they are due (a heap of due times, one task, instead of
a task and a timer per meter), and each meter has one task that delivers its buffer. All meters share one
uplink (``coap.py`` by default: a small pool of CoAP client sockets), so one process drives ten thousand
meters and more (docs/benchmarks.md).

``request_stop`` is what SIGTERM/SIGINT call: the first stops production and shortens the drain, a
second one ends the drain at once.
"""

import asyncio
import heapq
import logging
import math
import resource
from collections.abc import Coroutine
from typing import Any

from smartgas_publisher.coap import CoapUplink, response_deadline_s, transport_tuning
from smartgas_publisher.config import PublisherConfig
from smartgas_publisher.meter import Clock, Meter, utc_now
from smartgas_publisher.stats import FleetStats
from smartgas_publisher.uplink import Uplink

log = logging.getLogger(__name__)

#: After a stop request, how long the fleet still tries to deliver what is buffered. Short enough that
#: the whole shutdown fits in the 10 s a container runtime waits between SIGTERM and SIGKILL.
SHUTDOWN_DRAIN_S = 5.0
#: Open files beyond the uplink's: standard streams, the event loop's own, log files.
SPARE_FILE_DESCRIPTORS = 64


class FleetError(RuntimeError):
    """The fleet cannot start as configured on this host (for example, too few file descriptors)."""


class Fleet:
    """Creates the meters for a configuration and runs them to the end of one run."""

    def __init__(self, config: PublisherConfig, clock: Clock = utc_now) -> None:
        self._config = config
        meter_ids = config.meter_ids()
        self.stats = FleetStats(meters=len(meter_ids))
        self.uplink: Uplink = make_uplink(config, meter_ids, self.stats)
        self.meters = [Meter(meter_id, config, self.stats, self.uplink, clock) for meter_id in meter_ids]
        self._stopping = False
        self._production: asyncio.Task[None] | None = None
        self._drain_deadline = math.inf
        self._deadline_moved = asyncio.Event()
        self._crash: BaseException | None = None

    def request_stop(self) -> None:
        """Stop producing and drain for at most SHUTDOWN_DRAIN_S; called again, stop draining now."""
        now = asyncio.get_running_loop().time()
        if not self._stopping:
            self._stopping = True
            log.info(
                "stop requested: no more readings; delivering what is buffered for up to %g s (stop again to quit now)",
                SHUTDOWN_DRAIN_S,
            )
            self._end_production()
            self._move_drain_deadline(now + SHUTDOWN_DRAIN_S)
        else:
            log.info("second stop request: quitting without waiting for unsent readings")
            self._move_drain_deadline(now)

    async def run(self) -> FleetStats:
        """Run the fleet to the end and return the final counts (``buffered`` is then what is unsent)."""
        ensure_file_descriptors(self.uplink.files_needed + SPARE_FILE_DESCRIPTORS)
        log.info(
            "fleet starting: meters=%d (%s) %s period=%gs count=%s seed=%d",
            len(self.meters),
            self._config.fleet_path or "anonymous",
            f"broker={self._config.broker}"
            if self._config.transport == "mqtt"
            else f"consumer={self._config.consumer}",
            self._config.period_s,
            self._config.count if self._config.count is not None else "unlimited",
            self._config.seed,
        )
        for injection in self._config.inject:
            log.info(
                "%s: injecting fault %s: %s (consumer alert: %s)",
                injection.meter_id,
                injection.fault.kind,
                injection.fault.effect,
                injection.fault.alert,
            )
        tasks: list[asyncio.Task[None]] = []
        try:
            await self.uplink.open()
            self._production = self._start(self._produce(), "readings scheduler")
            tasks.append(self._production)
            tasks += [self._start(meter.send(), f"send {meter.meter_id}") for meter in self.meters]
            tasks.append(self._start(self._report_status(), "fleet status"))
            if self._stopping:  # asked to stop while opening
                self._end_production()
            await asyncio.gather(self._production, return_exceptions=True)
            await self._drain()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.uplink.close()
            level = logging.INFO if self.stats.all_acknowledged else logging.WARNING
            log.log(level, "%s", self.stats.summary_line())
        if self._crash is not None:
            raise self._crash
        return self.stats

    def _start(self, loop_coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(loop_coroutine, name=name)
        task.add_done_callback(self._check_loop)
        return task

    def _check_loop(self, task: asyncio.Task[None]) -> None:
        """A meter loop that ends with an exception is a bug: stop the whole fleet at once and re-raise it."""
        if task.cancelled() or (problem := task.exception()) is None:
            return
        log.error("%s failed; stopping the fleet", task.get_name(), exc_info=problem)
        if self._crash is None:
            self._crash = problem
        self._stopping = True
        self._end_production()
        self._move_drain_deadline(-math.inf)

    async def _produce(self) -> None:
        """Take each meter's readings when due, until every meter is done or production is ended."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        schedule = [(start + meter.first_delay_s, index) for index, meter in enumerate(self.meters)]
        heapq.heapify(schedule)
        try:
            while schedule:
                delay_s = schedule[0][0] - loop.time()
                if delay_s > 0:
                    await asyncio.sleep(delay_s)
                now = loop.time()
                while schedule and schedule[0][0] <= now:
                    due, index = heapq.heappop(schedule)
                    next_due = self.meters[index].take_reading(due, now)
                    if next_due is not None:
                        heapq.heappush(schedule, (next_due, index))
            if self._config.count is None:
                await asyncio.Event().wait()  # only silent meters left: they stay up until a stop request
        finally:
            for meter in self.meters:
                meter.end_production()

    def _end_production(self) -> None:
        if self._production is not None:
            self._production.cancel()

    async def _drain(self) -> None:
        """Wait until every meter is drained, the drain deadline passes, or a stop request ends it."""
        loop = asyncio.get_running_loop()
        self._move_drain_deadline(loop.time() + self._config.drain_budget_s)
        all_drained: asyncio.Future[Any] = asyncio.ensure_future(self._wait_all_drained())
        try:
            while not all_drained.done():
                remaining_s = self._drain_deadline - loop.time()
                if remaining_s <= 0:
                    unsent = sum(meter.unsent for meter in self.meters)
                    log.warning("drain ended with %d readings unsent", unsent)
                    return
                self._deadline_moved.clear()
                moved: asyncio.Future[Any] = asyncio.ensure_future(self._deadline_moved.wait())
                await asyncio.wait([all_drained, moved], timeout=remaining_s, return_when=asyncio.FIRST_COMPLETED)
                moved.cancel()
        finally:
            all_drained.cancel()

    async def _wait_all_drained(self) -> None:
        for meter in self.meters:
            await meter.wait_drained()

    def _move_drain_deadline(self, deadline: float) -> None:
        if deadline < self._drain_deadline:
            self._drain_deadline = deadline
            self._deadline_moved.set()

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(self._config.status_interval_s)
            log.info("%s", self.stats.status_line())


def make_uplink(config: PublisherConfig, meter_ids: list[str], stats: FleetStats) -> Uplink:
    """The transport the configuration names, shared by all meters."""
    if config.transport == "mqtt":
        from smartgas_publisher.mqtt import MqttUplink

        # A PUBACK is waited for as long as a CoAP answer would be (--ack-timeout, --max-retransmit).
        deadline_s = response_deadline_s(transport_tuning(config.ack_timeout_s, config.max_retransmit))
        return MqttUplink(config, meter_ids, stats, deadline_s)
    return CoapUplink(config, meter_ids)


def ensure_file_descriptors(needed: int) -> None:
    """Raise the soft open-file limit to ``needed`` if the hard limit allows; FleetError if it does not.

    The uplink's sockets and each meter's OSCORE lock file are open files, and the usual soft limit of
    1024 would stop a large fleet half-way through starting.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise FleetError(
            f"the fleet needs about {needed} open files (sockets, OSCORE context locks) but this process may"
            f" open at most {hard}; raise the limit (ulimit -n, or ulimits in compose) or run fewer meters"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
