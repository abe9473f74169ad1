"""Provisioning: make Elasticsearch and Kibana ready to show the fleet, with no manual step.

``smartgas-consumer setup`` runs :func:`provision` once per start of the compose stack; every step is
idempotent, so running it again (after editing an asset, say) is safe:

1. wait, bounded, until Elasticsearch answers and its cluster health is yellow or green;
2. when given, set the ``kibana_system`` user's password, so that Kibana can log in to Elasticsearch;
3. install the composable index templates (``assets/elasticsearch/*.json``), before any reading is indexed:
   each makes its names (``smartgas-readings*``, ``smartgas-alerts*``) data streams whose data stream
   lifecycle keeps ``retention_days`` of data;
4. when a Kibana URL is configured, wait, bounded, until Kibana's core services are available, then import
   the saved objects (``assets/kibana/smartgas.ndjson``: data views, saved searches and the
   "SmartGas fleet" dashboard) that are missing in Kibana or older than ours and never edited there
   (kibana_sync.py: a user's edit is never reverted), and fail if Kibana rejected any of them.
   ``--kibana-only`` runs this step alone: compose runs it as a service of its own that nothing waits
   for, so a slow or failing Kibana never holds back ingestion.

Each wait retries what may pass (no connection yet, a timeout, 429, 5xx) with capped backoff and a log
line per try, up to ``wait_timeout_s``; what cannot pass (bad credentials, a refused template, a rejected
saved object) fails at once. This module is the boundary where the Elasticsearch client's and aiohttp's
exceptions become :class:`ProvisionError`, whose message names the step and carries the server's text.

:func:`prepare_data_stream` is the shipper's start-up step: it installs the templates, then brings a data
stream that already exists up to them (:func:`evolve_data_stream`: a template reaches only indices created
after it). There it lets the client's exceptions through, because the shipper's own boundary classifies
them for its retry policy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import aiohttp
from elastic_transport import TransportError
from elasticsearch import ApiError, AsyncElasticsearch, BadRequestError, UnsupportedProductError

from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.elastic import make_client
from smartgas_consumer.kibana_sync import (
    RECORD_ID,
    RECORD_INDEX,
    Imported,
    ImportPlan,
    asset_digest,
    object_key,
    plan_import,
    read_record,
    record_document,
)

_LOG = logging.getLogger(__name__)

KIBANA_SYSTEM_USER = "kibana_system"
SAVED_OBJECTS_ASSET = "smartgas.ndjson"
#: Longest single request while waiting; the wait as a whole is bounded by ``wait_timeout_s``.
REQUEST_TIMEOUT_S = 10.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 5.0
#: How much of a server's answer goes into an error message.
ANSWER_EXCERPT_CHARS = 2000


#: Days of data a data stream keeps when the configuration does not say (0: keep everything).
DEFAULT_RETENTION_DAYS = 30


@dataclass(frozen=True, slots=True)
class IndexTemplate:
    """A composable index template: its name in Elasticsearch and its body's file in assets/elasticsearch.

    The template's index pattern is ``{name}*``: a data stream it shapes is named ``name`` or starts with it.
    """

    name: str
    asset: str

    def matches(self, data_stream: str) -> bool:
        return data_stream.startswith(self.name)


INDEX_TEMPLATES: tuple[IndexTemplate, ...] = (
    IndexTemplate("smartgas-readings", "readings-template.json"),
    IndexTemplate("smartgas-alerts", "alerts-template.json"),
)


def template_for(data_stream: str) -> IndexTemplate:
    """The template whose pattern covers ``data_stream``; ValueError for a name no template matches."""
    for template in INDEX_TEMPLATES:
        if template.matches(data_stream):
            return template
    patterns = ", ".join(f"{template.name}*" for template in INDEX_TEMPLATES)
    raise ValueError(f"{data_stream!r} matches no SmartGas index template ({patterns})")


class ProvisionError(Exception):
    """Elasticsearch or Kibana could not be made ready; the message names the step and the server's answer."""


# -- assets ------------------------------------------------------------------------------------------


def _asset(folder: str, name: str) -> bytes:
    return (resources.files("smartgas_consumer") / "assets" / folder / name).read_bytes()


