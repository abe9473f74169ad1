"""provision() against real HTTP servers on loopback that imitate Elasticsearch and Kibana.

The official Elasticsearch client and aiohttp talk to them over real sockets (no mocks): the fake
Elasticsearch checks credentials and sends ``X-Elastic-Product`` (the client refuses answers without it);
the fake Kibana reads the multipart upload as Kibana does and answers like its import API.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from elasticsearch import ApiError

from smartgas_consumer import provision as provision_module
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elastic import make_client
from smartgas_consumer.kibana_sync import Imported, asset_digest, object_key, plan_import, read_record, record_document
from smartgas_consumer.provision import (
    INDEX_TEMPLATES,
    ProvisionError,
    describe_import_error,
    install_templates,
    kibana_readiness,
    main_setup,
    provision,
    saved_objects_ndjson,
    template_body,
)

pytestmark = pytest.mark.integration

USER, PASSWORD = "elastic", "s3cret-elastic"
API_KEY = base64.b64encode(b"key-id:key-secret").decode()
PRODUCT_HEADER = {"X-Elastic-Product": "Elasticsearch"}

REDACTED_UNAVAILABLE = {"status": {"overall": {"level": "unavailable"}}}
FULL_AVAILABLE = {
    "name": "kibana",
    "version": {"number": "9.5.1"},
    "status": {
        # Plugins may be degraded (no encryption key, no fleet server): that must not block an import.
        "overall": {"level": "degraded", "summary": "1 service is degraded: taskManager"},
        "core": {
            "elasticsearch": {"level": "available", "summary": "Elasticsearch is available"},
            "savedObjects": {
                "level": "available",
                "summary": "SavedObjects service has completed migrations",
            },
        },
        "plugins": {"taskManager": {"level": "degraded", "summary": "Task Manager is unhealthy"}},
    },
}


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    body: Any = None


@dataclass
class FakeStack:
    """A fake Elasticsearch and a fake Kibana, each on its own ephemeral loopback port."""

    accepted_authorization: set[str] = field(default_factory=set)
    health: list[tuple[int, str]] = field(default_factory=list)  # next /_cluster/health answers
    product_header: bool = True
    refused_template: str | None = None
    kibana_status: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # last one repeats
    import_answer: tuple[int, Any] | None = None  # every import's answer (default: success)
    import_busy: int = 0  # how many imports first get "503 not ready yet"
    es_calls: list[Call] = field(default_factory=list)
    kibana_calls: list[Call] = field(default_factory=list)
    es_documents: dict[str, Any] = field(default_factory=dict)  # "index/id" → source
    kibana_objects: dict[str, str] = field(default_factory=dict)  # "type/id" → updated_at
    kibana_clock: int = 0
    es_url: str = ""
    kibana_url: str = ""
    _runners: list[web.AppRunner] = field(default_factory=list)

    async def start(self) -> None:
        es = web.Application()
        es.router.add_get("/", self._es_root)
        es.router.add_get("/_cluster/health", self._es_health)
        es.router.add_route("*", "/_security/user/{user}/_password", self._es_password)
        es.router.add_put("/_index_template/{name}", self._es_template)
        es.router.add_route("HEAD", "/{index}", self._es_exists)
        es.router.add_get("/{index}/_doc/{id}", self._es_get_doc)
        es.router.add_put("/{index}/_doc/{id}", self._es_put_doc)
        kibana = web.Application()
        kibana.router.add_get("/api/status", self._kibana_status)
        kibana.router.add_post("/api/saved_objects/_bulk_get", self._kibana_bulk_get)
        kibana.router.add_post("/api/saved_objects/_import", self._kibana_import)
        self.es_url = await self._serve(es)
        self.kibana_url = await self._serve(kibana)

    async def _serve(self, app: web.Application) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    # -- Elasticsearch ---------------------------------------------------------------------------------

    def _es(self, body: Any, status: int = 200) -> web.Response:
        return web.json_response(body, status=status, headers=PRODUCT_HEADER if self.product_header else {})

    async def _es_record(self, request: web.Request) -> web.Response | None:
        body = await request.json() if request.can_read_body else None
        authorization = request.headers.get("Authorization")
        self.es_calls.append(Call(request.method, request.path, dict(request.query), authorization, body))
        if authorization not in self.accepted_authorization:
            reason = f"unable to authenticate user [{USER}] for REST request [{request.path}]"
            error = {"type": "security_exception", "reason": reason}
            return self._es({"error": {**error, "root_cause": [error]}, "status": 401}, 401)
        return None

    async def _es_root(self, request: web.Request) -> web.Response:
        return await self._es_record(request) or self._es(
            {"name": "fake", "cluster_name": "smartgas", "version": {"number": "9.5.1"}}
        )

    async def _es_health(self, request: web.Request) -> web.Response:
        if refusal := await self._es_record(request):
            return refusal
        status, color = self.health.pop(0) if self.health else (200, "green")
        if status != 200:
            error = {"type": "master_not_discovered_exception", "reason": "fake: no master yet"}
            return self._es({"error": {**error, "root_cause": [error]}, "status": status}, status)
        return self._es({"cluster_name": "smartgas", "status": color, "timed_out": False})

    async def _es_password(self, request: web.Request) -> web.Response:
        return await self._es_record(request) or self._es({})

    async def _es_template(self, request: web.Request) -> web.Response:
        if refusal := await self._es_record(request):
            return refusal
        if request.match_info["name"] == self.refused_template:
            error = {"type": "mapper_parsing_exception", "reason": "fake: unknown parameter [ignore_abvoe]"}
            return self._es({"error": {**error, "root_cause": [error]}, "status": 400}, 400)
        return self._es({"acknowledged": True})

    async def _es_exists(self, request: web.Request) -> web.Response:
        if refusal := await self._es_record(request):
            return refusal
        return web.Response(status=404, headers=PRODUCT_HEADER)  # no data stream yet

    async def _es_get_doc(self, request: web.Request) -> web.Response:
        if refusal := await self._es_record(request):
            return refusal
        key = f"{request.match_info['index']}/{request.match_info['id']}"
        if key not in self.es_documents:
            return self._es(
                {"_index": request.match_info["index"], "_id": request.match_info["id"], "found": False}, 404
            )
        return self._es({"_id": request.match_info["id"], "found": True, "_source": self.es_documents[key]})

    async def _es_put_doc(self, request: web.Request) -> web.Response:
        if refusal := await self._es_record(request):
            return refusal
        self.es_documents[f"{request.match_info['index']}/{request.match_info['id']}"] = self.es_calls[-1].body
        return self._es({"result": "created"}, 201)

    # -- Kibana ----------------------------------------------------------------------------------------

    def kibana_edit(self, key: str) -> None:
        """A user changes an object in Kibana: its updated_at moves on."""
        self.kibana_clock += 1
        self.kibana_objects[key] = f"2026-11-29T12:00:{self.kibana_clock:02d}.000Z"

    async def _kibana_bulk_get(self, request: web.Request) -> web.Response:
        wanted = await request.json()
        self.kibana_calls.append(
            Call(request.method, request.path, dict(request.query), request.headers.get("Authorization"), wanted)
        )
        answer = []
        for item in wanted:
            key = f"{item['type']}/{item['id']}"
            if key in self.kibana_objects:
                answer.append({**item, "updated_at": self.kibana_objects[key], "attributes": {}})
            else:
                answer.append({**item, "error": {"statusCode": 404, "error": "Not Found", "message": "not found"}})
        return web.json_response({"saved_objects": answer})

    async def _kibana_status(self, request: web.Request) -> web.Response:
        self.kibana_calls.append(
            Call(request.method, request.path, dict(request.query), request.headers.get("Authorization"))
        )
        status, body = self.kibana_status.pop(0) if len(self.kibana_status) > 1 else self.kibana_status[0]
        return web.json_response(body, status=status)

    async def _kibana_import(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form["file"]
        assert isinstance(upload, web.FileField)
        content = upload.file.read()
        call = Call(request.method, request.path, dict(request.query), request.headers.get("Authorization"))
        call.body = {
            "filename": upload.filename,
            "content_type": upload.content_type,
            "objects": [json.loads(line) for line in content.decode().splitlines() if line.strip()],
            "kbn-xsrf": request.headers.get("kbn-xsrf"),
        }
        self.kibana_calls.append(call)
        if request.headers.get("kbn-xsrf") is None:
            return web.json_response(
                {
                    "statusCode": 400,
                    "error": "Bad Request",
                    "message": "Request must contain a kbn-xsrf header.",
                },
                status=400,
            )
        if self.import_busy:
            self.import_busy -= 1
            return web.json_response(
                {
                    "statusCode": 503,
                    "error": "Service Unavailable",
                    "message": "Kibana server is not ready yet",
                },
                status=503,
            )
        if self.import_answer is not None:
            status, body = self.import_answer
            return web.json_response(body, status=status)
        objects = call.body["objects"]
        for saved_object in objects:  # Kibana stamps each imported object with the time of the import
            self.kibana_edit(f"{saved_object['type']}/{saved_object['id']}")
        return web.json_response(
            {
                "success": True,
                "successCount": len(objects),
                "successResults": [{"type": o["type"], "id": o["id"], "meta": {}} for o in objects],
                "warnings": [],
            }
        )

    def imports(self) -> list[Call]:
        return [call for call in self.kibana_calls if call.path.endswith("/_import")]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # The retry policy is the module's; the tests only shorten its waits so the suite stays fast.
    monkeypatch.setattr(provision_module, "BACKOFF_BASE_S", 0.05)
    monkeypatch.setattr(provision_module, "BACKOFF_CAP_S", 0.2)


@pytest.fixture
async def stack() -> AsyncIterator[FakeStack]:
    fake = FakeStack(accepted_authorization={basic(USER, PASSWORD), f"ApiKey {API_KEY}"})
    fake.kibana_status = [(200, FULL_AVAILABLE)]
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def config_for(stack: FakeStack, *, kibana: bool = True, **overrides: Any) -> ConsumerConfig:
    values: dict[str, Any] = {
        "elasticsearch_url": stack.es_url,
        "elasticsearch_username": USER,
        "elasticsearch_password": PASSWORD,
        "kibana_url": stack.kibana_url if kibana else None,
    }
    values.update(overrides)
    return ConsumerConfig(**values)


def free_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the whole setup ---------------------------------------------------------------------------------


async def test_provision_sets_password_installs_templates_and_imports_objects(stack: FakeStack) -> None:
    stack.health = [(503, ""), (200, "red"), (200, "yellow")]  # a cluster still forming, then ready
    stack.kibana_status = [(503, REDACTED_UNAVAILABLE), (503, REDACTED_UNAVAILABLE), (200, FULL_AVAILABLE)]

    await provision(config_for(stack), kibana_system_password="kibana-s3cret", wait_timeout_s=10)

    assert {call.authorization for call in stack.es_calls} == {basic(USER, PASSWORD)}
    assert len([c for c in stack.es_calls if c.path == "/_cluster/health"]) == 3
    (password_call,) = [c for c in stack.es_calls if "_password" in c.path]
    assert password_call.path == "/_security/user/kibana_system/_password"
    assert password_call.method in {"PUT", "POST"}  # Elasticsearch takes both
    assert password_call.body == {"password": "kibana-s3cret"}
    templates = {c.path: c.body for c in stack.es_calls if c.path.startswith("/_index_template/")}
    assert templates == {f"/_index_template/{t.name}": template_body(t) for t in INDEX_TEMPLATES}
    # Order: Elasticsearch ready before anything is written to it.
    paths = [c.path for c in stack.es_calls]
    assert paths.index("/_security/user/kibana_system/_password") > paths.index("/_cluster/health")

    statuses = [c for c in stack.kibana_calls if c.path == "/api/status"]
    assert len(statuses) == 3
    (upload,) = stack.imports()
    assert upload.query == {"overwrite": "true"}
    assert upload.authorization == basic(USER, PASSWORD)
    assert upload.body["kbn-xsrf"] == "true"
    assert upload.body["filename"].endswith(".ndjson")  # Kibana refuses any other extension
    expected = [json.loads(line) for line in saved_objects_ndjson().decode().splitlines()]
    assert upload.body["objects"] == expected


async def test_without_a_kibana_url_only_elasticsearch_is_provisioned(stack: FakeStack) -> None:
    await provision(config_for(stack, kibana=False), kibana_system_password=None, wait_timeout_s=5)
    assert not [c for c in stack.es_calls if "_password" in c.path]
    assert len([c for c in stack.es_calls if c.path.startswith("/_index_template/")]) == len(INDEX_TEMPLATES)
    assert stack.kibana_calls == []


async def test_an_api_key_is_used_for_elasticsearch_and_kibana(stack: FakeStack) -> None:
    config = config_for(stack, elasticsearch_username=None, elasticsearch_password=None, elasticsearch_api_key=API_KEY)
    await provision(config, kibana_system_password=None, wait_timeout_s=5)
    assert {c.authorization for c in stack.es_calls} == {f"ApiKey {API_KEY}"}
    assert {c.authorization for c in stack.kibana_calls} == {f"ApiKey {API_KEY}"}


# -- what fails, and how loudly ----------------------------------------------------------------------


async def test_a_rejected_import_raises_with_kibanas_reasons(stack: FakeStack) -> None:
    rejected = {
        "success": False,
        "successCount": 4,
        "errors": [
            {
                "id": "smartgas-fleet",
                "type": "dashboard",
                "meta": {"title": "SmartGas fleet", "icon": "dashboardApp"},
                "error": {
                    "type": "missing_references",
                    "references": [{"type": "index-pattern", "id": "nope"}],
                },
            },
            {
                "id": "x",
                "type": "lens",
                "meta": {"title": "broken"},
                "error": {
                    "type": "unknown",
                    "message": "Unsupported saved object attributes",
                    "statusCode": 400,
                },
            },
        ],
    }
    stack.import_answer = (200, rejected)
    with pytest.raises(ProvisionError) as caught:
        await provision(config_for(stack), kibana_system_password=None, wait_timeout_s=5)
    message = str(caught.value)
    assert "rejected 2 object(s)" in message
    assert "dashboard smartgas-fleet (SmartGas fleet): missing_references index-pattern:nope" in message
    assert "lens x (broken): unknown Unsupported saved object attributes" in message
    assert len(stack.imports()) == 1  # a rejection is final: not retried


async def test_an_import_refused_by_http_status_raises_with_the_api_text(stack: FakeStack) -> None:
    stack.import_answer = (
        400,
        {"statusCode": 400, "error": "Bad Request", "message": "Invalid file extension .json"},
    )
    with pytest.raises(ProvisionError, match=r"HTTP 400: .*Invalid file extension \.json"):
        await provision(config_for(stack), kibana_system_password=None, wait_timeout_s=5)
    assert len(stack.imports()) == 1


async def test_an_import_answered_503_is_retried(stack: FakeStack) -> None:
    stack.import_busy = 2
    await provision(config_for(stack), kibana_system_password=None, wait_timeout_s=5)
    assert len(stack.imports()) == 3


async def test_unreachable_elasticsearch_gives_up_within_the_bound() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    config = ConsumerConfig(elasticsearch_url=url, elasticsearch_username=USER, elasticsearch_password=PASSWORD)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ProvisionError) as caught:
        await provision(config, kibana_system_password="x" * 8, wait_timeout_s=1.0)
    elapsed = loop.time() - started
    assert elapsed < 3.0
    message = str(caught.value)
    assert f"Elasticsearch at {url}" in message
    assert "gave up after 1 s" in message
    # The last reason, for the person reading the log: refused, or (on a loaded machine, when the budget ran
    # out during the last try) no answer in what was left of it.
    assert "ConnectionError" in message or "no answer within" in message, message


async def test_wrong_credentials_fail_at_once_not_after_the_bound(stack: FakeStack) -> None:
    config = config_for(stack, elasticsearch_password="wrong")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ProvisionError, match=r"security_exception|unable to authenticate"):
        await provision(config, kibana_system_password=None, wait_timeout_s=30)
    assert loop.time() - started < 5
    assert len(stack.es_calls) == 1


async def test_a_server_that_is_not_elasticsearch_is_named_as_such(stack: FakeStack) -> None:
    stack.product_header = False
    with pytest.raises(ProvisionError, match="not Elasticsearch"):
        await provision(config_for(stack), kibana_system_password=None, wait_timeout_s=5)


async def test_a_refused_template_fails_with_elasticsearchs_reason(stack: FakeStack) -> None:
    stack.refused_template = "smartgas-alerts"
    with pytest.raises(ProvisionError, match=r"installing the index templates.*ignore_abvoe"):
        await provision(config_for(stack), kibana_system_password=None, wait_timeout_s=5)
    assert stack.kibana_calls == []  # nothing imported on top of a half-provisioned cluster


async def test_kibana_that_never_becomes_available_times_out_naming_its_state(stack: FakeStack) -> None:
    stack.kibana_status = [(503, REDACTED_UNAVAILABLE)]
    with pytest.raises(ProvisionError) as caught:
        await provision(config_for(stack), kibana_system_password=None, wait_timeout_s=1.0)
    message = str(caught.value)
    assert f"Kibana at {stack.kibana_url}" in message
    assert "HTTP 503, overall unavailable" in message
    assert stack.imports() == []


# -- the shipper's step and the command's helper ------------------------------------------------------


async def test_install_templates_lets_the_clients_errors_through_for_the_shipper(stack: FakeStack) -> None:
    """The shipper classifies ApiError/TransportError for its retry policy, so they must reach it as such."""
    stack.refused_template = "smartgas-readings"
    client = make_client(config_for(stack))
    try:
        with pytest.raises(ApiError) as caught:
            await install_templates(client)
    finally:
        await client.close()
    assert caught.value.status_code == 400


async def test_main_setup_exit_codes(stack: FakeStack) -> None:
    config = config_for(stack)
    environ = {"KIBANA_PASSWORD": "kibana-s3cret"}
    assert await main_setup(config, environ, kibana_system_password_env="KIBANA_PASSWORD", wait_timeout_s=5) == 0
    (password_call,) = [c for c in stack.es_calls if "_password" in c.path]
    assert password_call.body == {"password": "kibana-s3cret"}
    assert await main_setup(config, {}, kibana_system_password_env="KIBANA_PASSWORD", wait_timeout_s=5) == 2
    assert await main_setup(ConsumerConfig(), environ, kibana_system_password_env=None, wait_timeout_s=5) == 2
    stack.kibana_objects.clear()  # a fresh Kibana: everything is to import again
    stack.import_answer = (200, {"success": False, "errors": []})
    assert await main_setup(config, environ, kibana_system_password_env=None, wait_timeout_s=5) == 1


# -- reading Kibana's answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "ready"),
    [
        (REDACTED_UNAVAILABLE, False),
        ({"status": {"overall": {"level": "available"}}}, True),
        (FULL_AVAILABLE, True),
        (
            {
                "status": {
                    "overall": {"level": "unavailable"},
                    "core": {
                        "elasticsearch": {"level": "available"},
                        "savedObjects": {"level": "unavailable"},
                    },
                }
            },
            False,
        ),
        ({"statusCode": 401, "error": "Unauthorized"}, False),
        ([], False),
    ],
)
def test_kibana_readiness(body: Any, ready: bool) -> None:
    assert kibana_readiness(body)[0] is ready


def test_describe_import_error_names_object_and_reason() -> None:
    item = {"id": "a", "type": "search", "title": "Old", "error": {"type": "conflict"}}
    assert describe_import_error(item) == "search a (Old): conflict"


# -- import only what is missing or older than ours ----------------------------------------------------


def our_keys() -> set[str]:
    return {object_key(json.loads(line)) for line in saved_objects_ndjson().decode().splitlines() if line.strip()}


def imported_keys(call: Call) -> set[str]:
    return {object_key(saved_object) for saved_object in call.body["objects"]}


async def test_a_second_setup_imports_nothing_and_never_reverts_a_users_edit(stack: FakeStack) -> None:
    config = config_for(stack)
    await provision(config, kibana_system_password=None, wait_timeout_s=5)
    (first,) = stack.imports()
    assert imported_keys(first) == our_keys()  # a fresh Kibana: everything is missing
    stack.kibana_edit("dashboard/smartgas-fleet")  # a user changes the dashboard in Kibana
    await provision(config, kibana_system_password=None, wait_timeout_s=5)
    assert len(stack.imports()) == 1  # nothing missing, nothing older than ours: no import at all
    del stack.kibana_objects["search/smartgas-alerts-list"]  # a user deletes a saved search
    await provision(config, kibana_system_password=None, wait_timeout_s=5)
    assert imported_keys(stack.imports()[-1]) == {"search/smartgas-alerts-list"}  # only the missing one


async def test_an_older_version_of_ours_is_replaced_unless_edited(stack: FakeStack) -> None:
    config = config_for(stack)
    await provision(config, kibana_system_password=None, wait_timeout_s=5)
    # The record says an older asset was imported for these two (as after an upgrade of SmartGas).
    (record_key,) = stack.es_documents
    record = stack.es_documents[record_key]
    for entry in record["objects"]:
        if entry["key"] in ("dashboard/smartgas-fleet", "index-pattern/smartgas-readings"):
            entry["digest"] = "an-older-asset"
    stack.kibana_edit("dashboard/smartgas-fleet")  # ... and a user had edited the dashboard since
    await provision(config, kibana_system_password=None, wait_timeout_s=5)
    assert imported_keys(stack.imports()[-1]) == {"index-pattern/smartgas-readings"}
    assert stack.imports()[-1].query == {"overwrite": "true"}


async def test_kibana_only_touches_neither_passwords_nor_templates(stack: FakeStack) -> None:
    environ = {"KIBANA_PASSWORD": "kibana-s3cret"}
    code = await main_setup(
        config_for(stack), environ, kibana_system_password_env="KIBANA_PASSWORD", wait_timeout_s=5, kibana_only=True
    )
    assert code == 0
    assert not [c for c in stack.es_calls if "_password" in c.path or "_index_template" in c.path]
    assert imported_keys(stack.imports()[0]) == our_keys()
    no_kibana = config_for(stack, kibana=False)
    assert await main_setup(no_kibana, {}, kibana_system_password_env=None, wait_timeout_s=5, kibana_only=True) == 2


def test_plan_imports_missing_and_older_keeps_edited() -> None:
    ours = [{"type": "dashboard", "id": name, "attributes": {"title": name}} for name in ("a", "b", "c", "d", "e")]
    digest = {object_key(o): asset_digest(o) for o in ours}
    record = {
        "dashboard/b": Imported(digest["dashboard/b"], "t1"),  # ours, current, untouched
        "dashboard/c": Imported("older", "t1"),  # an older version of ours, untouched
        "dashboard/d": Imported("older", "t1"),  # an older version of ours, edited since (t2)
    }
    in_kibana = {"dashboard/b": "t1", "dashboard/c": "t1", "dashboard/d": "t2", "dashboard/e": "t0"}
    plan = plan_import(ours, in_kibana, record)
    assert [object_key(o) for o in plan.to_import] == ["dashboard/a", "dashboard/c"]
    assert plan.reasons == {"dashboard/a": "missing in Kibana", "dashboard/c": "older than ours, never edited"}
    assert plan.current == ["dashboard/b"]
    assert plan.kept == ["dashboard/d", "dashboard/e"]  # e: there before us (never imported by setup)
    assert read_record(record_document(record)) == record
