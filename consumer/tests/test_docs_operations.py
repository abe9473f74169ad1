"""docs/operations.md against the running consumer: its status line example has the real line's shape."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from conftest import reading_uri
from smartgas_consumer.config import ConsumerConfig
from smartgas_consumer.server import Consumer

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"

pytestmark = pytest.mark.integration


def shape(line: str) -> list[str]:
    """A status line with its numbers taken out: keys, order and punctuation are what must agree."""
    message = line.split("smartgas_consumer.server: ", 1)[1]
    return re.findall(r"[a-z_]+=|\(|\)|\S+:", re.sub(r"=[0-9.]+s?|=-", "=", message))


def documented_lines() -> dict[str, str]:
    block = OPERATIONS.read_text().split("## Logs", 1)[1].split("```")[1]
    lines = [line for line in block.splitlines() if "smartgas_consumer.server:" in line]
    return {line.split("smartgas_consumer.server: ")[1].split(":")[0]: line for line in lines}


async def test_status_line_example_has_the_shape_of_a_real_status_line(
    consumer_config: ConsumerConfig, coap: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    config = dataclasses.replace(consumer_config, status_interval_s=0.2)
    consumer = Consumer(config)
    await consumer.start()
    try:
        bad = aiocoap.Message(code=Code.PUT, uri=reading_uri(consumer), payload=b'{"seq": -1}', content_format=50)
        answer = await asyncio.wait_for(coap.request(bad).response, 10)
        assert answer.code == Code.BAD_REQUEST
        with caplog.at_level(logging.INFO, logger="smartgas_consumer.server"):
            async with asyncio.timeout(30):
                while not any("rejected=1" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
    real = next(r.getMessage() for r in caplog.records if "rejected=1" in r.getMessage())
    documented = documented_lines()
    assert shape(documented["status"]) == shape(f"smartgas_consumer.server: {real}")
    assert "(invalid_reading=" in real and "(invalid_reading=" in documented["status"]