def lifecycle(retention_days: int) -> dict[str, Any]:
    """A data stream lifecycle keeping ``retention_days`` days of data (0: no retention, keep everything)."""
    return {"data_retention": f"{retention_days}d"} if retention_days > 0 else {}


def template_body(template: IndexTemplate, *, retention_days: int = DEFAULT_RETENTION_DAYS) -> dict[str, Any]:
    """The body of ``PUT /_index_template/{name}``, as shipped in the package, with the lifecycle's retention."""
    body: dict[str, Any] = json.loads(_asset("elasticsearch", template.asset))
    body["template"]["lifecycle"] = lifecycle(retention_days)
    return body


def saved_objects_ndjson() -> bytes:
    """The Kibana saved objects, one JSON object a line, as ``POST /api/saved_objects/_import`` takes them."""
    return _asset("kibana", SAVED_OBJECTS_ASSET)


# -- Elasticsearch -----------------------------------------------------------------------------------


async def install_templates(client: AsyncElasticsearch, *, retention_days: int = DEFAULT_RETENTION_DAYS) -> None:
    """Install (or replace) every index template. Raises the client's own errors: callers translate them."""
    for template in INDEX_TEMPLATES:
        body = template_body(template, retention_days=retention_days)
        await client.indices.put_index_template(name=template.name, body=body)
        _LOG.info("index template %s installed (version %s)", template.name, body.get("version"))


async def evolve_data_stream(
    client: AsyncElasticsearch, data_stream: str, *, retention_days: int = DEFAULT_RETENTION_DAYS
) -> str:
    """Bring an existing data stream up to its installed template; return what was done.

    A template shapes only the indices created after it, so a field it added would be refused (``dynamic:
    strict``) by the data stream's current backing index. Its mappings are put on the whole data stream,
    which reaches every backing index, old data included. Where an older backing index cannot take them (a
    field whose type changed, after an earlier rollover) they are put on the write index only; where the
    write index cannot take them either, the data stream is rolled over, so new data goes to a backing
    index made from the new template while old indices keep their own mapping. The lifecycle of a data
    stream is fixed when it is created; it is set again here, on clusters that have the lifecycle API.
    """
    if not await client.indices.exists(index=data_stream):
        return "not created yet: the first write creates it from the template"
    mappings = template_body(template_for(data_stream))["template"]["mappings"]
    done = ""
    for write_index_only, outcome in ((False, "mappings updated in place"), (True, "write index mappings updated")):
        try:
            await client.indices.put_mapping(
                index=data_stream,
                properties=mappings["properties"],
                dynamic=mappings.get("dynamic"),
                write_index_only=write_index_only,
            )
            done = outcome
            break
        except BadRequestError as err:
            _LOG.info("%s: mappings refused (write index only: %s): %s", data_stream, write_index_only, err.message)
    if not done:
        _LOG.warning("%s: the new mappings cannot be put on the write index; rolling over", data_stream)
        await client.indices.rollover(alias=data_stream)
        done = "rolled over to a backing index from the new template"
    try:
        await client.indices.put_data_lifecycle(name=data_stream, **lifecycle(retention_days))
    except ApiError as err:
        if err.status_code not in (400, 404, 405) or "no handler found" not in str(err.body):
            raise
        # Elasticsearch's minimal distribution has no data-streams module (the tests' node).
        _LOG.warning("%s: this cluster has no data stream lifecycle API; retention unchanged", data_stream)
    _LOG.info("data stream %s: %s", data_stream, done)
    return done


async def prepare_data_stream(
    client: AsyncElasticsearch, data_stream: str, *, retention_days: int = DEFAULT_RETENTION_DAYS
) -> str:
    """The shipper's start-up step: the templates installed, then ``data_stream`` brought up to them."""
    await install_templates(client, retention_days=retention_days)
    return await evolve_data_stream(client, data_stream, retention_days=retention_days)


def _retryable(status: int) -> bool:
    """A timeout (408), 429 and 5xx may pass on a later try; any other 4xx will not."""
    return status in (408, 429) or status >= 500


