"""A real webhook receiver on loopback (aiohttp): records every POST, answers as a test tells it, can go away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from smartgas_consumer.webhook import DELIVERY_HEADER, EVENT_HEADER


@dataclass(frozen=True)
class Received:
    """One POST as the receiver saw it, and what it answered."""

    delivery_id: str
    event_header: str
    content_type: str
    body: dict[str, Any]
    status: int


@dataclass
class Receiver:
    """A webhook receiver: answers ``plan(body)`` (200 by default), or ``statuses`` first; can go away."""

    plan: Callable[[dict[str, Any]], int] = lambda _body: 200
    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    received: list[Received] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None
    _port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self._port}/hook"

    async def stop(self) -> None:
        """Go away: connections are refused until ``start()`` again, on the same port."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.json()
        status = self.statuses.pop(0) if self.statuses else self.plan(body)
        self.received.append(
            Received(
                request.headers.get(DELIVERY_HEADER, ""),
                request.headers.get(EVENT_HEADER, ""),
                request.headers.get("Content-Type", ""),
                body,
                status,
            )
        )
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return web.json_response({"status": status}, status=status)

    def accepted(self) -> list[Received]:
        return [r for r in self.received if 200 <= r.status < 300]
