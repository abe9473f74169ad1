"""Unit tests of the CoAP edge's own logic: the refusal log's limits (per host, in all, in memory)."""

from __future__ import annotations

import logging

import pytest

from smartgas_consumer.error import InvalidReading
from smartgas_consumer.resource import RefusalLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_host_per_interval_with_a_count_of_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smartgas_consumer.resource")
    clock = Clock()
    log = RefusalLog(interval_s=10, clock=clock)
    assert [log.refused("10.0.0.7", "m1", InvalidReading("bad")) for _ in range(5)] == [True] + [False] * 4
    clock.now = 10.0
    assert log.refused("10.0.0.7", "m1", InvalidReading("bad"))
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2 and "(4 more refusal(s) from this peer not logged)" in lines[1]


def test_many_hosts_share_a_budget_and_a_bounded_memory() -> None:
    clock = Clock()
    log = RefusalLog(interval_s=10, max_lines=20, max_peers=100, clock=clock)
    logged = sum(log.refused(f"10.0.{i // 256}.{i % 256}", "m1", InvalidReading("bad")) for i in range(5000))
    assert logged == 20
    assert log.hosts_remembered == 100