async def _es_attempt(step: str, call: Callable[[], Awaitable[str | None]]) -> str | None:
    """Run one try of an Elasticsearch step: None when done, a reason to try again, or ProvisionError."""
    try:
        return await call()
    except UnsupportedProductError as err:
        raise ProvisionError(f"{step}: the server is not Elasticsearch ({err})") from err
    except ApiError as err:
        if _retryable(err.status_code):
            return str(err)
        raise ProvisionError(f"{step}: Elasticsearch refused it: {err}") from err
    except TransportError as err:  # refused connection, timeout, TLS failure
        return _describe_transport_error(err)


def _describe_transport_error(err: TransportError) -> str:
    """The transport's error with its underlying cause (the client keeps it only as the context)."""
    text = f"{type(err).__name__}: {err}"
    cause = err.__cause__ or err.__context__
    if not err.errors and cause is not None:
        text += f" ({cause})"
    return text


async def _poll(what: str, attempt: Callable[[float], Awaitable[str | None]], *, timeout_s: float) -> None:
    """Call ``attempt(request_timeout_s)`` until it returns None, backing off between tries.

    ``attempt`` returns a reason while the thing is not ready and raises ProvisionError for what waiting
    cannot fix. After ``timeout_s`` seconds in all, ProvisionError names the last reason.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout_s
    tries = 0
    while True:
        remaining = max(deadline - loop.time(), 0.01)
        try:
            async with asyncio.timeout(remaining):
                reason = await attempt(min(REQUEST_TIMEOUT_S, remaining))
        except TimeoutError:
            reason = f"no answer within {remaining:.1f} s"
        if reason is None:
            return
        tries += 1
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise ProvisionError(f"{what}: gave up after {timeout_s:g} s and {tries} tries; last: {reason}")
        delay = min(BACKOFF_BASE_S * 2 ** (tries - 1), BACKOFF_CAP_S, remaining)
        _LOG.info(
            "waiting for %s: %s (%.0f s of %g s; next try in %.1f s)",
            what,
            reason,
            loop.time() - started,
            timeout_s,
            delay,
        )
        await asyncio.sleep(delay)


async def wait_for_elasticsearch(client: AsyncElasticsearch, *, url: str, timeout_s: float) -> None:
    """Wait until Elasticsearch at ``url`` answers with these credentials and its health is not red."""
    step = f"Elasticsearch at {url}"

    async def attempt(request_timeout_s: float) -> str | None:
        async def call() -> str | None:
            timed = client.options(request_timeout=request_timeout_s)
            try:
                info = (await timed.info()).body
            except ApiError as err:
                if err.status_code != 405:
                    raise
                info = {}  # a node without the rest-root module (the integ-test zip) has no GET /
            health = await timed.cluster.health()
            status = health.get("status")
            if status not in ("green", "yellow"):
                return f"cluster health is {status}"
            _LOG.info(
                "Elasticsearch %s answered at %s (cluster %s, health %s)",
                info.get("version", {}).get("number", "?"),
                url,
                info.get("cluster_name", "?"),
                status,
            )
            return None

        return await _es_attempt(step, call)

    await _poll(step, attempt, timeout_s=timeout_s)


async def _es_step(step: str, operation: Callable[[], Awaitable[Any]], *, timeout_s: float) -> None:
    """Run an idempotent Elasticsearch operation, retrying only what may pass later."""

    async def attempt(_request_timeout_s: float) -> str | None:
        async def call() -> str | None:
            await operation()
            return None

        return await _es_attempt(step, call)

    await _poll(step, attempt, timeout_s=timeout_s)


# -- Kibana ------------------------------------------------------------------------------------------


def _kibana_headers(config: ConsumerConfig) -> dict[str, str]:
    """Kibana takes the Elasticsearch credentials: an API key, or the user and password (basic)."""
    if config.elasticsearch_api_key is not None:
        return {"Authorization": f"ApiKey {config.elasticsearch_api_key}"}
    if config.elasticsearch_username is not None:
        credentials = f"{config.elasticsearch_username}:{config.elasticsearch_password or ''}"
        return {"Authorization": "Basic " + base64.b64encode(credentials.encode("utf-8")).decode("ascii")}
    return {}


def kibana_session(config: ConsumerConfig) -> aiohttp.ClientSession:
    """An HTTP session for Kibana's API with the configured credentials; the caller closes it."""
    connector: aiohttp.TCPConnector | None = None
    if config.elasticsearch_ca_certs is not None:
        # One CA for the stack: an https:// Kibana is trusted with the same file as Elasticsearch.
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=str(config.elasticsearch_ca_certs)))
    return aiohttp.ClientSession(headers=_kibana_headers(config), connector=connector)


