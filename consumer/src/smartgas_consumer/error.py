"""Domain errors of the consumer, each carrying the CoAP response code it stands for.

As in aiocoap, raising one of these from a resource *is* the response: aiocoap renders the code and uses
the message as the diagnostic payload (RFC 7252 §5.5.2), so a person reading a meter's log sees why.
"""

from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code


class InvalidReading(coap_error.ConstructionRenderableError):
    """The body is not a valid reading (malformed, wrong fields, impossible values): 4.00."""

    code = Code.BAD_REQUEST


class ImplausibleReading(coap_error.ConstructionRenderableError):
    """A well-formed reading that cannot be true: a derived amount beyond bounds, a seq that runs ahead of
    the time since the meter's last reading, or one the store refused on its own: 4.00."""

    code = Code.BAD_REQUEST


class InvalidMeterId(coap_error.ConstructionRenderableError):
    """The meter id in the path does not follow the documented pattern: 4.00."""

    code = Code.BAD_REQUEST


class PayloadTooLarge(coap_error.ConstructionRenderableError):
    """The body is over the documented size limit: 4.13 with Size1 giving the limit."""

    code = Code.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, message: str, limit_bytes: int) -> None:
        super().__init__(message)
        self.limit_bytes = limit_bytes

    def to_message(self):  # type: ignore[no-untyped-def]
        response = super().to_message()
        response.opt.size1 = self.limit_bytes
        return response


class UnacknowledgedQoS(coap_error.ConstructionRenderableError):
    """An MQTT reading published at QoS 0: no acknowledgement could say it was committed: 4.00 (mqtt.py)."""

    code = Code.BAD_REQUEST


class UnsupportedFormat(coap_error.ConstructionRenderableError):
    """A Content-Format other than JSON (50) or CBOR (60): 4.15."""

    code = Code.UNSUPPORTED_CONTENT_FORMAT


class MeterNotFound(coap_error.ConstructionRenderableError):
    """No reading is stored for this meter: 4.04."""

    code = Code.NOT_FOUND


class StoreUnavailable(coap_error.ConstructionRenderableError):
    """The durable store could not commit (disk full, shutting down): 5.03, the meter retries later."""

    code = Code.SERVICE_UNAVAILABLE


class Overloaded(StoreUnavailable):
    """More readings wait for the commit than ``--max-pending-readings``: 5.03 at once, the meter retries later.
    A ``StoreUnavailable``, so the MQTT edge holds the reading back for the broker as for a store fault."""


class UnknownMeterRefused(coap_error.ConstructionRenderableError):
    """A meter missing from the fleet file, beyond the cap on such meters: 4.03 (admission.py)."""

    code = Code.FORBIDDEN


class NewMeterRateLimited(coap_error.ConstructionRenderableError):
    """New meters missing from the fleet file arrive too fast: 4.29 with Max-Age, the seconds to wait."""

    code = Code.TOO_MANY_REQUESTS

    def __init__(self, message: str, max_age_s: int) -> None:
        super().__init__(message)
        self.max_age_s = max_age_s

    def to_message(self):  # type: ignore[no-untyped-def]
        response = super().to_message()
        response.opt.max_age = self.max_age_s
        return response


class NotAuthenticated(coap_error.ConstructionRenderableError):
    """``--device-auth oscore``: a request not OSCORE-protected by a context the consumer holds: 4.01."""

    code = Code.UNAUTHORIZED


class WrongMeter(coap_error.ConstructionRenderableError):
    """A request protected by one meter's context on another meter's resource: 4.03."""

    code = Code.FORBIDDEN
