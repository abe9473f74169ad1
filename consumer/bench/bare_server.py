"""The reference of ``make bench``: a bare aiocoap server whose one resource answers every PUT with 2.04.

No validation, no store, no work: what aiocoap itself costs per request on this machine, so the
consumer's throughput can be given as a ratio to it (docs/benchmarks.md). aiocoap on its defaults
(its own duplicate detection, Python's collector settings), udp6 only, as the consumer binds it.
Prints ``listening on coap://[HOST]:PORT`` once bound and runs until SIGTERM/SIGINT.
Run: ``python consumer/bench/bare_server.py --port 0``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiocoap
from aiocoap import resource
from aiocoap.numbers.codes import Code


class AnyReading(resource.Resource, resource.PathCapable):
    """``/meters/{meter_id}/reading``: every PUT answered 2.04 with a short body, nothing kept."""

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        if request.code != Code.PUT:
            return aiocoap.Message(code=Code.METHOD_NOT_ALLOWED)
        return aiocoap.Message(code=Code.CHANGED, payload=b'{"stored": true}', content_format=50)


async def serve(host: str, port: int) -> None:
    root = resource.Site()
    root.add_resource(["meters"], AnyReading())
    context = await aiocoap.Context.create_server_context(root, bind=(host, port), transports=["udp6"])
    (interface,) = context.request_interfaces
    sock = interface.token_interface.message_interface.transport.get_extra_info("socket")
    print(f"listening on coap://[{host}]:{sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await context.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.host, arguments.port))


if __name__ == "__main__":
    main()