def _excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ANSWER_EXCERPT_CHARS else text[:ANSWER_EXCERPT_CHARS] + "…"


def kibana_readiness(body: Any) -> tuple[bool, str]:
    """Read an ``/api/status`` answer: ready for imports when core's Elasticsearch and saved objects are up.

    An authenticated answer has ``status.core``; an anonymous one is redacted to ``status.overall.level``
    (the core services' level). Plugins may stay "degraded" for reasons that do not matter to an import.
    """
    status = body.get("status") if isinstance(body, dict) else None
    if not isinstance(status, dict):
        return False, "answer without a status"
    overall = (status.get("overall") or {}).get("level", "?")
    core = status.get("core")
    if isinstance(core, dict):
        elasticsearch = (core.get("elasticsearch") or {}).get("level", "?")
        saved_objects = (core.get("savedObjects") or {}).get("level", "?")
        ready = elasticsearch == saved_objects == "available"
        return ready, f"overall {overall}, elasticsearch {elasticsearch}, savedObjects {saved_objects}"
    return overall == "available", f"overall {overall}"


async def wait_for_kibana(session: aiohttp.ClientSession, *, url: str, timeout_s: float) -> None:
    """Wait until Kibana at ``url`` reports its core services available."""

    async def attempt(request_timeout_s: float) -> str | None:
        try:
            async with session.get(
                f"{url}/api/status", timeout=aiohttp.ClientTimeout(total=request_timeout_s)
            ) as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as err:
            return f"{type(err).__name__}: {err}"
        try:
            ready, description = kibana_readiness(json.loads(text))
        except ValueError:
            return f"HTTP {status}, not JSON: {_excerpt(text)[:200]}"
        if status == 200 and ready:
            _LOG.info("Kibana answered at %s (%s)", url, description)
            return None
        return f"HTTP {status}, {description}"

    await _poll(f"Kibana at {url}", attempt, timeout_s=timeout_s)


def describe_import_error(item: Mapping[str, Any]) -> str:
    """One rejected saved object from an import answer, for a person: which object and why."""
    error = item.get("error") or {}
    title = (item.get("meta") or {}).get("title") or item.get("title") or ""
    detail = error.get("message") or ", ".join(
        f"{ref.get('type')}:{ref.get('id')}" for ref in error.get("references") or []
    )
    what = f"{item.get('type')} {item.get('id')}" + (f" ({title})" if title else "")
    return f"{what}: {error.get('type', 'error')}" + (f" {detail}" if detail else "")


async def import_saved_objects(session: aiohttp.ClientSession, *, url: str, ndjson: bytes, timeout_s: float) -> int:
    """Import the saved objects into Kibana's default space, overwriting; return how many were imported."""
    step = f"saved objects import into Kibana at {url}"
    imported = 0

    async def attempt(request_timeout_s: float) -> str | None:
        nonlocal imported
        form = aiohttp.FormData()
        form.add_field("file", ndjson, filename=SAVED_OBJECTS_ASSET, content_type="application/ndjson")
        try:
            async with session.post(
                f"{url}/api/saved_objects/_import",
                params={"overwrite": "true"},
                data=form,
                headers={"kbn-xsrf": "true"},
                timeout=aiohttp.ClientTimeout(total=request_timeout_s),
            ) as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as err:
            return f"{type(err).__name__}: {err}"
        if _retryable(status):
            return f"HTTP {status}: {_excerpt(text)[:200]}"
        if status != 200:
            raise ProvisionError(f"{step}: HTTP {status}: {_excerpt(text)}")
        try:
            answer = json.loads(text)
        except ValueError as err:
            raise ProvisionError(f"{step}: the answer is not JSON: {_excerpt(text)}") from err
        errors = answer.get("errors") or []
        if answer.get("success") is not True or errors:
            rejected = "; ".join(describe_import_error(item) for item in errors) or "no detail"
            raise ProvisionError(
                f"{step}: Kibana rejected {len(errors)} object(s): {rejected}. Answer: {_excerpt(text)}"
            )
        for warning in answer.get("warnings") or []:
            _LOG.warning("Kibana import warning: %s", warning.get("message", warning))
        imported = int(answer.get("successCount", 0))
        return None

    await _poll(step, attempt, timeout_s=timeout_s)
    return imported


