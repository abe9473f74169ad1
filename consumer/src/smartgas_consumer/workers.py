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
nothing another process can connect to), so the frames on it are pickles of the package's own dataclasses.

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
import pickle
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any

import aiocoap
from aiocoap.error import ConstructionRenderableError

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.error import ImplausibleReading, NewMeterRateLimited, StoreUnavailable, UnknownMeterRefused
from smartgas_consumer.fleet import FleetMeter
from smartgas_consumer.intake import ReadingIntake
from smartgas_consumer.reading import Reading
from smartgas_consumer.store import CommitResult, Enrichment

_LOG = logging.getLogger(__name__)
#: Frames on the socket pair: a 4-byte length, then a pickle.
_LENGTH = struct.Struct("!I")
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


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """Worker → consumer: commit this reading (validated and computed by the worker)."""

    request_id: int
    reading: Reading
    moles: float
    enrichment: Enrichment


@dataclass(frozen=True, slots=True)
class FaultRequest:
    """Worker → consumer: why the store cannot commit now, if it cannot (``/health``)."""

    request_id: int


@dataclass(frozen=True, slots=True)
class Answer:
    """Consumer → worker: the result, or the refusal's class name, text and Max-Age (4.29)."""

    request_id: int
    result: CommitResult | str | None = None
    refusal: tuple[str, str, int] | None = None


@dataclass(frozen=True, slots=True)
class Ready:
    """Worker → consumer, once: the worker has bound the CoAP port."""

    pid: int
    port: int


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's object; None at the end of the stream."""
    try:
        (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
        return pickle.loads(await reader.readexactly(length))
    except asyncio.IncompleteReadError:
        return None


def write_frame(writer: asyncio.StreamWriter, item: object) -> None:
    body = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(_LENGTH.pack(len(body)) + body)


# -- the worker's side ----------------------------------------------------------------------------------


class ConsumerLink:
    """A worker's end of the socket pair: requests out, answers matched to them by id."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_waiting: int = MAX_WAITING_PER_WORKER
    ) -> None:
        self._reader, self._writer = reader, writer
        self.max_waiting = max_waiting
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self.closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._receive(), name="consumer-link")

    async def _receive(self) -> None:
        try:
            while (answer := await read_frame(self._reader)) is not None:
                waiter = self._waiting.pop(answer.request_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
        finally:
            self.closed.set()
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(StoreUnavailable("reading not stored, retry later: the consumer stopped"))
            self._waiting.clear()

    async def _ask(self, make: Any) -> Answer:
        if self.closed.is_set():
            raise StoreUnavailable("reading not stored, retry later: the consumer stopped")
        if len(self._waiting) >= self.max_waiting:
            raise StoreUnavailable(
                f"reading not stored, retry later: {len(self._waiting)} readings of this worker wait for the commit"
            )
        request_id = next(self._ids)
        waiter: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = waiter
        write_frame(self._writer, make(request_id))
        return await waiter

    async def commit(self, reading: Reading, moles: float, enrichment: Enrichment) -> CommitResult:
        answer = await self._ask(lambda request_id: CommitRequest(request_id, reading, moles, enrichment))
        if answer.refusal is not None:
            name, message, max_age_s = answer.refusal
            if name == NewMeterRateLimited.__name__:
                raise NewMeterRateLimited(message, max_age_s)
            raise _REFUSALS.get(name, StoreUnavailable)(message)
        assert isinstance(answer.result, CommitResult)
        return answer.result

    async def fault(self) -> str | None:
        if self.closed.is_set():
            return "unreachable: the consumer process stopped"
        answer = await self._ask(FaultRequest)
        return answer.result if isinstance(answer.result, str) else None

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


class ForwardingIntake(ReadingIntake):
    """A worker's intake: validates and computes as the consumer's does, then the consumer commits."""

    def __init__(self, link: ConsumerLink, **options: Any) -> None:
        super().__init__(None, **options)  # type: ignore[arg-type]  # no store here: commit() forwards
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

    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    config = await read_frame(reader)
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
    link = ConsumerLink(reader, writer)
    link.start()
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
    loop = asyncio.get_running_loop()
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
    write_frame(writer, Ready(os.getpid(), sock.getsockname()[1]))
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
    await link.close()
    return 0


def main() -> int:
    return asyncio.run(run_worker(int(sys.argv[1])))


# -- the consumer's side --------------------------------------------------------------------------------


@dataclass
class _Worker:
    number: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    reader: asyncio.StreamReader


class WorkerPool:
    """The consumer's N workers: started on the CoAP port, served, restarted when one dies, stopped."""

    def __init__(self, config: ConsumerConfig, intake: ReadingIntake, store_fault: Any) -> None:
        self.config = config
        self.intake = intake
        self._store_fault = store_fault
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
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        port = self.port if self.port is not None else self.config.coap_port
        write_frame(writer, _replace_port(self.config, port))
        try:
            ready = await asyncio.wait_for(read_frame(reader), WORKER_START_TIMEOUT_S)
        except TimeoutError:
            ready = None
        if not isinstance(ready, Ready):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            writer.close()
            raise OSError(f"CoAP worker {number} did not start (exit code {process.returncode}; its error is above)")
        self.port = ready.port
        worker = _Worker(number, process, writer, reader)
        self._workers[number] = worker
        _LOG.info("CoAP worker %d started, PID %d, on UDP port %d", number, process.pid, ready.port)
        self._spawn(self._serve(worker), f"worker-{number}")

    def _spawn(self, coroutine: Any, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, worker: _Worker) -> None:
        while (request := await read_frame(worker.reader)) is not None:
            if isinstance(request, CommitRequest):
                self._spawn(self._commit(worker, request), "worker-commit")
            elif isinstance(request, FaultRequest):
                self._spawn(self._fault(worker, request), "worker-fault")
        # The worker is gone: its end closed (it stopped, or was killed).
        returncode = await worker.process.wait()
        worker.writer.close()
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

    async def _commit(self, worker: _Worker, request: CommitRequest) -> None:
        try:
            result = await self.intake.commit_forwarded(request.reading, request.moles, request.enrichment)
        except ConstructionRenderableError as err:
            max_age_s = int(getattr(err, "max_age_s", 0))
            answer = Answer(request.request_id, refusal=(type(err).__name__, str(err.message), max_age_s))
        except Exception as err:  # a bug of ours: the worker answers 5.03 rather than wait for ever
            _LOG.exception("commit of a reading from CoAP worker %d failed", worker.number)
            answer = Answer(request.request_id, refusal=("StoreUnavailable", f"reading not stored: {err}", 0))
        else:
            answer = Answer(request.request_id, result=result)
        if not worker.writer.is_closing():
            write_frame(worker.writer, answer)

    async def _fault(self, worker: _Worker, request: FaultRequest) -> None:
        fault = await self._store_fault()
        if not worker.writer.is_closing():
            write_frame(worker.writer, Answer(request.request_id, result=fault))

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
