"""The one place the consumer makes an Elasticsearch client, from its configuration.

One client per process, made at start and closed at stop (the original lab made one per message).
The client's major version must equal the cluster's: a 9.x client sends ``compatible-with=9`` headers
that an 8.x server refuses, so ``constraints.txt`` pins the client to the stack version in ``.env``.
"""

from __future__ import annotations

from elasticsearch import AsyncElasticsearch

from smartgas_consumer.config import ConsumerConfig


def make_client(config: ConsumerConfig, *, request_timeout_s: float = 30.0) -> AsyncElasticsearch:
    """An async client for ``config.elasticsearch_url``; the caller owns it and must ``await close()``."""
    if config.elasticsearch_url is None:
        raise ValueError("no Elasticsearch URL configured")
    auth: dict[str, object] = {}
    if config.elasticsearch_api_key is not None:
        auth["api_key"] = config.elasticsearch_api_key
    elif config.elasticsearch_username is not None:
        auth["basic_auth"] = (config.elasticsearch_username, config.elasticsearch_password or "")
    if config.elasticsearch_ca_certs is not None:
        auth["ca_certs"] = str(config.elasticsearch_ca_certs)
    # Retries belong to the shipper's own policy (capped backoff, item by item), not the transport's.
    return AsyncElasticsearch(
        config.elasticsearch_url,
        request_timeout=request_timeout_s,
        max_retries=0,
        retry_on_timeout=False,
        **auth,  # type: ignore[arg-type]
    )