async def saved_objects_in_kibana(
    session: aiohttp.ClientSession, *, url: str, objects: list[dict[str, Any]], timeout_s: float
) -> dict[str, str | None]:
    """Which of ``objects`` Kibana has (``POST /api/saved_objects/_bulk_get``): key → its ``updated_at``."""
    step = f"reading the saved objects in Kibana at {url}"
    found: dict[str, str | None] = {}

    async def attempt(request_timeout_s: float) -> str | None:
        wanted = [{"type": saved_object["type"], "id": saved_object["id"]} for saved_object in objects]
        try:
            async with session.post(
                f"{url}/api/saved_objects/_bulk_get",
                json=wanted,
                headers={"kbn-xsrf": "true"},
                timeout=aiohttp.ClientTimeout(total=request_timeout_s),
            ) as response:
                status, text = response.status, await response.text()
        except (aiohttp.ClientError, TimeoutError) as err:
            return f"{type(err).__name__}: {err}"
        if _retryable(status):
            return f"HTTP {status}: {_excerpt(text)[:200]}"
        if status != 200:
            raise ProvisionError(f"{step}: HTTP {status}: {_excerpt(text)}")
        try:
            answer = json.loads(text)
            for item in answer["saved_objects"]:
                if not item.get("error"):
                    found[object_key(item)] = item.get("updated_at")
        except (ValueError, KeyError, TypeError) as err:
            raise ProvisionError(f"{step}: unexpected answer: {_excerpt(text)}") from err
        return None

    await _poll(step, attempt, timeout_s=timeout_s)
    return found


async def sync_saved_objects(
    session: aiohttp.ClientSession, client: AsyncElasticsearch, *, url: str, timeout_s: float
) -> ImportPlan:
    """Import only the saved objects that are missing in Kibana or older than ours (kibana_sync.py)."""
    ours = [json.loads(line) for line in saved_objects_ndjson().decode("utf-8").splitlines() if line.strip()]
    stored = await client.options(ignore_status=404).get(index=RECORD_INDEX, id=RECORD_ID)
    record = read_record(stored.body.get("_source"))
    plan = plan_import(ours, await saved_objects_in_kibana(session, url=url, objects=ours, timeout_s=timeout_s), record)
    for key in plan.kept:
        _LOG.warning("Kibana: %s was changed in Kibana (or not imported by setup): kept as it is", key)
    if plan.to_import:
        ndjson = "".join(json.dumps(saved_object) + "\n" for saved_object in plan.to_import).encode("utf-8")
        await import_saved_objects(session, url=url, ndjson=ndjson, timeout_s=timeout_s)
        after = await saved_objects_in_kibana(session, url=url, objects=plan.to_import, timeout_s=timeout_s)
        for saved_object in plan.to_import:
            key = object_key(saved_object)
            record[key] = Imported(asset_digest(saved_object), after.get(key))
            _LOG.info("Kibana: %s imported (%s)", key, plan.reasons[key])
        await client.index(index=RECORD_INDEX, id=RECORD_ID, document=record_document(record), refresh=True)
    return plan


# -- the whole setup ---------------------------------------------------------------------------------


