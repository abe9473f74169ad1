"""Property-based tests of the HTTP API against its own OpenAPI spec (schemathesis), with API keys.

A real consumer process (fleet file, keys file, a few readings fed over CoAP) serves on loopback;
schemathesis generates requests for every operation from /api/openapi.json and checks every answer
against the spec: no server errors, status codes and bodies as documented, 401 handled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiocoap
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from running import consumer_process
from schemathesis.specs.openapi.checks import positive_data_acceptance

from smartgas_consumer.auth import digest

pytestmark = pytest.mark.integration

FLEET_FILE = Path(__file__).resolve().parents[2] / "fleet" / "fleet.yaml"
KEYS = {"*": "admin-key-for-schemathesis-0001", "acme-welding": "acme-key-for-schemathesis-0001"}


@pytest.fixture(scope="module")
def consumer_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("schemathesis")
    keys = folder / "keys.yaml"
    keys.write_text("keys:\n" + "".join(f'  - {{client: "{c}", sha256: {digest(k)}}}\n' for c, k in KEYS.items()))
    options = ("--fleet", str(FLEET_FILE), "--api-keys", str(keys))
    # Schemathesis tries wrong keys on every operation (its ignored-auth check); from one address that soon
    # means 429s, which test_http_hardening.py covers. Here the throttle is kept out of the way.
    with consumer_process(folder / "store.db", *options, "--wrong-keys-per-minute", "1000000") as consumer:
        feed(consumer.coap_port)
        yield f"http://127.0.0.1:{consumer.http_port}"


def feed(coap_port: int) -> None:
    import asyncio

    async def put_all() -> None:
        context = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            for meter_id in ("bottle-0001", "bottle-0020", "stray-1"):
                for seq in range(3):
                    body = {
                        "seq": seq,
                        "ts": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                        "pressure_bar": 150.0 - seq,
                        "temperature_c": 18.0,
                        "volume_l": 50.0,
                    }
                    message = aiocoap.Message(
                        code=aiocoap.PUT,
                        uri=f"coap://127.0.0.1:{coap_port}/meters/{meter_id}/reading",
                        payload=json.dumps(body).encode(),
                        content_format=50,
                    )
                    await asyncio.wait_for(context.request(message).response, 10)
        finally:
            await context.shutdown()

    asyncio.run(put_all())


@pytest.fixture(scope="module")
def operations(consumer_url: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{consumer_url}/api/openapi.json")
    found = [result.ok() for result in schema.get_all_operations()]
    assert len(found) >= 8  # me, meters, meter, readings, stats x3, alerts
    return found


# schemathesis's own pytest plugin does not run under pytest 9 yet, so each operation's strategy is driven
# by Hypothesis directly: the same generated cases, the same response validation.
def run_operation(operation: Any, check: Callable[[Any], None]) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def examples(case: Any) -> None:
        check(case)

    examples()


# A window whose since is after its until, or that spans more than 31 days, is refused with a documented
# 422: a rule across two parameters that OpenAPI cannot express, so that one check is left out.
CROSS_PARAMETER_RULES = [positive_data_acceptance]


@pytest.mark.parametrize("client", sorted(KEYS))
def test_api_conforms_to_its_spec(operations: list[Any], client: str) -> None:
    def conforms(case: Any) -> None:
        case.call_and_validate(headers={"X-API-Key": KEYS[client]}, excluded_checks=CROSS_PARAMETER_RULES)

    for operation in operations:
        run_operation(operation, conforms)


def test_api_without_a_key_is_401_everywhere(operations: list[Any]) -> None:
    def no_key(case: Any) -> None:
        response = case.call()
        assert response.status_code == 401, (case.method, case.formatted_path, response.status_code)

    for operation in operations:
        run_operation(operation, no_key)


# Any RFC 3339 moment, from year 1 to year 9999 with any offset up to ±23:59, in since and until: the answer is
# 200 or a 422 in the validation shape, never a 500, and the kept-alive connection survives (year 1 with a
# positive offset once overflowed on the way to UTC and closed the connection).
def rfc3339(moment: datetime, offset_min: int) -> str:
    hours, minutes = divmod(abs(offset_min), 60)
    return f"{moment.isoformat()}{'-' if offset_min < 0 else '+'}{hours:02d}:{minutes:02d}"


MOMENTS = st.builds(
    rfc3339,
    # Anywhere, and often within a day of datetime's own limits, where conversions and arithmetic overflow.
    st.datetimes(min_value=datetime.min, max_value=datetime.max)
    | st.datetimes(min_value=datetime.min, max_value=datetime(1, 1, 2))
    | st.datetimes(min_value=datetime(9999, 12, 30), max_value=datetime.max),
    st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59),
)
WINDOWED = [
    "/api/meters/bottle-0001/readings",
    "/api/sites/lyon-gerland/stats",
    "/dashboard/api/meters/bottle-0001/chart.svg",
]


def test_any_window_is_200_or_422(consumer_url: str) -> None:
    with httpx.Client(base_url=consumer_url, headers={"X-API-Key": KEYS["*"]}, timeout=30) as http:
        ports: set[int] = set()

        @given(path=st.sampled_from(WINDOWED), since=st.none() | MOMENTS, until=st.none() | MOMENTS)
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def answered(path: str, since: str | None, until: str | None) -> None:
            params = {name: value for name, value in (("since", since), ("until", until)) if value is not None}
            response = http.get(path, params=params)
            assert response.status_code in (200, 422), (path, params, response.status_code, response.text)
            if response.status_code == 422:
                assert response.json()["detail"][0]["loc"][0] == "query"
            ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])

        answered()
        assert len(ports) == 1  # every answer on one kept-alive connection
