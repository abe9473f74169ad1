"""The hand-off between a ``--workers`` worker and the consumer process: frames on their socket pair.

A frame is a 4-byte length and a body. The first frame each way is a pickle (the consumer's config to the
worker, ``Ready`` back); every later one is a ``marshal`` of a list of plain tuples: requests from the
worker (a reading to commit, a question for ``/health``), answers from the consumer. marshal builds
nothing but numbers, strings, tuples and lists, and is the cheapest encoding Python has for them; a
reading crosses as a flat tuple (``encode_commit``), not a pickle of dataclasses, whose per-field
reflection (``dataclasses``' ``__getstate__``) took 8.5 % of a worker's event loop (docs/benchmarks.md).

``FrameLink`` is one end, an asyncio protocol: what one turn of the event loop queues with ``send`` leaves as
one frame at the start of the next turn (one ``send`` system call and one wake-up of the other process for
all of them; the worker's end holds readings longer, by Nagle's rule: ``workers.ConsumerLink``), and every
complete frame that one read brings is handed on in one call to ``items_received``. A frame that cannot
be decoded (garbled, a length beyond ``MAX_FRAME_BYTES``, of the wrong shape) closes the link, as the
other end's exit would: the consumer then restarts that worker, whose waiting readings were never
acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import marshal
import pickle
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

from aiocoap.error import ConstructionRenderableError

from smartgas_consumer.reading import Reading
from smartgas_consumer.realgas import NO_REAL_GAS, RealGas
from smartgas_consumer.store import CommitResult, Enrichment, SequenceOutcome

_LOG = logging.getLogger(__name__)
_LENGTH = struct.Struct("!I")
#: The longest frame either end takes (a worker's whole bound of waiting readings is ~300 KB): a longer
#: length means the stream is garbled.
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: A request's kind (its second field) and an answer's status (its second field).
COMMIT, FAULT = 0, 1
RESULT, REFUSAL, FAULT_TEXT = 0, 1, 2
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_OUTCOMES = {outcome.value: outcome for outcome in SequenceOutcome}


class GarbledFrame(ValueError):
    """A frame whose body is not what this end expects."""


class FrameLink(asyncio.Protocol):
    """One end of the socket pair: frames in (``items_received``) and out (``send``, one frame a turn)."""

    def __init__(self, name: str) -> None:
        self.name = name  # for the logs: "CoAP worker 2", "the consumer process"
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._outgoing: list[Any] = []
        self._flush_scheduled = False
        loop = asyncio.get_running_loop()
        #: The first frame (a pickle); fails with ConnectionError if the link closes before it came.
        self.first_frame: asyncio.Future[Any] = loop.create_future()
        self.closed = asyncio.Event()

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        if self._buffer:  # the start of a frame came with the last read
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        view, offset, items = memoryview(data), 0, []
        try:
            while len(data) - offset >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(data, offset)
                if length > MAX_FRAME_BYTES:
                    raise GarbledFrame(f"a frame of {length} bytes, beyond {MAX_FRAME_BYTES}")
                end = offset + _LENGTH.size + length
                if len(data) < end:
                    break
                body = view[offset + _LENGTH.size : end]
                offset = end
                if not self.first_frame.done():
                    self.first_frame.set_result(pickle.loads(body))
                    continue
                frame = marshal.loads(body)
                if type(frame) is not list:
                    raise GarbledFrame(f"a frame of {type(frame).__name__}, not a list")
                items.extend(frame)
            if items:
                self.items_received(items)
        except Exception as err:  # whatever a garbled frame makes a decoder raise: this link is done
            _LOG.error("the link with %s is closed: it sent a frame that cannot be read (%r)", self.name, err)
            self.close()
            return
        self._buffer += view[offset:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.first_frame.done():
            self.first_frame.set_exception(ConnectionError(f"the link with {self.name} closed"))
            self.first_frame.exception()  # marked seen: an end whose first frame nobody awaits is not a fault
        self.closed.set()
        self.link_closed()

    # -- for subclasses -----------------------------------------------------------------------------

    def items_received(self, items: list[Any]) -> None:
        """The items of the frames one read brought (raise to declare them garbled: the link closes)."""
        raise GarbledFrame(f"{len(items)} items where none were expected")

    def link_closed(self) -> None:
        """The link is closed (the other end went, or a garbled frame): release what waits on it."""

    # -- sending ------------------------------------------------------------------------------------

    def send_first(self, item: object) -> None:
        """The first frame of this end (a pickle)."""
        self._write(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))

    def send(self, item: tuple[Any, ...]) -> None:
        """Queue ``item`` for this turn's frame."""
        self._outgoing.append(item)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def has_outgoing(self) -> bool:
        return bool(self._outgoing)

    def hold(self) -> None:
        """Keep what is queued for a later ``flush`` (called by the subclass instead of writing)."""
        self._flush_scheduled = True  # no flush of its own is scheduled: the subclass calls it

    def flush(self) -> None:
        """Write what is queued as one frame (called at the start of the turn after the first ``send``)."""
        self._flush_scheduled = False
        if self._outgoing:
            items, self._outgoing = self._outgoing, []
            self._write(marshal.dumps(items))

    def _write(self, body: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_LENGTH.pack(len(body)) + body)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