async def provision(
    config: ConsumerConfig,
    *,
    kibana_system_password: str | None,
    wait_timeout_s: float,
    kibana_only: bool = False,
) -> None:
    """Make Elasticsearch (and Kibana, when ``config.kibana_url`` is set) ready for the fleet.

    ``kibana_only`` skips the Elasticsearch steps (the compose stack runs the Kibana import as a service of
    its own, so that Kibana never holds back ingestion). Each wait (Elasticsearch, then Kibana) is bounded
    by ``wait_timeout_s``. Raises ProvisionError.
    """
    if config.elasticsearch_url is None:
        raise ProvisionError("no Elasticsearch URL configured (--elasticsearch-url)")
    url = config.elasticsearch_url
    client = make_client(config, request_timeout_s=REQUEST_TIMEOUT_S)
    try:
        await wait_for_elasticsearch(client, url=url, timeout_s=wait_timeout_s)
        if not kibana_only:
            await _provision_elasticsearch(client, config, kibana_system_password, wait_timeout_s)
        if config.kibana_url is None:
            _LOG.info("no Kibana URL configured: saved objects not imported")
            return
        async with kibana_session(config) as session:
            await wait_for_kibana(session, url=config.kibana_url, timeout_s=wait_timeout_s)
            try:
                plan = await sync_saved_objects(session, client, url=config.kibana_url, timeout_s=wait_timeout_s)
            except (ApiError, TransportError) as err:
                raise ProvisionError(f"the record of imported saved objects in Elasticsearch: {err}") from err
    finally:
        await client.close()
    _LOG.info(
        "Kibana: %d saved objects imported, %d current, %d kept as changed in Kibana; dashboard at "
        "%s/app/dashboards#/view/smartgas-fleet",
        len(plan.to_import),
        len(plan.current),
        len(plan.kept),
        config.kibana_url,
    )


async def _provision_elasticsearch(
    client: AsyncElasticsearch, config: ConsumerConfig, kibana_system_password: str | None, wait_timeout_s: float
) -> None:
    if kibana_system_password is not None:
        password = kibana_system_password

        async def set_password() -> None:
            await client.security.change_password(username=KIBANA_SYSTEM_USER, password=password)

        await _es_step(f"setting the {KIBANA_SYSTEM_USER} password", set_password, timeout_s=wait_timeout_s)
        _LOG.info("%s password set", KIBANA_SYSTEM_USER)
    retention_days = config.elasticsearch_retention_days
    await _es_step(
        "installing the index templates",
        lambda: install_templates(client, retention_days=retention_days),
        timeout_s=wait_timeout_s,
    )
    for data_stream in (config.elasticsearch_index, config.elasticsearch_alerts_index):
        await _es_step(
            f"bringing data stream {data_stream} up to its template",
            lambda name=data_stream: evolve_data_stream(client, name, retention_days=retention_days),  # type: ignore[misc]
            timeout_s=wait_timeout_s,
        )


async def main_setup(
    config: ConsumerConfig,
    environ: Mapping[str, str],
    *,
    kibana_system_password_env: str | None,
    wait_timeout_s: float,
    kibana_only: bool = False,
) -> int:
    """``smartgas-consumer setup``: run :func:`provision`; exit code 0 done, 1 failed, 2 misconfigured.

    The ``kibana_system`` password is read from the environment variable named by
    ``kibana_system_password_env`` (a variable, not a flag, so it never shows in ``ps``).
    """
    if config.elasticsearch_url is None:
        _LOG.error("setup needs --elasticsearch-url (or SMARTGAS_CONSUMER_ELASTICSEARCH_URL)")
        return 2
    if kibana_only and config.kibana_url is None:
        _LOG.error("setup --kibana-only needs --kibana-url (or SMARTGAS_CONSUMER_KIBANA_URL)")
        return 2
    password: str | None = None
    if kibana_system_password_env is not None:
        password = environ.get(kibana_system_password_env)
        if not password:
            _LOG.error(
                "%s is unset or empty: it must hold the %s password",
                kibana_system_password_env,
                KIBANA_SYSTEM_USER,
            )
            return 2
    try:
        await provision(config, kibana_system_password=password, wait_timeout_s=wait_timeout_s, kibana_only=kibana_only)
    except ProvisionError as err:
        _LOG.error("setup failed: %s", err)
        return 1
    _LOG.info("setup done")
    return 0
