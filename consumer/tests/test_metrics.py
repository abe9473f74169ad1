"""The metrics object: what each call shows in the exposition, parsed back with prometheus_client's parser."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from smartgas_consumer import __version__, error
from smartgas_consumer.intake import rejection_reason
from smartgas_consumer.metrics import (
    ACK_LATENCY_BUCKETS_S,
    COMMIT_READINGS_BUCKETS,
    REJECTION_REASONS,
    Metrics,
)
from smartgas_consumer.store import CommitResult, SequenceOutcome, StoreSummary, format_timestamp


def samples(metrics: Metrics) -> list[Sample]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return [sample for family in text_string_to_metric_families(body.decode()) for sample in family.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    matching = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(matching) == 1, f"{name}{labels}: {len(matching)} samples"
    return matching[0]


def buckets(metrics: Metrics, name: str) -> dict[float, float]:
    """Cumulative count per upper bound ``le`` of a histogram."""
    return {float(s.labels["le"]): s.value for s in samples(metrics) if s.name == f"{name}_bucket"}


def test_readings_by_outcome() -> None:
    metrics = Metrics()
    for _ in range(5):
        metrics.reading_received()
    metrics.reading_stored(CommitResult(SequenceOutcome.FIRST, 500.0, 0))
    metrics.reading_stored(CommitResult(SequenceOutcome.GAP, 499.0, 0, missing=3))
    metrics.reading_stored(CommitResult(SequenceOutcome.REBOOT, 498.0, 1))
    metrics.reading_stored(CommitResult(SequenceOutcome.DUPLICATE, 498.0, 1))
    metrics.reading_rejected("invalid_reading")
    assert value(metrics, "smartgas_readings_received_total") == 5
    assert value(metrics, "smartgas_readings_stored_total") == 3
    assert value(metrics, "smartgas_readings_duplicate_total") == 1
    assert value(metrics, "smartgas_readings_missing_total") == 3
    assert value(metrics, "smartgas_meter_reboots_total") == 1
    assert value(metrics, "smartgas_readings_rejected_total", reason="invalid_reading") == 1


def test_every_rejection_reason_exists_from_the_start_and_others_are_bounded() -> None:
    metrics = Metrics()
    for reason in REJECTION_REASONS:
        assert value(metrics, "smartgas_readings_rejected_total", reason=reason) == 0
    metrics.reading_rejected("something_new")
    assert value(metrics, "smartgas_readings_rejected_total", reason="other") == 1
    reasons = {s.labels["reason"] for s in samples(metrics) if s.name == "smartgas_readings_rejected_total"}
    assert reasons == {*REJECTION_REASONS, "other"}


@pytest.mark.parametrize(
    "error_class",
    [
        error.InvalidReading,
        error.InvalidMeterId,
        error.PayloadTooLarge,
        error.UnsupportedFormat,
        error.StoreUnavailable,
    ],
)
def test_reasons_are_the_names_the_intake_gives(error_class: type[Exception]) -> None:
    instance = error_class("why", 1024) if error_class is error.PayloadTooLarge else error_class("why")
    assert rejection_reason(instance) in REJECTION_REASONS


def test_ack_latency_histogram_buckets() -> None:
    metrics = Metrics()
    for seconds in (0.0004, 0.0021, 0.004, 0.09, 0.2, 3.0):
        metrics.ack_latency(seconds)
    counts = buckets(metrics, "smartgas_ack_latency_seconds")
    assert sorted(counts) == [*ACK_LATENCY_BUCKETS_S, float("inf")]
    assert ACK_LATENCY_BUCKETS_S[0] == 0.001 and ACK_LATENCY_BUCKETS_S[-1] == 1.0
    assert 0.1 in ACK_LATENCY_BUCKETS_S  # aiocoap's empty-ACK delay is a bucket edge
    assert counts[0.001] == 1
    assert counts[0.003] == 2
    assert counts[0.005] == 3
    assert counts[0.1] == 4
    assert counts[0.25] == 5
    assert counts[1.0] == 5
    assert counts[float("inf")] == 6
    assert value(metrics, "smartgas_ack_latency_seconds_count") == 6
    assert value(metrics, "smartgas_ack_latency_seconds_sum") == pytest.approx(3.2965)


def test_commit_has_the_store_hook_signature_and_fills_both_histograms() -> None:
    metrics = Metrics()
    on_commit = metrics.commit  # ReadingStore(on_commit=metrics.commit) calls it with (rows, seconds)
    on_commit(1, 0.0008)
    on_commit(40, 0.004)
    sizes = buckets(metrics, "smartgas_store_commit_readings")
    assert sorted(sizes) == [*map(float, COMMIT_READINGS_BUCKETS), float("inf")]
    assert sizes[1.0] == 1 and sizes[32.0] == 1 and sizes[64.0] == 2
    assert value(metrics, "smartgas_store_commit_readings_sum") == 41
    latency = buckets(metrics, "smartgas_store_commit_duration_seconds")
    assert latency[0.001] == 1 and latency[0.005] == 2
    assert value(metrics, "smartgas_store_commit_duration_seconds_count") == 2


def test_shipping_counters_are_per_sink() -> None:
    metrics = Metrics()
    metrics.shipped("readings", 500)
    metrics.shipped("readings", 20)
    metrics.dead_lettered("readings", 2)
    metrics.retried("alerts", 4)
    metrics.ship_failure("alerts")
    assert value(metrics, "smartgas_sink_shipped_records_total", sink="readings") == 520
    assert value(metrics, "smartgas_sink_shipped_records_total", sink="alerts") == 0  # present from the start
    assert value(metrics, "smartgas_sink_dead_lettered_records_total", sink="readings") == 2
    assert value(metrics, "smartgas_sink_retried_records_total", sink="alerts") == 4
    assert value(metrics, "smartgas_sink_request_failures_total", sink="alerts") == 1
    assert value(metrics, "smartgas_sink_request_failures_total", sink="readings") == 0


def test_refresh_sets_shipping_lag_and_store_gauges_from_a_summary() -> None:
    metrics = Metrics()
    now = datetime(2026, 11, 23, 8, 0, 0, tzinfo=UTC)
    oldest = format_timestamp(now - timedelta(seconds=42.5))
    metrics.refresh(StoreSummary(1000, 3, format_timestamp(now), 17, oldest, 2), now)
    assert value(metrics, "smartgas_sink_pending_records", sink="readings") == 17
    assert value(metrics, "smartgas_sink_oldest_pending_age_seconds", sink="readings") == pytest.approx(42.5)
    assert value(metrics, "smartgas_store_readings") == 1000
    assert value(metrics, "smartgas_store_dead_letters") == 2
    metrics.refresh(StoreSummary(1000, 3, format_timestamp(now), 0, None, 2), now)
    assert value(metrics, "smartgas_sink_pending_records", sink="readings") == 0
    assert value(metrics, "smartgas_sink_oldest_pending_age_seconds", sink="readings") == 0


def test_shipping_lag_of_another_sink_and_never_negative() -> None:
    metrics = Metrics()
    metrics.set_shipping_lag(3, -0.2, sink="alerts")  # a clock step must not show a negative age
    assert value(metrics, "smartgas_sink_pending_records", sink="alerts") == 3
    assert value(metrics, "smartgas_sink_oldest_pending_age_seconds", sink="alerts") == 0


def test_meters_and_open_alerts() -> None:
    metrics = Metrics(alert_kinds=["offline", "leak"])
    assert value(metrics, "smartgas_alerts_open", kind="leak") == 0
    metrics.set_meters(online=7, known=9, total=10)
    assert value(metrics, "smartgas_meters_online") == 7
    assert value(metrics, "smartgas_meters_known") == 9
    assert value(metrics, "smartgas_meters_registered") == 10
    metrics.set_open_alerts({"offline": 2, "low_fill": 1})
    assert value(metrics, "smartgas_alerts_open", kind="offline") == 2
    assert value(metrics, "smartgas_alerts_open", kind="low_fill") == 1
    metrics.set_open_alerts({"leak": 1})  # the others resolved: 0, not their last value
    assert value(metrics, "smartgas_alerts_open", kind="offline") == 0
    assert value(metrics, "smartgas_alerts_open", kind="low_fill") == 0
    assert value(metrics, "smartgas_alerts_open", kind="leak") == 1


def test_two_instances_share_nothing() -> None:
    first, second = Metrics(), Metrics()
    assert first.registry is not second.registry
    first.reading_received()
    first.shipped("readings", 3)
    first.set_meters(1, 1, 1)
    assert value(first, "smartgas_readings_received_total") == 1
    assert value(second, "smartgas_readings_received_total") == 0
    assert value(second, "smartgas_sink_shipped_records_total", sink="readings") == 0
    assert value(second, "smartgas_meters_online") == 0


def test_version_info() -> None:
    assert value(Metrics(), "smartgas_consumer_info", version=__version__) == 1


@pytest.mark.skipif(sys.platform != "linux", reason="ProcessCollector reads /proc, which only Linux has")
def test_process_cpu_and_memory_of_this_process() -> None:
    metrics = Metrics()
    assert value(metrics, "process_cpu_seconds_total") > 0
    assert value(metrics, "process_resident_memory_bytes") > 1_000_000
    assert value(metrics, "process_start_time_seconds") > 1_600_000_000
    names = {s.name for s in samples(Metrics(process=False))}
    assert not any(name.startswith(("process_", "python_")) for name in names)


def test_render_negotiates_openmetrics() -> None:
    metrics = Metrics()
    metrics.reading_received()
    text, content_type = metrics.render(None)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"smartgas_readings_received_total 1.0" in text
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
