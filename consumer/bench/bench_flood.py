"""Flood benchmark: the consumer's resident memory while one peer floods it with confirmable requests.

Starts a real consumer process on a loopback ephemeral port with a fresh store, then sends ``--requests``
CON PUTs of a refused reading (4.00, the cheapest path: what is measured is the CoAP layer, not the store)
from ``--sockets`` source ports, each request a new message id, ``--window`` outstanding at a time, from
plain UDP sockets (the client costs little, so the consumer is the one working). RSS (``/proc/PID/status``)
is sampled every ``--requests / 10`` answers. Bounded in count and in time (``--timeout``).

Run: ``python consumer/bench/bench_flood.py --requests 100000 --sockets 1`` (and ``--sockets 64``);
extra arguments after ``--`` go to the consumer (e.g. ``-- --coap-dedup-entries 5000``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import selectors
import socket
import tempfile
import time
from pathlib import Path

import serving  # a sibling module: the script runs as consumer/bench/bench_flood.py
from aiocoap import Message
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

RESEND_AFTER_S = 2.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def datagram(mid: int) -> bytes:
    """A CON PUT whose body is not a reading: refused 4.00 at the edge, after the message layer kept it."""
    message = Message(code=Code.PUT, payload=b'{"seq": "x"}', uri_path=("meters", "flood", "reading"))
    message.opt.content_format = 50
    message.mtype, message.mid, message.token = Type.CON, mid, mid.to_bytes(2, "big")
    return bytes(message.encode())


def flood(port: int, pid: int, requests: int, sockets: int, window: int, deadline: float) -> dict[str, object]:
    selector = selectors.DefaultSelector()
    peers = []
    for _ in range(sockets):
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        selector.register(peer, selectors.EVENT_READ)
        peers.append(peer)
    mids = [itertools.cycle(range(65536)) for _ in peers]  # each source port numbers its own messages
    outstanding: dict[tuple[int, int], float] = {}  # (socket index, mid) → sent at
    sent = answered = given_up = 0
    samples: list[tuple[int, float]] = []
    every = max(1, requests // 10)
    turn = itertools.cycle(range(sockets))
    started = time.monotonic()
    while answered + given_up < requests:
        if time.monotonic() > deadline:
            raise TimeoutError(f"flood over its time budget after {answered} answers")
        while sent < requests and len(outstanding) < window:
            index = next(turn)
            mid = next(mids[index])
            peers[index].sendto(datagram(mid), ("127.0.0.1", port))
            outstanding[(index, mid)] = time.monotonic()
            sent += 1
        for key, _events in selector.select(timeout=0.5):
            peer = key.fileobj
            assert isinstance(peer, socket.socket)
            index = peers.index(peer) if sockets > 1 else 0
            while True:
                try:
                    answer = peer.recv(2048)
                except BlockingIOError:
                    break
                mid = int.from_bytes(answer[2:4], "big")
                if outstanding.pop((index, mid), None) is not None:
                    answered += 1
                    if answered % every == 0:
                        samples.append((answered, round(rss_mb(pid), 1)))
        now = time.monotonic()
        for key, sent_at in list(outstanding.items()):  # lost on loopback under load: not re-sent, counted
            if now - sent_at > RESEND_AFTER_S:
                del outstanding[key]
                given_up += 1
    elapsed = time.monotonic() - started
    for peer in peers:
        peer.close()
    return {
        "answered": answered,
        "unanswered": given_up,
        "seconds": round(elapsed, 1),
        "requests_per_second": round(answered / elapsed),
        "rss_mb_by_answers": samples,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--sockets", type=int, default=1, help="source ports the flood comes from")
    parser.add_argument("--window", type=int, default=64, help="requests outstanding at once")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument("consumer_args", nargs="*", help="extra consumer flags, after --")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        running = serving.start(serving.serve_command(Path(scratch) / "flood.db", *arguments.consumer_args), http=False)
        process, port = running.process, running.coap_port
        try:
            time.sleep(1.0)
            idle = rss_mb(process.pid)
            deadline = time.monotonic() + arguments.timeout
            result = flood(port, process.pid, arguments.requests, arguments.sockets, arguments.window, deadline)
            result = {"sockets": arguments.sockets, "rss_mb_idle": round(idle, 1), **result}
            result["rss_mb_after"] = round(rss_mb(process.pid), 1)
            alive = process.poll() is None
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(json.dumps(result))
    return 0 if alive and result["answered"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
