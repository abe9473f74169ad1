"""Every core used (``--workers N``): N worker processes take the CoAP traffic, the consumer process commits.

The consumer process (the one ``serve`` starts) keeps everything that is state: the store and its lock,
the sequence rule, the admission of unknown meters, the alerts, the sinks, the HTTP API. It starts N
worker processes (``python -m smartgas_consumer.workers``), each binding the CoAP port with SO_REUSEPORT,
so the kernel spreads the datagrams over them by a hash of the source address and port: a meter sends
from one address and port, so its readings keep going to one worker (until the set of workers changes,
when a worker restarts). A worker does what costs CPU per reading and needs no shared state: aiocoap's
message layer and duplicate detection, the body's validation, the ideal and real-gas physics. It then
hands the computed reading to the consumer over a private socket pair (``ForwardingIntake.commit``); the
consumer commits it in its group commit and answers; only then does the worker send the 2.04. So an
acknowledged reading is committed durably before its ack, as with one process, and one consumer is still
one store, locked against a second consumer (docs/architecture.md).

The socket pair is made by the consumer and inherited by its own child only (no path in the file system,
nothing another process can connect to). What crosses it, and how (a frame per turn of each event loop,
a reading as a flat tuple, a batch committed by one coroutine), is ``handoff.py``'s.

A worker that dies (killed, crashed) is restarted by the consumer after ``RESTART_DELAY_S``; the requests it
held were not acknowledged, and meters re-send them (the store answers a re-send as a duplicate). A worker
whose consumer is gone stops. ``/health`` on a worker asks the consumer whether the store commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

import aiocoap
from aiocoap.error import ConstructionRenderableError

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.error import ImplausibleReading, NewMeterRateLimited, StoreUnavailable, UnknownMeterRefused
from smartgas_consumer.fleet import FleetMeter
from smartgas_consumer.handoff import (
    COMMIT,
    FAULT,
    FAULT_TEXT,
    FrameLink,
    GarbledFrame,
    decode_commit,
    decode_result,
    encode_commit,
    encode_result,
)
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.metrics import Metrics
from smartgas_consumer.reading import Reading
from smartgas_consumer.store import CommitResult, Enrichment

_LOG = logging.getLogger(__name__)
#: Readings a worker may have waiting for the consumer's commit; beyond, it answers 5.03 at once. The
#: consumer's share per reading is its bound: without this, workers reading faster than it commits would
#: pile readings up in its memory without end (measured: RSS past 1 GB under a sustained overload).
MAX_WAITING_PER_WORKER = 2048
#: How long the consumer waits before restarting a worker that died (a crash loop costs little).
RESTART_DELAY_S = 1.0
#: How long a worker may take to build its gas models and bind the port.
WORKER_START_TIMEOUT_S = 120.0
#: How long a worker may take to stop once asked (it answers what it holds first).
WORKER_STOP_TIMEOUT_S = 30.0
#: The refusals the consumer's commit can raise, rebuilt by name in the worker (their CoAP code and text).
_REFUSALS: dict[str, type[ConstructionRenderableError]] = {
    error.__name__: error for error in (ImplausibleReading, StoreUnavailable, UnknownMeterRefused)
}
_CONSUMER_STOPPED = "reading not stored, retry later: the consumer stopped"


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker → consumer, the worker's first frame: it has bound the CoAP port."""

    pid: int
    port: int


# -- the worker's side ----------------------------------------------------------------------------------