# -- what crosses ---------------------------------------------------------------------------------------


def _real_fields(real: RealGas) -> tuple[Any, ...] | None:
    if real == NO_REAL_GAS:
        return None
    return (
        real.compressibility_z,
        real.real_moles,
        real.mass_kg,
        real.standard_volume_m3,
        real.liquid_state,
        real.fill_pct,
    )


def _real(fields: tuple[Any, ...] | None) -> RealGas:
    return NO_REAL_GAS if fields is None else RealGas(*fields)


def encode_commit(request_id: int, reading: Reading, moles: float, enrichment: Enrichment) -> tuple[Any, ...]:
    """A reading to commit, as the flat tuple that crosses (the timestamp in whole microseconds: exact)."""
    return (
        request_id,
        COMMIT,
        reading.meter_id,
        reading.seq,
        (reading.ts - _EPOCH) // _MICROSECOND,
        reading.pressure_bar,
        reading.temperature_c,
        reading.volume_l,
        moles,
        enrichment.client_id,
        enrichment.site_id,
        enrichment.fill_pct,
        enrichment.known,
        enrichment.authenticated,
        _real_fields(enrichment.real),
    )


def decode_commit(item: tuple[Any, ...]) -> tuple[Reading, float, Enrichment]:
    """``encode_commit``'s tuple back (GarbledFrame if it is not one)."""
    try:
        (_, _, meter_id, seq, ts_us, pressure_bar, temperature_c, volume_l, moles, client_id, site_id, fill_pct,
         known, authenticated, real) = item  # fmt: skip
        if type(meter_id) is not str or type(seq) is not int or type(ts_us) is not int:
            raise GarbledFrame("a reading's meter id, seq or timestamp of the wrong type")
        reading = Reading(
            meter_id, seq, _EPOCH + ts_us * _MICROSECOND, float(pressure_bar), float(temperature_c), float(volume_l)
        )
        enrichment = Enrichment(client_id, site_id, fill_pct, bool(known), _real(real), bool(authenticated))
        return reading, float(moles), enrichment
    except (TypeError, ValueError, OverflowError) as err:
        raise GarbledFrame(f"not a reading to commit: {err}") from err


def encode_result(request_id: int, outcome: CommitResult | ConstructionRenderableError) -> tuple[Any, ...]:
    """The consumer's answer to a reading: its commit's result, or its refusal (class name, text, Max-Age)."""
    if isinstance(outcome, CommitResult):
        return (
            request_id,
            RESULT,
            outcome.outcome.value,
            outcome.moles,
            outcome.epoch,
            outcome.missing,
            _real_fields(outcome.real),
        )
    return request_id, REFUSAL, type(outcome).__name__, str(outcome.message), int(getattr(outcome, "max_age_s", 0))


def decode_result(item: tuple[Any, ...]) -> CommitResult | tuple[str, str, int]:
    """``encode_result``'s tuple back: the result, or the refusal's (class name, text, Max-Age)."""
    try:
        if item[1] == REFUSAL:
            _, _, name, message, max_age_s = item
            return str(name), str(message), int(max_age_s)
        _, _, outcome, moles, epoch, missing, real = item
        return CommitResult(_OUTCOMES[outcome], float(moles), int(epoch), int(missing), _real(real))
    except (TypeError, ValueError, KeyError, IndexError) as err:
        raise GarbledFrame(f"not an answer to a reading: {err}") from err
