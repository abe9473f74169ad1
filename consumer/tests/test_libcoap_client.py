"""Interoperability: Debian's libcoap client (``coap-client-notls``) against the consumer on loopback.

A second, independent CoAP implementation proves the consumer speaks the protocol, not just aiocoap's
dialect. ``make test`` installs the client (Debian package libcoap3-bin); without it this module is
skipped by name.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from conftest import reading_uri, wire_example
from smartgas_consumer.server import Consumer

COAP_CLIENT = shutil.which("coap-client-notls")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        COAP_CLIENT is None,
        reason="coap-client-notls not installed (Debian libcoap3-bin; `make test` installs it)",
    ),
]
INVALID = wire_example("invalid-readings.json")


async def coap_client(*arguments: str) -> tuple[str, str]:
    """Run coap-client-notls, bounded in time; return (stdout, stderr)."""
    assert COAP_CLIENT is not None
    process = await asyncio.create_subprocess_exec(
        COAP_CLIENT,
        "-B",
        "5",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=15)
    return stdout.decode(), stderr.decode()


async def test_valid_reading_put_and_get_refused(consumer: Consumer) -> None:
    body = json.dumps(wire_example("reading-250bar.json"))
    out, err = await coap_client("-m", "put", "-t", "50", "-e", body, reading_uri(consumer))
    assert json.loads(out)["moles"] == pytest.approx(504.2443, abs=1e-3), err
    _, err = await coap_client("-m", "get", reading_uri(consumer))
    assert err.strip().startswith("4.05")  # the read side is off by default (docs/security.md)


@pytest.mark.parametrize("case", INVALID, ids=[c["name"] for c in INVALID])
async def test_invalid_reading_gets_documented_code(consumer: Consumer, case: dict[str, str]) -> None:
    out, err = await coap_client("-m", "put", "-t", "50", "-e", case["payload"], reading_uri(consumer))
    # libcoap prints an error response as "<code> <diagnostic payload>" on stderr.
    assert err.strip().startswith(case["code"]), (out, err)
    assert case["diagnostic_contains"] in err
    assert (await consumer.store.summary()).readings == 0


async def test_text_plain_is_415(consumer: Consumer) -> None:
    _, err = await coap_client("-m", "put", "-t", "0", "-e", "250 bar", reading_uri(consumer))
    assert err.strip().startswith("4.15")


async def test_wrong_method_and_path(consumer: Consumer) -> None:
    _, err = await coap_client("-m", "post", reading_uri(consumer))
    assert err.strip().startswith("4.05")
    _, err = await coap_client("-m", "get", f"coap://127.0.0.1:{consumer.port}/elsewhere")
    assert err.strip().startswith("4.04")


async def test_discovery(consumer: Consumer) -> None:
    out, _ = await coap_client("-m", "get", f"coap://127.0.0.1:{consumer.port}/.well-known/core")
    assert "</health>" in out and "meters" not in out