class ConsumerLink(FrameLink):
    """A worker's end of the socket pair: readings out, answers matched to them by id.

    Its frames follow Nagle's rule: while a frame sent waits for its answers, the readings of later turns
    are held and leave together when the next answers come. The consumer answers once per group commit,
    so the worker sends about one frame per group commit instead of one per reading (each a system call
    here and a wake-up, a read and a task there); a reading held so waits about as long as it would have
    waited in the consumer's queue for the commit after the one under way. When nothing waits, a reading
    leaves at the end of its turn, so a quiet link adds no delay."""

    def __init__(self, max_waiting: int = MAX_WAITING_PER_WORKER) -> None:
        super().__init__("the consumer process")
        self.max_waiting = max_waiting
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._answer_due = False  # a frame left since the last answers came

    def items_received(self, items: list[Any]) -> None:
        for item in items:
            answer = item[2] if item[1] == FAULT_TEXT else decode_result(item)
            waiter = self._waiting.pop(item[0], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(answer)
        self._answer_due = False
        if self.has_outgoing():
            self.flush()

    def flush(self) -> None:
        if not self.has_outgoing():
            # A flush queued by a reading that the answers' own flush already sent: it must not mark the
            # link as holding, or after the next answers nothing would flush again (a worker silenced).
            super().flush()
            return
        if self._answer_due:
            self.hold()  # sent when the next answers come (items_received)
            return
        self._answer_due = True
        super().flush()

    def link_closed(self) -> None:
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(StoreUnavailable(_CONSUMER_STOPPED))
        self._waiting.clear()

    def _waiter(self) -> tuple[int, asyncio.Future[Any]]:
        if self.closed.is_set():
            raise StoreUnavailable(_CONSUMER_STOPPED)
        if len(self._waiting) >= self.max_waiting:
            raise StoreUnavailable(
                f"reading not stored, retry later: {len(self._waiting)} readings of this worker wait for the commit"
            )
        request_id = next(self._ids)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        return request_id, waiter

    async def commit(self, reading: Reading, moles: float, enrichment: Enrichment) -> CommitResult:
        request_id, waiter = self._waiter()
        self.send(encode_commit(request_id, reading, moles, enrichment))
        answer = await waiter
        if isinstance(answer, CommitResult):
            return answer
        name, message, max_age_s = answer
        if name == NewMeterRateLimited.__name__:
            raise NewMeterRateLimited(message, max_age_s)
        raise _REFUSALS.get(name, StoreUnavailable)(message)

    async def fault(self) -> str | None:
        if self.closed.is_set():
            return "unreachable: the consumer process stopped"
        request_id, waiter = self._waiter()
        self.send((request_id, FAULT))
        answer = await waiter
        return answer if isinstance(answer, str) else None

    async def wait_closed(self) -> None:
        self.close()
        await self.closed.wait()


class UnscrapedMetrics(Metrics):
    """A worker's metrics: nothing scrapes a worker (``/metrics`` is the consumer process's, which counts
    the readings it commits), so a worker spends nothing per reading on them."""

    def __init__(self) -> None:
        super().__init__(process=False)

    def reading_received(self, transport: str = "coap") -> None:
        pass

    def reading_accepted(self, transport: str = "coap") -> None:
        pass

    def reading_rejected(self, reason: str, transport: str = "coap") -> None:
        pass

    def ack_latency(self, seconds: float) -> None:
        pass


class ForwardingIntake(ReadingIntake):
    """A worker's intake: validates and computes as the consumer's does, then the consumer commits."""

    def __init__(self, link: ConsumerLink, **options: Any) -> None:
        # No store here: commit() forwards.
        super().__init__(None, metrics=UnscrapedMetrics(), **options)  # type: ignore[arg-type]
        self._link = link

    async def commit(
        self, reading: Reading, moles: float, enrichment: Enrichment, meter: FleetMeter | None
    ) -> CommitResult:
        result = await self._link.commit(reading, moles, enrichment)
        self.counters.stored += result.stored
        self.counters.duplicates += not result.stored
        return result


async def run_worker(fd: int) -> int:
    """A worker process: config from the consumer, CoAP on the shared port, until SIGTERM or the consumer goes."""
    # Imported here: the server module imports this one.
    from smartgas_consumer.dedup import DedupLimits, bounded_dedup_context
    from smartgas_consumer.edgelog import COAP_LOGGER, PeerNoiseFilter, datagram_error_handler
    from smartgas_consumer.fleet import Fleet, load_fleet
    from smartgas_consumer.realgas import RealGasPhysics
    from smartgas_consumer.server import (
        AIOCOAP_REUSE_PORT,
        SERVING_GC_THRESHOLDS,
        SO_RCVBUFFORCE,
        build_site,
        udp_socket,
    )

    loop = asyncio.get_running_loop()
    _, link = await loop.create_unix_connection(ConsumerLink, sock=socket.socket(fileno=fd))
    try:
        config = await link.first_frame
    except ConnectionError:
        return 1
    if not isinstance(config, ConsumerConfig):
        return 1
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s (worker PID %(process)d): %(message)s",
        stream=sys.stderr,
    )
    if config.log_level != "DEBUG":
        logging.getLogger(COAP_LOGGER).setLevel(logging.WARNING)
    fleet = load_fleet(config.fleet) if config.fleet is not None else Fleet()
    intake = ForwardingIntake(
        link,
        fleet=fleet,
        gas_physics=RealGasPhysics.build(fleet),
        log_readings=config.log_readings,
        max_reading_age_s=config.max_reading_age_s,
        max_clock_skew_s=config.max_clock_skew_s,
    )
    coap_log = logging.getLogger(COAP_LOGGER)
    coap_log.addFilter(PeerNoiseFilter())
    loop.set_exception_handler(datagram_error_handler(coap_log))
    os.environ[AIOCOAP_REUSE_PORT] = "1"
    limits = DedupLimits(config.coap_dedup_entries, config.coap_dedup_lifetime_s)
    context: aiocoap.Context = await bounded_dedup_context(limits).create_server_context(
        build_site(intake, store_fault=link.fault),
        bind=(config.coap_host, config.coap_port),
        transports=["udp6"],
        loggername=COAP_LOGGER,
    )
    sock = udp_socket(context)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, config.udp_receive_buffer_bytes)
    with contextlib.suppress(OSError):  # beyond net.core.rmem_max, for a privileged process
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, config.udp_receive_buffer_bytes)
    link.send_first(Ready(os.getpid(), sock.getsockname()[1]))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    gc.collect()
    gc.freeze()
    gc.set_threshold(*SERVING_GC_THRESHOLDS)
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(link.closed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    await context.shutdown()
    _LOG.info("worker %d stopped: %s", os.getpid(), intake.counters.describe())
    await link.wait_closed()
    return 0


def main() -> int:
    return asyncio.run(run_worker(int(sys.argv[1])))


# -- the consumer's side --------------------------------------------------------------------------------


class WorkerLink(FrameLink):
    """The consumer's end of one worker's socket pair: each read's readings committed as one batch, by one
    coroutine, and answered in the frame of the turn their group commit ends."""

    def __init__(self, number: int, pool: WorkerPool) -> None:
        super().__init__(f"CoAP worker {number}")
        self.number = number
        self._pool = pool

    def items_received(self, items: list[Any]) -> None:
        request_ids: list[int] = []
        forwarded: list[tuple[Reading, float, Enrichment]] = []
        for item in items:
            if item[1] == COMMIT:
                forwarded.append(decode_commit(item))
                request_ids.append(item[0])
            elif item[1] == FAULT:
                self._pool.spawn(self._fault(item[0]), f"worker-{self.number}-fault")
            else:
                raise GarbledFrame(f"a request of kind {item[1]!r}")
        if forwarded:
            self._pool.spawn(self._commit(request_ids, forwarded), f"worker-{self.number}-commit")

    async def _commit(self, request_ids: list[int], forwarded: list[tuple[Reading, float, Enrichment]]) -> None:
        outcomes: list[CommitResult | ConstructionRenderableError]
        try:
            outcomes = await self._pool.intake.commit_forwarded(forwarded)
        except Exception as err:  # a bug of ours: the worker answers 5.03 rather than wait for ever
            _LOG.exception("commit of %d readings from CoAP worker %d failed", len(forwarded), self.number)
            outcomes = [StoreUnavailable(f"reading not stored: {err}")] * len(forwarded)
        for request_id, outcome in zip(request_ids, outcomes, strict=True):
            self.send(encode_result(request_id, outcome))

    async def _fault(self, request_id: int) -> None:
        # Always answered: the worker holds its next readings until an answer comes (ConsumerLink).
        try:
            fault = await self._pool.store_fault()
        except Exception as err:  # a bug of ours: /health says so rather than the worker waiting for ever
            _LOG.exception("the store probe for CoAP worker %d failed", self.number)
            fault = f"the store probe failed: {err}"
        self.send((request_id, FAULT_TEXT, fault))


@dataclass
class _Worker:
    number: int
    process: asyncio.subprocess.Process
    link: WorkerLink = field(repr=False)


class WorkerPool:
    """The consumer's N workers: started on the CoAP port, served, restarted when one dies, stopped."""

    def __init__(self, config: ConsumerConfig, intake: ReadingIntake, store_fault: Any) -> None:
        self.config = config
        self.intake = intake
        self.store_fault = store_fault
        self.port: int | None = None
        self._workers: dict[int, _Worker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers.values()]

    async def start(self) -> int:
        """Start every worker; the first binds ``--coap-port`` (0: a free one), the others its port."""
        for number in range(1, self.config.workers + 1):
            await self._start_worker(number)
        assert self.port is not None
        return self.port

    async def _start_worker(self, number: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smartgas_consumer.workers",
                str(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                # Its own session: a terminal's Ctrl-C reaches the consumer, which stops the workers in order.
                start_new_session=True,
            )
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        _, link = await loop.create_unix_connection(lambda: WorkerLink(number, self), sock=ours)
        port = self.port if self.port is not None else self.config.coap_port
        link.send_first(_replace_port(self.config, port))
        try:
            ready = await asyncio.wait_for(link.first_frame, WORKER_START_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            ready = None
        if not isinstance(ready, Ready):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            link.close()
            raise OSError(f"CoAP worker {number} did not start (exit code {process.returncode}; its error is above)")
        self.port = ready.port
        worker = _Worker(number, process, link)
        self._workers[number] = worker
        _LOG.info("CoAP worker %d started, PID %d, on UDP port %d", number, process.pid, ready.port)
        self.spawn(self._serve(worker), f"worker-{number}")

    def spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, worker: _Worker) -> None:
        await worker.link.closed.wait()
        # The worker is gone (it stopped, or was killed), or sent a frame that cannot be read (then it stops
        # on the link's end; a worker that does not is killed).
        try:
            returncode = await asyncio.wait_for(worker.process.wait(), WORKER_STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            returncode = await worker.process.wait()
        if self._stopping:
            return
        del self._workers[worker.number]
        _LOG.error(
            "CoAP worker %d (PID %d) exited with code %d; restarting it in %.0f s",
            worker.number,
            worker.process.pid,
            returncode,
            RESTART_DELAY_S,
        )
        await asyncio.sleep(RESTART_DELAY_S)
        while not self._stopping:
            try:
                await self._start_worker(worker.number)
                return
            except OSError as err:
                _LOG.error("%s; trying again in %.0f s", err, RESTART_DELAY_S)
                await asyncio.sleep(RESTART_DELAY_S)

    async def stop(self) -> None:
        """Ask every worker to stop (each answers what it holds first), then wait for them and their commits."""
        self._stopping = True
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        for worker in self._workers.values():
            try:
                await asyncio.wait_for(worker.process.wait(), WORKER_STOP_TIMEOUT_S)
            except TimeoutError:
                _LOG.error("CoAP worker %d (PID %d) did not stop: killed", worker.number, worker.process.pid)
                worker.process.kill()
                await worker.process.wait()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._workers.clear()


def _replace_port(config: ConsumerConfig, port: int) -> ConsumerConfig:
    return dataclasses.replace(config, coap_port=port)


if __name__ == "__main__":
    # Run through the imported module, not this ``__main__`` copy: the frames' classes must be the ones
    # the consumer pickles (``smartgas_consumer.workers.Ready``, not ``__main__.Ready``).
    from smartgas_consumer import workers

    raise SystemExit(workers.main())
