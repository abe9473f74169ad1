"""A stand-in for Elasticsearch: a real HTTP server on loopback that can fail on demand.

The contract Elasticsearch decides (bulk item results, mapping errors, templates, data streams, 409s) is
tested against a real node (test_elasticsearch_real.py). This stand-in stays for the faults a real node
cannot be made to produce on demand: a 429 or 503 for chosen items, whole-request 429/5xx, slow answers,
a server without the ``X-Elastic-Product`` header, an 8.x server refusing a 9.x client. The official
client talks to it over real HTTP. A ``create`` of an ``_id`` already there is answered 409, as a data
stream answers it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ItemPlan = Callable[[str, dict[str, Any], int], int]
"""(document id, source, how many times this id was sent before) → HTTP status for that bulk item."""

PRODUCT_HEADER = {"X-Elastic-Product": "Elasticsearch"}


def always_created(_id: str, _source: dict[str, Any], _attempt: int) -> int:
    return 201


@dataclass
class FakeElasticsearch:
    """State and behaviour of the fake cluster; ``url`` is set once ``start()`` returned."""

    item_plan: ItemPlan = always_created
    request_failures: list[int] = field(default_factory=list)  # statuses for the next whole requests
    delay_s: float = 0.0
    send_product_header: bool = True
    major_version: int = 9
    documents: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # index → id → source
    sent: dict[str, int] = field(default_factory=dict)  # document id → times received in a bulk
    bulk_requests: int = 0
    templates: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    _runner: web.AppRunner | None = None
    _port: int = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._root)
        app.router.add_put("/_index_template/{name}", self._put_template)
        app.router.add_post("/_bulk", self._bulk)
        app.router.add_put("/_bulk", self._bulk)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self._port}"

    async def stop(self) -> None:
        """Go away: connections to ``url`` are refused until ``start()`` again (same port)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers ------------------------------------------------------------------------------------

    def _answer(self, body: Any, status: int = 200) -> web.Response:
        headers = PRODUCT_HEADER if self.send_product_header else {}
        return web.json_response(body, status=status, headers=headers)

    def _refuse_version(self, request: web.Request) -> web.Response | None:
        accept = request.headers.get("Accept", "")
        if "compatible-with=" in accept and f"compatible-with={self.major_version}" not in accept:
            # What an 8.x server says to a 9.x client.
            reason = f"Accept version must be either version {self.major_version} or {self.major_version - 1}"
            return self._answer(
                {"error": {"type": "media_type_header_exception", "reason": reason}, "status": 400}, 400
            )
        return None

    async def _root(self, request: web.Request) -> web.Response:
        return self._refuse_version(request) or self._answer(
            {
                "name": "fake",
                "cluster_name": "smartgas-test",
                "version": {"number": f"{self.major_version}.5.1"},
                "tagline": "You Know, for Search",
            }
        )

    async def _put_template(self, request: web.Request) -> web.Response:
        if refusal := self._refuse_version(request):
            return refusal
        self.templates[request.match_info["name"]] = await request.json()
        return self._answer({"acknowledged": True})

    async def _bulk(self, request: web.Request) -> web.Response:
        self.bulk_requests += 1
        if refusal := self._refuse_version(request):
            return refusal
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.request_failures:
            status = self.request_failures.pop(0)
            return self._answer(
                {
                    "error": {
                        "type": "es_rejected_execution_exception" if status == 429 else "unavailable_shards_exception",
                        "reason": "fake failure",
                    },
                    "status": status,
                },
                status,
            )
        lines = [json.loads(line) for line in (await request.text()).splitlines() if line.strip()]
        items = []
        for header, source in zip(lines[::2], lines[1::2], strict=True):
            op_type, meta = next(iter(header.items()))
            index, doc_id = meta["_index"], meta["_id"]
            attempt = self.sent.get(doc_id, 0)
            self.sent[doc_id] = attempt + 1
            status = self.item_plan(doc_id, source, attempt)
            item: dict[str, Any] = {"_index": index, "_id": doc_id, "status": status}
            existed = doc_id in self.documents.get(index, {})
            if 200 <= status < 300 and op_type == "create" and existed:
                item["status"] = 409
                item["error"] = {"type": "version_conflict_engine_exception", "reason": "document already exists"}
            elif 200 <= status < 300:
                self.documents.setdefault(index, {})[doc_id] = source
                item["result"] = "updated" if existed else "created"
                item["status"] = 200 if existed else 201
            elif status == 400:
                item["error"] = {
                    "type": "document_parsing_exception",
                    "reason": "[1:42] failed to parse field [pressure_bar] of type [double]",
                }
            else:
                item["error"] = {"type": "es_rejected_execution_exception", "reason": f"fake {status}"}
            items.append({op_type: item})
        errors = any(not 200 <= next(iter(i.values()))["status"] < 300 for i in items)
        return self._answer({"took": 1, "errors": errors, "items": items})

    def indexed(self, index: str) -> dict[str, dict[str, Any]]:
        return self.documents.get(index, {})
